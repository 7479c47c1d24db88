"""Predict a number from a text (a rating, a difficulty, a price) with a pretrained encoder.

A LightningModule of its own, built from parts: the encoder, LoRA adapters, pooling and the
checkpoint contents of models/text.py, a linear layer with one output, and the regression parts
of models/regressor.py (`TargetScale`, the training split's target mean and std as buffers, and
`RegressionTask`: the loss on the standardised target, MAE / RMSE / R², their logging). So
`test`, `predict` and an exported model answer in the target's own units, and with LoRA a
checkpoint holds only the adapters, the head and the target's statistics.

A batch is (x, y): x of shape (batch, 2, tokens), token ids and attention mask as data/text.py
makes them (with task: regression), y the targets as floats.
"""

from typing import Literal

import lightning as L
import torch
from torch import nn

from ..pretrained import load_encoder
from .finetune import is_adapter
from .fsdp import clip_gradients
from .regressor import RegressionTask, TargetScale
from .schedule import warmup_then_cosine
from .text import check_trained, drop_untrained, encode, merged_network, peft_adapters, prepare_text_run


class TextRegressor(L.LightningModule):
    """Predict one number per text with a pretrained encoder, a dropout and a linear layer.

    Args:
        input_shape: (2, max_length), from the data (linked by the CLI).
        model_name_or_path: the pretrained model: a local folder or a Hugging Face Hub name; the
            data's tokenizer is this model's.
        pooling: 'mean' of the real tokens' last hidden states, or 'cls': the first token's.
        dropout: before the head.
        lr: AdamW's peak learning rate (head and adapters); linear warm-up over `warmup_steps`,
            then cosine decay to zero.
        weight_decay: AdamW's.
        backbone_lr_scale: with lora_rank 0, the encoder's learning rate is lr x this.
        lora_rank: rank of peft LoRA adapters (only they and the head train); 0: every weight trains.
        lora_alpha, lora_dropout, lora_target_modules: as for the TextClassifier.
        loss: 'mse', 'huber' or 'l1', on the standardised target.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (2, 128), model_name_or_path: str = "models/encoder",
        pooling: Literal["mean", "cls"] = "mean", dropout: float = 0.1,
        lr: float = 5e-4, weight_decay: float = 0.01, warmup_steps: int = 0, backbone_lr_scale: float = 1.0,
        lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.1,
        lora_target_modules: list[str] | None = None, loss: Literal["mse", "huber", "l1"] = "mse",
    ):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        for key in ("num_classes", "class_names", "feature_names"):  # linked by the CLI into every model's
            self.hparams.pop(key, None)  # settings; loading a checkpoint would pass them to __init__
        encoder = load_encoder(model_name_or_path)
        if lora_rank:
            encoder = peft_adapters(encoder, lora_rank, lora_alpha, lora_dropout, lora_target_modules)
        self.backbone = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, 1)
        self.scale = TargetScale()  # standardised prediction -> the target's units
        self.task = RegressionTask(loss)
        # Checkpoints may leave out the pretrained weights; on_load_checkpoint checks the rest.
        self.strict_loading = False

    prepare_run = staticmethod(prepare_text_run)  # the CLI's: the tokenizer, FSDP's unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids and mask in, predictions in the target's units out, shape (batch, 1)."""
        pooled = encode(self.backbone, x[:, 0], x[:, 1], self.hparams.pooling)
        return self.scale(self.head(self.dropout(pooled)))

    def training_step(self, batch, batch_idx):
        return self.task.training_step(self, batch)

    def validation_step(self, batch, batch_idx):
        return self.task.evaluation_step(self, batch, "val")

    def test_step(self, batch, batch_idx):
        return self.task.evaluation_step(self, batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).squeeze(-1)  # one value per text: the PredictionWriter writes it as is

    def on_train_epoch_end(self):
        self.task.log_epoch(self, "train")

    def on_validation_epoch_end(self):
        self.task.log_epoch(self, "val")

    def on_test_epoch_end(self):
        self.task.log_epoch(self, "test")

    def setup(self, stage: str) -> None:
        if stage == "fit":  # the training split's target mean and std (a resumed fit loads its checkpoint's)
            self.task.set_statistics(self, self.trainer.datamodule)

    configure_gradient_clipping = clip_gradients

    def configure_optimizers(self):
        h = self.hparams
        encoder = [p for name, p in self.backbone.named_parameters() if p.requires_grad and not is_adapter(name)]
        ids = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]  # head and adapters
        groups = [{"params": rest, "lr": h.lr}]
        if encoder:  # a full fine-tune: the pretrained weights take smaller steps than the fresh head
            groups.append({"params": encoder, "lr": h.lr * h.backbone_lr_scale})
        opt = torch.optim.AdamW(groups, lr=h.lr, weight_decay=h.weight_decay)
        schedule = warmup_then_cosine(opt, h.warmup_steps, max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def saved_in_checkpoint(self, key: str) -> bool:
        """With LoRA, the encoder's pretrained weights stay out of checkpoints (they never change)."""
        return not (key.startswith("backbone.") and self.hparams.lora_rank) or is_adapter(key)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_untrained(checkpoint, self.saved_in_checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trained(self, checkpoint, self.saved_in_checkpoint)

    def inference_network(self) -> nn.Module:
        """`(input_ids, attention_mask) -> value in the target's units`, LoRA merged: what export writes."""
        head = nn.Sequential(self.head, self.scale)
        return merged_network(self.backbone, head, bool(self.hparams.lora_rank), self.hparams.pooling)
