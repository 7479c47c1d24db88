"""The MNIST family: grey images of ten classes, held in memory.

MNIST, Fashion-MNIST and Kuzushiji-MNIST are 28x28 images read from IDX files, downloaded
once. `digits` (the default run's data) needs no download: 1,797 handwritten digits of 8x8
pixels from the UCI repository ship inside this package (`digits.csv.gz`, CC BY 4.0, as in
scikit-learn), so the first `python train.py fit` works on a machine without internet.
"""

import csv
import gzip
from http.client import HTTPException
from importlib.resources import files
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from .augment import Augmentation
from .batches import InMemoryDataModule, split_indices
from .idx import download, read_idx

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip

# Per dataset: torchvision's folder name (so its downloads are found too), the public
# mirrors, the MD5 of each .gz file as served there, extra folders to look in, class names,
# image size and the validation images held out of the training set by default.
DATASETS = {
    "digits": {
        "embedded": "digits.csv.gz",  # in this package: 64 pixel values 0..16, then the label
        "folder": None, "mirrors": [], "md5": [], "also": [],
        "classes": [str(d) for d in range(10)],
        "size": (8, 8), "val_size": 200, "test_fraction": 0.2,
    },
    "mnist": {
        "folder": "MNIST",
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        "md5": ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
        "also": [],
        "classes": [str(d) for d in range(10)],
        "size": (28, 28), "val_size": 5000,
    },
    "fashion_mnist": {
        "folder": "FashionMNIST",
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
        # Debian's and Ubuntu's `dataset-fashion-mnist` package.
        "also": ["/usr/share/datasets/fashion-mnist"],
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        "size": (28, 28), "val_size": 5000,
    },
    "kmnist": {
        "folder": "KMNIST",
        "mirrors": ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
        "md5": ["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"],
        "also": [],
        "classes": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
        "size": (28, 28), "val_size": 5000,
    },
}  # fmt: skip


