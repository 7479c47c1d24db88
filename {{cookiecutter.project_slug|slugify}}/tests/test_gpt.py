"""The GPT part: the network and its cache, the corpus and its tokenizers, the one-line errors,
and `fit` / `validate` / `generate` from the command line on a small text with Chinese in it."""

import random
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import PRESETS, probes, summary, train
from torch._dynamo.utils import counters

from {{ cookiecutter.package_name }}.cli import main, parsed_config, run
from {{ cookiecutter.package_name }}.data.corpus import CorpusDataModule
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.generate import main as generate
from {{ cookiecutter.package_name }}.models.gpt import GPT, Block, sample
from {{ cookiecutter.package_name }}.models.lm import GPTModule

CONFIG = ROOT / "configs" / "gpt_char.yaml"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "我们", "学习", "语言", "模型", "。"]
# A run small enough for a test: the config's recipe with a tiny network and few steps.
TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--model.warmup_steps=2", "--model.lr=0.02",
        "--model.sample_tokens=12", "--data.block_size=16", "--data.batch_size=4", "--trainer.max_steps=24",
        "--trainer.val_check_interval=12", "--trainer.limit_val_batches=3", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]  # fmt: skip


def write_text(path: Path, lines: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines)), encoding="utf-8")
    return path


def test_generation_with_the_cache_equals_generation_without_it():
    torch.manual_seed(0)
    net = GPT(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16).eval()
    prompt = torch.randint(0, 40, (2, 5))
    # 30 new tokens: past the 12-token context, where the cached context is rebuilt.
    runs = [
        torch.cat(list(net.generate(prompt, 30, 1.0, None, None, use_cache, torch.Generator().manual_seed(3))), 1)
        for use_cache in (True, False, True)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    full, _ = net(prompt)
    _, cache = net(prompt[:, :4])
    step, _ = net(prompt[:, 4:], cache)
    torch.testing.assert_close(step[:, 0], full[:, 4])
    other = torch.cat(list(net.generate(prompt, 30, 1.0, None, None, True, torch.Generator().manual_seed(4))), 1)
    assert not torch.equal(other, runs[0])  # the seed matters


def test_attention_is_causal_and_the_head_is_tied():
    net = GPT(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8).eval()
    x = torch.randint(0, 30, (1, 8))
    changed = x.clone()
    changed[0, 5] = (x[0, 5] + 1) % 30
    a, b = net(x)[0], net(changed)[0]
    torch.testing.assert_close(a[:, :5], b[:, :5])  # a later token never changes earlier logits
    assert not torch.allclose(a[:, 5], b[:, 5])
    assert net.lm_head.weight is net.transformer.wte.weight


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 2, None, g).item() for _ in range(200)} == {0, 1}
    assert {sample(logits, 1.0, None, 0.7, g).item() for _ in range(200)} == {0, 1}  # 0.5 + 0.3 reach 0.7
    assert sample(logits, 0.0, None, None).item() == 0


