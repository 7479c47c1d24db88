"""Fine-tune a pretrained language model: a Hugging Face encoder and a linear head.

The recipe of the tutorials (load a pretrained model, tokenise labelled data, fine-tune,
evaluate, deploy) in the shape of the rest of the project: `TextClassifier` is a
`Classifier` whose backbone is a pretrained transformer encoder (BERT, MiniLM, RoBERTa, ...)
instead of a network built from scratch. The training and evaluation steps, the metrics,
the warm-up and cosine schedule, the frozen backbone and the backbone learning rate are the
Classifier's; only building the network, the forward pass and the checkpoint contents differ.

A batch is (x, y) with x of shape (batch, 2, tokens): token ids and the attention mask,
as data/text.py makes them. The encoder's last hidden states are averaged over the real
tokens (or its first token is taken, `pooling: cls`), then dropout and the head give logits.

LoRA (`lora_rank` > 0) goes through peft: small low-rank matrices next to the attention
projections learn the change, the pretrained weights stay as they are. A checkpoint then
holds only what trained (the adapters and the head: a few hundred KB instead of the whole
model), and `test`, `predict`, resuming and export rebuild the model from the base model's
folder (`model_name_or_path`) plus the checkpoint.

The functions beside the class (adapters, pooling, checkpoint contents, the merged network for
export, the run's preparation) serve the text regressor too (models/text_regressor.py).
"""

import warnings
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..pretrained import load_encoder, shard_by_layer, transformers
from .finetune import FineTuner, is_adapter

# Lightning lists every pretrained weight a small checkpoint leaves out; on_load_checkpoint
# checks the ones that matter (everything that trained).
warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")


def peft_adapters(encoder: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str] | None):
    """`encoder` with peft LoRA adapters of `rank` on the `targets` modules (null: peft's choice
    for the architecture, e.g. BERT's attention `query` and `value`)."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    try:
        return peft.get_peft_model(encoder, config)
    except ValueError as err:
        kind = getattr(encoder.config, "model_type", "?")
        raise UserError(
            f"lora_rank={rank}: no LoRA target modules for a {kind!r} model ({str(err).splitlines()[0]}); "
            "name them with --model.lora_target_modules='[q_proj, v_proj]' (the Linear layers' names)"
        ) from None


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text: the mean of the real tokens' hidden states, or the first token's ('cls')."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def encode(encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text: the encoder's last hidden states, pooled (`pool`)."""
    return pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pooling)


def prepare_text_run(config) -> None:
    """Called by the CLI once a text model's run is parsed (the models' `prepare_run`), before anything
    is built: the `text` extra installed, the data's tokenizer named by the model (unless
    --data.tokenizer says otherwise), and under FSDP the encoder's transformer layer as the unit of
    sharding and activation checkpointing."""
    transformers()  # one ERROR line with the install command when the extra is missing
    model, data = config.model.init_args, config.data.get("init_args")
    if data is not None and "tokenizer" in data and not data.tokenizer:
        data.tokenizer = model.model_name_or_path
    shard_by_layer(config, model.model_name_or_path)


def drop_untrained(checkpoint: dict, saved) -> None:
    """`on_save_checkpoint`: leave out the state entries `saved(key)` refuses (pretrained weights that
    never train in this run): the base model's folder has them."""
    state = checkpoint["state_dict"]
    for key in [k for k in state if not saved(k)]:
        del state[key]


def check_trained(model: nn.Module, checkpoint: dict, saved) -> None:
    """`on_load_checkpoint`: every entry `saved(key)` accepts is in the checkpoint, else one error."""
    have = checkpoint.get("state_dict", {})
    missing = [k for k in model.state_dict() if saved(k) and k not in have]
    if missing:
        raise UserError(
            f"the checkpoint lacks {len(missing)} of this model's trained weights (e.g. {missing[0]}): "
            "it was written for another model or other LoRA settings"
        )


def merged_network(backbone: nn.Module, head: nn.Module, lora: bool, pooling: str) -> "TextNetwork":
    """A plain module `(input_ids, attention_mask) -> head's output`, LoRA merged into the weights."""
    return TextNetwork(backbone.merge_and_unload() if lora else backbone, head, pooling).eval()


