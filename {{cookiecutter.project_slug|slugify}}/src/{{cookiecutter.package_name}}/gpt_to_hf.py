"""From zero to a chat model: the project's own GPT checkpoint as a Hugging Face model folder, ready
for chat fine-tuning (README, From zero to a chat model).

    python -m {{ cookiecutter.package_name }}.gpt_to_hf --ckpt_path logs/gpt_char/version_0/checkpoints/best.ckpt --output models/my-gpt
    python train.py fit --config configs/sft_full.yaml --model.model_name_or_path=models/my-gpt --data.path=chats.jsonl

The GPT (models/gpt.py) has GPT-2's layout, so its weights become a `GPT2LMHeadModel` unchanged
(exact GELU, no biases: zeros); the logits of the folder are checked against the checkpoint's.
Its tokenizer becomes a Hugging Face tokenizer with the plain chat template (chat_template.py).

A char or byte-level vocabulary has no end-of-sequence token, and a char one may lack the template's
own characters ('#', 'U', ...). Each missing one is added as a new token: a new row of the (tied)
embedding, set to the mean of the others, so the model's outputs on the old tokens do not change.
`<|endoftext|>` is the EOS that closes every assistant answer (fine-tuning teaches the model to write
it: that is how the chat model stops), and `<|unk|>` stands for a character a char vocabulary lacks.
The context stays the GPT's `block_size`: give `--data.max_length` at most that.
"""

import argparse
import sys
from pathlib import Path

import torch

from .chat_template import CHAT_EXTRA, PLAIN_TEMPLATE
from .errors import UserError, print_error
from .generate import load
from .pretrained import transformers

EOS, UNK = "<|endoftext|>", "<|unk|>"
MARKUP = "### System:User:Assistant:\n"  # the characters PLAIN_TEMPLATE writes around the messages
CONV1D = ("c_attn.weight", "c_fc.weight", "c_proj.weight")  # Hugging Face's GPT-2 stores these (in, out)


def hf_tokenizer(spec: dict):
    """A Hugging Face tokenizer that encodes as the project's Tokenizer `spec` does, plus the EOS (and for
    a char vocabulary `<|unk|>` and the template's characters) after its ids, and the plain template."""
    hf = transformers(CHAT_EXTRA)
    from tokenizers import Tokenizer, decoders, models

    if spec["kind"] == "char":  # a BPE without merges: one token per character, ids in the GPT's order
        chars = [*spec["chars"], *sorted(set(MARKUP) - set(spec["chars"])), UNK, EOS]
        chars_model = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token=UNK))
        chars_model.decoder = decoders.Fuse()  # characters joined as they are (no spaces between tokens)
        tokenizer = hf.PreTrainedTokenizerFast(tokenizer_object=chars_model, unk_token=UNK, eos_token=EOS)
    elif spec["kind"] == "bpe":
        tokenizer = hf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec["json"]))
    else:
        tokenizer = hf.AutoTokenizer.from_pretrained(spec["name"])
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})  # after the GPT's ids
    tokenizer.chat_template = PLAIN_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token  # padding is masked by length: the EOS is still learned
    return tokenizer


def gpt2_model(network, vocab_size: int):
    """The GPT `network` as a transformers GPT2LMHeadModel with `vocab_size` tokens (new rows: the mean embedding)."""
    hf = transformers(CHAT_EXTRA)
    wte = network.transformer.wte.weight
    config = hf.GPT2Config(
        vocab_size=vocab_size, n_positions=network.block_size, n_embd=wte.shape[1], n_layer=len(network.transformer.h),
        n_head=network.transformer.h[0].attn.n_head, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )  # fmt: skip
    model = hf.GPT2LMHeadModel(config)
    state = {k: v.t() if k.endswith(CONV1D) else v for k, v in network.state_dict().items() if k != "lm_head.weight"}
    grown = wte.detach().mean(0, keepdim=True).expand(vocab_size - len(wte), -1)
    state["transformer.wte.weight"] = torch.cat([wte.detach(), grown])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(".bias") and k != "lm_head.weight" for k in missing):
        raise UserError(f"the GPT's weights do not map onto GPT-2's: {(unexpected or missing)[0]}")
    with torch.no_grad():
        for name in missing:  # a GPT trained with bias: false; zero biases compute the same
            if name.endswith(".bias"):
                model.get_parameter(name).zero_()
    model.config.eos_token_id = model.config.bos_token_id = None  # set from the tokenizer by the caller
    return model.eval()


def convert(ckpt_path: str, output: str, tolerance: float = 1e-4) -> Path:
    """Write the GPT of `ckpt_path` with its tokenizer to the folder `output`, checked; returns it."""
    out = Path(output)
    if not out.parent.is_dir():
        raise UserError(f"--output={out}: the folder {out.parent} does not exist")
    network, own = load(Path(ckpt_path))
    tokenizer = hf_tokenizer(own.spec)
    model = gpt2_model(network, len(tokenizer))
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    ids = torch.arange(min(own.vocab_size, network.block_size)).unsqueeze(0)  # every old id the context holds
    with torch.no_grad():
        difference = (model(input_ids=ids).logits[..., : own.vocab_size] - network(ids)[0]).abs().max().item()
    if not difference <= tolerance:
        raise UserError(f"the converted model's logits differ from the GPT's by {difference:.1e}; nothing written")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(
        f"Wrote {out}/: GPT-2 layout, {len(tokenizer) - own.vocab_size} tokens added to the {own.vocab_size} "
        f"(EOS {EOS}); max |logit difference| vs the checkpoint {difference:.1e}: OK. Context {network.block_size} "
        f"tokens: fine-tune with --model.model_name_or_path={out} --data.max_length={network.block_size}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.gpt_to_hf",
        description="Write a GPT checkpoint of this project as a Hugging Face model folder for chat fine-tuning.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a GPT's .ckpt file (configs/gpt_char.yaml, gpt_small.yaml)")
    parser.add_argument("--output", required=True, help="the folder to write, e.g. models/my-gpt")
    args = parser.parse_args(argv)
    try:
        convert(args.ckpt_path, args.output)
    except UserError as err:
        return print_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
