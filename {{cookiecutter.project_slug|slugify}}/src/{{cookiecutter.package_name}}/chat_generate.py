"""Answer prompts with a chat model fine-tuned by `python train.py fit --config configs/sft_lora.yaml`.

    python -m {{ cookiecutter.package_name }}.chat_generate --ckpt_path best --prompt "Name three rivers in China"

The prompt is rendered with the chat template saved in the checkpoint (the one the model was
trained with), and the answer is printed as it is generated. A LoRA checkpoint is rebuilt from its
`model_name_or_path` folder plus the adapters it holds.
"""

import argparse
import sys
from pathlib import Path

from .errors import GIVE_A_CHECKPOINT, UserError, checkpoint_error, print_error, read_checkpoint, weights_mismatch


def is_chat(hparams: dict) -> bool:
    """Whether a checkpoint's hyperparameters are a ChatModel's (every one saves the chat template it was
    trained with), read without building anything: generate and export route by it."""
    return "chat_template" in hparams


def load_chat_model(given: str, log_dir: str = "logs"):
    """The ChatModel of checkpoint `given` (a path, or best / last: the newest under `log_dir`), on the CPU,
    in eval mode, rebuilt from its `model_name_or_path` plus the weights the checkpoint holds."""
    from .cli import newest_checkpoint
    from .models.chat import ChatModel

    path = Path(given)
    if given in ("best", "last"):
        path = newest_checkpoint(Path(log_dir), given, version="*/*")  # any run name, any version
        if path is None:
            raise UserError(
                f"--ckpt_path={given}: no {given} checkpoint under {log_dir}/*/*/checkpoints (train first with "
                "`python train.py fit --config configs/sft_lora.yaml`, give --log_dir, or give a .ckpt path)"
            )
        print(f"Using checkpoint {path}", file=sys.stderr)
    checkpoint = read_checkpoint(path, f"--ckpt_path={path}")
    if not is_chat(checkpoint.get("hyper_parameters") or {}):
        raise UserError(f"--ckpt_path={path}: not a chat model's checkpoint; {GIVE_A_CHECKPOINT} with sft_lora.yaml")
    try:
        model = ChatModel.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as err:
        if weights_mismatch(err):
            raise UserError(f"{path}: the weights do not fit the model its settings describe") from None
        raise checkpoint_error(path, path, err) from None
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.chat_generate",
        description="Answer prompts with a fine-tuned chat model.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file written by fit, or best / last")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeat for several)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None, help="sample among the most likely tokens of mass p")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling (default: %(default)s)")
    parser.add_argument("--log_dir", default="logs", help="where best / last are looked for (default: logs)")
    args = parser.parse_args(argv)
    try:
        from .models.chat import chat_reply

        model = load_chat_model(args.ckpt_path, args.log_dir)
        for prompt in args.prompt:
            print(f"> {prompt}", flush=True)
            chat_reply(
                model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                on_text=lambda piece: print(piece, end="", flush=True),
            )  # fmt: skip
            print(flush=True)
    except UserError as err:
        return print_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
