"""Each private name in internals.py still exists: an upgrade that moves one fails here, by name.
And no other file of the project uses a private name of another library."""

import re

import pytest
from conftest import ROOT
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from {{ cookiecutter.package_name }} import internals
{%- if cookiecutter.export == "yes" %}


def test_onnx_registration_logger_module_exists():
    import importlib
    import logging
    import warnings

    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(internals.ONNX_REGISTRATION)
    assert module.__name__ == internals.ONNX_REGISTRATION, "internals.ONNX_REGISTRATION moved"
    assert logging.getLogger(internals.ONNX_REGISTRATION).name == internals.ONNX_REGISTRATION
{%- endif %}


def test_tensorboard_file_writer_writes_events(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    writer = internals.tensorboard_file_writer(logger)
    assert writer is not None, "internals.tensorboard_file_writer: SummaryWriter.file_writer is gone"
    writer.add_summary(__import__("tensorboard").compat.proto.summary_pb2.Summary(), 0)
    writer.flush()
    assert list((tmp_path / "run").rglob("*tfevents*")), "internals.tensorboard_file_writer wrote no event file"


def test_validation_log_step_reads_the_fit_loops_counter():
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        step = internals.validation_log_step(trainer)
    except AttributeError as err:
        pytest.fail(f"internals.validation_log_step: fit_loop.epoch_loop._batches_that_stepped is gone ({err})")
    assert step == 0 and isinstance(step, int)


# `x._name` (except `self._name`: the project's own attributes), module paths with a `._` part,
# and `from x import _name`.
PRIVATE = re.compile(r"\b(?!self\b)\w+(\(\))?\._[A-Za-z]|\bimport\b[^#]*\b_[A-Za-z]")


def test_private_names_of_other_libraries_are_used_only_in_internals():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted([*(ROOT / "src").rglob("*.py"), ROOT / "train.py", ROOT / "my_network.py"])
        if path.name != "internals.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not found, "a private name outside internals.py (move it there, with a test):\n" + "\n".join(found)
    names = {name for name in vars(internals) if not name.startswith("_")}
    expected = {"tensorboard_file_writer", "validation_log_step"}
{%- if cookiecutter.export == "yes" %}
    expected.add("ONNX_REGISTRATION")
{%- endif %}
    assert names == expected, (
        "internals.py changed: update this list, its tests and the README's count of private names"
    )
