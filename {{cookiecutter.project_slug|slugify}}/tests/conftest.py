"""Shared fixtures: a tiny, learnable stand-in for the MNIST family, and ways to run the CLI.

Real MNIST cannot be downloaded in CI, so each test writes small IDX files itself: class k
is a bright 7x7 square at one of ten places on a noisy 28x28 image.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.data.idx import write_idx
from {{ cookiecutter.package_name }}.data.mnist import FILES

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = 600, 200


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy 28x28 uint8 images; label k puts a bright square at grid cell k."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    x = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, k in enumerate(y.tolist()):
        r, c = 2 + 7 * (k // 4), 1 + 7 * (k % 4)
        x[i, r : r + 6, c : c + 6] = 255
    return x, y.to(torch.uint8)


def write_dataset(folder: Path, train: int = TRAIN, test: int = TEST) -> Path:
    """Write the four IDX files (gzip-compressed) of a synthetic dataset into `folder`."""
    (xtr, ytr), (xte, yte) = synthetic_digits(train, 0), synthetic_digits(test, 1)
    for stem, values in zip(FILES, (xtr, ytr, xte, yte)):
        write_idx(folder / f"{stem}.gz", values)
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding synthetic mnist, fashion_mnist and kmnist under data/."""
    monkeypatch.chdir(tmp_path)
    for name in ("mnist", "fashion_mnist", "kmnist"):
        write_dataset(tmp_path / "data" / name)
    return tmp_path


@pytest.fixture
def probe_importable(monkeypatch):
    """Put tests/ on the path of every process train.py starts, for the `probe.Probe` callback."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))


# Options that keep a CLI run small and quiet on the synthetic MNIST above (named explicitly:
# the default config may train on another data set). A later --config can still change the data.
SMALL = [
    "--data.name=mnist",
    "--data.val_size=100",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def run_cli(*args: str) -> None:
    """Run the command line in this process (as `python train.py ARGS` would)."""
    main(list(args))


def run_train_py(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS` in a fresh process, for exit codes and output (`env`: added variables)."""
    # The package's source first, so that it is found without `pip install -e .` too.
    pythonpath = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "PYTHONPATH": pythonpath, **(env or {})},
    )


class Payload:
    """Unpickling this object creates the file `path`: a stand-in for arbitrary code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def write_table(path: Path, rows: int = 60) -> Path:
    """A CSV of three numeric features and a named label ('a', 'b', 'c') that they determine."""
    g = torch.Generator().manual_seed(2)
    lines = ["x1,x2,x3,label"]
    for i in range(rows):
        k = i % 3
        x = (torch.randn(3, generator=g) * 0.1 + torch.tensor([k, -k, 1.0])).tolist()
        lines.append(",".join(f"{v:.4f}" for v in x) + f",{'abc'[k]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_numbers(path: Path, rows: int = 160, targets: list[str] | None = None) -> Path:
    """`x1,x2,x3,y` with y = 50 + 20 x1 - 10 x2 + small noise (x3 is noise): a target far from 0 and 1,
    so that a model which did not undo the standardisation would be far off. `targets`: the y cells as written."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 3, generator=g)
    y = 50 + 20 * x[:, 0] - 10 * x[:, 1] + 0.5 * torch.randn(rows, generator=g)
    cells = targets or [f"{v:.4f}" for v in y.tolist()]
    lines = ["x1,x2,x3,y"] + [",".join(f"{v:.4f}" for v in r) + f",{t}" for r, t in zip(x.tolist(), cells)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_images(root: Path, per_class: int = 6, size: int = 12) -> Path:
    """root/<red|blue>/*.png: small RGB images whose class is their colour."""
    from PIL import Image

    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), tuple(c + 3 * i for c in colour)).save(root / name / f"{i}.png")
    return root
