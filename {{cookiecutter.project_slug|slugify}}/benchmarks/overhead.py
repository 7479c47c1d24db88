"""What does the project cost over a hand-written PyTorch loop? Prints a table; asserts nothing.

    python benchmarks/overhead.py                     # Fashion-MNIST (or MNIST), CPU
    python benchmarks/overhead.py --device cuda       # on a GPU
    python benchmarks/overhead.py --epochs 2 --repeats 1 --dataset mnist

In one process, alternating, each for --epochs epochs and --repeats rounds:
  (a) the classic tutorial loop: DataLoader over a TensorDataset, Adam, CrossEntropyLoss,
      loss.item() every step, an accuracy pass over the validation set each epoch;
  (b) `train.py fit` with the shipped default config (logger, checkpoints, progress bar);
  (c) the tutorial as a minimal LightningModule (forward, loss, Adam, the accuracy pass) on the
      tutorial's DataLoaders, in a bare Trainer (no logger, checkpoints, progress bar or summary):
      Lightning's own share;
  (d) `train.py fit` with a bare Trainer: our module and data without the run's extras;
  (e) (c) with the fused Adam kernel, which our models use (Classifier.configure_optimizers).
Same network, data, batch size and seed. The three ratios: (b)/(a), (c)/(a) and (b)/(c), ours;
then (b)/(e): ours with the optimizer's implementation the same on both sides.
An epoch is timed from its first training batch to the start of the next epoch (validation and
checkpointing included); the first epoch of every run is dropped as warm-up. Then a parity run
(Adam-equivalent settings, same seed and data order) compares the final training loss, and
`python train.py --help` is compared with `python -c "import lightning"`.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data import MNISTDataModule
from {{ cookiecutter.package_name }}.data.batches import model_input
from {{ cookiecutter.package_name }}.models import Classifier

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_model_summary=false"]
BARE = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class EpochTimer(L.Callback):
    """Records the start of every training epoch and the end of training."""

    def __init__(self):
        self.marks = []
        self.last_loss = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last_loss = outputs["loss"]  # a tensor: reading it here would add a sync per step

    def on_train_end(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    @property
    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:])]


def load_data(args):
    data = MNISTDataModule(args.data_dir, args.dataset, batch_size=args.batch_size, val_size=args.val_size)
    data.prepare_data()
    data.setup("fit")
    # The tutorial's data: float tensors made once, exactly as our batches are (pixels in [0, 1]);
    # the network normalises them with the training split's statistics, as ours does.
    (xt, yt), (xv, yv) = data.splits["train"], data.splits["val"]
    return (model_input(xt), yt), (model_input(xv), yv), (data.mean, data.std)


def handwritten(train, val, args, stats, max_steps=None):
    """The loop of the PyTorch tutorial, with our network. Returns epoch times, last loss."""
    L.seed_everything(args.seed, verbose=False)
    model = Classifier(input_shape=(1, 28, 28), num_classes=10)
    model.normalize.set_statistics(*stats)
    model = model.to(args.device)
    # Our first epoch's data order (data/batches.py, EpochSampler), drawn like ours from generators
    # of its own: the global RNG, which dropout uses, is left alone.
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(args.seed)).tolist()
    loader = DataLoader(TensorDataset(*train), batch_size=args.batch_size, sampler=order, generator=torch.Generator())
    val_loader = DataLoader(TensorDataset(*val), batch_size=args.batch_size)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times, step, loss_value = [], 0, None
    for _ in range(1 if max_steps else args.epochs):
        start = time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(args.device), y.to(args.device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            step += 1
            if max_steps and step == max_steps:
                return times, loss_value
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(args.device), y.to(args.device)
                correct += (model(x).argmax(1) == y).sum().item()
        times.append(time.perf_counter() - start)
    return times, loss_value


class Minimal(L.LightningModule):
    """The tutorial's loop as the smallest LightningModule: the same network, loss, optimizer and accuracy pass."""

    def __init__(self, network: nn.Module, fused: bool = False):
        super().__init__()
        self.network, self.correct, self.fused = network, 0, fused

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.network(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.correct += (self.network(x).argmax(1) == y).sum().item()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused or None)


