"""Does starting from a pretrained checkpoint help with few labels? Prints a table; asserts nothing.

    python benchmarks/finetune.py                                      # Fashion-MNIST classes 0-4 -> 5-9
    python benchmarks/finetune.py --source mnist --target fashion_mnist
    python benchmarks/finetune.py --backbone mlp --samples-per-class 50 --seeds 1

First a network is pretrained on all training images of --source (--pretrain-epochs).
Then, on the same small labelled subset of --target (--samples-per-class images per class,
drawn with the seed), for --epochs epochs at --lr each and with the same seed:
  (a) from scratch;
  (b) fine-tuned: --model.init_from=<the pretrained checkpoint>, everything trained;
  (c) fine-tuned as configs/finetune.yaml does: only the head trains until epoch
      --unfreeze-at (default: a quarter of the epochs), then the backbone too, at a tenth
      of the learning rate;
  (d) LoRA adapters (rank 8) and the head only (backbone mlp or vit).
--pretrained PATH skips the pretraining and starts from that checkpoint (each run prints
where it saved its own). A dataset is `name` or `name:first-last` (a range of its classes,
relabelled from 0), e.g. `fashion_mnist:0-4`. The accuracy is that of the final weights on the whole test split of the
target classes (no model selection on validation data, which the few-label setting lacks);
each row is repeated for --seeds different subsets and seeds. Wall time: one `fit`, start-up
included.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from {{ cookiecutter.package_name }}.cli import run

ROOT = Path(__file__).resolve().parents[1]
BARE = [
    "--trainer.logger=false",
    "--trainer.callbacks=[]",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=0",
]
BACKBONES = {
    "cnn": ["--model.backbone=cnn", "--model.width=32", "--model.depth=2", "--model.lr=0.002"],
    "mlp": ["--model.backbone=mlp", "--model.width=256", "--model.depth=2", "--model.lr=0.001"],
    "vit": ["--model.backbone=vit", "--model.width=64", "--model.depth=2", "--model.heads=4", "--model.lr=0.001"],
}


def dataset(spec: str) -> list[str]:
    """`fashion_mnist:5-9` -> the data options selecting that dataset and classes."""
    name, _, classes = spec.partition(":")
    options = [f"--data.name={name}"]
    if classes:
        first, last = (int(c) for c in classes.split("-"))
        options.append(f"--data.classes=[{', '.join(str(c) for c in range(first, last + 1))}]")
    return options


def fit(args, data: list[str], extra: list[str], epochs: int, seed: int, lr: float | None = None):
    """One `train.py fit` in this process; returns the CLI object and the wall time."""
    start = time.perf_counter()
    cli = run(
        [
            "fit",
            f"--data.data_dir={args.data_dir}",
            f"--data.val_size={args.val_size}",
            f"--data.seed={seed}",
            f"--seed_everything={seed}",
            f"--trainer.max_epochs={epochs}",
            "--trainer.accelerator=cpu" if args.device == "cpu" else "--trainer.accelerator=gpu",
            *BACKBONES[args.backbone],
            *([f"--model.lr={lr}"] if lr else []),
            *BARE,
            *data,
            *extra,
        ]
    )
    return cli, time.perf_counter() - start


def accuracy_on_test(cli) -> float:
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return metrics["test/acc"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--source", default="fashion_mnist:0-4", help="pretraining data, e.g. mnist")
    parser.add_argument("--target", default="fashion_mnist:5-9", help="fine-tuning data, e.g. fashion_mnist")
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate of the runs on the target")
    parser.add_argument("--unfreeze-at", type=int, default=None, help="epoch of (c)'s unfreezing")
    parser.add_argument("--backbone", default="cnn", choices=sorted(BACKBONES))
    parser.add_argument("--pretrained", default=None, help="a checkpoint to start from instead of pretraining")
    parser.add_argument("--seeds", type=int, default=2, help="repeats, each with its own subset and seed")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    os.chdir(tempfile.mkdtemp(prefix="finetune-"))  # the pretrained checkpoint lands here

    if args.pretrained:
        pretrained, pretrain_time, source_acc = Path(args.pretrained).resolve(), float("nan"), float("nan")
    else:
        cli, pretrain_time = fit(args, dataset(args.source), [], args.pretrain_epochs, seed=0)
        pretrained = Path("pretrained.ckpt").resolve()
        cli.trainer.save_checkpoint(pretrained)
        source_acc = accuracy_on_test(cli)
    print(f"pretrained on {args.source}: test accuracy {source_acc:.4f}, {pretrain_time:.1f}s", flush=True)
    print(f"pretrained checkpoint: {pretrained}", flush=True)

    target = [*dataset(args.target), f"--data.samples_per_class={args.samples_per_class}"]
    init = ["--model.class_path={{ cookiecutter.package_name }}.models.FineTuner", f"--model.init_from={pretrained}"]
    unfreeze = args.unfreeze_at if args.unfreeze_at is not None else max(1, args.epochs // 4)
    rows = {
        "(a) from scratch": [],
        "(b) fine-tuned (init_from)": init,
        f"(c) head only, all from ep. {unfreeze}": [
            *init,
            "--model.freeze_backbone=true",
            f"--model.unfreeze_at_epoch={unfreeze}",
            "--model.backbone_lr_scale=0.1",
        ],
    }
    if args.backbone != "cnn":
        rows["(d) LoRA rank 8 + head"] = [*init, "--model.lora_rank=8", "--model.lora_alpha=16"]
    results = {name: [] for name in rows}
    for seed in range(1, args.seeds + 1):
        for name, extra in rows.items():
            cli, seconds = fit(args, target, extra, args.epochs, seed, args.lr)
            accuracy = accuracy_on_test(cli)
            results[name].append((accuracy, seconds))
            print(f"seed {seed}: {name}: test accuracy {accuracy:.4f}, {seconds:.1f}s", flush=True)

    labelled = len(cli.datamodule.splits["train"][1])
    tested = len(cli.datamodule.splits["test"][1])
    print(
        f"\n{args.source} -> {args.target}, backbone {args.backbone}, {args.samples_per_class} labelled images "
        f"per class ({labelled} in all), {args.epochs} epochs at lr {args.lr}, test on {tested} images, "
        f"{args.seeds} seed(s); "
        f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads"
    )
    if not args.pretrained:
        print(f"pretraining: {args.pretrain_epochs} epochs, {pretrain_time:.1f}s, test accuracy {source_acc:.4f}")
    print(f"{'variant':<32} {'test accuracy (mean ± sd)':>26} {'wall time (mean)':>17}")
    for name, values in results.items():
        accs = [a for a, _ in values]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean_time = statistics.mean(s for _, s in values)
        print(f"{name:<32} {statistics.mean(accs):>18.4f} ± {spread:.4f} {mean_time:>16.1f}s")


if __name__ == "__main__":
    main()
