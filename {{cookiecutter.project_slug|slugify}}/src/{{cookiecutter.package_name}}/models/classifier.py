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
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .nets import build_backbone


class Classifier(L.LightningModule):
    """Classify inputs of `input_shape` into `num_classes` classes.

    Args:
        num_classes, input_shape, class_names: taken from the data (linked by the CLI).
        backbone: the network: 'mlp' or 'cnn'.
        width: hidden size (mlp) or channels of the first block (cnn).
        depth: hidden layers (mlp) or convolution blocks (cnn).
        dropout: dropout probability after each layer or block.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        scheduler: 'cosine' decays the learning rate to zero over the run; 'constant' keeps it.
        warmup_steps: optimizer steps of linear warm-up before the schedule.
        label_smoothing: passed to the cross-entropy loss.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        class_names: list[str] | None = None,
        backbone: Literal["mlp", "cnn"] = "mlp",
        width: int = 256,
        depth: int = 2,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, input_shape, width, depth, dropout)
        self.head = nn.Linear(self.backbone.out_features, num_classes)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        getattr(self, f"{stage}_metrics").update(logits.detach(), y)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._step(batch, "val"), on_epoch=True, prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._step(batch, "test"), on_epoch=True, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).softmax(dim=-1)

    def _log_epoch(self, stage: str) -> None:
        # torchmetrics gathers the counts from every process before computing.
        values = getattr(self, f"{stage}_metrics").compute()
        getattr(self, f"{stage}_metrics").reset()
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)
        if stage == "val":
            self.log("hp_metric", values["val/acc"], sync_dist=True)  # TensorBoard's HPARAMS tab

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self._log_epoch("val")
        else:
            self.val_metrics.reset()

    def on_test_epoch_end(self):
        self._log_epoch("test")

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
