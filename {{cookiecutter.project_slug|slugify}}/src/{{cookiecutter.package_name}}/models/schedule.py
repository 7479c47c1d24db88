"""The learning-rate schedule of the models: linear warm-up, then a cosine decay to zero (or constant)."""

import math

import torch


def warmup_then_cosine(optimizer, warmup_steps: int, total_steps: int, cosine: bool = True):
    """A LambdaLR stepped once per optimizer step: `warmup_steps` rising linearly to the peak
    learning rate, then half a cosine down to zero at `total_steps` (with `cosine=False`: the peak)."""
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
