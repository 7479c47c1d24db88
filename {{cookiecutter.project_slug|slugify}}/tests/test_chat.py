"""Chat fine-tuning end to end with a tiny random Llama written by the tests (no network): fit with
LoRA and in full through train.py's CLI, small checkpoints loaded with weights_only=True, validate
from a checkpoint, exact resume, generate, the Hugging Face export in plain transformers{% if cookiecutter.gpt == "yes" or cookiecutter.export == "yes" %} (also
through{% if cookiecutter.gpt == "yes" %} generate{% endif %}{% if cookiecutter.gpt == "yes" and cookiecutter.export == "yes" %} and{% endif %}{% if cookiecutter.export == "yes" %} export --format hf{% endif %}){% endif %}, FSDP's unit, errors."""

from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_cli
from jsonargparse import dict_to_namespace
from lightning.pytorch.callbacks import Callback

pytest.importorskip("transformers", reason="the chat extra is not installed: pip install -e '.[chat]'")
pytest.importorskip("peft", reason="the chat extra is not installed: pip install -e '.[chat]'")

from chatdata import CONVERSATIONS, tiny_chat_model, write_jsonl  # noqa: E402

from {{ cookiecutter.package_name }}.cli import run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture
def chats(tmp_path, monkeypatch) -> Path:
    """A data folder with train.jsonl (the conversations, 6 times over) and val.jsonl; the working directory."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", CONVERSATIONS, repeat=6)
    write_jsonl(folder / "val.jsonl", CONVERSATIONS)
    return folder


def sft(config: str, tiny: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / config), f"--model.model_name_or_path={tiny}", f"--data.path={data}",
        "--data.batch_size=4", "--model.lr=0.01", "--model.warmup_steps=0", "--model.sample_max_new_tokens=4",
        "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0", *QUIET, *extra,
    ]  # fmt: skip


def checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_lora_fit_writes_adapter_only_checkpoints_and_validate_reads_them(tiny, chats, capsys):
    run_cli("fit", *sft("sft_lora.yaml", tiny, chats, "--trainer.max_epochs=3"))
    run = Path("logs/sft_lora/version_0")
    checkpoint = torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in checkpoint["state_dict"])
    template = checkpoint["hyper_parameters"]["chat_template"]
    assert "<|im_start|>" in template  # the tokenizer's template travels with the checkpoint
    capsys.readouterr()
    run_cli("validate", *sft("sft_lora.yaml", tiny, chats))
    base = capsys.readouterr().out
    run_cli("validate", *sft("sft_lora.yaml", tiny, chats, "--ckpt_path=best"))
    tuned = capsys.readouterr().out

    def val_loss(out: str) -> float:
        return float(next(line for line in out.splitlines() if "val/loss" in line).split()[-2])

    assert val_loss(tuned) < val_loss(base) - 0.5  # the conversations were learned


def test_full_fit_saves_every_weight(tiny, chats):
    run_cli("fit", *sft("sft_full.yaml", tiny, chats, "--trainer.max_epochs=1"))
    state = checkpoint_state(Path("logs/sft_full/version_0/checkpoints/last.ckpt"))
    assert any(k.endswith("embed_tokens.weight") for k in state) and not any("lora" in k for k in state)


class StopAfterFirstEpoch(Callback):
    """Ends the run after its first epoch, as a kill would (last.ckpt is written at each epoch's end)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_lora_resume_is_exact(tiny, chats):
    """Two epochs in one run, or stopped after one and resumed with --ckpt_path=last: the same adapters, bit
    for bit (the order of the conversations, LoRA's dropout, the optimizer and the schedule all resume)."""
    args = [*sft("sft_lora.yaml", tiny, chats, "--model.lora_dropout=0.2", "--model.sample_max_new_tokens=0"),
            "--trainer.max_epochs=2"]  # fmt: skip
    run(["fit", *args, "--trainer.logger.init_args.name=straight"])
    run(["fit", *args, "--trainer.logger.init_args.name=resumed"], callbacks=[StopAfterFirstEpoch()])
    run(["fit", *args, "--trainer.logger.init_args.name=resumed", "--ckpt_path=last"])
    straight = checkpoint_state(Path("logs/straight/version_0/checkpoints/last.ckpt"))
    resumed = checkpoint_state(Path("logs/resumed/version_0/checkpoints/last.ckpt"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_generate_and_export_to_a_plain_hugging_face_folder(tiny, chats, capsys):
    """chat_generate answers with the checkpoint's template; the exported folder, in plain transformers,
    has the checkpoint's logits and gives the same greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from {{ cookiecutter.package_name }}.chat_export import main as export_main
    from {{ cookiecutter.package_name }}.chat_generate import load_chat_model
    from {{ cookiecutter.package_name }}.chat_generate import main as generate_main

    run_cli("fit", *sft("sft_lora.yaml", tiny, chats, "--trainer.max_epochs=2"))
    capsys.readouterr()
    prompt = "What is two plus two?"
    assert generate_main(["--ckpt_path=best", "--prompt", prompt, "--temperature=0", "--max_new_tokens=8"]) == 0
    first, answer, *_ = capsys.readouterr().out.split("\n")
    assert first == f"> {prompt}" and answer.strip()

    assert export_main(["--ckpt_path=best", "--output", "exported"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    files = {p.name for p in Path("exported").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and not any("adapter" in f for f in files)
    model = AutoModelForCausalLM.from_pretrained("exported")  # plain transformers, no project code
    tokenizer = AutoTokenizer.from_pretrained("exported")
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    tuned = load_chat_model("best")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, tuned.model(**ids).logits, atol=1e-5, rtol=1e-5)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) == answer


{%- if cookiecutter.gpt == "yes" %}


def test_generate_answers_with_a_chat_checkpoint(tiny, chats, capsys):
    """`python -m ...generate` hands a chat checkpoint to chat_generate: the same answer, found through the
    run's --config (a GPT's default config has no chat runs: the error says to give it)."""
    from {{ cookiecutter.package_name }}.chat_generate import main as chat_main
    from {{ cookiecutter.package_name }}.generate import main as generate_main

    run_cli("fit", *sft("sft_lora.yaml", tiny, chats, "--trainer.max_epochs=2"))
    capsys.readouterr()
    options = ["--prompt", "What is two plus two?", "--temperature=0", "--max_new_tokens=8"]
    assert chat_main(["--ckpt_path=best", *options]) == 0
    expected = capsys.readouterr().out
    assert expected.startswith("> What is two plus two?\n") and expected.split("\n")[1].strip()
    with pytest.raises(SystemExit) as exit_:
        generate_main(["--config", str(ROOT / "configs" / "sft_lora.yaml"), "--ckpt_path=best", *options])
    assert exit_.value.code == 0 and capsys.readouterr().out == expected
    with pytest.raises(SystemExit) as exit_:
        generate_main(["--ckpt_path=best", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1
    assert err[0].startswith("ERROR: --ckpt_path=best: no best checkpoint under logs/gpt_char")
    assert err[0].endswith("or give the --config of the run, e.g. configs/sft_lora.yaml)")
{%- endif %}
{%- if cookiecutter.export == "yes" %}


def test_export_format_hf_writes_the_chat_model_as_a_hugging_face_folder(tiny, chats, capsys):
    """`python -m ...export --format hf` hands a chat checkpoint to chat_export (default folder: beside the
    checkpoint); another format for a chat model, or hf for another model, is one ERROR line."""
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }} import export
    from {{ cookiecutter.package_name }}.chat_generate import load_chat_model

    run_cli("fit", *sft("sft_lora.yaml", tiny, chats, "--trainer.max_epochs=1"))
    best = Path("logs/sft_lora/version_0/checkpoints/best.ckpt")
    capsys.readouterr()
    assert export.main(["--ckpt_path=best", "--format=hf"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    folder = best.with_name("best-hf")
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits  # plain transformers
        torch.testing.assert_close(exported, load_chat_model(str(best)).model(input_ids=ids).logits)

    assert export.main(["--ckpt_path", str(best)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ERROR: --ckpt_path={best}: a chat model is exported as a Hugging Face folder: give --format hf"
    ]
    other = Path("classifier.ckpt")
    torch.save({"state_dict": {"head.weight": torch.zeros(2, 3)}, "hyper_parameters": {"num_classes": 2}}, other)
    assert export.main(["--ckpt_path", str(other), "--format=hf"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ERROR: --format hf: {other} is not a chat model's checkpoint (configs/sft_lora.yaml, sft_full.yaml); "
        "export this model with --format exported_program, torchscript, onnx"
    ]
{%- endif %}


def fsdp_run(tiny: Path, strategy: dict) -> object:
    """A parsed run of configs/sft_lora.yaml with the tiny model and `strategy` as trainer.strategy."""
    return dict_to_namespace({
        "model": {"class_path": "ChatModel", "init_args": {"model_name_or_path": str(tiny)}},
        "data": {"class_path": "ChatDataModule", "init_args": {"tokenizer": None}},
        "trainer": {"strategy": strategy},
    })  # fmt: skip


def test_fsdp_preset_shards_the_decoder_by_its_layer_class(tiny):
    """configs/trainer/fsdp.yaml names the ViT's Block; a chat run replaces it with the model's decoder layer
    (as the text part does for the encoder), for sharding and activation checkpointing (no GPU needed)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from {{ cookiecutter.package_name }}.models.chat import ChatModel

    preset = yaml.safe_load((ROOT / "configs" / "trainer" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    config = fsdp_run(tiny, preset)
    ChatModel.prepare_run(config)
    init = config.trainer.strategy.init_args
    assert init.auto_wrap_policy == {LlamaDecoderLayer} and init.activation_checkpointing_policy == {LlamaDecoderLayer}
    assert init.use_orig_params is True  # LoRA: frozen and trained weights in one unit
    assert config.data.init_args.tokenizer == str(tiny)
    preset["init_args"]["activation_checkpointing_policy"] = []  # the preset's way to keep activations
    config = fsdp_run(tiny, preset)
    ChatModel.prepare_run(config)
    assert config.trainer.strategy.init_args.activation_checkpointing_policy == []
    config = fsdp_run(tiny, {"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {}})
    ChatModel.prepare_run(config)
    assert "auto_wrap_policy" not in config.trainer.strategy.init_args  # other strategies are left alone


class CountModules(Callback):
    """Counts the classes of the wrapped model's modules when training starts (FSDP units, checkpoint wrappers)."""

    def __init__(self):
        self.counts = Counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.counts.update(type(m).__name__ for m in trainer.strategy.model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FSDP needs an NVIDIA GPU: Lightning's FSDPStrategy refuses accelerator=cpu (run pytest -m gpu on a GPU)",
)
def test_fsdp_preset_fine_tunes_with_lora_one_unit_per_decoder_layer(tiny, chats):
    presets = ROOT / "configs" / "trainer"
    counter = CountModules()
    try:
        run(
            ["fit", *sft("sft_lora.yaml", tiny, chats, "--trainer.max_epochs=1", f"--config={presets / 'gpu.yaml'}",
                         f"--config={presets / 'fsdp.yaml'}", "--trainer.devices=1")],
            callbacks=[counter],
        )  # fmt: skip
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next tests run without a process group
    layers = 2  # tiny_chat_model's
    assert counter.counts["FullyShardedDataParallel"] == layers + 1  # one unit per decoder layer, one for the rest
    assert counter.counts["CheckpointWrapper"] == layers
    state = checkpoint_state(Path("logs/sft_lora/version_0/checkpoints/last.ckpt"))
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)  # whole adapters, no FSDP prefixes


{%- if cookiecutter.gpt == "yes" %}


def test_from_zero_a_gpt_of_this_project_becomes_a_chat_model(tiny, chats, capsys):
    """A GPT trained here on characters (gpt_char.yaml) -> gpt_to_hf -> a Hugging Face folder with the GPT's
    logits and token ids plus an EOS -> SFT of all weights learns the conversations -> it answers and exports."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from {{ cookiecutter.package_name }}.chat_export import main as export_main
    from {{ cookiecutter.package_name }}.chat_generate import main as chat_main
    from {{ cookiecutter.package_name }}.data.corpus import Tokenizer
    from {{ cookiecutter.package_name }}.gpt_to_hf import main as convert

    corpus = Path("corpus.txt")
    corpus.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS * 20), encoding="utf-8")
    run_cli(
        "fit", "--config", str(ROOT / "configs" / "gpt_char.yaml"), f"--data.path={corpus}", "--data.block_size=192",
        "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.sample_tokens=0",
        "--trainer.max_steps=8", "--trainer.val_check_interval=8", "--trainer.limit_val_batches=1", *QUIET,
    )  # fmt: skip
    gpt = Path("logs/gpt_char/version_0/checkpoints/last.ckpt")
    line = last_error(capsys, "fit", *sft("sft_full.yaml", gpt, chats))  # the checkpoint itself: not a folder
    assert line.startswith(f"ERROR: --model.model_name_or_path={gpt}: a checkpoint, not a Hugging Face model folder")
    assert f"gpt_to_hf --ckpt_path {gpt} --output" in line
    assert convert(["--ckpt_path", str(gpt), "--output", "my-gpt"]) == 0
    assert "max |logit difference| vs the checkpoint" in capsys.readouterr().out
    own = Tokenizer(torch.load(gpt, weights_only=True)["hyper_parameters"]["vocab"])
    tokenizer = AutoTokenizer.from_pretrained("my-gpt")
    text = "Say hello. 你好！"
    assert tokenizer(text)["input_ids"] == own.encode(text) and tokenizer.decode(own.encode(text)) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id >= own.vocab_size  # a token of its own
    assert "### Assistant:" in tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                             add_generation_prompt=True)  # fmt: skip

    def val_loss(*extra: str) -> float:
        capsys.readouterr()
        run_cli("validate", *sft("sft_full.yaml", Path("my-gpt"), chats, "--data.max_length=192", *extra))
        return float(next(line for line in capsys.readouterr().out.splitlines() if "val/loss" in line).split()[-2])

    run_cli("fit", *sft("sft_full.yaml", Path("my-gpt"), chats, "--data.max_length=192", "--trainer.max_epochs=3"))
    assert val_loss("--ckpt_path=best") < val_loss() - 0.5  # the conversations were learned
    assert chat_main(["--ckpt_path=best", "--prompt", "What is two plus two?", "--temperature=0",
                      "--max_new_tokens=40"]) == 0  # fmt: skip
    first, answer, *_ = capsys.readouterr().out.split("\n")
    assert first == "> What is two plus two?" and 0 < len(answer) < 40  # it answers, and stops at the EOS
    assert export_main(["--ckpt_path=best", "--output", "chat-gpt"]) == 0  # GPT-2 layout: plain transformers
    assert AutoModelForCausalLM.from_pretrained("chat-gpt").config.model_type == "gpt2"
{%- endif %}


def last_error(capsys, *args: str) -> str:
    """The one line a user mistake prints, after checking the exit code and that no traceback came."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(*args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_hostile_jsonl_is_one_error_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[0], {"instruction": "no answer"}])
    line = last_error(capsys, "fit", *sft("sft_lora.yaml", tiny, data))
    assert line == f"ERROR: {data}:2: no text 'output' (an Alpaca record needs instruction and output)"


def test_missing_model_and_checkpoint_errors(tmp_path, chats, capsys, monkeypatch):
    from {{ cookiecutter.package_name }}.chat_generate import main as generate_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = last_error(capsys, "fit", *sft("sft_lora.yaml", tmp_path / "nowhere", chats))
    assert line.startswith(f"ERROR: {tmp_path / 'nowhere'}: no such folder, and HF_HUB_OFFLINE=1 forbids")
    assert generate_main(["--ckpt_path=best", "--prompt=hi"]) == 1
    assert capsys.readouterr().err.startswith("ERROR: --ckpt_path=best: no best checkpoint under logs")
