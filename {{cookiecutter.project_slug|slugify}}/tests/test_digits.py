"""The default run's data: the UCI handwritten digits that ship inside the package."""

import gzip
import hashlib
from importlib.resources import files

import torch
from conftest import run_train_py

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data.mnist import MNISTDataModule

# digits.csv.gz as scikit-learn 1.9.1 ships it (sklearn/datasets/data/digits.csv.gz): the bytes were
# copied unchanged, so this sum is the one of that file; a changed or truncated copy fails here.
SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"


def test_the_shipped_file_is_the_original():
    data = (files("{{ cookiecutter.package_name }}.data") / "digits.csv.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256
    rows = gzip.decompress(data).decode().splitlines()
    assert len(rows) == 1797 and all(len(row.split(",")) == 65 for row in rows)


def test_digits_are_8x8_images_in_fixed_splits(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "nothing-here"), name="digits", download=False)
    dm.prepare_data()  # nothing to fetch or find
    dm.setup("fit")
    assert dm.input_shape == (1, 8, 8) and dm.class_names == [str(d) for d in range(10)]
    sizes = {split: len(y) for split, (_, y) in dm.splits.items()}
    assert sizes == {"train": 1238, "val": 200, "test": 359}  # test: a fixed 20%; val: 200 of the rest
    x, y = dm.splits["train"]
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
    assert int(x.max()) == 255 and int(x.min()) == 0  # 0..16 scaled to the other sets' 0..255
    assert torch.bincount(torch.cat([y for _, y in dm.splits.values()])).tolist() == [
        178, 182, 177, 183, 181, 182, 181, 179, 174, 180,  # the UCI set's class counts
    ]  # fmt: skip
    # The test split does not move with the seed (it plays the role of MNIST's t10k files); val does.
    other = MNISTDataModule(name="digits", seed=7)
    other.setup("fit")
    assert torch.equal(other.splits["test"][0], dm.splits["test"][0])
    assert not torch.equal(other.splits["val"][0], dm.splits["val"][0])
    assert not (tmp_path / "nothing-here").exists()  # nothing was written


def test_the_first_pixels_match_the_file():
    """Row 0 of the file is a 0; its first row of pixels is 0,0,5,13,9,1,0,0 (x 255/16, rounded)."""
    dm = MNISTDataModule(name="digits", val_size=1)
    dm.setup("fit")
    x = torch.cat([dm.splits[s][0] for s in ("train", "val", "test")])
    expected = torch.tensor([0, 0, 5, 13, 9, 1, 0, 0]).mul(255 / 16).round().to(torch.uint8)
    assert any(torch.equal(image[0, 0], expected) for image in x)


def test_the_default_run_needs_no_network_and_learns(tmp_path, monkeypatch):
    """`python train.py fit` as a new user types it (shortened to 5 epochs), in an empty folder,
    with every HTTP(S) request sent to a closed port: a download would fail the run."""
    offline = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    fit = run_train_py(
        "fit", "--trainer.max_epochs=5", "--trainer.enable_progress_bar=false", cwd=tmp_path, env=offline
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    folder = tmp_path / "logs" / "digits_mlp" / "version_0"
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert list(folder.glob("events.out.tfevents.*"))
    assert not (tmp_path / "data").exists()  # nothing downloaded
    monkeypatch.chdir(tmp_path)
    tested = run(["test", "--ckpt_path=best", "--trainer.enable_progress_bar=false"])
    assert tested.trainer.callback_metrics["test/acc"] > 0.9
