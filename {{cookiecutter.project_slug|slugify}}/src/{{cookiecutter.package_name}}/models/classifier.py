"""The LightningModule: a backbone and a linear head, trained with cross-entropy.

Every constructor argument is a plain number, string or list, so checkpoints hold no
pickled objects and load with `torch.load(weights_only=True)`.
"""

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import ClassificationScores
from .nets import build_backbone


class Classifier(L.LightningModule):
    """Classify inputs of `input_shape` into `num_classes` classes.

    Args:
        num_classes, input_shape, class_names: taken from the data (linked by the CLI).
        backbone: the network: 'mlp', 'cnn' or 'vit' (a Vision Transformer).
        width: hidden size (mlp), channels of the first block (cnn) or token size (vit).
        depth: hidden layers (mlp), convolution blocks (cnn) or transformer blocks (vit).
        dropout: dropout probability after each layer or block.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        scheduler: 'cosine' decays the learning rate to zero over the run; 'constant' keeps it.
        warmup_steps: optimizer steps of linear warm-up before the schedule.
        label_smoothing: passed to the cross-entropy loss.
        heads: attention heads per transformer block (vit); must divide `width`.
        patch_size: side of the square patches the image is cut into (vit); must divide its height and width.
        compile: compile the backbone with `torch.compile`: faster steps after a slow first one.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        class_names: list[str] | None = None,
        backbone: Literal["mlp", "cnn", "vit"] = "mlp",
        width: int = 256,
        depth: int = 2,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        heads: int = 4,
        patch_size: int = 7,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, input_shape, width, depth, dropout, heads, patch_size)
        # The compiled backbone (compile=true), set past nn.Module's registration of submodules
        # so that checkpoints have the same keys with and without compile.
        object.__setattr__(self, "compiled", torch.compile(self.backbone) if compile else None)
        self.head = nn.Linear(self.backbone.out_features, num_classes)
        # Accuracy and macro-F1, counted every step and computed once per epoch.
        self.train_metrics = ClassificationScores(num_classes, prefix="train/")
        self.val_metrics = ClassificationScores(num_classes, prefix="val/")
        self.test_metrics = ClassificationScores(num_classes, prefix="test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone if self.compiled is None else self.compiled
        return self.head(backbone(x))

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        getattr(self, f"{stage}_metrics").update(logits.detach(), y)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        # For a small model a `self.log` call costs about a quarter of the whole step, so the
        # step loss is logged only when the logger will write it (every log_every_n_steps),
        # and the epoch mean is summed on the device, without a host sync, and logged once.
        self.loss_sum += loss.detach()
        self.loss_count += 1
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._step(batch, "val"), on_epoch=True, prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._step(batch, "test"), on_epoch=True, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).softmax(dim=-1)

    def _log_epoch(self, stage: str) -> None:
        # torchmetrics gathers the counts from every process before computing.
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()
        metrics.reset()
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)
        if stage == "val":
            self.log("hp_metric", values["val/acc"], sync_dist=True)  # TensorBoard's HPARAMS tab

    def on_train_epoch_start(self):
        self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0

    def on_train_epoch_end(self):
        self.log("train/loss_epoch", self.loss_sum / max(1, self.loss_count), sync_dist=True)
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self._log_epoch("val")
        else:
            self.val_metrics.reset()

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Under FSDP each process holds a shard of every gradient, so the norm must be taken
        # across processes: FSDP's own clip_grad_norm_ does that (Lightning's does not).
        fsdp = hasattr(self.trainer.model, "clip_grad_norm_")  # the root FullyShardedDataParallel
        if fsdp and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total)
        cosine = self.hparams.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
