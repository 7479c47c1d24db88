"""Mistakes on the command line, run as `python train.py ...` in a fresh process: each one
ends with the right exit code and a message that names the problem, never a traceback.

Exit code 2: jsonargparse rejected the options or a config file. Exit code 1: the CLI's
own checks, reported as a single `ERROR:` line.
"""

from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, Payload, run_cli, run_train_py, write_table

MARKER = "UNPICKLED"  # a file that appears only if the payload below is ever unpickled


def broken_yaml(where: Path) -> None:
    (where / "broken.yaml").write_text("model:\n  init_args:\n    width: [64, 128\n")


def empty_data_dir(where: Path) -> None:
    (where / "empty").mkdir()


def table(where: Path) -> None:
    write_table(where / "table.csv")


def truncated_checkpoint(where: Path) -> None:
    run_cli("fit", *SMALL, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")
    real = (where / "logs" / "digits_mlp" / "version_0" / "checkpoints" / "last.ckpt").read_bytes()
    (where / "truncated.ckpt").write_bytes(real[:100])


def pickled_checkpoint(where: Path) -> None:
    payload = {"state_dict": {"weight": Payload(str(where / MARKER))}, "hyper_parameters": {}}
    torch.save(payload, where / "payload.ckpt")


# id, arguments, set-up of the working folder, exit code, words stderr must contain
CASES = [
    ("unknown-option", ["fit", "--model.nope=1"], None, 2, ["nope", "not accepted"]),
    ("wrong-type", ["fit", "--trainer.max_epochs=abc"], None, 2, ["trainer.max_epochs", "abc", "int"]),
    ("unknown-backbone", ["fit", "--model.backbone=resnet"], None, 2, ["backbone", "resnet", "'mlp', 'cnn'"]),
    ("missing-config", ["fit", "--config=nosuch.yaml"], None, 2, ["nosuch.yaml", "does not exist"]),
    (
        "lenet-too-deep",  # the shipped digits are 8x8: three 2x2 poolings leave 1x1, four leave nothing
        ["fit", "--model.backbone=lenet", "--model.depth=4"],
        None,
        1,
        ["backbone 'lenet'", "8x8 images are too small for depth 4"],
    ),
    ("yaml-syntax", ["fit", "--config=broken.yaml"], broken_yaml, 2, ["parsing config", "flow sequence", "line 3"]),
    (
        "data-offline",
        ["fit", "--data.name=mnist", "--data.download=false", "--data.data_dir=empty"],
        empty_data_dir,
        1,
        ["missing", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "empty/mnist", "download=true"],
    ),
    (
        "cnn-on-table",
        ["fit", f"--config={ROOT / 'configs' / 'custom_csv.yaml'}", "--data.path=table.csv", "--model.backbone=cnn"],
        table,
        1,
        ["backbone 'cnn' needs images", "shape (3,)", "--model.backbone=mlp"],
    ),
    ("ckpt-missing", ["test", "--ckpt_path=nosuch.ckpt"], None, 1, ["nosuch.ckpt", "file not found"]),
    (
        "ckpt-truncated",
        ["test", "--ckpt_path=truncated.ckpt"],
        truncated_checkpoint,
        1,
        ["truncated.ckpt", "not a readable checkpoint"],
    ),
    (
        "ckpt-pickled-code",
        ["test", "--ckpt_path=payload.ckpt"],
        pickled_checkpoint,
        1,
        ["payload.ckpt", "refused to load", "weights_only=True"],
    ),
]


@pytest.mark.parametrize(("args", "setup", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_is_reported_without_traceback(workdir, args, setup, code, words):
    if setup:
        setup(workdir)
    result = run_train_py(*args, cwd=workdir)
    err = result.stderr
    assert result.returncode == code, err
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in stderr:\n{err}"
    if code == 1:
        # The CLI's own message: exactly one ERROR line, and it is the whole message.
        lines = err.strip().splitlines()
        assert [line for line in lines if line.startswith("ERROR:")] == lines[-1:], err
        assert all(word in lines[-1] for word in words), err
    else:
        assert "error:" in err, err  # jsonargparse's usage error
    assert not (workdir / MARKER).exists(), "the checkpoint's pickled payload ran"


def test_an_option_of_another_model_class_is_one_error_line(workdir):
    """The plain classifier has no `init_from`: one line names the model class and the config that have it,
    instead of the parser's dozen lines about Union subtypes."""
    result = run_train_py("fit", "--model.init_from=x.ckpt", cwd=workdir)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "ERROR: --model.init_from: the model Classifier has no option 'init_from'; "
        "it belongs to FineTuner (--config configs/finetune.yaml)"
    ], result.stderr
    assert not (workdir / "logs").exists()


def test_the_pickled_payload_is_live(tmp_path):
    """The refusal above means something: loading the file unsafely does run the payload."""
    pickled_checkpoint(tmp_path)
    torch.load(tmp_path / "payload.ckpt", weights_only=False)
    assert (tmp_path / MARKER).exists()
