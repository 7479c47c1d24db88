"""Export a trained model for inference without this project, and check it against PyTorch.

    python -m {{ cookiecutter.package_name }}.export --ckpt_path logs/digits_mlp/version_0/checkpoints/best.ckpt
    python -m {{ cookiecutter.package_name }}.export --ckpt_path best --format onnx     # needs: pip install -e '.[onnx]'

Formats: `exported_program` (torch.export, a .pt2 file: `torch.export.load(path).module()`),
`torchscript` (torch.jit.trace, a .pt file: `torch.jit.load(path)`; deprecated by PyTorch,
kept for older runtimes) and `onnx` (a .onnx file for ONNX Runtime and other engines). The
exported network is the model's normalisation (the training data's mean and std, saved in
the checkpoint), the backbone and the head, with any LoRA adapters merged; the batch
dimension is dynamic. So it takes raw inputs: images as float32 pixels in [0, 1] (uint8
values / 255), tables as their feature values in the training file's column order; it
returns logits (a Regressor: the predicted value in the target's units, its last layer undoing
the target's standardisation).

Beside the file, `<file>.json` records what a deployment needs (README, Use the exported
model): the input's shape, dtype and range, a table's feature columns, the class names in
output order and the source checkpoint.

Before the files replace their destinations, the model's outputs are compared with the
PyTorch model's on random raw inputs in two batch sizes; a difference above the tolerance
writes nothing and exits with code 1.
{%- if cookiecutter.chat == "yes" %}

A chat model (configs/sft_lora.yaml, sft_full.yaml) is handed on as a Hugging Face folder instead,
LoRA merged, by chat_export (README, Fine-tune a chat model):

    python -m {{ cookiecutter.package_name }}.export --ckpt_path best --format hf --output chat-model
{%- endif %}
"""

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError, load_model, print_error{% if cookiecutter.chat == "yes" %}, read_checkpoint{% endif %}
from .internals import ONNX_REGISTRATION

FORMATS = {"exported_program": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}
{%- if cookiecutter.chat == "yes" %}
HF = "hf"  # a chat model's format: a Hugging Face folder (chat_export.py)
{%- endif %}
ONNX_EXTRA = "pip install -e '.[onnx]'"


def inference_network(model) -> nn.Module:
    """Normalisation, backbone and head as a plain module (LoRA adapters merged, no Lightning attributes)."""
    from .models.finetune import merge_lora

    backbone = merge_lora(model.backbone) if model.hparams.get("lora_rank") else model.backbone
    return nn.Sequential(model.normalize, backbone, model.head).eval()


def input_kind(shape: tuple[int, ...]) -> str:
    """'image' (channels, height, width) or 'table' (features): what the exported model is fed."""
    return "image" if len(shape) == 3 else "table"


def raw_inputs(model, shape: tuple[int, ...], sizes, generator: torch.Generator) -> list[torch.Tensor]:
    """Random batches of raw inputs: pixels in [0, 1], or feature values spread like the training rows'."""
    if input_kind(shape) == "image":
        return [torch.rand(n, *shape, generator=generator) for n in sizes]
    mean, std = model.normalize.mean, model.normalize.std
    return [mean + std * torch.randn(n, *shape, generator=generator) for n in sizes]


