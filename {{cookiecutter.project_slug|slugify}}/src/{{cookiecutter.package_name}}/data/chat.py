"""Conversations to fine-tune a chat model on: JSON Lines files, rendered, tokenised and masked.

One conversation per line, in either of two shapes:

    {"instruction": "Translate to French", "input": "cheese", "output": "fromage"}     (Alpaca; input optional)
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}                       (several turns)

Which tokens are learned (their label is the token; every other label is -100, ignored by the loss):
- the assistant turns' tokens, and the end-of-sequence (EOS) token that closes each, so the model
  learns to stop; the system and user turns and the template's own markup are not learned;
- the EOS is learned even when the tokenizer's pad token is the EOS: padding is masked by each
  sample's length, never by comparing token ids with the pad id;
- a conversation is cut to `max_length` tokens; if that leaves no learned token (the first prompt
  alone is longer), reading stops with an ERROR naming the file and line.

Every mistake in a file (a line that is not JSON, a missing `output`, an unknown role, an empty
conversation, a prompt longer than `max_length`) is one ERROR line naming the file and line.
"""

from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from ..chat_template import CHAT_EXTRA, ROLES, encode, render, use_template
from ..errors import UserError
from ..pretrained import load_tokenizer
from .batches import EpochSampler
from .custom import json_lines

IGNORE = -100  # the label of a token that is not learned (cross_entropy's ignore_index)


def to_messages(record: dict, where: str) -> list[dict]:
    """The conversation of one JSON record (Alpaca or chat shape), checked; `where` is 'file:line'."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' is empty or not a list; give at least a user and an assistant turn")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                role = m.get("role") if isinstance(m, dict) else m
                raise UserError(
                    f"{where}: message {k + 1} (role {role!r}) is not an object with a role (system, user or "
                    "assistant) and a text content"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: no assistant message: nothing to learn from this conversation")
        return messages
    if "instruction" in record:
        missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise UserError(f"{where}: no text {missing[0]!r} (an Alpaca record needs instruction and output)")
        context = record.get("input") or ""
        prompt = record["instruction"] + (f"\n\n{context}" if context else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise UserError(f"{where}: neither 'messages' nor 'instruction' (fields: {list(record)[:6]})")


def read_jsonl(path: Path) -> list[tuple[int, list[dict]]]:
    """(line number, conversation) for every non-blank line of `path`."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    conversations = [(line, to_messages(record, f"{path}:{line}")) for line, record in json_lines(path, text)]
    if not conversations:
        raise UserError(f"{path}: no conversations (the file is empty)")
    return conversations


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation, rendered by the chat template turn by turn.

    For each assistant turn, the template renders the conversation before it with the generation
    prompt (exactly what generation will render) and the conversation including it; the text in
    between is the answer. Its tokens up to and including the first EOS are learned; what the
    template adds after the EOS (e.g. a newline) is not. A template that does not end the turn
    with the EOS gets one appended, learned. Tokens after the last assistant turn are left out.
    """
    eos = tokenizer.eos_token_id
    ids, labels, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(
                "the chat template renders a conversation differently from its beginning; "
                "fine-tuning needs a template whose renders of a conversation's turns extend each other"
            )
        prompt_part, answer = encode(tokenizer, prompt[len(done) :]), encode(tokenizer, full[len(prompt) :])
        end = answer.index(eos) + 1 if eos in answer else len(answer)
        learned, rest = answer[:end] + ([] if eos in answer else [eos]), answer[end:]
        ids += prompt_part + learned + rest
        labels += [IGNORE] * len(prompt_part) + learned + [IGNORE] * len(rest)
        done = full
    return ids, labels


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded on the right to its longest sample; padding is masked by length (pad_id may be the EOS)."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(samples: list[dict], max_length: int) -> list[dict]:
    """Samples concatenated into rows of at most `max_length` tokens (in order, a new row when one is full).

    Each packed token keeps its sample's number (`segment`) and its position within the sample, so
    `collate_packed` lets no token attend to another sample and positions restart with each sample.
    """
    rows, row = [], None
    for s in samples:
        n = len(s["input_ids"])
        if row is None or len(row["input_ids"]) + n > max_length:
            row = {"input_ids": [], "labels": [], "position_ids": [], "segment": []}
            rows.append(row)
        segment = row["segment"][-1] + 1 if row["segment"] else 0
        row["input_ids"] += s["input_ids"]
        row["labels"] += s["labels"]
        row["position_ids"] += list(range(n))
        row["segment"] += [segment] * n
    return rows


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of packed rows with a 4D attention mask: causal within each sample, nothing across samples."""
    batch = collate(rows, pad_id)
    length = batch["input_ids"].shape[1]
    segment = torch.full((len(rows), length), -1, dtype=torch.long)  # padding: a segment of its own
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row["segment"])
        segment[r, :n], positions[r, :n] = torch.tensor(row["segment"]), torch.tensor(row["position_ids"])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    # A padding token attends to itself only, so no attention row is empty (that would give NaN).
    mask = (same & causal) | torch.eye(length, dtype=torch.bool)
    return {**batch, "attention_mask": mask[:, None], "position_ids": positions}


