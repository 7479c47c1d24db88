"""Your own data: a CSV table of numeric features, or a folder of images per class.

Both read everything once into memory. Splits come from you (`train`/`val`/`test` files
or folders) or are cut reproducibly from the training data by fraction and seed.
Class names are sorted (numerically when they are all integers): label k is the k-th.
A table's target may instead be a number to predict (`task: regression`): read as a float, with
the training split's mean and standard deviation, which the model keeps to answer in its units.
From a checkpoint (`test`, `predict`), the model's own class names and feature columns are
used instead, so `predict` on a new file needs none of the training files.
"""

import csv
import io
import json
import math
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .augment import Augmentation
from .batches import InMemoryDataModule, split_indices

SPLITS = ("train", "val", "test")
MAX_DECIMAL_CLASSES = 20  # more distinct decimal labels than this: the classifier points to regression
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def json_lines(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `text`, the JSON Lines file `path`; a line that is
    not a JSON object stops reading with an error naming the file and line."""
    rows = []
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line}: not valid JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{line}: a JSON {type(row).__name__}, not an object with named fields")
        rows.append((line, row))
    return rows


def sort_classes(names) -> list[str]:
    names = set(names)
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=int if numeric else str)


def regression_target(text: str, path: Path, line: int, column: str, classes_config: str) -> float:
    """A regression target cell as a finite number, else one ERROR line naming the cell
    (`classes_config`: the config to point to if the column holds classes)."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(
            f"{path}:{line}: target column {column!r} holds {text.strip()!r}, not a number; a regression "
            f"target must be numeric: fix the value or drop the row (for classes use {classes_config})"
        ) from None
    if not math.isfinite(value):
        raise UserError(f"{path}:{line}: target column {column!r} is {text.strip()!r}; fix the value or drop the row")
    return value


def check_labels(labels: list, lines: list[int], path: Path, column: str, regression: bool, numbers_config: str):
    """Refuse labels that cannot be learnt as they are: a constant regression target, or decimal numbers
    with many distinct values given to a classifier (a quantity, not classes: use `numbers_config`)."""
    if regression and len(labels) > 1 and len(set(labels)) == 1:
        raise UserError(
            f"{path}:{lines[0]}: target column {column!r} is {labels[0]:g} in all {len(labels)} rows: "
            "nothing to learn; check --data.label_column"
        )
    if regression or len(set(labels)) <= MAX_DECIMAL_CLASSES:
        return
    for value, line in zip(labels, lines):
        try:
            number = float(value)
        except ValueError:
            return  # names: classes
        if math.isfinite(number) and not number.is_integer():
            raise UserError(
                f"{path}:{line}: label column {column!r} holds decimal numbers ({value}, {len(set(labels))} "
                f"distinct values): a quantity to predict, not classes; use --config {numbers_config}"
            )


class FileDataModule(InMemoryDataModule):
    """Reads all samples on first use (`samples`), then splits them in `setup`.

    A subclass defines `read()`, returning ({split: (x, label names, sample ids)}, location),
    with at least a 'train' split.
    """

    def __init__(self, val_fraction, test_fraction, batch_size, num_workers, seed):
        super().__init__(batch_size, num_workers)
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError(
                f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in "
                "[0, 1) and together less than 1"
            )
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.seed = seed

    regression = False  # CSVDataModule's task: regression reads numbers instead of classes

    @cached_property
    def samples(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str] | None, dict]:
        parts, where = self.read()
        if self.regression:  # the labels are already floats (read as numbers by CSVDataModule)
            tensors = {s: (x, torch.tensor(values, dtype=torch.float32)) for s, (x, values, _) in parts.items()}
            return tensors, None, {s: ids for s, (_, _, ids) in parts.items()}
        found = sort_classes(name for _, names, _ in parts.values() for name in names)
        classes = list(map(str, self.trained_value("class_names") or found))  # the model's order, from a checkpoint
        if len(classes) < 2:
            raise UserError(f"{where}: found {len(classes)} class(es) {classes}; a classifier needs at least two")
        if unknown := sorted(set(found) - set(classes)):
            raise UserError(f"{where}: classes {unknown} are not among the model's {classes}; remove those samples")
        index = {name: k for k, name in enumerate(classes)}
        tensors = {s: (x, torch.tensor([index[n] for n in names])) for s, (x, names, _) in parts.items()}
        return tensors, classes, {s: ids for s, (_, _, ids) in parts.items()}

    def trained_value(self, name: str):
        """The checkpoint's `name` (see use_trained), or None when training or for an older checkpoint."""
        return (self.trained or {}).get(name)

    @property
    def class_names(self) -> list[str]:
        return self.trained_value("class_names") or self.samples[1]

    @property
    def num_classes(self) -> int:
        return 1 if self.regression else len(self.class_names)  # regression: one output

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.trained_value("input_shape") or self.samples[0]["train"][0].shape[1:])

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.trained and self.load_predict():
            return  # new samples for a trained model: the training files are not read
        if "train" in self.splits:
            return
        parts = dict(self.samples[0])
        x, y = parts["train"]
        missing = [s for s in ("val", "test") if s not in parts]
        *cuts, rest = split_indices(len(y), tuple(self.fractions[s] for s in missing), self.seed)
        parts.update({s: (x[i], y[i]) for s, i in zip(missing, cuts)})
        parts["train"] = (x[rest], y[rest])
        self.set_splits(*(parts[s] for s in SPLITS))
        ids = self.samples[2]  # which file (and line) each validation and test sample came from
        self.ids = {s: [ids["train"][k] for k in i.tolist()] for s, i in zip(missing, cuts)}
        self.ids.update({s: ids[s] for s in ("val", "test") if s not in missing})


