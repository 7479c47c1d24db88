"""Export a text model (TextClassifier or TextRegressor checkpoint): the network file plus its tokenizer beside it.

`python -m {{ cookiecutter.package_name }}.export` comes here for text checkpoints. LoRA adapters are merged
into the weights first, so the file is the plain encoder and head. It takes two int64 inputs,
`input_ids` and `attention_mask`, both (batch, tokens) with batch and tokens dynamic, and
returns logits (a TextRegressor: the predicted value in the target's units, (batch, 1)). The
tokenizer is saved in the folder `<file stem>-tokenizer/` next to it, so inference needs
transformers' tokenizer (or the `tokenizers` package) and the runtime only:

    tokenizer = AutoTokenizer.from_pretrained("best-tokenizer")
    batch = tokenizer(["what a lovely day"], return_tensors="np", padding=True)
    logits = onnxruntime.InferenceSession("best.onnx").run(None, dict(batch))[0]

As for images, the file is compared with the PyTorch model (here on random token ids of
two batch sizes and two lengths) before it takes its name; a difference above the
tolerance writes nothing.
"""

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import UserError, load_model

INPUTS = ("input_ids", "attention_mask")


def is_text_checkpoint(path: Path) -> bool:
    """Whether checkpoint `path` was written by a text model (its hyperparameters name a model folder)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: export's own loading reports it
        return False
    return "model_name_or_path" in checkpoint.get("hyper_parameters", {})


def load_text_model(path: Path):
    """The TextClassifier (or TextRegressor) of checkpoint `path`, on the CPU, in eval mode: rebuilt
    from the base model's folder (`model_name_or_path`), then given the checkpoint's weights."""
    from .models.text import TextClassifier
    from .models.text_regressor import TextRegressor

    return load_model((TextClassifier, TextRegressor), path)


def random_batches(vocab: int, batch_size: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token ids and masks for the check: (batch_size, length) and (1, length // 2 + 1), padded texts included."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for n, tokens in dict.fromkeys(((batch_size, length), (1, length // 2 + 1))):
        ids = torch.randint(1, vocab, (n, tokens), generator=g)
        lengths = torch.randint(1, tokens + 1, (n,), generator=g)
        lengths[0] = tokens  # one text fills the batch, as the tokenizer pads to the longest
        mask = (torch.arange(tokens) < lengths[:, None]).long()
        batches.append((ids * mask, mask))
    return batches


def write_text_file(net, sample: tuple[torch.Tensor, torch.Tensor], fmt: str, path: Path, max_tokens: int) -> None:
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=max_tokens)
    shapes = ({0: batch, 1: tokens}, {0: batch, 1: tokens})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if fmt == "exported_program":
            torch.export.save(torch.export.export(net, sample, dynamic_shapes=shapes), path)
        elif fmt == "onnx":
            torch.onnx.export(
                net,
                sample,
                str(path),
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_shapes=shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        else:
            raise UserError(f"--format {fmt}: text models export as exported_program or onnx")


def load_text_file(fmt: str, path: Path):
    if fmt == "exported_program":
        module = torch.export.load(path).module()
        return lambda ids, mask: module(ids, mask)
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda ids, mask: torch.from_numpy(
        session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    )


def export_text(checkpoint: Path, fmt: str, out: Path, batch_size: int, tolerance: float) -> Path:
    """Write the text model of `checkpoint` to `out` and its tokenizer beside it; returns `out`."""
    if not out.parent.is_dir():
        raise UserError(f"--output={out}: the folder {out.parent} does not exist")
    from .pretrained import load_tokenizer

    model = load_text_model(checkpoint)
    tokenizer = load_tokenizer(model.hparams.model_name_or_path)
    net = model.inference_network()
    config = net.encoder.config
    max_tokens = min(int(model.hparams.input_shape[-1]), int(getattr(config, "max_position_embeddings", 512)))
    batches = random_batches(int(config.vocab_size), batch_size, max(2, max_tokens))
    with torch.no_grad():
        expected = [net(ids, mask) for ids, mask in batches]

    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=out.suffix)
    os.close(fd)
    tmp, words = Path(tmp_name), out.with_name(f"{out.stem}-tokenizer")
    staged = out.with_name(f".{out.stem}-tokenizer.tmp")
    try:
        write_text_file(net, batches[0], fmt, tmp, max_tokens)
        run = load_text_file(fmt, tmp)
        difference = None
        if run is not None:
            with torch.no_grad():
                difference = max((run(*x) - y).abs().max().item() for x, y in zip(batches, expected))
            if not difference <= tolerance:  # also catches NaN
                raise UserError(
                    f"the {fmt} model differs from PyTorch by up to {difference:.2e} (tolerance {tolerance:.0e}) "
                    "on random token ids; nothing written (try another --format, or --tolerance)"
                )
        shutil.rmtree(staged, ignore_errors=True)
        tokenizer.save_pretrained(staged)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        shutil.rmtree(words, ignore_errors=True)
        os.replace(staged, words)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
    line = f"Wrote {out} ({out.stat().st_size / 2**20:.1f} MB) and its tokenizer {words}/; "
    if difference is None:
        line += "NOT CHECKED: comparing with PyTorch needs ONNX Runtime: pip install -e '.[onnx]'"
    else:
        line += f"max |difference| vs PyTorch on random token ids: {difference:.1e} (tolerance {tolerance:.0e}): OK"
    print(line)
    classes = model.hparams.get("class_names")
    if "num_classes" in model.hparams:
        output = f"logits for {model.hparams.num_classes} classes"
        output += f" ({', '.join(map(str, classes))})" if classes else ""
    else:  # a TextRegressor
        output = "the predicted value in the target's units, (batch, 1)"
    print(
        f"Inputs: input_ids and attention_mask, int64 (batch, tokens), tokens <= {max_tokens}, as the tokenizer "
        f"gives them; output: {output}" + (" (LoRA merged)" if model.hparams.lora_rank else "")
    )
    return out
