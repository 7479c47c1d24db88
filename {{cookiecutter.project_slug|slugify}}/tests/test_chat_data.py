"""The chat data: which tokens are learned, the one prompt renderer, packing, and hostile files."""

import pytest
import torch
from chatdata import CHATML, CONVERSATIONS, tiny_chat_model, write_jsonl

from {{ cookiecutter.package_name }}.chat_template import PLAIN_TEMPLATE, prompt_ids, render, use_template
from {{ cookiecutter.package_name }}.data.chat import (
    IGNORE,
    ChatDataModule,
    collate,
    collate_packed,
    pack,
    to_messages,
    tokenize_conversation,
)
from {{ cookiecutter.package_name }}.errors import UserError

pytest.importorskip("transformers", reason="the chat extra is needed: pip install -e '.[chat]'")


@pytest.fixture(scope="module", params=["chatml", "plain"])
def tokenizer(request, tmp_path_factory):
    """The tiny model's tokenizer: with its own ChatML template, or with none (the plain template applies)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp(request.param)
    tiny_chat_model(folder, template=None if request.param == "plain" else CHATML)
    tok = use_template(AutoTokenizer.from_pretrained(folder))
    assert tok.pad_token_id == tok.eos_token_id  # the hard case for masking
    return tok


def conversations() -> list[list[dict]]:
    return [to_messages(record, "test") for record in CONVERSATIONS]


def learned_runs(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive learned labels."""
    runs, run = [], []
    for label in [*labels, IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs, run = [*runs, run], []
    return runs


def test_masking_audit(tokenizer):
    """Every sample has learned tokens; exactly each assistant answer and its closing EOS are learned
    (no prompt, system or template token); the EOS stays learned in a padded batch where pad = EOS."""
    eos, samples = tokenizer.eos_token_id, []
    for messages in conversations():
        ids, labels = tokenize_conversation(tokenizer, messages)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = learned_runs(labels)
        assert len(runs) == len(answers)  # one learned stretch per assistant turn, nothing else
        for run, answer in zip(runs, answers):
            assert run[-1] == eos and eos not in run[:-1]  # closed by the EOS, learned
            assert tokenizer.decode(run[:-1]) == answer  # the answer's text, not a prompt token more
        assert all(label in (IGNORE, token) for token, label in zip(ids, labels))
        samples.append({"input_ids": ids, "labels": labels})
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    turns = sum(m["role"] == "assistant" for c in conversations() for m in c)
    assert int((batch["labels"] == eos).sum()) == turns  # padding (= EOS) is not learned, the EOS is
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE).all())


def test_template_round_trip(tokenizer):
    """The training render of each assistant turn's prompt is token for token what generation renders:
    the tokenizer's apply_chat_template(..., add_generation_prompt=True)."""
    for messages in conversations():
        ids, labels = tokenize_conversation(tokenizer, messages)
        starts = [i for i in range(len(labels)) if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for start, turn in zip(starts, turns, strict=True):
            expected = tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True, tokenize=True)
            expected = list(expected["input_ids"]) if hasattr(expected, "keys") else list(expected)
            assert ids[:start] == expected
            assert prompt_ids(tokenizer, messages[:turn]) == expected  # generation's own render


def test_the_tokenizers_template_else_the_plain_one(tokenizer):
    """A tokenizer's own chat template is used as it is; without one, the plain template of the README."""
    text = render(tokenizer, conversations()[0], add_generation_prompt=False)
    if tokenizer.chat_template == PLAIN_TEMPLATE:
        assert text == "### User:\nWhat is two plus two?\n\n### Assistant:\nFour.<|im_end|>\n\n"
    else:
        assert text == "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n"


def test_packing_keeps_samples_apart(tokenizer, tmp_path):
    """A packed row gives each sample the logits it has alone: no attention across samples, positions restart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    samples = [dict(zip(("input_ids", "labels"), tokenize_conversation(tokenizer, m))) for m in conversations()]
    rows = pack(samples, max_length=max(len(s["input_ids"]) for s in samples) * 2)
    assert len(rows) < len(samples)
    batch = collate_packed(rows, pad_id=tokenizer.pad_token_id)
    assert int((batch["labels"] != IGNORE).sum()) == sum(sum(x != IGNORE for x in s["labels"]) for s in samples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits  # fmt: skip
        k, row, offset = 0, 0, 0
        for s in samples:
            n = len(s["input_ids"])
            if offset + n > len(rows[row]["input_ids"]):
                row, offset = row + 1, 0
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[row, offset : offset + n], alone, atol=1e-5, rtol=1e-4)
            offset, k = offset + n, k + 1


HOSTILE = {
    "not JSON": ("{'instruction': 'single quotes'}", "not valid JSON"),
    "missing output": ({"instruction": "Say hi"}, "no text 'output'"),
    "unknown role": ({"messages": [{"role": "robot", "content": "beep"}]}, "role 'robot'"),
    "empty conversation": ({"messages": []}, "'messages' is empty"),
    "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    "prompt too long": ({"instruction": "word " * 400, "output": "ok"}, "longer than max_length=64"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_jsonl_names_file_and_line(case, tokenizer, tmp_path):
    record, message = HOSTILE[case]
    path = write_jsonl(tmp_path / "train.jsonl", [CONVERSATIONS[0], CONVERSATIONS[1], record, CONVERSATIONS[0]])
    data = ChatDataModule(path=str(path), max_length=64)
    data._tokenizer = tokenizer
    with pytest.raises(UserError) as err:
        data.setup("fit")
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)
