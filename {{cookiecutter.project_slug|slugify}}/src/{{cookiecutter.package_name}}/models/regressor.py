"""Predict a number (a price, a yield, a lab value) from a table's features: the regression twin
of the Classifier, a LightningModule of its own.

The network learns the target standardised with the training split's mean and standard
deviation (buffers, like the inputs' in `nets.Normalize`), and its last layer, `TargetScale`,
turns its output back into the target's units. So `predict`, an exported model and a server
answer in those units, and the loss and the optimizer see values of order 1 whatever they are.
"""

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection, R2Score

from .fsdp import clip_gradients
from .nets import Normalize, example_batch, output_network
from .schedule import warmup_then_cosine

LOSSES = {"mse": F.mse_loss, "huber": F.huber_loss, "l1": F.l1_loss}


class TargetScale(nn.Module):
    """`z * std + mean`: a standardised prediction in the target's units (fit sets the statistics)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


def scores(prefix: str) -> MetricCollection:
    """MAE, RMSE and R² over an epoch, in the target's units; `<prefix>loss`: the mean loss."""
    return MetricCollection(
        {"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False), "r2": R2Score(), "loss": MeanMetric()},
        prefix=prefix,
        compute_groups=False,  # the loss takes other arguments than the three scores
    )


class Regressor(L.LightningModule):
    """Predict one number per sample of `input_shape` (a table's row of features).

    Args:
        input_shape, feature_names: the data's (linked by the CLI).
        network: your own `nn.Module` from the features to one output (README, "Bring your own
            network"); null: an MLP of `depth` layers of `width` units with `dropout`.
        lr, weight_decay: AdamW's peak learning rate (cosine decay to zero) and weight decay.
        loss: 'mse' (mean squared error), 'huber' (quadratic near 0, linear past one standard
            deviation: outliers pull less) or 'l1' (mean absolute error), on the standardised target.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (10,), feature_names: list[str] | None = None,
        network: nn.Module | None = None, width: int = 256, depth: int = 2, dropout: float = 0.1,
        lr: float = 1e-3, weight_decay: float = 1e-4, loss: Literal["mse", "huber", "l1"] = "mse",
    ):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if isinstance(self.hparams.get("network"), nn.Module):  # built in Python: not storable in a checkpoint
            del self.hparams["network"]
        for key in ("num_classes", "class_names"):  # the CLI links them into every model's settings; loading
            self.hparams.pop(key, None)  # a checkpoint passes each setting to __init__, which takes neither
        self.normalize = Normalize(input_shape)
        self.backbone = output_network(network, input_shape, 1, width, depth, dropout)
        self.head = TargetScale()
        self.train_loss = MeanMetric()
        self.val_metrics, self.test_metrics = scores("val/"), scores("test/")
        self.example_input_array = example_batch(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features in, predictions in the target's units out, shape (batch, 1)."""
        return self.head(self.backbone(self.normalize(x)))

    def step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss on the standardised target, predictions and targets in the target's units)."""
        x, y = batch
        predicted = self(x).squeeze(-1)
        scale = self.head
        loss = LOSSES[self.hparams.loss]((predicted - scale.mean) / scale.std, (y - scale.mean) / scale.std)
        return loss, predicted, y

    def training_step(self, batch, batch_idx):
        loss, _, y = self.step(batch)
        self.train_loss.update(loss.detach(), len(y))
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def evaluation_step(self, batch, metrics: MetricCollection) -> dict:
        loss, predicted, y = self.step(batch)
        for name, metric in metrics.items():
            metric.update(*((loss, len(y)) if name.endswith("loss") else (predicted, y)))
        return {"predicted": predicted, "target": y}  # for the TensorBoard views (callbacks.py)

    def validation_step(self, batch, batch_idx):
        return self.evaluation_step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx):
        return self.evaluation_step(batch, self.test_metrics)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).squeeze(-1)  # one value per sample: the PredictionWriter writes it as is

    def log_epoch(self, values: dict) -> None:
        if not self.trainer.sanity_checking:
            self.log_dict(values, sync_dist=True, prog_bar=any(k.startswith("val/") for k in values))

    def on_train_epoch_end(self):
        self.log_epoch({"train/loss_epoch": self.train_loss.compute()})
        self.train_loss.reset()

    def on_validation_epoch_end(self):
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_epoch({**values, "hp_metric": values["val/rmse"]})

    def on_test_epoch_end(self):
        self.log_epoch(self.test_metrics.compute())
        self.test_metrics.reset()

    configure_gradient_clipping = clip_gradients

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = warmup_then_cosine(opt, 0, max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def setup(self, stage: str) -> None:
        # fit: the training split's statistics of inputs and target (a resumed fit then loads its checkpoint's).
        data = self.trainer.datamodule
        if stage == "fit" and getattr(data, "target_mean", None) is not None:
            self.normalize.set_statistics(data.mean, data.std)
            self.head.mean.fill_(float(data.target_mean))
            self.head.std.fill_(float(data.target_std))