class MNISTDataModule(InMemoryDataModule):
    """One of the MNIST family, held in memory.

    Args:
        data_dir: where IDX files are looked for and downloaded to: `<data_dir>/<name>/`, or
            `data_dir` itself when it holds the four files.
        name: which dataset; `digits` ships with the project (8x8 images, nothing to download).
        batch_size: samples per batch.
        val_size: images taken from the training set for validation (a fixed split);
            null: 5000 for the 28x28 sets, 200 for digits.
        num_workers: DataLoader processes; 0 is fastest for data already in memory.
        on_device: keep the whole dataset on the GPU (about 55 MB): the fastest option there.
        download: fetch missing files from the public mirrors (MD5-checked).
        mirror: a base URL to download from instead of the public mirrors.
        seed: seed of the train/validation split and of the labelled subset.
        classes: keep only these classes (e.g. [5, 6, 7, 8, 9]), relabelled 0..k-1 in the given
            order; class names follow. null: all ten.
        samples_per_class: train on only this many images per class (a fixed, seeded choice);
            validation and test stay whole. null: all.
        train_fraction: train on this fraction of each class's images (when samples_per_class is null).
        translate, flip, erase: augment the training batches (augment.py): random shifts of up to
            `translate` pixels, left-right mirroring (fashion_mnist only: a mirrored digit or
            character is another sign), and random erasing with probability `erase`. Off by default.
    """

    def __init__(
        self,
        data_dir: str = "data",
        name: Literal["digits", "mnist", "fashion_mnist", "kmnist"] = "mnist",
        batch_size: int = 64,
        val_size: int | None = None,
        num_workers: int = 0,
        on_device: bool = False,
        download: bool = True,
        mirror: str | None = None,
        seed: int = 42,
        classes: list[int] | None = None,
        samples_per_class: int | None = None,
        train_fraction: float = 1.0,
        translate: int = 0,
        flip: bool = False,
        erase: float = 0.0,
    ):
        super().__init__(batch_size, num_workers, on_device)
        self.save_hyperparameters()
        self.info = DATASETS[name]
        if flip and name != "fashion_mnist":
            raise UserError(f"flip=true mirrors images, and a mirrored {name} image is another sign: use it for "
                            "fashion_mnist or your own images, or set --data.flip=false")  # fmt: skip
        self.augmentation = Augmentation(translate, flip, erase)
        self.limit_training(samples_per_class, train_fraction, seed)
        every = len(self.info["classes"])
        valid = classes is None or (len(set(classes)) == len(classes) >= 2 and all(0 <= c < every for c in classes))
        if not valid:
            raise UserError(f"classes={list(classes)}: give at least two different class numbers from 0 to {every - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, *self.info["size"])

    @property
    def class_names(self) -> list[str]:
        chosen = self.hparams.classes
        return self.info["classes"] if chosen is None else [self.info["classes"][c] for c in chosen]

    def _keep_classes(self, x, y):
        """Only the samples of `classes`, relabelled 0..k-1 in their order."""
        if self.hparams.classes is None:
            return x, y
        new = torch.full((len(self.info["classes"]),), -1, dtype=torch.long)
        new[torch.tensor(self.hparams.classes)] = torch.arange(len(self.hparams.classes))
        keep = new[y] >= 0
        return x[keep], new[y][keep]

    def _folders(self) -> list[Path]:
        root = Path(self.hparams.data_dir)
        return [root / self.hparams.name, root / self.info["folder"] / "raw", root,
                *map(Path, self.info["also"])]  # fmt: skip

    def _find(self, stem: str) -> Path | None:
        for folder in self._folders():
            for path in (folder / stem, folder / f"{stem}.gz"):
                if path.is_file():
                    return path
        return None

    def folder_of(self, stem: str) -> Path | None:
        """The folder where the file `stem` (or `stem`.gz) was found, or None."""
        found = self._find(stem)
        return found and found.parent

    def prepare_data(self) -> None:
        if "embedded" in self.info:
            return
        missing = [(stem, md5) for stem, md5 in zip(FILES, self.info["md5"]) if not self._find(stem)]
        failed = {}  # mirror -> its first failure: the message names each mirror once, not once per file
        if self.hparams.download:
            mirrors = [self.hparams.mirror] if self.hparams.mirror else self.info["mirrors"]
            for stem, md5 in missing:
                target = Path(self.hparams.data_dir) / self.hparams.name / f"{stem}.gz"
                for mirror in mirrors:
                    try:
                        download(mirror.rstrip("/") + f"/{stem}.gz", target, md5)
                        break
                    except (OSError, ValueError, HTTPException, UserError) as err:  # ValueError: not a URL
                        failed.setdefault(mirror, f"{mirror}: {getattr(err, 'reason', err)}")
        self._require_files(list(failed.values()))

    def _require_files(self, failures: list[str] = ()) -> None:
        if "embedded" in self.info:
            return
        still = [stem for stem in FILES if not self._find(stem)]
        if still:
            where = ", ".join(str(f) for f in self._folders())
            tried = f" Download failed ({'; '.join(failures)})." if failures else ""
            raise UserError(
                f"{self.hparams.name}: missing {', '.join(s + '[.gz]' for s in still)}; "
                f"looked in {where}.{tried} Fix: connect to the internet and keep download=true; "
                f"or on a machine with internet run `python -m {__package__}.download {self.hparams.name}` "
                f"and copy the files into {Path(self.hparams.data_dir) / self.hparams.name}/ here"
            )

    def _load(self, images: str, labels: str):
        x, y = read_idx(self._find(images)), read_idx(self._find(labels)).long()
        if x.dim() != 3 or tuple(x.shape[1:]) != self.info["size"] or y.dim() != 1:
            raise UserError(
                f"{self._find(images)} holds {tuple(x.shape)} values and {self._find(labels)} {tuple(y.shape)}; "
                "expected N x 28 x 28 images and N labels (replace both files with a matching pair)"
            )
        if len(x) != len(y):
            raise UserError(
                f"{self._find(images)} has {len(x)} images but {self._find(labels)} has "
                f"{len(y)} labels; replace both files with a matching pair"
            )
        if len(y) and int(y.max()) >= len(self.info["classes"]):
            raise UserError(
                f"{self._find(labels)}: label {int(y.max())} is out of range "
                f"0..{len(self.info['classes']) - 1}; the file is not a {self.hparams.name} label file"
            )
        return self._keep_classes(x.unsqueeze(1), y)

    def _load_embedded(self):
        """The packaged digits as (train, test): pixels 0..16 scaled to 0..255 like the other sets'.

        The set has no official test split, so a fixed one (not moved by `seed`) is cut here."""
        with gzip.open(files(__package__) / self.info["embedded"], "rt") as f:
            rows = torch.tensor([[float(v) for v in row] for row in csv.reader(f)])
        x = (rows[:, :-1] * (255 / 16)).round().to(torch.uint8).reshape(-1, 1, *self.info["size"])
        test, train = split_indices(len(rows), (self.info["test_fraction"],), seed=0)
        y = rows[:, -1].long()
        return self._keep_classes(x[train], y[train]), self._keep_classes(x[test], y[test])

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        if "embedded" in self.info:
            (x, y), test = self._load_embedded()
        else:
            self._require_files()
            (x, y), test = self._load(FILES[0], FILES[1]), self._load(FILES[2], FILES[3])
        val_size = self.info["val_size"] if self.hparams.val_size is None else self.hparams.val_size
        if not 0 < val_size < len(y):
            raise UserError(
                f"val_size={val_size} must be between 1 and {len(y) - 1}, "
                "the number of training images minus one (set --data.val_size)"
            )
        val, train = split_indices(len(y), (val_size / len(y),), self.hparams.seed)
        self.set_splits((x[train], y[train]), (x[val], y[val]), test)
