"""What the user is told: mistakes they can fix, and lines printed once per run. Checkpoints and the
models in them are read here too (safely, weights_only=True), since every way that fails is such a mistake.

Every module may import this one; it imports nothing of the package, and Lightning and torch only
when a function needs them (so it can report a broken install of them).
"""

import inspect
import pickle
import sys
import textwrap
import zipfile
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad data, path or option).

    The command line prints it as one ``ERROR:`` line, without a traceback; the message
    says what is wrong, where, and how to fix it.
    """


def rank_zero_print(message: str) -> None:
    """Print from the first process only: multi-GPU and multi-node runs start one process per device."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(message, flush=True)


def first_line(err: object) -> str:
    """The first line of an exception's message, cut at a word boundary."""
    text = str(err).strip()
    return textwrap.shorten(text.splitlines()[0] if text else type(err).__name__, 160)


def checkpoint_error(what: str, path, err: BaseException) -> UserError:
    """The UserError for checkpoint `path` that `torch.load(weights_only=True)` refused or could not read.

    `what` starts the message: the path, or the option that gave it.
    """
    if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path):
        return UserError(
            f"{what}: refused to load: it holds objects that safe loading "
            f"(torch.load(weights_only=True)) does not allow ({first_line(err)}). "
            "Only checkpoints written by this project are accepted"
        )
    if isinstance(err, pickle.UnpicklingError):  # not written by torch.save at all
        return UserError(f"{what}: not a readable checkpoint (not a file written by torch.save)")
    return UserError(
        f"{what}: not a readable checkpoint ({first_line(err)}); it may be truncated: use another .ckpt file"
    )


# What torch.load raises for a file that is not a whole checkpoint (truncated, not a zip, not torch.save's).
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError)
GIVE_A_CHECKPOINT = "give a .ckpt file written by `fit`, e.g. logs/<run>/version_0/checkpoints/best.ckpt"


def read_checkpoint(path, what: str) -> dict:
    """The checkpoint at `path`, read safely (weights_only=True) on the CPU; `what` names it in errors
    (the option that gave it, e.g. '--ckpt_path=x.ckpt')."""
    import torch

    if not Path(path).is_file():
        raise UserError(f"{what}: file not found ({GIVE_A_CHECKPOINT}, or 'best' / 'last')")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UNREADABLE as err:
        raise checkpoint_error(what, path, err) from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{what}: holds no model weights (no 'state_dict'); {GIVE_A_CHECKPOINT}")
    hparams = checkpoint.get("hyper_parameters")
    check_class_paths(hparams if isinstance(hparams, dict) else {}, what)
    return checkpoint


def weights_mismatch(err: BaseException) -> str | None:
    """The first line of a `load_state_dict` error (missing, unexpected or mis-shaped weights), else None."""
    if isinstance(err, RuntimeError) and "loading state_dict" in str(err):
        return first_line(str(err).split("\n", 1)[-1].strip())
    return None


def saved_class(checkpoint: dict, base: type | tuple[type, ...]) -> type:
    """The class LightningCLI saved in the checkpoint (`_class_path`, e.g. a FineTuner) when it is an
    imported subclass of `base` (of one of them), else `base` (the first). `base.load_from_checkpoint`
    alone would build a `base`: Lightning drops `_class_path` for classes whose __init__ takes no **kwargs."""
    bases = base if isinstance(base, tuple) else (base,)
    module, _, name = str(checkpoint.get("hyper_parameters", {}).get("_class_path", "")).rpartition(".")
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, bases) else bases[0]


def load_model(cls, path: Path, **kwargs):
    """The model (a `cls`, or one of a tuple of classes) of checkpoint `path`, on the CPU, in eval mode
    (loaded with weights_only=True); `kwargs`: settings that replace the checkpoint's, where the class has them."""
    checkpoint = read_checkpoint(path, f"--ckpt_path={path}")  # one clear error for a missing, truncated or unsafe file
    cls = saved_class(checkpoint, cls)
    kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(cls).parameters}
    try:
        model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:
        if weights_mismatch(err):
            detail = weights_mismatch(err)
            raise UserError(f"{path}: the weights do not fit the model its settings describe ({detail})") from None
        if isinstance(err, UserError):
            raise
        raise checkpoint_error(path, path, err) from None
    return model.eval()


def effective_batch_size(trainer, batch) -> str:
    """'Effective batch size N = batch per device x accumulation x devices x nodes' (the samples per optimizer step)."""
    steps, devices, nodes = trainer.accumulate_grad_batches, trainer.num_devices, trainer.num_nodes
    total = batch * steps * devices * nodes if isinstance(batch, int) else "?"
    return (
        f"Effective batch size {total} = {batch} per device x {steps} accumulation x {devices} "
        f"device{'s' * (devices != 1)} x {nodes} node{'s' * (nodes != 1)}"
    )


def print_error(message: object) -> int:
    """Print the one `ERROR:` line of a user mistake to stderr; returns the exit code, 1."""
    print(f"ERROR: {message}", file=sys.stderr)
    return 1


def own_folders() -> list[Path]:
    """Where the user's own code lives: the current folder and the project's (the one with train.py)."""
    project = Path(__file__).resolve().parents[2]
    return [Path.cwd().resolve(), *([project] if (project / "train.py").is_file() else [])]


def check_class_paths(hparams: dict, what: str) -> None:
    """Refuse a checkpoint whose settings name a class (e.g. `network: {class_path: ...}`) from a module
    that is neither imported already nor a file under the current folder: building the model would
    import it, and running code is what safe loading (weights_only=True) is there to prevent."""
    import importlib.util

    for key, value in hparams.items():
        if isinstance(value, dict):
            check_class_paths(value, what)
        if key not in ("class_path", "_class_path") or not isinstance(value, str):
            continue
        top = value.split(".")[0]
        spec = None if top in sys.modules else importlib.util.find_spec(top)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if top not in sys.modules and not any(origin and origin.is_relative_to(root) for root in own_folders()):
            raise UserError(
                f"{what}: its settings name the class {value}, which is neither imported nor in a module under "
                f"this folder; refused (building the model would run its code). Run from the folder that defines it"
            )
