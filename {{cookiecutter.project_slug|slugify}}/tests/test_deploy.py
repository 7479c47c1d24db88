"""Deployable models: the training data's mean and std are part of the model (checkpoint and export),
`predict` from a checkpoint needs no training file, and the README's "Use the exported model" code,
run where neither this project nor Lightning can be imported, gives the same rows as `predict`."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, run_cli, write_images, write_table
from PIL import Image

from {{ cookiecutter.package_name }} import export
from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data.idx import read_idx, write_idx
from {{ cookiecutter.package_name }}.data.mnist import DATASETS

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore::DeprecationWarning")

QUIET = [a for a in SMALL if not a.startswith("--data.")]
CONFIGS = ROOT / "configs"
CNN = [f"--config={CONFIGS / 'fashion_mnist_cnn.yaml'}", "--model.width=8", *SMALL, "--data.name=fashion_mnist"]
TABLE = [f"--config={CONFIGS / 'custom_csv.yaml'}", *QUIET]
SHORT = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=4"]
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.M | re.S)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def readme_code() -> list[str]:
    """The Python blocks of README.md's section "Use the exported model", as a reader copies them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Use the exported model\n", 1)[1].split("\n## ", 1)[0]
    return FENCE.findall(section)


# Runs a file as `python -I FILE` would, but with this project and Lightning made unimportable:
# an editable install would otherwise still be found in site-packages.
DEPLOYED = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"{{ cookiecutter.package_name }}", "lightning", "pytorch_lightning"}:
            raise ModuleNotFoundError(f"No module named {name!r} (not in a deployment)")
