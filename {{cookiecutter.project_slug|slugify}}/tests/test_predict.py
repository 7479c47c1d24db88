"""`python train.py predict` writes a CSV through the PredictionWriter callback: one row per
sample with its id, the predicted class name and its probability, for the MNIST family, a
CSV table (`predict_file`) and a folder of images (`predict_dir`); never a partial file."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL, run_cli, run_train_py, write_images, write_table
from PIL import Image

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data.idx import read_idx
from {{ cookiecutter.package_name }}.data.mnist import DATASETS
from {{ cookiecutter.package_name }}.models import Classifier

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

QUIET = [a for a in SMALL if not a.startswith("--data.")]
CONFIGS = ROOT / "configs"


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def softmax_of(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).softmax(dim=-1)


def check_rows(rows: list[dict[str, str]], probs: torch.Tensor, names: list[str]) -> None:
    """Each row's class and probability are the argmax and max of that sample's softmax."""
    assert len(rows) == len(probs)
    best, predicted = probs.max(dim=-1)
    for row, p, k in zip(rows, best.tolist(), predicted.tolist()):
        assert row["predicted"] == names[k]
        assert float(row["probability"]) == pytest.approx(p, abs=1e-6)
        assert 0 <= float(row["probability"]) <= 1


def test_predict_from_best_checkpoint_writes_csv_of_the_test_split(workdir, capsys):
    run(["fit", *SMALL, "--data.name=fashion_mnist", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"])
    best = workdir / "logs" / "digits_mlp" / "version_0" / "checkpoints" / "best.ckpt"
    capsys.readouterr()
    cli = run(["predict", *SMALL, "--data.name=fashion_mnist", "--ckpt_path=best"])
    out = workdir / "logs" / "digits_mlp" / "version_0" / "predictions.csv"  # in the run of the checkpoint
    assert f"Predictions for 200 samples written to {Path(cli.trainer.log_dir) / 'predictions.csv'}" in (
        capsys.readouterr().out
    )
    header, rows = read_csv(out)
    assert header == ["id", "predicted", "probability", "label"]
    assert [r["id"] for r in rows] == [str(i) for i in range(200)]  # the index in the test files

    # The class names of the data, the true labels of the test file, and the checkpoint's softmax.
    names = DATASETS["fashion_mnist"]["classes"]
    data = workdir / "data" / "fashion_mnist"
    labels = read_idx(data / "t10k-labels-idx1-ubyte.gz").long()
    assert [r["label"] for r in rows] == [names[k] for k in labels.tolist()]
    x = read_idx(data / "t10k-images-idx3-ubyte.gz").unsqueeze(1).float() / 255  # raw pixels: the model normalises
    check_rows(rows, softmax_of(Classifier.load_from_checkpoint(best, map_location="cpu"), x), names)
    assert {r["predicted"] for r in rows} <= set(names)


def test_output_option_and_epoch_interval_write_the_same_rows(workdir):
    # No checkpoint: the seeded initial weights, the same in both runs.
    run(["predict", *SMALL, "--predictions.output=a/by_batch.csv"])
    run(["predict", *SMALL, "--predictions.output=b/at_end.csv", "--predictions.write_interval=epoch"])
    by_batch, at_end = workdir / "a" / "by_batch.csv", workdir / "b" / "at_end.csv"
    assert by_batch.read_text() == at_end.read_text()
    assert len(read_csv(by_batch)[1]) == 200
    assert sorted(p.name for p in (workdir / "a").iterdir()) == ["by_batch.csv"]  # no temporary files left


def test_predict_file_of_a_csv_table(workdir, capsys):
    table = write_table(workdir / "table.csv")
    # Columns in another order, an id column and no label column: features are found by name.
    values = [[0.1, -0.2, 1.0], [2.0, -2.1, 0.9], [1.1, -0.9, 1.2]]
    lines = ["x3,name,x2,x1"] + [f"{x3},row-{i},{x2},{x1}" for i, (x1, x2, x3) in enumerate(values)]
    (workdir / "new.csv").write_text("\n".join(lines) + "\n")
    config = [f"--config={CONFIGS / 'custom_csv.yaml'}", *QUIET, f"--data.path={table}"]
    common = [*config, "--predictions.output=out.csv", "--data.id_column=name"]

    cli = run(["predict", *common, "--data.predict_file=new.csv"])
    header, rows = read_csv(workdir / "out.csv")
    assert header == ["id", "predicted", "probability"]  # nothing to compare with: no label column
    assert [r["id"] for r in rows] == ["row-0", "row-1", "row-2"]
    check_rows(rows, softmax_of(cli.model, torch.tensor(values)), ["a", "b", "c"])  # the raw values

    # Without predict_file: the test rows, named by their line in table.csv, with their labels.
    cli = run(["predict", *config, "--predictions.output=out.csv"])
    header, rows = read_csv(workdir / "out.csv")
    assert header == ["id", "predicted", "probability", "label"]
    text = table.read_text().splitlines()
    assert len(rows) == len(cli.datamodule.splits["test"][1]) == 6  # 10 % of 60
    for row in rows:
        line = text[int(row["id"]) - 1].split(",")  # 1-based line numbers; the header is line 1
        assert row["label"] == line[3]
    x, _ = cli.datamodule.splits["test"]
    check_rows(rows, softmax_of(cli.model, x), ["a", "b", "c"])

    # A typo in the id column is an error, not line numbers in disguise.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli("predict", *config, "--data.predict_file=new.csv", "--data.id_column=nmae")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and "no id column 'nmae'" in err and "--data.id_column" in err
    assert "Traceback" not in err


def test_predict_dir_of_images(workdir, capsys):
    root = write_images(workdir / "images", size=12)
    todo = workdir / "todo"
    todo.mkdir()
    # Another size and other modes than the training images: converted to RGB, resized to image_size.
    Image.new("L", (20, 16), 90).save(todo / "grey.png")
    Image.new("RGBA", (12, 12), (200, 30, 30, 255)).save(todo / "red.png")
    Image.new("RGB", (30, 30), (20, 20, 210)).save(todo / "blue.jpg")
    (todo / "notes.txt").write_text("not an image")
    config = [f"--config={CONFIGS / 'custom_images.yaml'}", *QUIET, f"--data.root={root}", "--data.image_size=[12, 12]"]

    cli = run(["predict", *config, f"--data.predict_dir={todo}", "--predictions.output=out.csv"])
    header, rows = read_csv(workdir / "out.csv")
    assert header == ["id", "predicted", "probability"]
    assert [r["id"] for r in rows] == [str(todo / n) for n in ("blue.jpg", "grey.png", "red.png")]
    expected = []
    for name in ("blue.jpg", "grey.png", "red.png"):
        with Image.open(todo / name) as image:
            pixels = np.asarray(image.convert("RGB").resize((12, 12), Image.BILINEAR))
        expected.append(torch.tensor(pixels).permute(2, 0, 1).float())
    x = torch.stack(expected) / 255
    check_rows(rows, softmax_of(cli.model, x), ["blue", "red"])

    # Without image_size the images to classify must have the training images' size.
    with pytest.raises(SystemExit) as exit_:
        run_cli("predict", *config, "--data.image_size=null", f"--data.predict_dir={todo}")
    assert exit_.value.code == 1
    assert "blue.jpg: image is 30x30 but" in capsys.readouterr().err
    empty = workdir / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        run_cli("predict", *config, f"--data.predict_dir={empty}")
    assert f"{empty}: no images" in capsys.readouterr().err


def test_failed_predict_leaves_no_partial_csv(workdir, monkeypatch):
    out = workdir / "preds" / "predictions.csv"
    out.parent.mkdir()
    out.write_text("id,predicted,probability\nolder,run,1.0\n")
    predict_step = Classifier.predict_step

    def fails_at_third_batch(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("out of memory (simulated)")
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "predict_step", fails_at_third_batch)
    with pytest.raises(RuntimeError, match="simulated"):
        run(["predict", *SMALL, f"--predictions.output={out}"])
    # Two batches of rows had been written: none of them reached the CSV, nor a temporary file.
    assert out.read_text() == "id,predicted,probability\nolder,run,1.0\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.csv"]


@pytest.mark.slow
def test_predict_with_two_processes_writes_every_sample_once(workdir):
    single = run_train_py("predict", *SMALL, "--trainer.accelerator=cpu", "--predictions.output=one.csv", cwd=workdir)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_train_py(
        "predict", *SMALL, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--predictions.output=two.csv", cwd=workdir,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    # Each process predicted every other sample; the first wrote them all, in order, once.
    assert (workdir / "two.csv").read_text() == (workdir / "one.csv").read_text()
    assert double.stdout.count("Predictions for 200 samples written to two.csv") == 1
    assert sorted(p.name for p in workdir.glob("*.csv")) == ["one.csv", "two.csv"]
    assert not list(workdir.glob(".*tmp"))
