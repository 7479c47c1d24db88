"""The only names from other libraries' private modules that this project uses, and why.

Each one has no public equivalent today. They live here so that an upgrade that moves one breaks
in one place, and tests/test_internals.py fails with the name that changed.
"""
{%- if cookiecutter.export == "yes" %}

# export.py lowers this logger while exporting to ONNX: it prints "torchvision is not installed"
# on every export, a line about a package this project deliberately does not use.
ONNX_REGISTRATION = "torch.onnx._internal.exporter._registration"
{%- endif %}


def tensorboard_file_writer(logger):
    """The event-file writer of a Lightning `TensorBoardLogger`.

    callbacks.py writes the run's HPARAMS record (the metric names the tab shows) before Lightning
    writes its own; `SummaryWriter` only exposes `add_hparams`, which opens a second run folder.
    `file_writer` is set by `SummaryWriter.__init__` but is not documented.
    """
    return logger.experiment.file_writer


def validation_log_step(trainer) -> int:
    """The step at which Lightning logs this validation's scalars, so that callbacks.py's images
    line up with the curves. It is a counter of the fit loop (`_batches_that_stepped`), which
    Lightning's own DeviceStatsMonitor reads too; `global_step` is one ahead of it at that moment.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped
