"""The download table in data/mnist.py (mirrors and MD5 sums), which the download tests replace
with a local server: checked here against an independent published list and the real files."""

import gzip
import os
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.data.idx import read_idx
from {{ cookiecutter.package_name }}.data.mnist import DATASETS, FILES, MNISTDataModule

# Copied by hand, once, from torchvision's own table: pytorch/vision, torchvision/datasets/mnist.py
# (classes MNIST, FashionMNIST and KMNIST: `mirrors` and `resources`, in FILES order), read at
# commit 01977a187961243eaf66ead246fd92a5c6c7ccfc. MNIST's second mirror is not in torchvision's
# list: it is the CVDF mirror that JAX's examples/datasets.py downloads MNIST from.
PUBLISHED = {
    "mnist": (
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
    ),
    "fashion_mnist": (
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
    ),
    "kmnist": (
        ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
        ["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
         "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"],
    ),
}  # fmt: skip

# Debian's and Ubuntu's `dataset-fashion-mnist`, installed (apt-get install) or unpacked elsewhere by
# `apt-get download` and `dpkg -x` into the folder DEBIAN_FILES names (the template's tests do that).
DEBIAN = Path(os.environ.get("DEBIAN_FILES", "/")) / "usr/share/datasets/fashion-mnist"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_mirrors_and_md5_sums_match_the_published_list(name):
    mirrors, md5 = PUBLISHED[name]
    assert DATASETS[name]["md5"] == md5
    assert DATASETS[name]["mirrors"] == mirrors
    assert all(m.endswith("/") for m in DATASETS[name]["mirrors"])  # the file name is appended as is


@pytest.mark.debian
@pytest.mark.skipif(
    not DEBIAN.is_dir(), reason="needs the real Fashion-MNIST files: apt-get install dataset-fashion-mnist"
)
def test_the_real_fashion_mnist_files(tmp_path, monkeypatch):
    """Debian's files are the real Fashion-MNIST, found without a download and read whole."""
    monkeypatch.setitem(DATASETS["fashion_mnist"], "also", [str(DEBIAN)])  # where this machine has them
    for stem in FILES:
        data = gzip.decompress((DEBIAN / f"{stem}.gz").read_bytes())
        count = int.from_bytes(data[4:8], "big")
        assert count == (60000 if stem.startswith("train") else 10000), stem
        assert len(data) == (16 + 784 * count if "images" in stem else 8 + count), stem
    data = MNISTDataModule(data_dir=str(tmp_path), name="fashion_mnist", download=False, val_size=5000)
    data.prepare_data()  # nothing is missing: no download is tried
    data.setup("fit")
    assert not list(tmp_path.iterdir())
    x, y = data.splits["train"]
    assert x.shape == (55000, 1, 28, 28) and x.dtype == torch.uint8 and len(data.splits["val"][1]) == 5000
    labels = read_idx(DEBIAN / f"{FILES[1]}.gz").long()
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10  # balanced, as published
    assert torch.bincount(data.splits["test"][1], minlength=10).tolist() == [1000] * 10
