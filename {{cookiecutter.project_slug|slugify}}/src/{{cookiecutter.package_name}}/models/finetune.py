"""Fine-tuning: `FineTuner` starts from another run's weights, freezes, unfreezes, adds LoRA adapters.

`read_weights` + `load_init_weights` implement `--model.init_from=path.ckpt`: the
checkpoint is read with `torch.load(weights_only=True)`; the backbone must match this
model exactly (else one error lists the layers that differ), the classification head is
loaded when the classes are the same and starts fresh when their number or names differ.

`LoRALinear` wraps an `nn.Linear` with a low-rank update: y = W x + b + (alpha/rank) B A x,
where W and b stay frozen and only A (rank x in) and B (out x rank, zero at the start, so
training starts from the pretrained function) are trained. `add_lora` puts one on every
Linear of a backbone: the layers of the MLP and the two MLP layers of each transformer
block of the ViT. The attention's own projections are left alone: `nn.MultiheadAttention`
uses its weights directly, not by calling its Linear modules. The CNN has no Linear
layers. `merge_lora` folds the adapters back into plain `nn.Linear` layers (W + scale B A),
for prediction and export.
"""

import textwrap

import torch
from torch import nn

from ..errors import GIVE_A_CHECKPOINT, UserError, rank_zero_print, read_checkpoint
from .classifier import Classifier

ADAPTER_KEYS = ("lora_a", "lora_b", "scale")