class ChatDataModule(LightningDataModule):
    """Conversations from JSON Lines files (see the module docstring for the two record shapes).

    Args:
        path: a .jsonl file, or a folder with train.jsonl and optionally val.jsonl and test.jsonl.
        tokenizer: the tokenizer's model folder or Hub name; null: the model's `model_name_or_path`
            (the command line fills it in), so the two always match.
        max_length: conversations are cut to this many tokens.
        batch_size: conversations (or packed rows) per batch; a batch is padded to its longest.
        val_fraction: without val.jsonl, this fraction of train.jsonl (a fixed, seeded choice) is held out.
        seed: seed of that split and of the order of the training conversations.
        pack: concatenate conversations into rows of up to max_length tokens (no attention across
            them): fewer padding tokens when conversations are short.
        sample_prompts: how many held-out prompts the model answers at each validation (TensorBoard's
            Text tab).
        num_workers: DataLoader worker processes (the data is in memory: 0 is usually fastest).
    """

    def __init__(
        self,
        path: str = "data/chat.jsonl",
        tokenizer: str | None = None,
        max_length: int = 1024,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 42,
        pack: bool = False,
        sample_prompts: int = 3,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if max_length < 2:
            raise UserError(f"max_length={max_length}: give at least 2 tokens")
        if not 0 <= val_fraction < 1:
            raise UserError(f"val_fraction={val_fraction}: give a fraction in [0, 1)")
        self._tokenizer = None
        self.splits: dict[str, list[dict]] = {}
        self.prompts: list[list[dict]] = []  # held-out conversations' first prompts, for the Text tab

    @property
    def batch_size(self) -> int:
        return self.hparams.batch_size

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = use_template(load_tokenizer(self.hparams.tokenizer, CHAT_EXTRA))
        return self._tokenizer

    def files(self) -> dict[str, Path]:
        path = Path(self.hparams.path)
        if path.is_file():
            return {"train": path}
        if not (path / "train.jsonl").is_file():
            what = "no train.jsonl in this folder" if path.is_dir() else "file not found"
            raise UserError(f"{path}: {what} (set --data.path to a .jsonl file or a folder with train.jsonl)")
        return {s: path / f"{s}.jsonl" for s in ("train", "val", "test") if (path / f"{s}.jsonl").is_file()}

    def encode_file(self, path: Path) -> tuple[list[dict], list[list[dict]]]:
        """The tokenised conversations of `path` and their messages."""
        samples, conversations = [], []
        for line, messages in read_jsonl(path):
            ids, labels = tokenize_conversation(self.tokenizer, messages)
            ids, labels = ids[: self.hparams.max_length], labels[: self.hparams.max_length]
            if all(label == IGNORE for label in labels):
                raise UserError(
                    f"{path}:{line}: the prompt is longer than max_length={self.hparams.max_length} tokens: "
                    "no answer token is left to learn; raise --data.max_length or shorten this conversation"
                )
            samples.append({"input_ids": ids, "labels": labels})
            conversations.append(messages)
        return samples, conversations

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        files = self.files()
        read = {split: self.encode_file(file) for split, file in files.items()}
        train, train_messages = read["train"]
        if "val" not in read:  # hold out a seeded fraction of the training conversations
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
            cut = round(len(train) * self.hparams.val_fraction)
            held, kept = order[:cut], sorted(order[cut:])
            read["val"] = ([train[i] for i in held], [train_messages[i] for i in held])
            read["train"] = ([train[i] for i in kept], [train_messages[i] for i in kept])
        self.splits = {split: samples for split, (samples, _) in read.items()}
        first_prompt = [m[: next(i for i, x in enumerate(m) if x["role"] == "assistant")] for m in read["val"][1]]
        self.prompts = first_prompt[: self.hparams.sample_prompts]

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits or not self.splits[split]:
            raise UserError(f"{self.hparams.path}: no {split} conversations (add {split}.jsonl to the data folder)")
        samples, pad = self.splits[split], self.tokenizer.pad_token_id
        if self.hparams.pack:
            samples = pack(samples, self.hparams.max_length)
        collate_fn = partial(collate_packed if self.hparams.pack else collate, pad_id=pad)  # picklable for workers
        return DataLoader(
            samples,
            batch_size=self.hparams.batch_size,
            # An order fixed by (seed, epoch), and a generator of the loader's own: a run resumed at an
            # epoch's end sees the same batches and draws the same dropout as one that never stopped.
            sampler=EpochSampler(len(samples), self.hparams.seed, skip={}) if shuffle else None,
            generator=torch.Generator().manual_seed(0),
            collate_fn=collate_fn,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)