class TextClassifier(FineTuner):
    """Classify texts into `num_classes` classes with a pretrained encoder and a linear head.

    Args:
        num_classes, input_shape, class_names: taken from the data (linked by the CLI);
            input_shape is (2, max_length): token ids and attention mask.
        feature_names: linked from the data like the others; a text model has no feature columns (None).
        model_name_or_path: the pretrained model: a local folder (config.json, model.safetensors,
            tokenizer files) or a Hugging Face Hub name (e.g. bert-base-chinese for Chinese text).
            The data's tokenizer is this model's.
        pooling: 'mean': the average of the last hidden states of the real tokens; 'cls': the first token's.
        dropout: dropout before the head (the encoder keeps the dropout of its own config).
        lr: peak learning rate of AdamW (the head and LoRA adapters).
        weight_decay, scheduler, warmup_steps, label_smoothing: as for the Classifier.
        freeze_backbone: train only the head (the encoder and any adapters are frozen).
        unfreeze_at_epoch: with freeze_backbone, the epoch from which the encoder trains too.
        backbone_lr_scale: the encoder's learning rate is lr x this (e.g. 0.1 for a full fine-tune
            with a fresh head); the head and adapters train at lr.
        lora_rank: rank of peft LoRA adapters; only the adapters and the head train. 0: no
            adapters, all weights train (configs/text_full.yaml).
        lora_alpha: the adapters' output is scaled by lora_alpha / lora_rank.
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: names of the Linear layers that get adapters, e.g. [query, key, value];
            null: peft's default for the architecture.
        gradient_checkpointing: recompute the encoder's activations in the backward pass instead of
            storing them: less memory, about a third more time per step.
    """

    def __init__(
        self,
        num_classes: int = 2,
        input_shape: tuple[int, ...] = (2, 128),
        class_names: list[str] | None = None,
        feature_names: list[str] | None = None,
        model_name_or_path: str = "models/encoder",
        pooling: Literal["mean", "cls"] = "mean",
        dropout: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        freeze_backbone: bool = False,
        unfreeze_at_epoch: int | None = None,
        backbone_lr_scale: float = 1.0,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.1,
        lora_target_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            num_classes=num_classes, input_shape=input_shape, class_names=class_names, feature_names=feature_names,
            lr=lr, weight_decay=weight_decay, scheduler=scheduler, warmup_steps=warmup_steps,
            label_smoothing=label_smoothing, freeze_backbone=freeze_backbone, unfreeze_at_epoch=unfreeze_at_epoch,
            backbone_lr_scale=backbone_lr_scale, lora_rank=lora_rank, lora_alpha=lora_alpha,
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.example_input_array = None  # the summary's FLOPs: token ids are not images
        # Checkpoints may leave out the pretrained weights (saved_in_checkpoint); the model was
        # built from them, and on_load_checkpoint checks that nothing else is missing.
        self.strict_loading = False

    prepare_run = staticmethod(prepare_text_run)

    def build_network(self, network=None):
        h = self.hparams
        encoder = load_encoder(h.model_name_or_path)
        if h.gradient_checkpointing:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if h.lora_rank:
            encoder = self.add_adapters(encoder)
        return nn.Identity(), encoder, nn.Linear(encoder.config.hidden_size, h.num_classes)

    def add_adapters(self, encoder: nn.Module) -> nn.Module:
        h = self.hparams
        return peft_adapters(encoder, h.lora_rank, h.lora_alpha, h.lora_dropout, h.lora_target_modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(encode(self.backbone, x[:, 0], x[:, 1], self.hparams.pooling)))

    def saved_in_checkpoint(self, key: str) -> bool:
        """Whether state_dict entry `key` goes into checkpoints: all but the pretrained weights
        that never train in this run (with LoRA, or a backbone frozen for the whole run)."""
        if not key.startswith("backbone."):
            return True
        if self.hparams.lora_rank:
            return is_adapter(key)
        return not (self.hparams.freeze_backbone and self.hparams.unfreeze_at_epoch is None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_untrained(checkpoint, self.saved_in_checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trained(self, checkpoint, self.saved_in_checkpoint)
        super().on_load_checkpoint(checkpoint)

    def on_predict_start(self) -> None:
        pass  # the adapters run as trained; inference_network merges them

    def inference_network(self) -> nn.Module:
        """A plain module `(input_ids, attention_mask) -> logits`, LoRA merged into the weights."""
        return merged_network(self.backbone, self.head, bool(self.hparams.lora_rank), self.hparams.pooling)


class TextNetwork(nn.Module):
    """The encoder, pooling and head without Lightning: what export writes to a file."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pooling: str):
        super().__init__()
        self.encoder, self.head, self.pooling = encoder, head, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(encode(self.encoder, input_ids, attention_mask, self.pooling))
