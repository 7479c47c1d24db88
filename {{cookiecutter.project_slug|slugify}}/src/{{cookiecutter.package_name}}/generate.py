"""Continue a prompt with a trained GPT, printing the text as it is made.

    python -m {{ cookiecutter.package_name }}.generate --ckpt_path=best --prompt "ROMEO:" --max_new_tokens 200 \
        --temperature 0.8 --top_k 50 --seed 0

`--ckpt_path` is a .ckpt file, or `best` / `last`: the newest such checkpoint of the runs of
`--config` (its logger's folder), as for `python train.py test`. The checkpoint alone rebuilds the
network and its tokenizer. The same seed gives the same text; `--no_cache` recomputes the whole
context for each token (slower; the text is the same).
{%- if cookiecutter.chat == "yes" %}

A chat model's checkpoint (configs/sft_lora.yaml, sft_full.yaml) is answered by chat_generate, with its
options (`--prompt` may be repeated; see `python -m {{ cookiecutter.package_name }}.chat_generate --help`):

    python -m {{ cookiecutter.package_name }}.generate --config configs/sft_lora.yaml --ckpt_path best --prompt "Hi"
{%- endif %}
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from .data.corpus import Tokenizer
from .errors import UserError, print_error, read_checkpoint
from .models.gpt import GPT

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gpt_char.yaml"
NETWORK = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


def find_checkpoint(given: str, config: str) -> Path:
    """`given`, or for 'best'/'last' the newest such checkpoint under the config's logs/<name>/."""
    if given not in ("best", "last"):
        return Path(given)
    from .cli import newest_checkpoint

    try:
        logger = yaml.safe_load(Path(config).read_text(encoding="utf-8"))["trainer"]["logger"]["init_args"]
        root = Path(logger["save_dir"]) / logger.get("name", "")
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise UserError(f"--config={config}: no trainer.logger save_dir/name to find '{given}' in ({err})") from None
    found = newest_checkpoint(root, given)
    if found is None:
{%- if cookiecutter.chat == "yes" %}
        hint = ", or give the --config of the run, e.g. configs/sft_lora.yaml"
{%- else %}
        hint = ""
{%- endif %}
        raise UserError(f"--ckpt_path={given}: no {given} checkpoint under {root}/*/checkpoints (train first{hint})")
    return found


def load(path: Path) -> tuple[GPT, Tokenizer]:
    """The network (in eval mode) and the tokenizer of a GPTModule checkpoint."""
    checkpoint = read_checkpoint(path, f"--ckpt_path={path}")
    h = checkpoint.get("hyper_parameters") or {}
    if not all(k in h for k in (*NETWORK, "vocab")):
        kind = h.get("_class_path", "another model")
        raise UserError(f"--ckpt_path={path}: a checkpoint of {kind}, not of a GPT; give one trained with a gpt config")
    network = GPT(*(h[k] for k in NETWORK))
    network.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()})
    return network.eval(), Tokenizer(h["vocab"])


def text_pieces(steps, tokenizer: Tokenizer):
    """The text of the token ids `steps` yields (tensors of one id), piece by piece as they come
    (the command prints them, the server streams them)."""
    new, shown = [], ""
    for token in steps:
        new.append(token.item())
        text = tokenizer.decode(new)
        # A byte-level token may end inside a character: wait for the rest.
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
    rest = tokenizer.decode(new)[len(shown) :]
    if rest:
        yield rest
{%- if cookiecutter.chat == "yes" %}


def answer_chat(args: list[str] | None) -> int | None:
    """chat_generate's exit code when the checkpoint is a chat model's (it answers with its own options),
    else None: the checkpoint is read for its hyperparameters only (memory-mapped, no model built)."""
    from .chat_generate import is_chat
    from .chat_generate import main as chat_main

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--ckpt_path", default="best")
    first.add_argument("--config", default=str(DEFAULT_CONFIG))
    known, rest = first.parse_known_args(args)
    if "-h" in rest or "--help" in rest:
        return None
    try:
        path = find_checkpoint(known.ckpt_path, known.config)
        hparams = read_checkpoint(path, f"--ckpt_path={path}").get("hyper_parameters") or {}
    except UserError:
        return None  # the GPT's own loading below reports it
    return chat_main(["--ckpt_path", str(path), *rest]) if is_chat(hparams) else None
{%- endif %}


def main(args=None) -> None:
{%- if cookiecutter.chat == "yes" %}
    code = answer_chat(args)
    if code is not None:
        sys.exit(code)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="A chat model's checkpoint is answered with chat_generate's options (its --help).",
    )
{%- else %}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
{%- endif %}
    parser.add_argument("--ckpt_path", default="best", help="a .ckpt file, or best / last of --config's runs")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the training config (for best / last)")
    parser.add_argument("--prompt", default="\n", help="the text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: always the most likely token")
    parser.add_argument("--top_k", type=int, default=None, help="draw among the k most likely tokens only")
    parser.add_argument("--top_p", type=float, default=None, help="draw among the likeliest tokens of this mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context for each token")
    opts = parser.parse_args(args)
    try:
        network, tokenizer = load(find_checkpoint(opts.ckpt_path, opts.config))
        ids = tokenizer.encode(opts.prompt, f"--prompt={opts.prompt!r}")
        if not ids:
            raise UserError("--prompt is empty; give some text to continue, e.g. --prompt $'\\n'")
    except UserError as err:
        sys.exit(print_error(err))
    generator = torch.Generator().manual_seed(opts.seed)
    print(opts.prompt, end="", flush=True)
    steps = network.generate(torch.tensor([ids]), opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p,
                             use_cache=not opts.no_cache, generator=generator)  # fmt: skip
    for piece in text_pieces(steps, tokenizer):
        print(piece, end="", flush=True)
    print(flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