def deployment_info(model, shape: tuple[int, ...], fmt: str, out: Path, checkpoint: Path) -> dict:
    """What the JSON file beside an export says: enough to feed the model and read its output."""
    regression = model.hparams.get("num_classes") is None  # a Regressor: one number per sample
    names = [] if regression else model.hparams.get("class_names") or range(model.hparams.get("num_classes"))
    kind = input_kind(shape)
    described = {
        "image": "pixels as float32 in [0, 1] (uint8 value / 255), channels first: (batch, channels, height, width)",
        "table": "the raw feature values (not standardised), in the order of `features`",
    }
    info = {
        "file": out.name,
        "format": fmt,
        "checkpoint": str(checkpoint.resolve()),
        "input": {
            "kind": kind,
            "shape": ["batch", *shape],
            "dtype": "float32",
            "range": [0.0, 1.0] if kind == "image" else None,
            "description": described[kind],
        },
        "features": model.hparams.get("feature_names") if kind == "table" else None,
        "classes": None if regression else [str(n) for n in names],
        "output": "the predicted value in the target's units, shape (batch, 1)"
        if regression
        else "logits, one per class in the order of `classes`; softmax gives probabilities",
        # Already applied inside the model; here for reference only.
        "normalization": {
            "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(),
        },
    }
    if regression:  # also inside the model (its last layer): the target's statistics of the training rows
        info["target"] = {"mean": float(model.head.mean), "std": float(model.head.std)}
    if fmt == "onnx":
        info["onnx"] = {"input": "input", "output": "logits"}
    return info


