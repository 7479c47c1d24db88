"""Your own labelled text: CSV, TSV or JSON Lines files, tokenised by the model's tokenizer.

Every text is tokenised once, when the files are read, and kept in memory as token ids and
an attention mask (1 for a real token, 0 for padding), stacked as one (N, 2, max_length)
tensor per split, so the shared batch machinery of batches.py (seeded splits, labelled
subsets, exact resume) works unchanged. Each batch is then cut to its longest text on the
device (`on_after_batch_transfer`): a batch of tweets costs what its longest tweet needs,
not `max_length`.
"""

import csv
import io
import math
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from ..pretrained import load_tokenizer
from .custom import SPLITS, FileDataModule, check_labels, json_lines, regression_target

SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}  # None: one JSON object per line


class TextDataModule(FileDataModule):
    """Texts with a label each (a class, or a number to predict), in CSV (.csv), TSV (.tsv) or
    JSON Lines (.jsonl) files.

    Args:
        path: a file, or a folder with train.<suffix> (and optionally val.<suffix>, test.<suffix>).
        text_column: the column (JSON key) holding the text.
        label_column: the column holding its class (labels may be names), or with task: regression its number.
        tokenizer: the tokenizer's model folder or Hub name; null: the model's
            `model_name_or_path` (the command line fills it in), so the two always match.
        max_length: texts are cut to this many tokens (the special tokens included).
        encoding: the files' text encoding, e.g. utf-8, latin-1, gb18030.
        val_fraction, test_fraction: parts cut from the training rows when no val/test file.
        batch_size, num_workers: as for the DataLoader.
        seed: seed of the split and of the labelled subset.
        samples_per_class: train on only this many samples per class (a fixed, seeded choice);
            validation and test stay whole. null: all.
        train_fraction: train on this fraction of each class's samples (when samples_per_class is null).
        predict_file: a file of the same format (a label column is not needed) that `predict`
            classifies instead of the test rows.
        id_column: a column naming each row, for the `id` of the prediction CSV; default: the
            row's line number in its file (the header of a CSV or TSV is line 1).
        task: 'classification' (labels are classes) or 'regression' (the label column holds the
            number to predict, e.g. a rating; configs/text_regression.yaml).
    """

    def __init__(
        self,
        path: str = "data/text.csv",
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: str | None = None,
        max_length: int = 128,
        encoding: str = "utf-8",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 16,
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
        self.regression = task == "regression"  # targets read as floats (FileDataModule.samples)
        if self.regression and (samples_per_class is not None or train_fraction < 1):
            raise UserError(
                "samples_per_class and train_fraction pick samples per class: leave them out with task: regression"
            )
        self.unknown_label = math.nan if self.regression else -1  # the label of a text to predict
        self.limit_training(samples_per_class, train_fraction, seed)
        if max_length < 2:
            raise UserError(f"max_length={max_length}: give at least 2 (the special tokens alone take two)")
        try:
            "".encode(encoding)
        except LookupError:
            raise UserError(f"encoding={encoding!r}: not a text encoding Python knows (e.g. utf-8, latin-1)") from None
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def read(self):
        path = Path(self.hparams.path)
        if path.is_dir():
            files = {}
            for split in SPLITS:
                found = [path / f"{split}{s}" for s in SUFFIXES if (path / f"{split}{s}").is_file()]
                if found:
                    files[split] = found[0]
            if "train" not in files:
                raise UserError(
                    f"{path}: no train.csv, train.tsv or train.jsonl in this folder "
                    "(add one, or set --data.path to a file)"
                )
        elif path.is_file():
            files = {"train": path}
        else:
            raise UserError(f"{path}: file not found (set --data.path to your .csv, .tsv or .jsonl file)")
        return {s: self._read_file(f) for s, f in files.items()}, str(path)

    def read_predict(self):
        if not self.hparams.predict_file:
            return None
        path = Path(self.hparams.predict_file)
        if not path.is_file():
            raise UserError(f"{path}: file not found (set --data.predict_file to the texts to classify)")
        x, _, ids = self._read_file(path, labelled=False)
        return x, ids

    def _rows(self, path: Path) -> list[tuple[int, dict]]:
        """(line number, row) for every row of `path`, decoded with `encoding`."""
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv or .jsonl")
        data, encoding = path.read_bytes(), self.hparams.encoding
        try:
            text = data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            column = err.start - data.rfind(b"\n", 0, err.start)
            raise UserError(
                f"{path}:{line}: not {encoding} text (byte 0x{data[err.start]:02x} at column {column}); "
                "set --data.encoding to the file's encoding "
                "(e.g. latin-1, cp1252, gb18030) or save the file as UTF-8"
            ) from None
        delimiter = SUFFIXES[path.suffix.lower()]
        if delimiter is None:
            return json_lines(path, text)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        return [(reader.line_num, row) for row in reader]

    def _read_file(self, path: Path, labelled: bool = True) -> tuple[torch.Tensor, list[str], list[str]]:
        h = self.hparams
        rows = self._rows(path)
        if not rows:
            raise UserError(f"{path}: no rows")
        needed = [h.text_column] + ([h.label_column] if labelled else []) + ([h.id_column] if h.id_column else [])
        texts, labels, ids, lines = [], [], [], []
        for line, row in rows:
            absent = [c for c in needed if c not in row]
            if absent:
                option = {h.text_column: "text_column", h.label_column: "label_column"}.get(absent[0], "id_column")
                raise UserError(f"{path}:{line}: no column {absent[0]!r}; columns: {list(row)} (set --data.{option})")
            texts.append(str(row[h.text_column] or ""))
            ids.append(str(row[h.id_column]) if h.id_column else str(line))
            if labelled:
                label = str(row[h.label_column] if row[h.label_column] is not None else "").strip()
                if not label:
                    raise UserError(f"{path}:{line}: the label is empty (fill it in or remove the row)")
                if self.regression:
                    label = regression_target(label, path, line, h.label_column, "configs/text_lora.yaml")
                labels.append(label)
                lines.append(line)
        if labelled:
            check_labels(labels, lines, path, h.label_column, self.regression, "configs/text_regression.yaml")
        return self.encode(texts), labels, ids

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Token ids and attention masks of `texts`, (N, 2, max_length), padded on the right."""
        tokenizer, length = self.tokenizer, self.hparams.max_length
        encoded = tokenizer(texts, truncation=True, max_length=length)["input_ids"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        x = torch.full((len(texts), 2, length), pad, dtype=torch.long)
        x[:, 1] = 0
        for i, ids in enumerate(encoded):
            x[i, 0, : len(ids)] = torch.tensor(ids)
            x[i, 1, : len(ids)] = 1
        return x

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # No normalisation (the base class's is for pixels and features): cut the padding
        # that no text of this batch needs.
        x, y = batch
        longest = max(1, int(x[:, 1].sum(dim=1).max()))
        return x[:, :, :longest], y