class CSVDataModule(FileDataModule):
    """Rows of numeric features with a label column (labels may be strings).

    Args:
        path: a CSV file, or a folder with train.csv (and optionally val.csv, test.csv).
        label_column: the column holding the class of each row.
        feature_columns: the columns used as inputs; default: all others.
        val_fraction, test_fraction: parts cut from the training rows when no val/test file.
        batch_size, num_workers: as for the DataLoader.
        seed: seed of the split and of the labelled subset.
        samples_per_class: train on only this many samples per class (a fixed, seeded choice);
            validation and test stay whole. null: all.
        train_fraction: train on this fraction of each class's samples (when samples_per_class is null).
        predict_file: a CSV with the same feature columns (a label column is not needed) that
            `predict` classifies instead of the test rows.
        id_column: a column naming each row, kept out of the features, for the `id` of the
            prediction CSV; default: the row's line number in its file (the header is line 1).
        task: 'classification' (labels are classes) or 'regression' (the label column holds the
            number to predict; configs/regression_csv.yaml).
    """

    def __init__(
        self,
        path: str = "data/table.csv",
        label_column: str = "label",
        feature_columns: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 42,
        samples_per_class: int | None = None,
        train_fraction: float = 1.0,
        predict_file: str | None = None,
        id_column: str | None = None,
        task: Literal["classification", "regression"] = "classification",
    ):
        super().__init__(val_fraction, test_fraction, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.regression = task == "regression"
        if self.regression and (samples_per_class is not None or train_fraction < 1):
            raise UserError(
                "samples_per_class and train_fraction pick samples per class: leave them out with task: regression"
            )
        self.unknown_label = math.nan if self.regression else -1  # the label of a row to predict
        self.limit_training(samples_per_class, train_fraction, seed)
        self.features = None  # the training file's feature columns, looked up by name in the others

    def use_trained(self, model_args: dict) -> None:
        super().use_trained(model_args)
        self.features = self.trained_value("feature_names") or self.features  # the columns the model reads

    @property
    def feature_names(self) -> list[str]:
        if self.features is None:
            _ = self.samples  # the training file fixes them
        return self.features

    def read_predict(self):
        if not self.hparams.predict_file:
            return None
        path = Path(self.hparams.predict_file)
        if not path.is_file():
            raise UserError(f"{path}: file not found (set --data.predict_file to the CSV to classify)")
        _ = self.feature_names  # the model's columns, or the training file's (read first)
        x, _, ids = self._read_file(path, labelled=False)
        return x, ids

    def read(self):
        path = Path(self.hparams.path)
        if path.is_dir():
            files = {s: path / f"{s}.csv" for s in SPLITS if (path / f"{s}.csv").is_file()}
            if "train" not in files:
                raise UserError(f"{path}: no train.csv in this folder (add it, or set --data.path to a CSV file)")
        elif path.is_file():
            files = {"train": path}
        else:
            raise UserError(f"{path}: file not found (set --data.path to your CSV file)")
        return {s: self._read_file(f) for s, f in files.items()}, str(path)

    def _read_file(self, path: Path, labelled: bool = True) -> tuple[torch.Tensor, list[str], list[str]]:
        label, name = self.hparams.label_column, self.hparams.id_column
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err}); save it as CSV in UTF-8") from None
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if labelled and label not in header:
                raise UserError(f"{path}: no label column {label!r}; columns: {header} (set --data.label_column)")
            if name and name not in header and not labelled:  # optional in the files to train on
                raise UserError(f"{path}: no id column {name!r}; columns: {header} (set --data.id_column)")
            features = self.features or self.hparams.feature_columns or [c for c in header if c not in (label, name)]
            self.features = self.features or features
            absent = [c for c in features if c not in header]
            if absent or not features:
                raise UserError(
                    f"{path}: feature columns {absent or features} not found; columns: {header} "
                    "(set --data.feature_columns)"
                )
            rows, labels, ids, lines = [], [], [], []
            for row in reader:
                line = reader.line_num  # counts blank lines, which the reader skips
                rows.append([self._number(row.get(c), path, line, c) for c in features])
                ids.append(row[name] if name in row else str(line))
                if not labelled:
                    continue
                if not (row.get(label) or "").strip():
                    raise UserError(f"{path}:{line}: the label is empty (fill it in or remove the row)")
                if self.regression:
                    labels.append(regression_target(row[label], path, line, label, "configs/custom_csv.yaml"))
                else:
                    labels.append(row[label].strip())
                lines.append(line)
        if not rows:
            raise UserError(f"{path}: the file has a header but no rows")
        if labelled:
            check_labels(labels, lines, path, label, self.regression, "configs/regression_csv.yaml")
        return torch.tensor(rows, dtype=torch.float32), labels, ids

    @staticmethod
    def _number(text: str | None, path: Path, line: int, column: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value):
            raise UserError(
                f"{path}:{line}: column {column!r} holds {text!r}, not a finite number "
                "(fix the value, drop the row, or leave the column out with --data.feature_columns)"
            )
        return value


