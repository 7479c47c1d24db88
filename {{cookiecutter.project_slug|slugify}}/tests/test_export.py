"""Export: each format written from a checkpoint of `fit`, reloaded on its own and compared with the model;
LoRA adapters merged; and the user mistakes that end in one ERROR line."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from conftest import ROOT, SMALL, run_cli, write_dataset

from {{ cookiecutter.package_name }} import export
from {{ cookiecutter.package_name }}.models import Classifier, FineTuner

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore::DeprecationWarning")

REPORT = re.compile(r"max \|difference\| vs PyTorch on batches of (\d+) and 1: (\S+) \(tolerance 1e-04\): OK")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a tiny `fit` of the default MLP on synthetic MNIST, shared by this file's tests."""
    root = tmp_path_factory.mktemp("export_fit")
    write_dataset(root / "data" / "mnist")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_cli(
            "fit", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--model.width=32", *SMALL,
        )  # fmt: skip
    return root / "logs" / "digits_mlp" / "version_0" / "checkpoints" / "last.ckpt"


def reference(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The checkpoint's Classifier's output on `x`, computed without the export module."""
    model = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        return model(x)


def run_file(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file the way a user of it would."""
    if fmt == "exported_program":
        return torch.export.load(path).module()(x)
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def needs(fmt: str) -> None:
    if fmt == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(name, reason="ONNX export needs the `onnx` extra: pip install -e '.[onnx]'")


@pytest.mark.parametrize(("fmt", "suffix"), [("exported_program", ".pt2"), ("torchscript", ".pt"), ("onnx", ".onnx")])
def test_each_format_matches_the_model(checkpoint, tmp_path, capsys, fmt, suffix):
    needs(fmt)
    out = tmp_path / f"model{suffix}"

    assert export.main(["--ckpt_path", str(checkpoint), "--format", fmt, "--output", str(out)]) == 0

    printed = capsys.readouterr().out
    assert f"Wrote {out} ({round(out.stat().st_size / 1024)} KB)" in printed
    batch, difference = REPORT.search(printed).groups()
    assert int(batch) == 8 and float(difference) <= 1e-4
    assert "pixels in [0, 1] (uint8 / 255): the training data's normalisation is inside the model" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, f"{out.name}.json"]  # no temporary file left
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))  # another batch size than exported
    with torch.no_grad():
        torch.testing.assert_close(run_file(fmt, out, x), reference(checkpoint, x), atol=1e-5, rtol=1e-5)


def test_default_output_and_format_and_best_last(checkpoint, tmp_path, capsys):
    logs = tmp_path / "logs"
    run = logs / "digits_mlp" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    ckpt = Path(shutil.copy(checkpoint, run / "last.ckpt"))

    assert export.main(["--ckpt_path", str(ckpt)]) == 0
    assert ckpt.with_suffix(".pt2").is_file()  # exported_program, next to the checkpoint
    assert (run / "last.pt2.json").is_file()
    assert (ckpt.with_suffix(".pt2").stat().st_mode & 0o777) == 0o666 & ~current_umask()

    out = tmp_path / "from_last.pt"
    assert (
        export.main(["--ckpt_path", "last", "--log_dir", str(logs), "--format", "torchscript", "--output", str(out)])
        == 0
    )
    assert f"Using checkpoint {ckpt}" in capsys.readouterr().out and out.is_file()
    assert export.main(["--ckpt_path", "best", "--log_dir", str(logs)]) == 1
    assert capsys.readouterr().err.startswith("ERROR: --ckpt_path=best: no best checkpoint under")


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_lora_adapters_are_merged_into_the_export(tmp_path):
    """A ViT with trained (non-zero) LoRA adapters: the exported file has plain Linear layers and the same outputs."""
    torch.manual_seed(0)
    model = FineTuner(backbone="vit", width=32, depth=1, heads=2, lora_rank=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
    ckpt = tmp_path / "lora.ckpt"
    # what LightningCLI writes: the class to rebuild, so loading gives a FineTuner with its adapters
    hparams = {
        **model.hparams,
        "_class_path": "{{ cookiecutter.package_name }}.models.FineTuner",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    state = {"state_dict": model.state_dict(), "hyper_parameters": hparams}
    torch.save({**state, "pytorch-lightning_version": lightning.__version__}, ckpt)

    assert export.main(["--ckpt_path", str(ckpt)]) == 0
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        program = torch.export.load(ckpt.with_suffix(".pt2"))
        assert [k for k in program.state_dict if "lora" in k] == []
        assert len([k for k in model.state_dict() if "lora" in k]) == 2 * 2  # A and B of the block's two Linears
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


class Payload:
    """Any class: safe loading (weights_only=True) refuses to rebuild it."""


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ERROR: ")
    return err[0]


def test_missing_corrupt_and_unsafe_checkpoints(tmp_path, capsys, checkpoint):
    assert export.main(["--ckpt_path", str(tmp_path / "nope.ckpt")]) == 1
    assert "file not found" in error_line(capsys)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    assert export.main(["--ckpt_path", str(truncated)]) == 1
    assert "not a readable checkpoint" in error_line(capsys)

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload()}, unsafe)
    assert export.main(["--ckpt_path", str(unsafe)]) == 1
    assert "refused to load" in error_line(capsys)
    assert not list(tmp_path.glob("*.pt2"))


