"""What the user is told: mistakes they can fix, and lines printed once per run.

Every module may import this one; it imports nothing of the package.
"""

import pickle
import textwrap
import zipfile

from lightning.pytorch.utilities.rank_zero import rank_zero_only


class UserError(Exception):
    """A mistake the user can fix (bad data, path or option).

    The command line prints it as one ``ERROR:`` line, without a traceback; the message
    says what is wrong, where, and how to fix it.
    """


@rank_zero_only
def rank_zero_print(message: str) -> None:
    """Print from the first process only: multi-GPU and multi-node runs start one process per device."""
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