def write_file(net: nn.Module, sample: torch.Tensor, fmt: str, path: Path) -> None:
    """Write `net` in format `fmt` to `path`, tracing it with `sample`."""
    with warnings.catch_warnings():
        # PyTorch's own deprecation notices from inside the exporters; nothing a user can act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if fmt == "exported_program":
            batch = torch.export.Dim("batch")
            program = torch.export.export(net, (sample,), dynamic_shapes=({0: batch},))
            torch.export.save(program, path)
        elif fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(net, sample)
            torch.jit.save(traced, str(path))
        else:
            registration = logging.getLogger(ONNX_REGISTRATION)
            level = registration.level
            registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..."
            try:
                torch.onnx.export(
                    net,
                    (sample,),
                    str(path),
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_shapes=({0: "batch"},),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            finally:
                registration.setLevel(level)


def load_file(fmt: str, path: Path):
    """A function running the exported file on a tensor, or None when ONNX Runtime is missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "exported_program":
            module = torch.export.load(path).module()
            return lambda x: module(x)
        if fmt == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu")
            return lambda x: module(x)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def export(ckpt_path: str, fmt: str, output: str | None, batch_size: int, tolerance: float, log_dir: str) -> Path:
    """Write the model of `ckpt_path` in format `fmt` and check it; returns the written path."""
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(f"--format onnx needs the packages {' and '.join(missing)}: {ONNX_EXTRA}")
    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size}: give at least 1")
    from .cli import resolve_checkpoint

    checkpoint = resolve_checkpoint(ckpt_path, Path(log_dir))
{%- if cookiecutter.chat == "yes" %}
    from .chat_generate import is_chat

    if is_chat(read_checkpoint(checkpoint, f"--ckpt_path={checkpoint}").get("hyper_parameters") or {}):
        if fmt != HF:
            raise UserError(
                f"--ckpt_path={checkpoint}: a chat model is exported as a Hugging Face folder: give --format {HF}"
            )
        from .chat_export import export_hf

        return export_hf(str(checkpoint), output or str(checkpoint.with_name(f"{checkpoint.stem}-{HF}")), tolerance)
    if fmt == HF:
        raise UserError(
            f"--format {HF}: {checkpoint} is not a chat model's checkpoint (configs/sft_lora.yaml, sft_full.yaml); "
            f"export this model with --format {', '.join(FORMATS)}"
        )
{%- endif %}
{%- if cookiecutter.text == "yes" %}
    from .text_export import export_text, is_text_checkpoint

    if is_text_checkpoint(checkpoint):  # a TextClassifier: two inputs, and its tokenizer beside the file
        return export_text(checkpoint, fmt, Path(output or checkpoint.with_suffix(FORMATS[fmt])), batch_size, tolerance)
{%- endif %}
    from .models import Classifier, Regressor

    model = load_model((Classifier, Regressor), checkpoint, compile=False)
    net = inference_network(model)
    shape = tuple(model.hparams.get("input_shape") or (1, 28, 28))
    out = Path(output) if output else checkpoint.with_suffix(FORMATS[fmt])
    if not out.parent.is_dir():
        raise UserError(f"--output={out}: the folder {out.parent} does not exist")
    described = out.with_name(out.name + ".json")

    generator = torch.Generator().manual_seed(0)
    batches = raw_inputs(model, shape, dict.fromkeys((batch_size, 1)), generator)
    with torch.no_grad():
        expected = [net(x) for x in batches]

    tmp, tmp_json = (temporary_beside(path) for path in (out, described))
    try:
        write_file(net, batches[0], fmt, tmp)
        run = load_file(fmt, tmp)
        if run is None:
            difference = None
        else:
            with torch.no_grad():
                difference = max((run(x) - y).abs().max().item() for x, y in zip(batches, expected))
            if not difference <= tolerance:  # also catches NaN
                raise UserError(
                    f"the {fmt} model differs from PyTorch by up to {difference:.2e} (tolerance {tolerance:.0e}) "
                    f"on random batches of {' and '.join(str(len(x)) for x in batches)}; nothing written "
                    "(try another --format, or --tolerance if the difference is acceptable)"
                )
        tmp_json.write_text(json.dumps(deployment_info(model, shape, fmt, out, checkpoint), indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for path, final in ((tmp, out), (tmp_json, described)):
            path.chmod(0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
            os.replace(path, final)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)

    sizes = " and ".join(str(len(x)) for x in batches)
    line = f"Wrote {out} ({out.stat().st_size / 1024:.0f} KB); "
    if difference is None:
        line += f"NOT CHECKED: comparing with PyTorch needs ONNX Runtime: {ONNX_EXTRA}"
    else:
        line += f"max |difference| vs PyTorch on batches of {sizes}: {difference:.1e} (tolerance {tolerance:.0e}): OK"
    print(line)
    classes = model.hparams.get("class_names")
    raw = "pixels in [0, 1] (uint8 / 255)" if input_kind(shape) == "image" else "raw feature values"
    if isinstance(model, Regressor):
        output = "the predicted value in the target's units, (batch, 1)"
    else:
        output = f"logits for {model.hparams.get('num_classes')} classes" + (
            f" ({', '.join(map(str, classes))})" if classes else ""
        )
    print(
        f"Input: float32 (batch, {', '.join(map(str, shape))}), {raw}: the training data's normalisation is "
        f"inside the model; output: {output}"
    )
    print(f"Wrote {described}: input shape, dtype and range, class names (and feature columns) for deployment")
    return out


def temporary_beside(path: Path) -> Path:
    """An empty temporary file in `path`'s folder, to be renamed onto `path` when complete."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.export",
        description="Export a checkpoint's model to a file and check its outputs against PyTorch.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file written by fit, or best / last")
{%- if cookiecutter.chat == "yes" %}
    parser.add_argument(
        "--format", choices=[*FORMATS, HF], default="exported_program",
        help=f"default: %(default)s; {HF}: a chat model as a Hugging Face folder",
    )  # fmt: skip
    parser.add_argument(
        "--output",
        help=f"the file to write (default: the checkpoint's path with .pt2 / .pt / .onnx; {HF}: <checkpoint>-{HF}/)",
    )
{%- else %}
    parser.add_argument("--format", choices=list(FORMATS), default="exported_program", help="default: %(default)s")
    parser.add_argument("--output", help="the file to write (default: the checkpoint's path with .pt2 / .pt / .onnx)")
{%- endif %}
    parser.add_argument(
        "--batch_size", "--batch-size", type=int, default=8, help="size of the random check batch (default: 8)"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |difference| (default: 1e-4)")
    parser.add_argument("--log_dir", default="logs", help="where best / last are looked for (default: logs)")
    args = parser.parse_args(argv)
    try:
        export(args.ckpt_path, args.format, args.output, args.batch_size, args.tolerance, args.log_dir)
    except UserError as err:
        return print_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
