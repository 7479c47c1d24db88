"""Hand a fine-tuned chat model on as a Hugging Face folder that needs no project code.

    python -m {{ cookiecutter.package_name }}.chat_export --ckpt_path best --output chat-model

LoRA adapters are merged into the weights; the folder holds config.json, model.safetensors,
generation_config.json and the tokenizer with the chat template the model was trained with, so

    model = AutoModelForCausalLM.from_pretrained("chat-model")
    tokenizer = AutoTokenizer.from_pretrained("chat-model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    print(tokenizer.decode(model.generate(**ids, max_new_tokens=50)[0]))

Before the folder takes its name, it is loaded back with plain transformers and its logits on a
prompt are compared with the checkpoint's model (adapters unmerged): a difference above the
tolerance (a fraction of the largest logit) writes nothing.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from .chat_generate import load_chat_model
from .chat_template import CHAT_EXTRA, prompt_ids
from .errors import UserError, print_error
from .pretrained import transformers

CHECK = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write one sentence about rivers, 请用中文回答。"},
]


def export_hf(given: str, output: str, tolerance: float = 1e-4, log_dir: str = "logs") -> Path:
    """Write the model of checkpoint `given` (a path, best or last) to the folder `output`; returns it."""
    hf = transformers(CHAT_EXTRA)
    out = Path(output)
    if not out.parent.is_dir():
        raise UserError(f"--output={out}: the folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output={out}: a file is in the way (give a folder name)")
    model = load_chat_model(given, log_dir)
    ids = torch.tensor([prompt_ids(model.tokenizer, CHECK)])
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits
    merged = model.merged().eval()
    staged = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        merged.save_pretrained(staged, safe_serialization=True)
        model.tokenizer.save_pretrained(staged)  # with the chat template
        reloaded = hf.AutoModelForCausalLM.from_pretrained(staged, use_safetensors=True, dtype=torch.float32)
        with torch.no_grad():
            # Relative to the largest logit: merging LoRA (W + BA in one matrix) rounds differently in float32,
            # and over a 30-layer model that alone moves logits of size 20 by about 1e-4.
            scale = expected.float().abs().max().clamp_min(1.0)
            difference = ((reloaded(input_ids=ids).logits - expected.float()).abs().max() / scale).item()
        if not difference <= tolerance:  # also catches NaN
            raise UserError(
                f"the exported model's logits differ from the checkpoint's by up to {difference:.2e} of the "
                f"largest logit (tolerance {tolerance:.0e}); nothing written"
            )
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    lora = " (LoRA merged)" if model.hparams.lora_rank else ""
    print(
        f"Wrote {out}/ ({size:.0f} MB){lora}: a Hugging Face model folder with its tokenizer and chat template; "
        f"max |logit difference| vs the checkpoint: {difference:.1e} of the largest logit "
        f"(tolerance {tolerance:.0e}): OK"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.chat_export",
        description="Write a chat model checkpoint as a Hugging Face folder (LoRA merged) and check its logits.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file written by fit, or best / last")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |difference| (default: 1e-4)")
    parser.add_argument("--log_dir", default="logs", help="where best / last are looked for (default: logs)")
    args = parser.parse_args(argv)
    try:
        export_hf(args.ckpt_path, args.output, args.tolerance, args.log_dir)
    except UserError as err:
        return print_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