class ImageFolderDataModule(FileDataModule):
    """Images in one sub-folder per class: `root/<class>/*.png` (or .jpg, ...).

    Args:
        root: the folder of class folders, or of `train/`, `val/`, `test/` folders of them.
        image_size: [height, width] to resize every image to; required when sizes differ.
        grayscale: read images as one grey channel instead of RGB.
        val_fraction, test_fraction: parts cut from the training images when no val/test folder.
        batch_size, num_workers: as for the DataLoader.
        seed: seed of the split and of the labelled subset.
        samples_per_class: train on only this many samples per class (a fixed, seeded choice);
            validation and test stay whole. null: all.
        train_fraction: train on this fraction of each class's samples (when samples_per_class is null).
        predict_dir: a folder of images (no class folders) that `predict` classifies instead of
            the test images; they are read like the training images (grey or RGB, image_size).
        translate, flip, erase: augment the training batches (augment.py): random shifts of up to
            `translate` pixels, left-right mirroring, random erasing with probability `erase`.
    """

    def __init__(
        self,
        root: str = "data/images",
        image_size: tuple[int, int] | None = None,
        grayscale: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 42,
        samples_per_class: int | None = None,
        train_fraction: float = 1.0,
        predict_dir: str | None = None,
        translate: int = 0,
        flip: bool = False,
        erase: float = 0.0,
    ):
        super().__init__(val_fraction, test_fraction, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.limit_training(samples_per_class, train_fraction, seed)
        self.augmentation = Augmentation(translate, flip, erase)
        self._first = None  # (path, size) of the first image read, to report mixed sizes

    def read(self):
        root = Path(self.hparams.root)
        if not root.is_dir():
            raise UserError(f"{root}: folder not found (set --data.root to your image folder)")
        if (root / "train").is_dir():
            folders = {s: root / s for s in SPLITS if (root / s).is_dir()}
        else:
            folders = {"train": root}
        return {s: self._read_folder(f) for s, f in folders.items()}, str(root)

    def read_predict(self):
        if not self.hparams.predict_dir:
            return None
        folder = Path(self.hparams.predict_dir)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise UserError(f"{folder}: no images (.png, .jpg, ...) in this folder (set --data.predict_dir)")
        shape = self.trained_value("input_shape")  # a checkpoint's: the training images are not needed
        if shape is None:
            _ = self.samples  # the training images first: the images to classify must have their size
        x = torch.stack([self._read_image(p) for p in files])
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            c, h, w = shape
            raise UserError(
                f"{folder}: images are {tuple(x.shape[1:])} (channels, height, width) but the model takes "
                f"{tuple(shape)}: set --data.image_size='[{h}, {w}]' and --data.grayscale={str(c == 1).lower()}"
            )
        return x, [str(p) for p in files]

    def _read_folder(self, folder: Path) -> tuple[torch.Tensor, list[str], list[str]]:
        classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise UserError(f"{folder}: no class folders; put each class's images in {folder}/<class name>/")
        images, labels, paths = [], [], []
        for d in classes:
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{d}: class folder has no images (.png, .jpg, ...); add images or remove the folder")
            images += [self._read_image(p) for p in files]
            labels += [d.name] * len(files)
            paths += [str(p) for p in files]
        return torch.stack(images), labels, paths

    def _read_image(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.hparams.grayscale else "RGB")
                if self.hparams.image_size:
                    height, width = self.hparams.image_size
                    image = image.resize((width, height), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{path}: not a readable image ({err}); replace or remove it") from None
        if self._first is None:
            self._first = (path, image.size)
        elif image.size != self._first[1]:
            (w0, h0), (w, h) = self._first[1], image.size
            raise UserError(
                f"{path}: image is {w}x{h} but {self._first[0]} is {w0}x{h0}; "
                f"set --data.image_size='[{h0}, {w0}]' to resize all images to one size"
            )
        channels = len(image.getbands())
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.reshape(image.size[1], image.size[0], channels).permute(2, 0, 1)
