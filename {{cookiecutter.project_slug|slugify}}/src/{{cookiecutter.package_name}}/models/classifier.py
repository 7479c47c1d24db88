"""The LightningModule: input normalisation, a backbone and a linear head, trained with cross-entropy.

Every constructor argument is a plain number, string or list, so checkpoints hold no
pickled objects and load with `torch.load(weights_only=True)`. The training data's mean and
std are buffers of `normalize`, so the model takes raw inputs (pixels in [0, 1], a table's
own values) and a checkpoint or an export needs nothing from the data to use it.
"""

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from ..errors import UserError, rank_zero_print
from .finetune import add_lora, is_adapter, load_init_weights, merge_lora
from .metrics import ClassificationScores
from .nets import Normalize, build_backbone, example_batch


class Classifier(L.LightningModule):
    """Classify inputs of `input_shape` into `num_classes` classes.

    Args:
        num_classes, input_shape, class_names: taken from the data (linked by the CLI).
        feature_names: a table's feature columns, in the order the model reads them (linked from
            the data; null for images). Saved with the model, so `predict` on a new CSV needs no training file.
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
        init_from: a checkpoint written by `fit` to start from (README, Fine-tune on your data):
            its backbone must match; its head is used when the classes are the same, else starts fresh.
        freeze_backbone: train only the head (and LoRA adapters are frozen too).
        unfreeze_at_epoch: with freeze_backbone, the epoch (0-based) from which the backbone
            trains too, at lr x backbone_lr_scale; null: frozen for the whole run.
        backbone_lr_scale: the backbone's learning rate is lr x this (e.g. 0.1); the head and
            LoRA adapters train at lr.
        lora_rank: rank of LoRA adapters on the backbone's Linear layers; only the adapters and
            the head train. 0: no adapters.
        lora_alpha: the adapters' output is scaled by lora_alpha / lora_rank.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        class_names: list[str] | None = None,
        feature_names: list[str] | None = None,
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
        init_from: str | None = None,
        freeze_backbone: bool = False,
        unfreeze_at_epoch: int | None = None,
        backbone_lr_scale: float = 1.0,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        # The training data's statistics, set when `fit` starts (setup) and saved in every checkpoint.
        self.normalize = Normalize(input_shape)
        self.backbone = build_backbone(backbone, input_shape, width, depth, dropout, heads, patch_size)
        if lora_rank and not add_lora(self.backbone, lora_rank, lora_alpha):
            raise UserError(
                f"lora_rank={lora_rank}: backbone {backbone!r} has no Linear layers for LoRA adapters; "
                "use --model.backbone=mlp or vit, or --model.freeze_backbone=true instead"
            )
        if backbone_lr_scale <= 0 or (unfreeze_at_epoch is not None and unfreeze_at_epoch < 0):
            raise UserError(
                f"backbone_lr_scale={backbone_lr_scale} must be > 0 and unfreeze_at_epoch={unfreeze_at_epoch} "
                ">= 0 (or null: stay frozen)"
            )
        # The compiled backbone (compile=true), set past nn.Module's registration of submodules
        # so that checkpoints have the same keys with and without compile.
        object.__setattr__(self, "compiled", torch.compile(self.backbone) if compile else None)
        self.head = nn.Linear(self.backbone.out_features, num_classes)
        # Accuracy and macro-F1, counted every step and computed once per epoch.
        self.train_metrics = ClassificationScores(num_classes, prefix="train/")
        self.val_metrics = ClassificationScores(num_classes, prefix="val/")
        self.test_metrics = ClassificationScores(num_classes, prefix="test/")
        self._apply_freezing(epoch=0, modes=False)
        # The model summary runs this through the network: each layer's shapes and FLOPs.
        self.example_input_array = example_batch(input_shape)
        self.checkpoint_step = None  # where on the run's charts the loaded checkpoint was saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone if self.compiled is None else self.compiled
        return self.head(backbone(self.normalize(x)))

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
        if stage != "train" and self.trainer.state.fn != "fit" and self.checkpoint_step is not None:
            # validate/test of a checkpoint: its values go on the run's charts where the weights were saved.
            self.log("step", float(self.checkpoint_step), sync_dist=True)
        if stage == "val":
            self.log("hp_metric", values["val/acc"], sync_dist=True)  # TensorBoard's HPARAMS tab

    def on_train_epoch_start(self):
        self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0
        self._apply_freezing(self.current_epoch)
        if self.hparams.freeze_backbone and self.current_epoch == self.hparams.unfreeze_at_epoch:
            rank_zero_print(f"Epoch {self.current_epoch}: backbone unfrozen. {self._trainable()}")

    def on_train_start(self):
        # A run resumed mid-epoch (fit --ckpt_path=...) starts without on_train_epoch_start.
        self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0
        self._apply_freezing(self.current_epoch)

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
        opt = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
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

    # Fine-tuning (models/finetune.py): init_from, a frozen backbone, LoRA adapters.

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one, or 'backbone' at lr x backbone_lr_scale and 'head'
        (the head and any LoRA adapters) at lr. A frozen backbone stays in its group: AdamW skips
        parameters without a gradient, and unfreezing only has to set `requires_grad`."""
        lr, scale = self.hparams.lr, self.hparams.backbone_lr_scale
        if scale == 1:
            return [{"params": list(self.parameters()), "lr": lr}]
        backbone = [p for name, p in self.backbone.named_parameters() if not is_adapter(name)]
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": backbone, "lr": lr * scale, "name": "backbone"}, {"params": head, "lr": lr, "name": "head"}]

    def backbone_frozen(self, epoch: int) -> bool:
        h = self.hparams
        return bool(h.freeze_backbone) and (h.unfreeze_at_epoch is None or epoch < h.unfreeze_at_epoch)

    def _apply_freezing(self, epoch: int, modes: bool = True) -> None:
        """Set which backbone parameters train in `epoch`; with `modes`, BatchNorm layers without
        trained parameters are put in eval mode, so their running statistics stay as loaded."""
        frozen, lora = self.backbone_frozen(epoch), bool(self.hparams.lora_rank)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not frozen and (is_adapter(name) or not lora))
        for m in self.backbone.modules() if modes else ():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(self.training and any(p.requires_grad for p in m.parameters()))

    def _trainable(self) -> str:
        total = sum(p.numel() for p in self.parameters())
        count = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if self.backbone_frozen(self.current_epoch):
            until = self.hparams.unfreeze_at_epoch
            what = "head only (backbone frozen" + (f" until epoch {until})" if until is not None else ")")
        else:
            what = "head + LoRA adapters" if self.hparams.lora_rank else "the whole model"
        return f"Trainable parameters: {count:,} of {total:,} ({100 * count / total:.1f}%): {what}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # `fit` logs an epoch's validation at the epoch's last step, one before the checkpoint's global_step.
        self.checkpoint_step = max(0, checkpoint.get("global_step", 1) - 1)

    def setup(self, stage: str) -> None:
        # The summary's example batch, in the weights' dtype (bf16-true: bfloat16). None under FSDP,
        # whose network may run only through FSDP's wrapper (the summary calls the module itself), and
        # with compile, whose compiled backbone hides its layers from the FLOP counter (and warns).
        opaque = self.hparams.compile or isinstance(self.trainer.strategy, FSDPStrategy)
        self.example_input_array = None if opaque else example_batch(self.hparams.input_shape, self.trainer.precision)
        if stage != "fit":
            return  # test, predict: the statistics are the checkpoint's (loaded after setup), never recomputed
        # The statistics of the data this run trains on. A resumed fit then loads its checkpoint's,
        # which its weights were trained with; init_from loads only the backbone and the head.
        data = self.trainer.datamodule
        if getattr(data, "mean", None) is not None:
            self.normalize.set_statistics(data.mean, data.std)
        h = self.hparams
        if h.freeze_backbone and h.unfreeze_at_epoch is not None and self.trainer.world_size > 1:
            raise UserError(
                "unfreeze_at_epoch with more than one process: DDP fixes the trained parameters when it starts. "
                "Run two fits instead: one with the backbone frozen, then one with "
                "--model.init_from=<its last.ckpt> --model.freeze_backbone=false"
            )
        # Loaded here, before DDP or FSDP wrap the model. A resumed `fit` replaces these weights with the
        # checkpoint's and must not need the file any more, so errors wait for on_fit_start, which knows.
        self._init_result = None
        if h.init_from:
            try:
                self._init_result = load_init_weights(self, h.init_from)
            except UserError as err:
                self._init_result = err

    def on_fit_start(self) -> None:
        result = getattr(self, "_init_result", None)
        if result is not None and self.trainer.ckpt_path is None:  # not resuming
            if isinstance(result, UserError):
                raise result
            rank_zero_print(result)
        self._apply_freezing(self.current_epoch, modes=False)  # modes: at each epoch's start
        rank_zero_print(self._trainable())

    def on_predict_start(self) -> None:
        if self.hparams.lora_rank:
            merge_lora(self.backbone)  # one matrix product per layer instead of three
