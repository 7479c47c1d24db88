"""Predict a number (a price, a yield, a lab value) from a table's features: the regression twin
of the Classifier, a LightningModule of its own.

The network learns the target standardised with the training split's mean and standard
deviation (buffers, like the inputs' in `nets.Normalize`), and its last layer, `TargetScale`,
turns its output back into the target's units. So `predict`, an exported model and a server
answer in those units, and the loss and the optimizer see values of order 1 whatever they are.

`RegressionTask` holds what every model that predicts one number shares (the loss on the
standardised target, MAE / RMSE / R² and their logging): a model holds one and calls it from
its hooks (the Regressor{% if cookiecutter.text == "yes" %}; the text part's TextRegressor, models/text_regressor.py{% endif %}).
"""

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection, R2Score

from ..errors import UserError
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
        # In float32 whatever the network's precision: under bf16-mixed z is bfloat16, whose 8 bits of
        # mantissa would round a prediction of 300000 to a multiple of 2048.
        return z.float() * self.std.float() + self.mean.float()


def scores(prefix: str) -> MetricCollection:
    """MAE, RMSE and R² over an epoch, in the target's units; `<prefix>loss`: the mean loss."""
    return MetricCollection(
        {"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False), "r2": R2Score(), "loss": MeanMetric()},
        prefix=prefix,
        compute_groups=False,  # the loss takes other arguments than the three scores
    )


class RegressionTask(nn.Module):
    """The loss, the metrics and their logging for a model whose forward pass returns one value per
    sample in the target's units, ending in a `TargetScale`. The model holds one (`task`) and calls it
    from its hooks with itself: a component, so that each model stays one plain LightningModule.

    loss: 'mse', 'huber' or 'l1', on the standardised target (order 1 whatever the target's units).
    """

    def __init__(self, loss: str = "mse"):
        super().__init__()
        if loss not in LOSSES:
            raise UserError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}")
        self.loss = LOSSES[loss]
        self.train_loss = MeanMetric()
        self.val_metrics, self.test_metrics = scores("val/"), scores("test/")

    @staticmethod
    def scale(model: nn.Module) -> TargetScale:
        return next(m for m in model.modules() if isinstance(m, TargetScale))

    def step(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss on the standardised target, predictions and targets in the target's units)."""
        x, y = batch
        predicted = model(x).squeeze(-1)
        scale = self.scale(model)
        return self.loss((predicted - scale.mean) / scale.std, (y - scale.mean) / scale.std), predicted, y

    def training_step(self, model, batch) -> torch.Tensor:
        loss, _, y = self.step(model, batch)
        self.train_loss.update(loss.detach(), len(y))
        if (model.global_step + 1) % model.trainer.log_every_n_steps == 0:
            model.log("train/loss_step", loss, prog_bar=True)
        return loss

    def evaluation_step(self, model, batch, split: Literal["val", "test"]) -> dict:
        loss, predicted, y = self.step(model, batch)
        for name, metric in (self.val_metrics if split == "val" else self.test_metrics).items():
            metric.update(*((loss, len(y)) if name.endswith("loss") else (predicted, y)))
        return {"predicted": predicted, "target": y}  # for the TensorBoard views (callbacks.py)

    def log_epoch(self, model, split: Literal["train", "val", "test"]) -> None:
        """Log the epoch's values of `split` (val: also `hp_metric`, the RMSE) and start counting anew."""
        if split == "train":
            values = {"train/loss_epoch": self.train_loss.compute()}
            self.train_loss.reset()
        else:
            metrics = self.val_metrics if split == "val" else self.test_metrics
            values = metrics.compute()
            metrics.reset()
            values.update({"hp_metric": values["val/rmse"]} if split == "val" else {})
        if not model.trainer.sanity_checking:
            model.log_dict(values, sync_dist=True, prog_bar=split == "val")

    def set_statistics(self, model, data) -> None:
        """When `fit` starts: the training split's target mean and std into the model's TargetScale
        (a resumed fit then loads its checkpoint's)."""
        if getattr(data, "target_mean", None) is not None:
            self.scale(model).mean.fill_(float(data.target_mean))
            self.scale(model).std.fill_(float(data.target_std))


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
        self.task = RegressionTask(loss)
        self.example_input_array = example_batch(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features in, predictions in the target's units out, shape (batch, 1)."""
        return self.head(self.backbone(self.normalize(x)))

    def training_step(self, batch, batch_idx):
        return self.task.training_step(self, batch)

    def validation_step(self, batch, batch_idx):
        return self.task.evaluation_step(self, batch, "val")

    def test_step(self, batch, batch_idx):
        return self.task.evaluation_step(self, batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).squeeze(-1)  # one value per sample: the PredictionWriter writes it as is

    def on_train_epoch_end(self):
        self.task.log_epoch(self, "train")

    def on_validation_epoch_end(self):
        self.task.log_epoch(self, "val")

    def on_test_epoch_end(self):
        self.task.log_epoch(self, "test")

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
            self.task.set_statistics(self, data)