class LoRALinear(nn.Module):
    """`base(x) + scale * x A^T B^T`, with `base` frozen and A, B trained; scale = alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise UserError(f"lora_rank={rank}: the rank of the adapters must be at least 1 (0 turns LoRA off)")
        self.base = base
        self.base.requires_grad_(False)
        # A small random, B zero: the adapter adds nothing until it is trained.
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        # A buffer, so that a checkpoint alone is enough to merge the adapters (`merge_state_dict`).
        self.register_buffer("scale", torch.tensor(float(alpha) / rank))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear layer computing the same function (up to rounding)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        linear.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        linear.requires_grad_(self.base.weight.requires_grad)
        return linear


def add_lora(module: nn.Module, rank: int, alpha: float) -> int:
    """Replace every nn.Linear inside `module` (not those of nn.MultiheadAttention) by a LoRALinear.

    Returns the number of layers wrapped.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention | LoRALinear):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, rank, alpha))
            count += 1
        else:
            count += add_lora(child, rank, alpha)
    return count


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRALinear inside `module` (or `module` itself) by its merged nn.Linear."""
    if isinstance(module, LoRALinear):
        return module.merged()
    for name, child in module.named_children():
        setattr(module, name, merge_lora(child))
    return module


def is_adapter(name: str) -> bool:
    """Whether a parameter or buffer name belongs to a LoRA adapter (ours, or peft's)."""
    parts = name.split(".")
    return parts[-1] in ADAPTER_KEYS or "lora_A" in parts or "lora_B" in parts


def merge_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with LoRA adapters turned into the plain one of the same network without them."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in [k for k in state if k.endswith(".lora_a")]:
        prefix = key.removesuffix(".lora_a")
        a, b, scale = state[key], state[f"{prefix}.lora_b"], state[f"{prefix}.scale"]
        merged[f"{prefix}.weight"] = merged.pop(f"{prefix}.base.weight") + scale * b @ a
        if f"{prefix}.base.bias" in merged:
            merged[f"{prefix}.bias"] = merged.pop(f"{prefix}.base.bias")
    return merged


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a checkpoint written by `fit` (adapters merged) and its hyperparameters."""
    checkpoint = read_checkpoint(path, f"--model.init_from={path}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"--model.init_from={path}: holds no model weights (no 'state_dict' of tensors); {GIVE_A_CHECKPOINT}"
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    return merge_state_dict(state), hparams if isinstance(hparams, dict) else {}


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def load_init_weights(model: nn.Module, path: str) -> str:
    """Copy the backbone (and the head when it fits) of checkpoint `path` into `model`.

    `model` has a `backbone` and a `head`; its backbone may hold LoRA adapters (they keep
    their fresh values). Returns one line saying what was loaded.
    """
    weights, hparams = read_weights(path)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}

    def plain(key: str) -> str:  # the model's key as it would be without adapters
        prefix, _, leaf = key.rpartition(".")
        return f"{prefix.removesuffix('.base')}.{leaf}" if prefix.removesuffix(".base") in wrapped else key

    own = {plain(k): k for k in model.state_dict() if not is_adapter(k) and k.startswith(("backbone.", "head."))}
    current = model.state_dict()
    problems = []
    for key in sorted(k for k in own if k.startswith("backbone.")):
        if key not in weights:
            problems.append(f"{key}: missing in the checkpoint, model {_shape(current[own[key]])}")
        elif weights[key].shape != current[own[key]].shape:
            problems.append(f"{key}: checkpoint {_shape(weights[key])} vs model {_shape(current[own[key]])}")
    for key in sorted(k for k in weights if k.startswith("backbone.") and k not in own):
        problems.append(f"{key}: checkpoint {_shape(weights[key])}, not in the model")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        trained = ", ".join(f"{k}={hparams[k]}" for k in ("backbone", "width", "depth", "input_shape") if k in hparams)
        raise UserError(
            f"--model.init_from={path}: the checkpoint's backbone does not fit this model "
            f"({len(problems)} mismatching tensor{'s' * (len(problems) != 1)}: {shown}). "
            + (f"It was trained with {trained}; " if trained else "")
            + "use the same --model.backbone, width, depth (and input shape) as the run that wrote it"
        )
    load = {own[k]: weights[k] for k in own if k.startswith("backbone.")}
    head = [k for k in own if k.startswith("head.")]
    theirs, ours = hparams.get("class_names"), getattr(model, "hparams", {}).get("class_names")
    same_classes = theirs is None or ours is None or list(theirs) == list(ours)
    head_fits = all(k in weights and weights[k].shape == current[own[k]].shape for k in head)
    if head_fits and same_classes:
        load.update({own[k]: weights[k] for k in head})
    model.load_state_dict(load, strict=False)  # the adapters (not in `load`) keep their values
    if head_fits and same_classes:
        return f"Initialised from {path}: backbone and head loaded"
    if head_fits:
        why = f"the checkpoint's classes {_names(theirs)} are not this data's {_names(ours)}"
    else:
        count = weights["head.weight"].shape[0] if "head.weight" in weights else "?"
        why = f"the checkpoint has {count} classes, this model {current[own['head.weight']].shape[0]}"
    return f"Initialised from {path}: backbone loaded; the head starts fresh ({why})"


def _names(names) -> str:
    return textwrap.shorten(", ".join(map(str, names)), 60, placeholder=" ...")


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FineTuner(Classifier):
    """A Classifier that starts from a trained checkpoint (configs/finetune*.yaml).

    Args:
        init_from: a checkpoint written by `fit` (README, Fine-tune on your data): its backbone must
            match; its head is used when the classes are the same, else the head starts fresh.
        freeze_backbone: train only the head (and LoRA adapters are frozen too).
        unfreeze_at_epoch: with freeze_backbone, the epoch (0-based) from which the backbone trains
            too, at lr x backbone_lr_scale; null: frozen for the whole run.
        backbone_lr_scale: the backbone's learning rate is lr x this (e.g. 0.1); the head and LoRA
            adapters train at lr.
        lora_rank: rank of LoRA adapters on the backbone's Linear layers; only the adapters and the
            head train. 0: no adapters.
        lora_alpha: the adapters' output is scaled by lora_alpha / lora_rank.
        **kwargs: the Classifier's arguments.
    """

    def __init__(
        self,
        init_from: str | None = None, freeze_backbone: bool = False, unfreeze_at_epoch: int | None = None,
        backbone_lr_scale: float = 1.0, lora_rank: int = 0, lora_alpha: float = 16.0, **kwargs,
    ):  # fmt: skip
        if backbone_lr_scale <= 0 or lora_rank < 0 or (unfreeze_at_epoch is not None and unfreeze_at_epoch < 0):
            raise UserError(
                f"backbone_lr_scale={backbone_lr_scale} must be > 0, lora_rank={lora_rank} >= 0 and "
                f"unfreeze_at_epoch={unfreeze_at_epoch} >= 0 (or null: stay frozen)"
            )
        super().__init__(**kwargs)
        if freeze_backbone and kwargs.get("network") is not None:
            raise UserError(
                "freeze_backbone with model.network: your network has no separate head to train; "
                "use --model.freeze_backbone=false"
            )
        self.set_trainable(epoch=0)

    def build_network(self, network):
        normalize, backbone, head = super().build_network(network)
        if self.hparams.lora_rank:
            backbone = self.add_adapters(backbone)
        return normalize, backbone, head

    def add_adapters(self, backbone: nn.Module) -> nn.Module:
        """`backbone` with LoRA adapters of rank `lora_rank` (a subclass may use peft's instead)."""
        if not add_lora(backbone, self.hparams.lora_rank, self.hparams.lora_alpha):
            raise UserError(
                f"lora_rank={self.hparams.lora_rank}: backbone {self.hparams.get('backbone')!r} has no Linear "
                "layers for LoRA adapters; use --model.backbone=mlp or vit, or --model.freeze_backbone=true instead"
            )
        return backbone

    def parameter_groups(self) -> list[dict]:
        """'backbone' at lr x backbone_lr_scale and 'head' (the head and any LoRA adapters) at lr. A frozen
        backbone stays in its group: AdamW skips parameters without a gradient, so unfreezing only sets
        `requires_grad`."""
        lr, scale = self.hparams.lr, self.hparams.backbone_lr_scale
        if scale == 1:
            return super().parameter_groups()
        backbone = [p for name, p in self.backbone.named_parameters() if not is_adapter(name)]
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": backbone, "lr": lr * scale, "name": "backbone"}, {"params": head, "lr": lr, "name": "head"}]

    def backbone_frozen(self, epoch: int) -> bool:
        h = self.hparams
        return bool(h.freeze_backbone) and (h.unfreeze_at_epoch is None or epoch < h.unfreeze_at_epoch)

    def set_trainable(self, epoch: int) -> None:
        """Which backbone parameters train in `epoch`. In training, BatchNorm layers without trained
        parameters go to eval mode, so that their running statistics stay as loaded."""
        frozen, lora = self.backbone_frozen(epoch), bool(self.hparams.lora_rank)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not frozen and (is_adapter(name) or not lora))
        for m in self.backbone.modules() if self.training else ():
            if isinstance(m, BATCH_NORMS):
                m.train(any(p.requires_grad for p in m.parameters()))

    def trainable(self) -> str:
        """One line: how many parameters train now, and which."""
        total = sum(p.numel() for p in self.parameters())
        count = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if self.backbone_frozen(self.current_epoch):
            until = self.hparams.unfreeze_at_epoch
            what = "head only (backbone frozen" + (f" until epoch {until})" if until is not None else ")")
        else:
            what = "head + LoRA adapters" if self.hparams.lora_rank else "the whole model"
        return f"Trainable parameters: {count:,} of {total:,} ({100 * count / total:.1f}%): {what}"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        h = self.hparams
        if stage != "fit":
            return
        if h.freeze_backbone and h.unfreeze_at_epoch is not None and self.trainer.world_size > 1:
            raise UserError(
                "unfreeze_at_epoch with more than one process: DDP fixes the trained parameters when it starts. "
                "Run two fits instead: one with the backbone frozen, then one with "
                "--model.init_from=<its last.ckpt> --model.freeze_backbone=false"
            )
        # Loaded here, before DDP or FSDP wrap the model. A resumed fit then restores its own checkpoint
        # over these weights (the command line drops init_from when resuming, so the file may be gone).
        if h.get("init_from"):  # (the text model has none)
            rank_zero_print(load_init_weights(self, h["init_from"]))

    def on_train_start(self):
        self.set_trainable(self.current_epoch)  # also where a run resumed mid-epoch starts
        rank_zero_print(self.trainable())

    def on_train_epoch_start(self):
        self.set_trainable(self.current_epoch)
        if self.hparams.freeze_backbone and self.current_epoch == self.hparams.unfreeze_at_epoch:
            rank_zero_print(f"Epoch {self.current_epoch}: backbone unfrozen. {self.trainable()}")

    def on_predict_start(self) -> None:
        if self.hparams.lora_rank:
            merge_lora(self.backbone)  # one matrix product per layer instead of three
