"""Text for a language model: a UTF-8 file or a folder of `.txt` files, as windows of token ids.

- **Tokenizers.** `char`: the corpus's characters, one id each (Chinese too: characters, not
  bytes); `bpe`: a byte-level BPE trained on the corpus (the `tokenizers` library); anything
  else: a Hugging Face tokenizer folder or Hub name. The model keeps the tokenizer as plain
  values (`vocab`, linked by the command line), so a checkpoint alone can generate.
- **Tokenise once.** Ids go to `<corpus>.cache/` (or `cache_dir`) under a key made of the text's
  SHA-256 and the tokenizer options: a changed text or tokenizer gets new files, an unchanged one
  is read back.
- **Splits.** The last `val_fraction` of the tokens is held out, as nanoGPT does. A training
  sample is the `block_size` tokens from any position (inputs) and the same shifted by one
  (targets); validation takes the held-out part in consecutive windows.
- **In memory or streamed.** A small corpus is a tensor in memory, shuffled and resumed
  mid-epoch as every DataModule here (batches.py). With `streaming: true` the ids are written
  once into litdata chunks and read by `StreamingDataLoader`: corpora larger than memory, local
  or on an object store (`stream_dir: s3://...`), sharded across processes, resumed mid-epoch.
"""

import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .batches import InMemoryDataModule, already_stacked

PIECE_BYTES = 1 << 20  # text is read, checked and (streamed) tokenised this much at a time


class Tokenizer:
    """encode/decode between text and ids; `spec` (plain values) rebuilds it."""

    def __init__(self, spec: dict):
        self.spec, kind = spec, spec["kind"]
        if kind == "char":
            self.chars = spec["chars"]
            self.ids = {c: i for i, c in enumerate(self.chars)}
            self.vocab_size = len(self.chars)
        elif kind == "bpe":
            from tokenizers import Tokenizer as Trained

            self.bpe = Trained.from_str(spec["json"])
            self.vocab_size = self.bpe.get_vocab_size()
        else:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(spec["name"])
            self.vocab_size = len(self.hf)

    def encode(self, text: str, what: str = "the text") -> list[int]:
        if self.spec["kind"] == "char":
            unknown = sorted(set(text) - self.ids.keys())
            if unknown:
                raise UserError(
                    f"{what} has characters the char vocabulary lacks ({''.join(unknown[:20])!r}); "
                    "use only characters of the training corpus, or train with --data.tokenizer=bpe"
                )
            return [self.ids[c] for c in text]
        if self.spec["kind"] == "bpe":
            return self.bpe.encode(text).ids
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        if self.spec["kind"] == "char":
            return "".join(self.chars[i] for i in ids)
        return (self.bpe if self.spec["kind"] == "bpe" else self.hf).decode(ids)


def corpus_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"--data.path={path}: the folder holds no .txt file; give a text file or such a folder")
        return files
    if not path.is_file():
        raise UserError(f"--data.path={path}: no such file or folder; give a UTF-8 text file or a folder of .txt files")
    return [path]


def read_utf8(data: bytes, file: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{file}: not UTF-8 at byte {offset + err.start}; convert it, e.g. iconv -f GB18030 -t UTF-8"
        ) from None


def pieces(files: list[Path], size: int = PIECE_BYTES):
    """(file, byte offset, text) of each file in turn, in parts of about `size` bytes cut after a newline."""
    for file in files:
        with open(file, "rb") as f:
            offset, rest = 0, b""
            while block := f.read(size):
                data = rest + block
                cut = data.rfind(b"\n") + 1 or len(data)
                yield file, offset, read_utf8(data[:cut], file, offset)
                offset, rest = offset + cut, data[cut:]
            if rest:
                yield file, offset, read_utf8(rest, file, offset)


def char_start(file: str, at: int) -> int:
    """The first offset from `at` on where a UTF-8 character starts (not a continuation byte 0b10xxxxxx)."""
    with open(file, "rb") as f:
        f.seek(at)
        head = f.read(4)
    return at + next((i for i, b in enumerate(head) if b & 0xC0 != 0x80), len(head))


def atomic_write(path: Path, write) -> None:
    """`write(tmp)`, then rename tmp to `path`: a killed run leaves no half-written cache."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def train_tokenizer(files: list[Path], kind: str, bpe_vocab_size: int) -> Tokenizer:
    if kind == "char":
        chars = set()
        for *_, text in pieces(files):
            chars.update(text)
        return Tokenizer({"kind": "char", "chars": "".join(sorted(chars))})
    if kind == "bpe":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator((text for *_, text in pieces(files)), vocab_size=bpe_vocab_size, show_progress=False)
        return Tokenizer({"kind": "bpe", "json": bpe.to_str()})
    return Tokenizer({"kind": "hf", "name": kind})


def tokenize_piece(piece, spec: dict):
    """litdata.optimize's function (run in its worker processes): the ids of one piece of text."""
    file, offset, length = piece
    with open(file, "rb") as f:
        f.seek(offset)
        text = read_utf8(f.read(length), Path(file), offset)
    yield torch.tensor(Tokenizer(spec).encode(text), dtype=torch.int32)