def test_char_tokenizer_reads_chinese_as_characters_and_caches_the_ids(tmp_path):
    text = write_text(tmp_path / "zh.txt")
    data = CorpusDataModule(str(text), block_size=16)
    assert "学" in data.vocab["chars"] and "习" in data.vocab["chars"]
    assert data.vocab_size == len(set(text.read_text(encoding="utf-8")))
    data.prepare_data()
    data.setup("fit")
    ids = torch.cat([data.ids["train"], data.ids["val"]])
    assert data.tokenizer.decode(ids.tolist()) == text.read_text(encoding="utf-8")
    assert len(data.ids["val"]) == int(len(ids) * 0.1)  # the last tenth, held out
    cached = list((tmp_path / "zh.txt.cache").glob("tokens-*.npy"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = CorpusDataModule(str(text), block_size=16)
    again.prepare_data()
    assert cached[0].stat().st_mtime_ns == stamp  # read back, not written again
    write_text(text, seed=1)  # a changed text: new ids
    changed = CorpusDataModule(str(text), block_size=16)
    changed.prepare_data()
    assert len(list((tmp_path / "zh.txt.cache").glob("tokens-*.npy"))) == 2
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == y.shape == (12, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_bpe_tokenizer_round_trips_the_text(tmp_path):
    text = write_text(tmp_path / "zh.txt")
    data = CorpusDataModule(str(text), tokenizer="bpe", bpe_vocab_size=300, block_size=8)
    assert data.vocab["kind"] == "bpe" and data.vocab_size <= 300
    ids = data.tokenizer.encode("我们学习语言模型。")
    assert data.tokenizer.decode(ids) == "我们学习语言模型。"


@pytest.mark.parametrize(
    "content, block, message",
    [
        (b"", 16, "the corpus is empty"),
        ("短文本".encode(), 16, "too few for samples of block_size + 1 = 17"),
        ("好的".encode() + b"\xff\xfe rest", 4, "not UTF-8 at byte 6"),
    ],
)
def test_corpus_mistakes_are_one_error_line(tmp_path, capsys, content, block, message):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={CONFIG}", *TINY, f"--data.path={corpus}", f"--data.block_size={block}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ERROR: ") and message in err[-1] and str(corpus) in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(UserError, match="n_embd=10 is not divisible by --model.n_head=4"):
        GPTModule(vocab_size=10, n_embd=10, n_head=4)


def test_fit_validate_and_generate_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = write_text(tmp_path / "zh.txt")
    main(["fit", f"--config={CONFIG}", *TINY, f"--data.path={corpus}"])
    run = tmp_path / "logs" / "gpt_char" / "version_0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    found = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    found.Reload()
    losses = [e.value for e in found.Scalars("val/loss")]
    assert len(losses) == 2 and losses[-1] < 0.9 * torch.log(torch.tensor(len(set(corpus.read_text())))).item()
    assert "val/sample/text_summary" in found.Tags()["tensors"]
    capsys.readouterr()

    main(["validate", f"--config={CONFIG}", *TINY, f"--data.path={corpus}", "--ckpt_path=best"])
    assert "val/loss" in capsys.readouterr().out

    args = ["--config", str(CONFIG), "--prompt", "我们", "--max_new_tokens", "40", "--top_k", "5", "--seed", "7"]
    texts = []
    for extra in ([], [], ["--no_cache"]):
        generate([*args, *extra])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2]  # the same seed: the same text, with or without the cache
    assert texts[0].startswith("我们") and len(texts[0].rstrip("\n")) == 42
    assert set(texts[0]) <= set(corpus.read_text()) | {"\n"}

    with pytest.raises(SystemExit):
        generate([*args[:2], "--prompt", "Zebra"])  # Z, b and r are not in the text
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR: --prompt='Zebra' has characters the char vocabulary lacks ('Zbr')")


def test_generate_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    other = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 10, "backbone": "mlp"}}, other)
    with pytest.raises(SystemExit):
        generate(["--ckpt_path", str(other)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR: ") and str(other) in err and "not of a GPT" in err


@pytest.mark.slow  # compiling on the CPU: about 50 s on 2 busy cores (10 s with inductor's cache warm)
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_compile_trains_as_the_plain_network_and_saves_its_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = write_text(tmp_path / "zh.txt")
    args = ["fit", f"--config={CONFIG}", *TINY, f"--data.path={corpus}", "--trainer.max_steps=6",
            "--trainer.val_check_interval=6", "--trainer.log_every_n_steps=3"]  # fmt: skip
    plain = run([*args, "--model.compile=false", "--trainer.logger.init_args.version=plain"])
    counters.clear()
    compiled = run([*args, "--model.compile=true", "--trainer.logger.init_args.version=compiled"])
    assert counters["stats"]["unique_graphs"] >= 1  # the steps ran through torch.compile
    for name in ("train/loss", "val/loss"):  # the same arithmetic, up to the order of float operations
        torch.testing.assert_close(
            compiled.trainer.callback_metrics[name], plain.trainer.callback_metrics[name], rtol=1e-4, atol=1e-4
        )
    # The checkpoint holds the plain network's names (no _orig_mod.): it loads into an uncompiled GPT.
    runs = tmp_path / "logs" / "gpt_char"
    saved = {v: torch.load(runs / v / "checkpoints" / "last.ckpt", weights_only=True) for v in ("plain", "compiled")}
    assert saved["compiled"]["state_dict"].keys() == saved["plain"]["state_dict"].keys()
    hparams = {k: v for k, v in saved["compiled"]["hyper_parameters"].items() if not k.startswith("_")}
    model = GPTModule(**{**hparams, "compile": False})
    model.configure_model()
    model.load_state_dict(saved["compiled"]["state_dict"])
    for name, value in saved["plain"]["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-3, atol=1e-4)


def test_the_fsdp_preset_shards_and_checkpoints_gpt_blocks(tmp_path):
    """The preset names the ViT's block; the GPT puts its own in its place (the run itself needs a GPU:
    test_distributed.py, pytest -m gpu)."""
    configs = ROOT / "configs"
    config = parsed_config(["fit", f"--config={configs / 'gpt_small.yaml'}",
                            f"--config={configs / 'trainer' / 'fsdp.yaml'}", f"--data.path={tmp_path}"])  # fmt: skip
    GPTModule.prepare_run(config)
    policies = config.trainer.strategy.init_args
    assert policies.auto_wrap_policy == policies.activation_checkpointing_policy == {Block}


def plain_gpt(checkpoint: Path) -> GPTModule:
    """The checkpoint (loaded as plain values) in a GPT built without any strategy: every weight, no extra name."""
    ckpt = torch.load(checkpoint, weights_only=True)
    model = GPTModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    model.configure_model()
    model.load_state_dict(ckpt["state_dict"])
    return model


@pytest.mark.gpu
@pytest.mark.usefixtures("probe_importable")
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FSDP needs an NVIDIA GPU: Lightning's FSDPStrategy refuses accelerator=cpu (run pytest -m gpu on a GPU)",
)
def test_fsdp_preset_shards_and_checkpoints_each_gpt_block(workdir):
    """configs/gpt_small.yaml with the FSDP preset, shrunk: the GPT's Block (not the preset's ViT block) is the unit."""
    corpus, n_layer = write_text(workdir / "zh.txt"), 2
    result = train(
        "fit", f"--config={ROOT / 'configs' / 'gpt_small.yaml'}", f"--config={PRESETS / 'fsdp.yaml'}",
        "--trainer.devices=1", f"--data.path={corpus}", "--data.tokenizer=char", "--data.streaming=false",
        "--data.num_workers=0", "--data.block_size=32", "--data.batch_size=4", f"--model.n_layer={n_layer}",
        "--model.n_head=2", "--model.n_embd=32", "--model.compile=false", "--model.warmup_steps=2",
        "--model.sample_tokens=8", "--trainer.max_steps=4", "--trainer.accumulate_grad_batches=1",
        "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=probe.Probe", cwd=workdir,
    )  # fmt: skip
    assert summary(result.stdout)[0].endswith("; precision bf16-mixed; strategy fsdp")
    (record,) = probes(workdir)
    assert record["modules"]["FullyShardedDataParallel"] == n_layer + 1  # one unit per block, one for the rest
    assert record["modules"]["CheckpointWrapper"] == n_layer
    checkpoints = workdir / "logs" / "gpt_small" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert all(p.is_file() for p in checkpoints.iterdir())  # whole files, not sharded folders
    assert plain_gpt(checkpoints / "last.ckpt").model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)
