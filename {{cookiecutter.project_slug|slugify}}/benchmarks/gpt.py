"""The GPT part against a hand-written PyTorch loop, and peak memory. Prints tables; asserts nothing.

    python benchmarks/gpt.py --corpus fortunes.txt                # configs/gpt_char.yaml, 2,000 steps
    python benchmarks/gpt.py --corpus fortunes.txt --steps 500 --repeats 1
    python benchmarks/gpt.py --corpus fortunes.txt --memory-only  # the memory table's rows

In one process, alternating, --repeats rounds of:
  (a) a hand-written loop: the same network (models/gpt.py), the same batches in the same order
      (data/corpus.py's loader), AdamW and schedule (models/lm.py), gradient clipping at 1.0;
  (b) `train.py fit --config configs/gpt_char.yaml` with its logger, checkpoints and progress bar.
Both start from seed 42 and run --steps optimizer steps. Tokens/s counts the training steps
after the first 10 (warm-up) up to the last one, validation excluded. The validation loss of
each is the mean over the same 20 held-out batches after the last step.

Memory (--memory or --memory-only): each config trains --memory-steps steps in a fresh process; its
peak resident memory (CPU) and, on a GPU, torch.cuda.max_memory_allocated are printed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data.corpus import CorpusDataModule
from {{ cookiecutter.package_name }}.models.gpt import GPT
from {{ cookiecutter.package_name }}.models.lm import optimizer_and_schedule

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 10  # steps not timed


class StepTimes(Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, *args):
        self.times.append(time.perf_counter())


def settings(config: Path) -> tuple[dict, dict]:
    found = yaml.safe_load(config.read_text())
    return found["model"]["init_args"], found["data"]["init_args"]


def handwritten(corpus: str, config: Path, steps: int, device: str) -> tuple[float, float]:
    """Tokens/s and the final validation loss of a plain loop over the config's network and data."""
    model_args, data_args = settings(config)
    L.seed_everything(42, verbose=False)
    data = CorpusDataModule(**{**data_args, "path": corpus})
    data.prepare_data()
    data.setup("fit")
    h = SimpleNamespace(**model_args)
    net = GPT(data.vocab_size, data.block_size, h.n_layer, h.n_head, h.n_embd, h.dropout, h.bias).to(device)
    optimizer, schedule = optimizer_and_schedule(net, h, steps)
    times, step = [], 0
    net.train()
    while step < steps:
        for x, y in data.train_dataloader():
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(net(x)[0].flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 10 == 0:
                loss.item()  # what logging costs: the loss to the host
            times.append(time.perf_counter())
            if step == steps:
                break
    net.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(net(x.to(device))[0].flatten(0, 1), y.to(device).flatten()).item()
            for _, (x, y) in zip(range(20), data.val_dataloader())
        ]
    tokens = (steps - WARMUP) * data.batch_size * data.block_size
    return tokens / (times[-1] - times[WARMUP - 1]), sum(losses) / len(losses)


def ours(corpus: str, config: Path, steps: int, device: str, logs: str) -> tuple[float, float]:
    timer = StepTimes()
    accelerator = "gpu" if device == "cuda" else "cpu"
    cli = run(["fit", f"--config={config}", f"--data.path={corpus}", f"--trainer.max_steps={steps}",
               f"--trainer.val_check_interval={steps}", f"--trainer.accelerator={accelerator}",
               f"--trainer.logger.init_args.save_dir={logs}"], callbacks=[timer])  # fmt: skip
    data = cli.datamodule
    tokens = (steps - WARMUP) * data.batch_size * data.block_size
    return tokens / (timer.times[-1] - timer.times[WARMUP - 1]), float(cli.trainer.callback_metrics["val/loss"])


def memory_row(corpus: str, config: Path, steps: int, device: str, batch: int | None) -> dict:
    """Train `steps` steps of `config` in a fresh process; its parameters and peak memory."""
    code = (
        "import json, resource, sys, torch\n"
        "from {{ cookiecutter.package_name }}.cli import run\n"
        "cli = run(sys.argv[1:])\n"
        "m, d, t = cli.model, cli.datamodule, cli.trainer\n"
        "print('ROW', json.dumps({'params': sum(p.numel() for p in m.parameters()), 'context': d.block_size,\n"
        "  'batch': d.batch_size, 'precision': str(t.precision),\n"
        "  'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n"
        "  'gpu_mib': torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))\n"
    )
    with tempfile.TemporaryDirectory() as logs:
        args = [f"--config={config}", f"--data.path={corpus}", f"--trainer.max_steps={steps}",
                "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0", "--model.sample_tokens=0",
                f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={logs}", "--model.compile=false"]  # fmt: skip
        args += [f"--data.batch_size={batch}"] if batch else []
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}
        done = subprocess.run([sys.executable, "-c", code, "fit", *args], capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("ROW ")), None)
    if line is None:
        raise SystemExit(f"{config.name}: the memory run failed:\n{done.stderr[-2000:]}")
    return {"config": config.stem, **json.loads(line[4:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="a UTF-8 text file (e.g. the fortunes, README)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt_char.yaml"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--memory", action="store_true", help="also the memory table")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--small-batch", type=int, default=None, help="gpt_small's batch for the memory row")
    args = parser.parse_args()
    config = Path(args.config)
    if not args.memory_only:
        rows = {"hand-written": [], "ours": []}
        with tempfile.TemporaryDirectory() as logs:
            for _ in range(args.repeats):  # alternating, so that a busy machine slows both alike
                rows["hand-written"].append(handwritten(args.corpus, config, args.steps, args.device))
                rows["ours"].append(ours(args.corpus, config, args.steps, args.device, logs))
        print(f"\n{config.name}, {args.steps} steps, {args.device}, {torch.get_num_threads()} threads")
        print(f"{'loop':<14}{'tokens/s (each round)':<30}{'val/loss (each round)':<26}")
        for name, results in rows.items():
            speeds = ", ".join(f"{s:,.0f}" for s, _ in results)
            losses = ", ".join(f"{v:.3f}" for _, v in results)
            print(f"{name:<14}{speeds:<30}{losses:<26}")
        ratio = [o[0] / h[0] for o, h in zip(rows["ours"], rows["hand-written"])]
        print("ours / hand-written tokens/s: " + ", ".join(f"{r:.3f}" for r in ratio))
    if args.memory or args.memory_only:
        print(f"\npeak memory, {args.memory_steps} training steps, {args.device}")
        header = f"{'config':<12}{'parameters':>12}{'context':>9}{'batch':>7}  {'precision':<12}"
        print(f"{header}{'peak RSS':>10}{'GPU peak':>10}")
        for name, batch in (("gpt_char", None), ("gpt_small", args.small_batch)):
            r = memory_row(args.corpus, ROOT / "configs" / f"{name}.yaml", args.memory_steps, args.device, batch)
            gpu = f"{r['gpu_mib']:,.0f} MiB" if r["gpu_mib"] else "-"
            print(f"{name:<12}{r['params']:>12,}{r['context']:>9}{r['batch']:>7}  {r['precision']:<12}"
                  f"{r['rss_mib']:>6,.0f} MiB{gpu:>10}")  # fmt: skip


if __name__ == "__main__":
    main()