sys.meta_path.insert(0, Absent())
try:
    import {{ cookiecutter.package_name }}
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the project can still be imported")
code = open(sys.argv[1], encoding="utf-8").read()
exec(compile(code, sys.argv[1], "exec"), {"__name__": "__main__"})
"""


def run_deployed(code: str, cwd: Path) -> None:
    """Run `code` in a fresh, isolated Python (-I: no PYTHONPATH, no user site, not the cwd) in `cwd`."""
    (cwd / "use_model.py").write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-I", "-c", DEPLOYED, "use_model.py"], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def same_rows(exported: list[dict[str, str]], predicted: list[dict[str, str]]) -> None:
    assert len(exported) == len(predicted) > 0
    for a, b in zip(exported, predicted):
        assert (a["id"], a["predicted"]) == (b["id"], b["predicted"])
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-5)


def test_checkpoint_keeps_the_training_statistics_and_predict_uses_them(workdir):
    cli = run(["fit", *SMALL, *SHORT])
    ckpt = workdir / "logs" / "digits_mlp" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    train = cli.datamodule.splits["train"][0].float() / 255  # the training split's pixels in [0, 1]
    assert state["normalize.mean"].shape == (1, 1, 1)
    torch.testing.assert_close(state["normalize.mean"].flatten(), train.mean().reshape(1))
    torch.testing.assert_close(state["normalize.std"].flatten(), train.std().reshape(1))
    run(["predict", *SMALL, f"--ckpt_path={ckpt}", "--predictions.output=before.csv"])

    # Other training images (brighter, other mean and std): a checkpoint predicts exactly as before.
    images = workdir / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    write_idx(images, (read_idx(images).int() + 80).clamp(max=255).to(torch.uint8))
    cli = run(["predict", *SMALL, f"--ckpt_path={ckpt}", "--predictions.output=after.csv"])
    assert float(cli.datamodule.mean.flatten()[0]) > float(state["normalize.mean"].flatten()[0]) + 0.1
    torch.testing.assert_close(cli.model.normalize.mean, state["normalize.mean"])
    assert (workdir / "after.csv").read_text() == (workdir / "before.csv").read_text()


def test_csv_predict_works_without_the_training_file(workdir):
    table = write_table(workdir / "table.csv", rows=90)
    fitted = run(["fit", *TABLE, f"--data.path={table}", *SHORT]).model
    ckpt = workdir / "logs" / "custom_csv" / "version_0" / "checkpoints" / "last.ckpt"
    # New rows: the columns in another order, one more column, and no label.
    g = torch.Generator().manual_seed(5)
    values = (torch.randn(12, 3, generator=g) * 0.5 + torch.tensor([1.0, -1.0, 1.0])).round(decimals=4).tolist()
    lines = ["x3,note,x1,x2"] + [f"{x3},n{i},{x1},{x2}" for i, (x1, x2, x3) in enumerate(values)]
    (workdir / "new_rows.csv").write_text("\n".join(lines) + "\n")
    predict = ["predict", *TABLE, f"--data.path={table}", f"--ckpt_path={ckpt}", "--data.predict_file=new_rows.csv"]

    run([*predict, "--predictions.output=before.csv"])
    table.unlink()
    cli = run([*predict, "--predictions.output=after.csv"])

    assert (workdir / "after.csv").read_text() == (workdir / "before.csv").read_text()
    rows = read_rows(workdir / "after.csv")
    assert [r["id"] for r in rows] == [str(line) for line in range(2, 14)]
    assert cli.model.hparams.feature_names == ["x1", "x2", "x3"] and cli.datamodule.splits.keys() == {"predict"}
    with torch.no_grad():
        best, k = fitted.eval()(torch.tensor(values)).softmax(-1).max(-1)  # raw values: the model standardises them
    assert [r["predicted"] for r in rows] == [["a", "b", "c"][c] for c in k.tolist()]
    assert [float(r["probability"]) for r in rows] == pytest.approx(best.tolist(), abs=1e-6)
    assert len({r["predicted"] for r in rows}) >= 2  # not one class for everything


def test_image_folder_predict_works_without_the_training_images(workdir, capsys):
    root = write_images(workdir / "images", size=12)
    config = [f"--config={CONFIGS / 'custom_images.yaml'}", *QUIET, f"--data.root={root}", "--data.image_size=[12, 12]"]
    run(["fit", *config, "--trainer.max_epochs=1"])
    ckpt = workdir / "logs" / "custom_images" / "version_0" / "checkpoints" / "last.ckpt"
    todo = workdir / "todo"
    todo.mkdir()
    for name in ("red/0.png", "blue/1.png", "red/5.png"):
        shutil.copy(root / name, todo / name.replace("/", "_"))
    predict = ["predict", *config, f"--ckpt_path={ckpt}", f"--data.predict_dir={todo}"]

    run([*predict, "--predictions.output=before.csv"])
    shutil.rmtree(root)
    run([*predict, "--predictions.output=after.csv"])
    assert (workdir / "after.csv").read_text() == (workdir / "before.csv").read_text()
    assert len(read_rows(workdir / "after.csv")) == 3

    # Without image_size, images of another size than the model's are one clear error.
    big = workdir / "big"
    big.mkdir()
    Image.new("RGB", (20, 16), (200, 20, 20)).save(big / "x.png")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(*predict[:-1], f"--data.predict_dir={big}", "--data.image_size=null")
    assert exit_.value.code == 1
    assert "images are (3, 16, 20) (channels, height, width) but the model takes (3, 12, 12): set " in (
        capsys.readouterr().err
    )


def test_export_json_describes_images_and_tables(workdir):
    run(["fit", *CNN, *SHORT])
    best = workdir / "logs" / "fashion_mnist_cnn" / "version_0" / "checkpoints" / "best.ckpt"
    out = workdir / "model.pt2"
    assert export.main(["--ckpt_path", str(best), "--output", str(out)]) == 0
    info = json.loads((workdir / "model.pt2.json").read_text())
    assert info["file"] == "model.pt2" and info["format"] == "exported_program"
    assert info["checkpoint"] == str(best.resolve())
    assert info["input"]["shape"] == ["batch", 1, 28, 28] and info["input"]["dtype"] == "float32"
    assert info["input"]["range"] == [0.0, 1.0] and info["features"] is None
    assert info["classes"] == DATASETS["fashion_mnist"]["classes"]

    table = write_table(workdir / "table.csv")
    run(["fit", *TABLE, f"--data.path={table}", "--trainer.max_epochs=1"])
    ckpt = workdir / "logs" / "custom_csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert export.main(["--ckpt_path", str(ckpt), "--format", "torchscript", "--output", "t.pt"]) == 0
    info = json.loads((workdir / "t.pt.json").read_text())
    assert info["input"]["shape"] == ["batch", 3] and info["input"]["range"] is None
    assert info["features"] == ["x1", "x2", "x3"] and info["classes"] == ["a", "b", "c"]
    # The standardisation is inside the file: raw rows give the checkpoint model's outputs.
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert info["normalization"]["mean"] == pytest.approx(state["normalize.mean"].tolist())
    assert float(state["normalize.mean"][0]) == pytest.approx(1.0, abs=0.1)  # x1 is 0, 1 or 2: mean about 1


def test_readme_image_code_gives_the_test_accuracy_and_predicts_rows(workdir, tmp_path_factory):
    run(["fit", *CNN, "--data.batch_size=32", "--trainer.max_epochs=3"])  # 48 steps: enough to learn something
    cli = run(["test", *CNN, "--ckpt_path=best"])
    accuracy = float(cli.trainer.callback_metrics["test/acc"])
    run(["predict", *CNN, "--ckpt_path=best", "--predictions.output=predicted.csv"])

    deployed = tmp_path_factory.mktemp("deployed")  # outside the project and the training run
    assert export.main(["--ckpt_path", "best", "--output", str(deployed / "model.pt2")]) == 0
    (deployed / "data" / "fashion_mnist").mkdir(parents=True)
    name = "t10k-images-idx3-ubyte.gz"
    shutil.copy(workdir / "data" / "fashion_mnist" / name, deployed / "data" / "fashion_mnist" / name)
    image_code, _ = readme_code()
    run_deployed(image_code, deployed)

    exported = read_rows(deployed / "exported_predictions.csv")
    same_rows(exported, read_rows(workdir / "predicted.csv"))
    labels = read_idx(workdir / "data" / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").tolist()
    names = DATASETS["fashion_mnist"]["classes"]
    hits = sum(row["predicted"] == names[k] for row, k in zip(exported, labels))
    assert hits / len(labels) == pytest.approx(accuracy, abs=1e-6)
    assert 0.3 < accuracy < 1  # it learned something, and there is something to get wrong


def test_readme_table_code_with_onnx_runtime_predicts_rows(workdir, tmp_path_factory):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason="ONNX export needs the `onnx` extra: pip install -e '.[onnx]'")
    table = write_table(workdir / "table.csv", rows=90)
    run(["fit", *TABLE, f"--data.path={table}", *SHORT])
    ckpt = workdir / "logs" / "custom_csv" / "version_0" / "checkpoints" / "last.ckpt"
    g = torch.Generator().manual_seed(6)
    values = (torch.randn(15, 3, generator=g) * 0.6 + torch.tensor([1.0, -1.0, 1.0])).tolist()
    lines = ["x2,x3,x1"] + [f"{x2:.4f},{x3:.4f},{x1:.4f}" for x1, x2, x3 in values]
    (workdir / "new_rows.csv").write_text("\n".join(lines) + "\n")
    run(["predict", *TABLE, f"--ckpt_path={ckpt}", "--data.predict_file=new_rows.csv", "--predictions.output=p.csv"])

    deployed = tmp_path_factory.mktemp("deployed")
    assert export.main(["--ckpt_path", str(ckpt), "--format", "onnx", "--output", str(deployed / "table.onnx")]) == 0
    shutil.copy(workdir / "new_rows.csv", deployed / "new_rows.csv")
    _, table_code = readme_code()
    run_deployed(table_code, deployed)

    same_rows(read_rows(deployed / "exported_predictions.csv"), read_rows(workdir / "p.csv"))