class Windows(torch.utils.data.Dataset):
    """Inputs `ids[i : i + block]` and targets `ids[i + 1 : i + block + 1]` for i = 0, stride, 2 * stride, ..."""

    def __init__(self, ids: torch.Tensor, block: int, stride: int = 1):
        self.ids, self.block, self.stride = ids, block, stride
        self.offsets = torch.arange(block + 1)

    def __len__(self) -> int:
        return (len(self.ids) - self.block - 1) // self.stride + 1

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]):
        rows = self.ids[torch.as_tensor(indices)[:, None] * self.stride + self.offsets].long()
        return rows[:, :-1], rows[:, 1:]


class CorpusDataModule(InMemoryDataModule):
    """Batches of (inputs, targets) token ids, (batch_size, block_size) each.

    Args:
        path: a UTF-8 text file, or a folder whose `.txt` files (in name order) make the corpus.
        tokenizer: 'char', 'bpe', or a Hugging Face tokenizer folder or name (needs transformers).
        bpe_vocab_size: the vocabulary the BPE learns (tokenizer 'bpe').
        block_size: tokens of context per sample (linked into the model's `block_size`).
        val_fraction: the last part of the tokens held out for validation.
        cache_dir: where token ids (and stream chunks) go; null: `<path>.cache/` beside the corpus.
        streaming: write litdata chunks once and stream them (corpora larger than memory).
        stream_dir: where the chunks go, a folder or an object store URL (default: in cache_dir).
    """

    def __init__(self, path: str, tokenizer: str = "char", bpe_vocab_size: int = 4096, block_size: int = 64,
                 batch_size: int = 12, val_fraction: float = 0.1, cache_dir: str | None = None,
                 streaming: bool = False, stream_dir: str | None = None, num_workers: int = 0):  # fmt: skip
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not 0 < val_fraction < 1:
            raise UserError(f"--data.val_fraction={val_fraction} must be in (0, 1); 0.1 holds out the last tenth")
        self.save_hyperparameters()
        self.path, self.block_size, self.val_fraction = Path(path), block_size, val_fraction
        self.cache = Path(cache_dir) if cache_dir else Path(f"{path}.cache")
        self.kind, self.bpe_vocab_size = tokenizer, bpe_vocab_size
        self.streaming, self.stream_dir = streaming, stream_dir
        self._tokenizer, self._key, self.ids = None, None, {}

    # What the command line links into the model: the tokenizer as plain values, and its size.
    @property
    def vocab(self) -> dict:
        return self.tokenizer.spec

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def use_trained(self, model_args: dict) -> None:
        """validate/test of a checkpoint: its tokenizer, not one trained again on this text."""
        if model_args.get("vocab"):
            self._tokenizer = Tokenizer(model_args["vocab"])

    @property
    def key(self) -> str:
        """SHA-256 of the corpus (its files' names and bytes) and the tokenizer options: the cache's name."""
        if self._key is None:
            digest, size = hashlib.sha256(json.dumps([self.kind, self.bpe_vocab_size]).encode()), 0
            for file in corpus_files(self.path):
                digest.update(file.name.encode())
                with open(file, "rb") as f:
                    while block := f.read(PIECE_BYTES):
                        digest.update(block)
                        size += len(block)
            if size == 0:
                raise UserError(f"--data.path={self.path}: the corpus is empty; give a file with text in it")
            self._key = digest.hexdigest()[:16]
        return self._key

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            saved = self.cache / f"vocab-{self.key}.json"
            if saved.is_file():
                self._tokenizer = Tokenizer(json.loads(saved.read_text(encoding="utf-8")))
            else:
                self._tokenizer = train_tokenizer(corpus_files(self.path), self.kind, self.bpe_vocab_size)
                self.cache.mkdir(parents=True, exist_ok=True)
                atomic_write(saved, lambda tmp: tmp.write_text(json.dumps(self._tokenizer.spec), encoding="utf-8"))
        return self._tokenizer

    def prepare_data(self) -> None:
        self.streamed_dirs() if self.streaming else self.token_ids()

    def token_ids(self) -> np.ndarray:
        """All the corpus's ids: read from the cache, or tokenised once and cached."""
        spec = hashlib.sha256(json.dumps(self.tokenizer.spec).encode()).hexdigest()[:8]  # a checkpoint's may differ
        saved = self.cache / f"tokens-{self.key}-{spec}.npy"
        if not saved.is_file():
            text = "".join(text for *_, text in pieces(corpus_files(self.path)))
            ids = np.asarray(self.tokenizer.encode(text, f"--data.path={self.path}"), dtype=np.int32)
            self.split_at(len(ids))
            self.cache.mkdir(parents=True, exist_ok=True)
            atomic_write(saved, lambda tmp: np.save(open(tmp, "wb"), ids))
        return np.load(saved, mmap_mode="r")

    def split_at(self, n: int) -> int:
        """Where validation starts in n tokens; an error if a split is shorter than one sample."""
        cut, need = n - int(n * self.val_fraction), self.block_size + 1
        if n == 0:
            raise UserError(f"--data.path={self.path}: the corpus is empty; give a file with text in it")
        if cut < need or n - cut < need:
            raise UserError(
                f"--data.path={self.path}: {n} tokens, too few for samples of block_size + 1 = {need} tokens "
                "in training and in validation; give more text or a smaller --data.block_size"
            )
        return cut

    def setup(self, stage: str) -> None:
        if not self.streaming:
            ids = torch.from_numpy(np.array(self.token_ids()))
            cut = self.split_at(len(ids))
            self.ids = {"train": ids[:cut], "val": ids[cut:]}

    def streamed_dirs(self) -> dict[str, str]:
        """The litdata chunk folders of the train and val splits, written once. Validation is the
        last `val_fraction` of the bytes (the piece of text across the boundary is cut at a character)."""
        import litdata

        root = self.stream_dir or str(self.cache / f"stream-{self.key}-{self.block_size}")
        dirs = {split: f"{root}/{split}" for split in ("train", "val")}
        if "://" in root or Path(root, "val", "index.json").is_file():
            return dirs
        parts = [(str(f), offset, len(t.encode())) for f, offset, t in pieces(corpus_files(self.path))]
        total, start, split = sum(p[2] for p in parts), 0, {"train": [], "val": []}
        if total == 0:
            raise UserError(f"--data.path={self.path}: the corpus is empty; give a file with text in it")
        boundary = total - int(total * self.val_fraction)
        for file, offset, length in parts:
            cut = min(max(boundary - start, 0), length)  # this piece's bytes before the boundary
            if 0 < cut < length:
                cut = char_start(file, offset + cut) - offset
            split["train"] += [(file, offset, cut)] if cut else []
            split["val"] += [(file, offset + cut, length - cut)] if cut < length else []
            start += length
        if not split["train"] or not split["val"]:
            raise UserError(f"--data.path={self.path}: {total} bytes, too few to hold out a validation part; add text")
        tmp = Path(f"{root}.tmp-{os.getpid()}")
        # A forked worker starts at once; a spawned one (litdata's default) imports torch and Lightning
        # again, seconds per split. Fork only on Linux (as DataLoader's workers): macOS's is unsafe.
        start = "fork" if sys.platform == "linux" else None
        for name, inputs in split.items():
            litdata.optimize(fn=functools.partial(tokenize_piece, spec=self.tokenizer.spec), inputs=inputs,
                             output_dir=str(tmp / name), chunk_size=(self.block_size + 1) * 1024,
                             item_loader=litdata.TokensLoader(), num_workers=1, verbose=False,
                             start_method=start)  # fmt: skip
        atomic_write(Path(root), tmp.rename)
        return dirs

    def _loader(self, split: str, shuffle: bool = False):
        if not self.streaming:
            samples = Windows(self.ids[split], self.block_size, stride=1 if shuffle else self.block_size)
            sampler = self._epoch_sampler(len(samples)) if shuffle else None
            generator = torch.Generator().manual_seed(0)  # as in batches.py: nothing drawn from the global one
            return torch.utils.data.DataLoader(samples, self.batch_size, sampler=sampler, collate_fn=already_stacked,
                                               num_workers=self.num_workers, generator=generator)  # fmt: skip
        import litdata

        samples = litdata.StreamingDataset(
            self.streamed_dirs()[split], item_loader=litdata.TokensLoader(block_size=self.block_size + 1),
            shuffle=shuffle, seed=torch.initial_seed() % 2**32, drop_last=shuffle,
        )  # fmt: skip
        if len(samples) == 0:
            raise UserError(f"--data.path={self.path}: the {split} split has no sample of block_size + 1 tokens")
        # Its own generator, as in batches.py: starting the loader draws nothing from the global one (dropout's).
        return litdata.StreamingDataLoader(samples, batch_size=self.batch_size, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(0))  # fmt: skip

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, torch.Tensor):  # streamed: rows of block_size + 1 ids
            return batch[:, :-1].long(), batch[:, 1:].long()
        return batch
