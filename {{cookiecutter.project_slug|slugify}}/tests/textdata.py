"""A tiny, randomly initialised BERT and labelled texts it can learn, written by the tests themselves.

No download: the vocabulary is the words below, the weights are random (seeded), and the
class of a text (or its score, `write_scores`) is given by its words, so a few epochs of
training learn it.
"""

from pathlib import Path

WORDS = {
    "positive": ["good", "great", "lovely", "happy", "fine", "nice"],
    "negative": ["bad", "awful", "sad", "poor", "ugly", "worse"],
}
FILLER = ["the", "a", "day", "film", "food", "was", "and", "it", "very", "so"]


def write_tiny_bert(folder: Path, layers: int = 2) -> Path:
    """A BERT folder (config, safetensors weights, WordPiece tokenizer) of about 60k parameters."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in WORDS.values() for w in ws)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (text, label) pairs: two to six filler words around one or two words of the label's class."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = rng.choices(FILLER, k=rng.randint(2, 6)) + rng.choices(WORDS[label], k=rng.randint(1, 2))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_texts(path: Path, n: int = 80, seed: int = 0, encoding: str = "utf-8") -> Path:
    """A CSV (or .tsv / .jsonl, by suffix) of `n` labelled texts with columns text,label."""
    import csv
    import json

    rows = texts(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding=encoding)
        return path
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_scores(path: Path, n: int = 120, seed: int = 0) -> Path:
    """A CSV of `n` texts with a numeric column `score`: 250 for a text of positive words, 150 for one of
    negative words, plus noise of at most 2 (standard deviation about 50, far from 0 and 1, so that a
    model that did not undo the target's standardisation would be far off)."""
    import csv
    import random

    rng = random.Random(seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "score"])
        for text, label in texts(n, seed):
            writer.writerow([text, f"{(250 if label == 'positive' else 150) + rng.uniform(-2, 2):.2f}"])
    return path
