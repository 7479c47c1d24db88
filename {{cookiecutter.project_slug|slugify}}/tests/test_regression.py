"""Predicting numbers: models.Regressor on a CSV table (CSVDataModule with task: regression),
as configs/regression_csv.yaml runs it: metrics in the target's units, best.ckpt by val/rmse,
TensorBoard's scatter plot and residual histogram, predict, {% if cookiecutter.export == "yes" %}export, {% endif %}and the data's errors."""

import csv
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, write_numbers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

{% if cookiecutter.export == "yes" %}from {{ cookiecutter.package_name }} import export
{% endif %}from {{ cookiecutter.package_name }}.callbacks import scatter_image
from {{ cookiecutter.package_name }}.cli import run

CONFIGS = ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def regression_args(table: Path, *extra: str) -> list[str]:
    return [
        f"--config={CONFIGS / 'regression_csv.yaml'}",
        *QUIET,
        f"--data.path={table}",
        "--data.label_column=y",
        *extra,
    ]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_fit_test_predict{% if cookiecutter.export == "yes" %}_and_export{% endif %}_answer_in_the_target_units(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    table = write_numbers(tmp_path / "table.csv")
    args = regression_args(table)
    cli = run(["fit", *args, "--trainer.max_epochs=12", "--model.lr=0.01"])
    data, model = cli.datamodule, cli.model
    run_dir = Path(cli.trainer.log_dir)

    # The target's statistics of the training split are buffers of the model (saved in its checkpoints).
    y_train = data.splits["train"][1]
    assert float(model.head.mean) == pytest.approx(float(y_train.mean()), rel=1e-6)
    assert float(model.head.std) == pytest.approx(float(y_train.std()), rel=1e-6)

    # best.ckpt is the epoch of the lowest val/rmse; the scatter plot and the residual histogram are
    # logged at each validation, the histogram over every validation sample.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    rmse = [e.value for e in events.Scalars("val/rmse")]
    assert len(rmse) == 12 and rmse[-1] < rmse[0]
    assert float(cli.trainer.checkpoint_callback.best_model_score) == pytest.approx(min(rmse), rel=1e-6)
    assert len(events.Images("val/predicted_vs_true")) == len(events.Histograms("val/residuals")) == 12
    last = events.Histograms("val/residuals")[-1].histogram_value
    x_val, y_val = data.splits["val"]
    with torch.no_grad():
        residuals = model.eval()(x_val).squeeze(-1) - y_val
    assert last.num == len(y_val) and last.sum == pytest.approx(float(residuals.sum()), rel=1e-4, abs=1e-3)

    # test of the best checkpoint prints test/rmse, and it is the RMSE of that model on the test rows.
    capsys.readouterr()
    cli = run(["test", *args, "--ckpt_path=best"])
    assert "test/rmse" in capsys.readouterr().out
    x_test, y_test = cli.datamodule.splits["test"]
    with torch.no_grad():
        predicted = cli.model.eval()(x_test).squeeze(-1)
    expected = float(((predicted - y_test) ** 2).mean().sqrt())
    assert float(cli.trainer.callback_metrics["test/rmse"]) == pytest.approx(expected, rel=1e-5)
    assert expected < 0.5 * float(y_test.std())  # it learned (predicting the mean would give about 1 std)

    # predict: id (the row's line), the value in the target's units, the true value from the file.
    run(["predict", *args, "--ckpt_path=best", "--predictions.output=out.csv"])
    header, rows = read_csv(tmp_path / "out.csv")
    assert header == ["id", "predicted", "label"] and len(rows) == len(y_test)
    lines = table.read_text().splitlines()
    assert [float(r["label"]) for r in rows] == [float(lines[int(r["id"]) - 1].split(",")[3]) for r in rows]
{%- if cookiecutter.export == "yes" %}

    # The exported model, fed the raw feature values of those rows, returns predict's values.
    features = torch.tensor([[float(v) for v in lines[int(r["id"]) - 1].split(",")[:3]] for r in rows])
    best = next(run_dir.glob("checkpoints/best*.ckpt"))
    assert export.main(["--ckpt_path", str(best), "--output", str(tmp_path / "model.pt2")]) == 0
    exported = torch.export.load(tmp_path / "model.pt2").module()
    values = exported(features).squeeze(-1)
    assert values.tolist() == pytest.approx([float(r["predicted"]) for r in rows], rel=1e-5)
{%- endif %}

    # A file of new rows without the target: no label column.
    (tmp_path / "new.csv").write_text("x1,x2,x3\n1,0,0\n0,1,0\n")
    run(["predict", *args, "--ckpt_path=best", "--predictions.output=new_out.csv", "--data.predict_file=new.csv"])
    header, rows = read_csv(tmp_path / "new_out.csv")
    assert header == ["id", "predicted"] and len(rows) == 2
    assert float(rows[0]["predicted"]) - float(rows[1]["predicted"]) == pytest.approx(30, abs=6)  # 20 x1 - 10 x2


def decimal_labels(n: int) -> list[str]:
    return [f"{1 + i / 7:.3f}" for i in range(n)]


# id, the target cells, extra options, the file:line the message names, words it must contain
MISTAKES = [
    ("not-a-number", ["1.5"] * 5 + ["n/a"] + ["2.5"] * 54, [], 7, ["'n/a', not a number", "fix the value"]),
    ("nan", ["1.5", "nan"] + ["2.5"] * 58, [], 3, ["'nan'", "fix the value or drop the row"]),
    ("infinite", ["1.5", "2.5", "-inf"] + ["2.5"] * 57, [], 4, ["'-inf'", "fix the value or drop the row"]),
    ("constant", ["7"] * 60, [], 2, ["is 7 in all 60 rows", "nothing to learn"]),
    (
        "decimals-to-the-classifier",
        decimal_labels(60),
        [f"--config={CONFIGS / 'custom_csv.yaml'}"],
        3,  # the first value that is not a whole number
        ["decimal numbers", "configs/regression_csv.yaml"],
    ),
]


@pytest.mark.parametrize(("targets", "extra", "line", "words"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_target_mistakes_are_one_error_line_naming_file_and_line(
    tmp_path, monkeypatch, capsys, targets, extra, line, words
):
    monkeypatch.chdir(tmp_path)
    table = write_numbers(tmp_path / "t.csv", rows=len(targets), targets=targets)
    args = regression_args(table) if not extra else [*extra, *QUIET, f"--data.path={table}", "--data.label_column=y"]
    with pytest.raises(SystemExit) as exit_:
        run_cli("fit", *args, "--trainer.max_epochs=1")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    errors = [text for text in err.splitlines() if text.startswith("ERROR:")]  # (in-process: Lightning's warnings too)
    assert errors == err.strip().splitlines()[-1:] and "Traceback" not in err, err
    assert errors[0].startswith(f"ERROR: {table}:{line}: ") and all(w in errors[0] for w in words), errors[0]


def test_whole_number_labels_stay_classes(tmp_path):
    """Integer labels, or few distinct decimals, are classes: no hint to use regression."""
    from {{ cookiecutter.package_name }}.data import CSVDataModule

    for labels in ([str(i % 30) for i in range(60)], [("0.5", "1.5")[i % 2] for i in range(60)]):
        dm = CSVDataModule(path=str(write_numbers(tmp_path / "t.csv", rows=60, targets=labels)), label_column="y")
        dm.setup("fit")
        assert dm.num_classes == len(set(labels))


def test_own_network_gives_one_value_in_the_target_units():
    from torch import nn

    from {{ cookiecutter.package_name }}.errors import UserError
    from {{ cookiecutter.package_name }}.models import Regressor

    model = Regressor(input_shape=(3,), network=nn.Linear(3, 1))
    model.head.mean.fill_(100.0)
    model.head.std.fill_(10.0)
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.allclose(model(x), model.backbone(x) * 10 + 100)  # normalisation is 0 and 1 until fit
    with pytest.raises(UserError, match=r"not \(2, 1\).*a regressor: one value"):
        Regressor(input_shape=(3,), network=nn.Linear(3, 2))


def test_predictions_stay_float32_under_bf16_mixed():
    """Under bf16-mixed (configs/trainer/gpu.yaml) the network's output is bfloat16; in the target's units
    that would round 300000 to a multiple of 2048, so the last layer computes in float32."""
    from torch import nn

    from {{ cookiecutter.package_name }}.models import Regressor

    model = Regressor(input_shape=(3,), network=nn.Linear(3, 1))
    model.head.mean.fill_(300000.0)
    model.head.std.fill_(1000.0)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < 20  # the network's own bfloat16 rounding, times the std of 1000


def test_scatter_image_puts_perfect_predictions_on_the_diagonal():
    true = torch.linspace(-5, 300, 40)
    pixels = torch.tensor(list(scatter_image(true.clone(), true).getdata())).reshape(320, 320, 3)
    blue = ((pixels[..., 2] > 150) & (pixels[..., 0] < 100)).nonzero()  # the points' colour
    rows, columns = blue[:, 0].float(), blue[:, 1].float()
    assert len(blue) > 40 and columns.max() - columns.min() > 200
    # Image rows grow downwards: on the diagonal, row + column is the same for every point.
    assert float((rows + columns).std()) < 3
