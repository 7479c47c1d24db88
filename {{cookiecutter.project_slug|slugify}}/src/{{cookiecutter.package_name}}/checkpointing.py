"""Training that survives being killed.

`AtomicCheckpointIO` writes each checkpoint to a temporary file beside it, then renames it
into place: a process killed while saving leaves the previous checkpoint whole. The command
line uses it unless the Trainer is given another CheckpointIO.

`LastCheckpoint` keeps `last.ckpt`: at the end of each epoch, every `every_n_train_steps`
optimizer steps when set, and when the run is asked to stop (SIGTERM; SIGUSR1 too outside
SLURM). Under SLURM, Lightning's own SIGUSR1 handling (save hpc_ckpt, requeue) is kept but run
between two steps, where its checkpoint is whole and its closing of the loggers cannot cut a
log write in half (it would fail with "Writer is closed"). It also stores the
random generators' states, and the DataModule stores how far into the epoch training got
(data/batches.py), so `fit --ckpt_path=last` continues exactly where the checkpoint was taken.
"""

import os
import random
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import UserError, rank_zero_print

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into `<path>.tmp-<pid>`, flushed to disk, then renamed to `path` (atomic on one file system)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk too
        finally:
            os.close(folder)


def rng_states() -> dict:
    """The global random generators' states as tensors, ints and tuples (weights_only=True loads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class LastCheckpoint(ModelCheckpoint):
    """`<dirpath>/<filename>.ckpt`, the checkpoint to resume from (see the module's docstring).

    Args:
        dirpath: its folder; default: the logger's `version_N/checkpoints/`.
        filename: its name without `.ckpt`.
        every_n_train_steps: also save every this many optimizer steps (null: only at epoch ends).
            A run killed with `kill -9` then loses at most this many steps.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last", every_n_train_steps: int | None = None):
        super().__init__(dirpath=dirpath, filename=filename, save_top_k=1, enable_version_counter=False)
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise UserError(
                f"every_n_train_steps={every_n_train_steps} must be at least 1 (or null: only at epoch ends)"
            )
        self.every_n_steps = every_n_train_steps
        self.stopped_by = None  # the signal's name, once one asked the run to stop
        self._rng_to_restore = None
        self._handlers = {}
        self._requeue = None  # Lightning's SLURM handler, once SIGUSR1 came: run at the next step's end
        self.saved_at_step = -1

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"

    def save_now(self, trainer) -> None:
        """Write `path` now (every process calls this; the strategy writes once, through AtomicCheckpointIO)."""
        if trainer.sanity_checking or trainer.fast_dev_run or self.saved_at_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: optimizer, loops, callbacks
        self.saved_at_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.requeue_if_asked()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            self.save_now(trainer)

    # Every save goes through save_now, which skips a step already saved: at the end of each epoch
    # (after its validation), not also where ModelCheckpoint would save by its own rules.
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Applied when training starts: building the run in between draws random numbers.
        self._rng_to_restore = state_dict.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._catch_stop_signals(trainer)

    def _catch_stop_signals(self, trainer) -> None:
        """SIGTERM (and SIGUSR1 outside SLURM) make Lightning stop after the current step (see on_exception);
        under SLURM, SIGUSR1 runs Lightning's requeue at the end of the current step."""
        environment = getattr(trainer.strategy, "cluster_environment", None)  # single-device strategies have none
        if isinstance(environment, SLURMEnvironment):
            slurm = environment.auto_requeue
        else:
            slurm = environment is None and SLURMEnvironment.detect()
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:  # Windows has no SIGUSR1
                continue
            previous = signal.getsignal(signum)

            def handler(number, frame, previous=previous, name=name):
                if slurm and name == "SIGUSR1" and callable(previous):  # SLURM's warning: see requeue_if_asked
                    self._requeue = (previous, number)
                    return
                self.stopped_by = self.stopped_by or name
                if callable(previous):
                    previous(number, frame)  # Lightning's SIGTERM handler: stop after this step (see on_exception)
                elif name != "SIGTERM":
                    signal.raise_signal(signal.SIGTERM)  # the same stop, through Lightning's SIGTERM handler
                else:
                    trainer.should_stop = True  # Lightning has no SIGTERM handler here: stop at the epoch's end

            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave signals to Lightning
                return
            self._handlers[signum] = previous

    def requeue_if_asked(self) -> None:
        """Run Lightning's SLURM SIGUSR1 handler (hpc_ckpt, `scontrol requeue`) now, if the signal came."""
        if self._requeue is not None:
            (handler, number), self._requeue = self._requeue, None
            handler(number, None)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, previous in self._handlers.items():
            signal.signal(signum, previous)
        self._handlers = {}
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Lightning raises SIGTERMException after the step during which a stop signal came."""
        if isinstance(exception, SIGTERMException) and self.dirpath is not None and trainer.global_step > 0:
            self.save_now(trainer)
            for logger in trainer.loggers:
                logger.finalize("interrupted")
            args = [a for a in sys.argv[1:] if not a.startswith("--ckpt_path")]
            command = shlex.join(["python", "train.py", *args, "--ckpt_path=last"])
            rank_zero_print(
                f"Received {self.stopped_by or 'SIGTERM'}: saved {self.path.resolve()}; resume with: {command}"
            )