def minimal(train, val, args, stats, fused: bool = False):
    """(c), or (e) with `fused`: the tutorial's network and DataLoaders in a bare Trainer."""
    L.seed_everything(args.seed, verbose=False)
    network = Classifier(input_shape=(1, 28, 28), num_classes=10)
    network.normalize.set_statistics(*stats)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(args.seed)).tolist()
    loader = DataLoader(TensorDataset(*train), batch_size=args.batch_size, sampler=order, generator=torch.Generator())
    val_loader = DataLoader(TensorDataset(*val), batch_size=args.batch_size)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=args.epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(Minimal(network, fused), loader, val_loader)
    return timer.epochs, timer.last_loss


def ours(args, extra):
    """`train.py fit` in this process, with an EpochTimer appended to the callbacks."""
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    cli = run(
        [
            "fit",
            f"--data.name={args.dataset}",
            f"--data.data_dir={args.data_dir}",
            f"--data.batch_size={args.batch_size}",
            f"--data.val_size={args.val_size}",
            f"--seed_everything={args.seed}",
            f"--trainer.accelerator={accelerator}",
            f"--trainer.max_epochs={args.epochs}",
            *extra,
            "--trainer.callbacks+=__main__.EpochTimer",
        ]
    )
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, EpochTimer))
    return timer.epochs, timer.last_loss


def startup_seconds(command: list[str], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=["mnist", "fashion_mnist", "kmnist"])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--parity-steps", type=int, default=300)
    parser.add_argument("--startup-rounds", type=int, default=5)
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    os.chdir(tempfile.mkdtemp(prefix="overhead-"))  # logs and checkpoints of the runs land here

    train, val, stats = load_data(args)
    variants = {
        "hand-written loop": lambda: handwritten(train, val, args, stats),
        "fit, default config": lambda: ours(args, QUIET),
        "minimal, bare Trainer": lambda: minimal(train, val, args, stats),
        "fit, bare Trainer": lambda: ours(args, BARE + ["--trainer.callbacks=[]"]),
        "minimal, fused Adam": lambda: minimal(train, val, args, stats, fused=True),
    }
    epochs = {name: [] for name in variants}
    for round_ in range(args.repeats):
        for name, variant in variants.items():
            times, _ = variant()
            epochs[name] += times[1:] if len(times) > 1 else times
            print(f"round {round_ + 1}: {name}: " + " ".join(f"{t:.2f}s" for t in times), flush=True)

    # Parity: AdamW without weight decay is Adam; a constant schedule; the same seed and data order.
    steps = args.parity_steps
    _, theirs = handwritten(train, val, args, stats, max_steps=steps)
    parity = [f"--trainer.max_steps={steps}", "--model.weight_decay=0", "--model.scheduler=constant"]
    _, mine = ours(args, BARE + parity + ["--trainer.callbacks=[]", "--trainer.limit_val_batches=0"])
    mine = float(mine)

    lightning_import = startup_seconds([sys.executable, "-c", "import lightning"], args.startup_rounds)
    help_time = startup_seconds([sys.executable, "train.py", "--help"], args.startup_rounds)

    base = statistics.median(epochs["hand-written loop"])
    steps_per_epoch = -(-len(train[1]) // args.batch_size)
    print(f"\n{args.dataset}, {len(train[1])} training images, batch {args.batch_size}, device {args.device}, "
          f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'variant':<22} {'epoch (median)':>15} {'per step':>10} {'ratio':>7}")
    for name, times in epochs.items():
        median = statistics.median(times)
        per_step = median / steps_per_epoch * 1000
        print(f"{name:<22} {median:>14.2f}s {per_step:>8.2f}ms {median / base:>7.3f}")
    default, lean = statistics.median(epochs["fit, default config"]), statistics.median(epochs["minimal, bare Trainer"])
    print(f"\nratios: default config / hand-written {default / base:.3f}, minimal LightningModule / hand-written "
          f"{lean / base:.3f} (Lightning's share), default config / minimal {default / lean:.3f} (ours)")  # fmt: skip
    fused = statistics.median(epochs["minimal, fused Adam"])
    print(f"with the same fused optimizer on both sides: default config / minimal {default / fused:.3f}")
    verdict = "equal to 5 decimals" if round(theirs, 5) == round(mine, 5) else "DIFFERENT"
    print(f"\nparity after {steps} steps: hand-written loss {theirs:.6f}, ours {mine:.6f}: {verdict}")
    print(f"start-up: `train.py --help` {help_time:.2f}s, `import lightning` {lightning_import:.2f}s, "
          f"ratio {help_time / lightning_import:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