def test_unknown_format_and_bad_batch_size(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--ckpt_path", str(checkpoint), "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert export.main(["--ckpt_path", str(checkpoint), "--batch_size", "0"]) == 1
    assert "--batch_size=0" in error_line(capsys)


def hide_modules(monkeypatch, *names: str) -> None:
    """Make `importlib.util.find_spec` report `names` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_onnx_without_the_extra(checkpoint, tmp_path, monkeypatch, capsys):
    hide_modules(monkeypatch, "onnxscript")
    out = tmp_path / "m.onnx"
    assert export.main(["--ckpt_path", str(checkpoint), "--format", "onnx", "--output", str(out)]) == 1
    assert "pip install -e '.[onnx]'" in error_line(capsys) and not out.exists()


def test_onnx_without_onnx_runtime_is_written_but_not_checked(checkpoint, tmp_path, monkeypatch, capsys):
    needs("onnx")
    hide_modules(monkeypatch, "onnxruntime")
    out = tmp_path / "m.onnx"
    assert export.main(["--ckpt_path", str(checkpoint), "--format", "onnx", "--output", str(out)]) == 0
    assert "NOT CHECKED: comparing with PyTorch needs ONNX Runtime: pip install -e '.[onnx]'" in capsys.readouterr().out
    assert out.stat().st_size > 0


def test_a_failed_check_writes_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.pt2"
    out.write_bytes(b"the previous export")
    real = export.load_file

    def off_by_a_little(fmt, path):
        run = real(fmt, path)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(export, "load_file", off_by_a_little)

    assert export.main(["--ckpt_path", str(checkpoint), "--output", str(out)]) == 1

    line = error_line(capsys)
    assert "differs from PyTorch by up to 1.00e-03 (tolerance 1e-04)" in line and "nothing written" in line
    assert out.read_bytes() == b"the previous export" and sorted(tmp_path.iterdir()) == [out]
    # A looser tolerance accepts it.
    assert export.main(["--ckpt_path", str(checkpoint), "--output", str(out), "--tolerance", "1e-2"]) == 0


def test_command_line_exit_code_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "{{ cookiecutter.package_name }}.export", "--ckpt_path", str(tmp_path / "missing.ckpt")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        },
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ERROR: --ckpt_path={tmp_path / 'missing.ckpt'}: file not found (give a .ckpt file written by `fit`, "
        "e.g. logs/<run>/version_0/checkpoints/best.ckpt, or 'best' / 'last')"
    ]
