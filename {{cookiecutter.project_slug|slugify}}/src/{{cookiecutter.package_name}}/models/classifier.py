"""The LightningModule: normalisation (`nets.Normalize`), a backbone and a linear head, trained with cross-entropy.
Its arguments are plain values (`network`: a class path), so checkpoints load with weights_only=True."""

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from .fsdp import clip_gradients
from .metrics import ClassificationScores
from .nets import Normalize, build_backbone, example_batch, own_network
from .schedule import warmup_then_cosine


class Classifier(L.LightningModule):
    """Classify inputs of `input_shape` into `num_classes` classes.

    Args:
        num_classes, input_shape, class_names, feature_names: the data's (linked by the CLI).
        network: your own `nn.Module` from inputs to logits (README, "Bring your own network");
            null: `backbone` ('mlp', 'cnn', 'lenet' or 'vit') sized by width, depth, dropout, heads, patch_size.
        lr, weight_decay: AdamW's peak learning rate and decoupled weight decay.
        scheduler: 'cosine' decays to zero over the run after `warmup_steps` of linear warm-up.
        label_smoothing: of the cross-entropy loss.
        compile: compile the backbone with `torch.compile`: faster steps after a slow first one.
    """

    def __init__(
        self,
        num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28),
        class_names: list[str] | None = None, feature_names: list[str] | None = None,
        network: nn.Module | None = None,
        backbone: Literal["mlp", "cnn", "lenet", "vit"] = "mlp", width: int = 256, depth: int = 2, dropout: float = 0.1,
        heads: int = 4, patch_size: int = 7,
        lr: float = 1e-3, weight_decay: float = 1e-4, scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0, label_smoothing: float = 0.0, compile: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if isinstance(self.hparams.get("network"), nn.Module):  # built in Python, not from a config:
            del self.hparams["network"]  # not storable; pass it again to load_from_checkpoint
        self.normalize, self.backbone, self.head = self.build_network(network)
        # Set past nn.Module's registration of submodules: checkpoints have the same keys with and without compile.
        object.__setattr__(self, "compiled", torch.compile(self.backbone) if compile else None)
        # Accuracy, macro-F1 and the mean loss, counted every step and computed once per epoch.
        self.train_metrics = ClassificationScores(num_classes, "train/", loss_name="loss_epoch")
        self.val_metrics = ClassificationScores(num_classes, "val/", loss_name="loss")
        self.test_metrics = ClassificationScores(num_classes, "test/", loss_name="loss")
        # The model summary (callbacks.LayerTable) runs this through the network: each layer's shapes and FLOPs.
        self.example_input_array = example_batch(input_shape)
        self.checkpoint_step = None  # where on the run's charts the loaded checkpoint was saved

    def build_network(self, network: nn.Module | None) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(normalize, backbone, head), which `forward` runs in turn."""
        h = self.hparams
        if network is not None:
            return Normalize(h.input_shape), own_network(network, h.input_shape, h.num_classes), nn.Identity()
        backbone = build_backbone(h.backbone, h.input_shape, h.width, h.depth, h.dropout, h.heads, h.patch_size)
        return Normalize(h.input_shape), backbone, nn.Linear(backbone.out_features, h.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone if self.compiled is None else self.compiled
        return self.head(backbone(self.normalize(x)))

    def step(self, batch, metrics: ClassificationScores) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metrics.update(logits.detach(), y, loss.detach())
        return loss

    def training_step(self, batch, batch_idx):
        loss = self.step(batch, self.train_metrics)
        # A `self.log` costs a quarter of a small model's step: only on the steps the logger writes.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx):
        self.step(batch, self.test_metrics)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).softmax(dim=-1)

    def log_epoch(self, metrics: ClassificationScores) -> None:
        values = metrics.compute()  # torchmetrics sums the counts of every process first
        metrics.reset()
        if self.trainer.sanity_checking:
            return
        self.log_dict(values, prog_bar=metrics is self.val_metrics, sync_dist=True)
        if self.trainer.state.fn != "fit" and self.checkpoint_step is not None:
            # validate/test of a checkpoint: its values go on the run's charts where the weights were saved.
            self.log("step", float(self.checkpoint_step), sync_dist=True)
        if metrics is self.val_metrics:
            self.log("hp_metric", values["val/acc"], sync_dist=True)  # TensorBoard's HPARAMS tab

    def on_train_epoch_end(self):
        self.log_epoch(self.train_metrics)

    def on_validation_epoch_end(self):
        self.log_epoch(self.val_metrics)

    def on_test_epoch_end(self):
        self.log_epoch(self.test_metrics)

    configure_gradient_clipping = clip_gradients

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": self.hparams.lr}]

    def configure_optimizers(self):
        groups = self.parameter_groups()
        # The fused kernel updates a tensor in one call instead of about ten: on a CPU, a third of the
        # MLP's optimizer step. It takes floating-point tensors on CPUs and CUDA GPUs. Not under 16-mixed:
        # Lightning does not clip the gradients of a fused optimizer that a gradient scaler steps.
        params = [p for group in groups for p in group["params"]]
        fused = str(self.trainer.precision) != "16-mixed" and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
        )
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = warmup_then_cosine(opt, self.hparams.warmup_steps, total, self.hparams.scheduler == "cosine")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # `fit` logs an epoch's validation at the epoch's last step, one before the checkpoint's global_step.
        self.checkpoint_step = max(0, checkpoint.get("global_step", 1) - 1)

    def setup(self, stage: str) -> None:
        # fit: the training data's statistics (a resumed fit loads its checkpoint's); test, predict: the checkpoint's.
        data = self.trainer.datamodule
        if stage == "fit" and isinstance(self.normalize, Normalize) and getattr(data, "mean", None) is not None:
            self.normalize.set_statistics(data.mean, data.std)
