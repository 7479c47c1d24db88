"""A callback that records, per process, what that process saw: for tests of multi-process runs.

Add it to any run with `--trainer.callbacks+=probe.Probe` (with tests/ on PYTHONPATH). At the
end of each stage every process writes `probe/<stage>-rank<global rank>.json` in the working
folder: the samples it trained on (a hash per image), its own count of validation hits, the
metrics the Trainer ended with, the optimizer steps it took, the module types of the
network as the strategy wrapped it, the cluster environment Lightning detected, and, for a
model with a compiled backbone, how many backbone calls ran through torch.compile.
"""

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy


def sample_ids(x: torch.Tensor) -> list[str]:
    """A short hash of each sample's values: the same image gives the same id on every process."""
    rows = x.detach().float().cpu().flatten(1).numpy()
    return [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in rows]


class Probe(Callback):
    def __init__(self, folder: str = "probe"):
        self.folder = Path(folder)
        self.first_epoch = None
        self.trained: list[str] = []  # the samples of this run's first epoch
        self.optimizer_steps = 0
        self.grad_norms: list[float] = []
        self.val_hits = self.val_seen = 0
        self.modules: Counter = Counter()
        self.backbone_calls: list[bool] = []

    def _look_at_model(self, trainer) -> None:
        # The network as the strategy wrapped it (DDP, FSDP units, activation checkpointing).
        self.modules = Counter(type(m).__name__ for m in trainer.strategy.model.modules())

    def on_train_start(self, trainer, pl_module):
        self._look_at_model(trainer)
        if getattr(pl_module, "compiled", None) is not None:
            # Inside a call that torch.compile traced, is_compiling() is True (and the append is replayed
            # on each call of the compiled code); a call of the plain module records False.
            pl_module.backbone.register_forward_pre_hook(
                lambda module, args: self.backbone_calls.append(torch.compiler.is_compiling())
            )

    def on_test_start(self, trainer, pl_module):
        self._look_at_model(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch
        if trainer.current_epoch == self.first_epoch:
            self.trained += sample_ids(batch[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # After the optimizer step and before the next zero_grad: the gradients as clipped.
        grads = [p.grad.detach().float().norm() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self.grad_norms.append(float(torch.stack(grads).norm()))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_hits = self.val_seen = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if isinstance(trainer.strategy, FSDPStrategy):
            return  # the parameters are sharded: only the wrapped model can run a forward pass
        x, y = batch
        self.val_hits += int((pl_module(x).argmax(dim=-1) == y).sum())
        self.val_seen += len(y)

    def teardown(self, trainer, pl_module, stage):
        environment = getattr(trainer.strategy, "cluster_environment", None)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "trained": self.trained,
            "optimizer_steps": self.optimizer_steps,
            "grad_norms": self.grad_norms,
            "global_step": trainer.global_step,
            "val_hits": self.val_hits,
            "val_seen": self.val_seen,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "precision": trainer.precision,
            "modules": self.modules,
            "backbone_calls": {"compiled": sum(self.backbone_calls), "plain": self.backbone_calls.count(False)},
            "cluster_environment": type(environment).__name__ if environment is not None else None,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        stage = getattr(stage, "value", stage)  # "fit", "test", ...
        (self.folder / f"{stage}-rank{trainer.global_rank}.json").write_text(json.dumps(record))
