"""Gradient clipping that also works under FSDP (`configure_gradient_clipping` of the models)."""


def clip_gradients(module, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
    """Lightning's clipping, except for the norm under FSDP.

    Each FSDP process holds a shard of every gradient, so the norm must be taken across
    processes: the root FullyShardedDataParallel's own `clip_grad_norm_` does that, and
    Lightning's clipping (per process) would not.
    """
    root = module.trainer.model
    if hasattr(root, "clip_grad_norm_") and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
        root.clip_grad_norm_(gradient_clip_val)
    else:
        module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
