"""Predicting numbers from texts: models.text_regressor.TextRegressor with a tiny, randomly initialised
BERT written by the tests (no network), as configs/text_regression.yaml runs it: fit, test of best.ckpt,
predictions in the target's units{% if cookiecutter.export == "yes" %}, export{% endif %}, small LoRA checkpoints, and the target's errors."""

import csv
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

pytest.importorskip("transformers", reason="the text extra is not installed: pip install -e '.[text]'")
pytest.importorskip("peft", reason="the text extra is not installed: pip install -e '.[text]'")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from textdata import write_scores, write_tiny_bert  # noqa: E402

from {{ cookiecutter.package_name }}.cli import run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

CONFIG = ROOT / "configs" / "text_regression.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def regression_run(bert: Path, data: Path, *extra: str, config: Path = CONFIG) -> list[str]:
    return [
        f"--config={config}", f"--model.model_name_or_path={bert}", f"--data.path={data}",
        "--data.label_column=score", "--data.batch_size=8", "--model.lr=0.01", "--model.warmup_steps=2", *QUIET, *extra,
    ]  # fmt: skip


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_fit_test_predict{% if cookiecutter.export == "yes" %}_and_export{% endif %}_answer_in_the_target_units(tmp_path, monkeypatch, bert, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_scores(tmp_path / "scores.csv", 120)  # 250 with positive words, 150 with negative ones
    args = regression_run(bert, data, "--model.lora_rank=0")  # all weights: the tiny random BERT learns fast
    cli = run(["fit", *args, "--trainer.max_epochs=3", "--model.lr=0.02"])
    run_dir = Path(cli.trainer.log_dir)

    # The target's statistics of the training split are buffers of the model (saved in its checkpoints).
    y_train = cli.datamodule.splits["train"][1]
    assert y_train.dtype == torch.float32
    assert float(cli.model.scale.mean) == pytest.approx(float(y_train.mean()), rel=1e-6)
    assert float(cli.model.scale.std) == pytest.approx(float(y_train.std()), rel=1e-6)

    # best.ckpt is the epoch of the lowest val/rmse; the scatter plot and residual histogram are logged.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    rmse = [e.value for e in events.Scalars("val/rmse")]
    assert len(rmse) == 3 and float(cli.trainer.checkpoint_callback.best_model_score) == pytest.approx(min(rmse))
    assert len(events.Images("val/predicted_vs_true")) == len(events.Histograms("val/residuals")) == 3

    # test of the best checkpoint prints test/rmse, the RMSE of that model on the test texts, in the
    # target's units and well below its standard deviation (predicting the mean gives about 1 std).
    capsys.readouterr()
    cli = run(["test", *args, "--ckpt_path=best"])
    assert "test/rmse" in capsys.readouterr().out
    x_test, y_test = cli.datamodule.on_after_batch_transfer(cli.datamodule.splits["test"], 0)  # padding cut
    with torch.no_grad():
        predicted = cli.model.eval()(x_test).squeeze(-1)
    expected = float(((predicted - y_test) ** 2).mean().sqrt())
    assert float(cli.trainer.callback_metrics["test/rmse"]) == pytest.approx(expected, rel=1e-5)
    assert expected < 0.4 * float(y_test.std())  # about 0.05 std here

    # predict: id (the row's line), the value in the target's units, the true value from the file.
    run(["predict", *args, "--ckpt_path=best", "--predictions.output=out.csv"])
    header, rows = read_csv(tmp_path / "out.csv")
    assert header == ["id", "predicted", "label"] and len(rows) == len(y_test) == 12
    lines = data.read_text().splitlines()
    assert [float(r["label"]) for r in rows] == [float(lines[int(r["id"]) - 1].rsplit(",", 1)[1]) for r in rows]
    values = [float(r["predicted"]) for r in rows]
    assert values == pytest.approx(predicted.tolist(), rel=1e-5)

    # New texts without the score column: the learnt word decides the value, about 250 or 150.
    (tmp_path / "new.csv").write_text("text\nthe food was good and nice\nthe film was sad and awful\n")
    run(["predict", *args, "--ckpt_path=best", "--predictions.output=new.out.csv", "--data.predict_file=new.csv"])
    header, rows = read_csv(tmp_path / "new.out.csv")
    assert header == ["id", "predicted"] and [r["id"] for r in rows] == ["2", "3"]
    assert float(rows[0]["predicted"]) == pytest.approx(250, abs=30)
    assert float(rows[1]["predicted"]) == pytest.approx(150, abs=30)
{%- if cookiecutter.export == "yes" %}

    # The exported file, fed the tokenizer's ids and mask, returns predict's values (LoRA or not).
    from transformers import AutoTokenizer

    from {{ cookiecutter.package_name }} import export

    best = next(run_dir.glob("checkpoints/best*.ckpt"))
    assert export.main(["--ckpt_path", str(best), "--output", str(tmp_path / "model.pt2")]) == 0
    assert "the predicted value in the target's units" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model-tokenizer")
    batch = tokenizer(["the food was good and nice", "the film was sad and awful"], return_tensors="pt", padding=True)
    exported = torch.export.load(tmp_path / "model.pt2").module()
    got = exported(batch["input_ids"], batch["attention_mask"]).squeeze(-1)
    assert got.tolist() == pytest.approx([float(r["predicted"]) for r in rows], rel=1e-4)
{%- endif %}


def test_lora_checkpoints_hold_adapters_head_and_target_statistics(tmp_path, monkeypatch, bert):
    monkeypatch.chdir(tmp_path)
    data = write_scores(tmp_path / "scores.csv", 40)
    args = regression_run(bert, data, "--trainer.limit_val_batches=1")
    run(["fit", *args, "--trainer.max_epochs=1"])
    best = tmp_path / "logs" / "text_regression" / "version_0" / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert {"head.weight", "head.bias", "scale.mean", "scale.std"} <= keys
    assert all(".lora_A." in k or ".lora_B." in k for k in keys if k.startswith("backbone."))
    assert float(checkpoint["state_dict"]["scale.mean"]) == pytest.approx(200, abs=20)
    # test rebuilds the encoder from its folder and takes the rest from the checkpoint.
    cli = run(["test", *args, "--ckpt_path=best"])
    assert float(cli.model.scale.mean) == float(checkpoint["state_dict"]["scale.mean"])
    assert "test/rmse" in cli.trainer.callback_metrics


def scores_file(path: Path, cells: list[str]) -> Path:
    """A CSV of texts whose score cells are `cells`, as written."""
    words = ["good day", "bad film", "nice food", "sad day"]
    path.write_text("text,score\n" + "".join(f"{words[i % 4]},{c}\n" for i, c in enumerate(cells)))
    return path


# id, the score cells, the config, the file:line the message names, words it must contain
MISTAKES = [
    ("not-a-number", ["1.5"] * 5 + ["n/a"] + ["2.5"] * 14, CONFIG, 7, ["'n/a', not a number", "fix the value"]),
    ("nan", ["1.5", "nan"] + ["2.5"] * 18, CONFIG, 3, ["'nan'", "fix the value or drop the row"]),
    ("infinite", ["1.5", "2.5", "inf"] + ["2.5"] * 17, CONFIG, 4, ["'inf'", "fix the value or drop the row"]),
    ("constant", ["7"] * 20, CONFIG, 2, ["is 7 in all 20 rows", "nothing to learn"]),
    (
        "decimals-to-the-text-classifier",
        [f"{1 + i / 7:.3f}" for i in range(30)],
        ROOT / "configs" / "text_lora.yaml",
        3,  # the first value that is not a whole number
        ["decimal numbers", "configs/text_regression.yaml"],
    ),
]


@pytest.mark.parametrize(("cells", "config", "line", "words"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_target_mistakes_are_one_error_line_naming_file_and_line(
    tmp_path, monkeypatch, capsys, bert, cells, config, line, words
):
    monkeypatch.chdir(tmp_path)
    path = scores_file(tmp_path / "t.csv", cells)
    with pytest.raises(SystemExit) as exit_:
        run_cli("fit", *regression_run(bert, path, config=config))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    errors = [text for text in err.splitlines() if text.startswith("ERROR:")]  # (in-process: library warnings too)
    assert errors == err.strip().splitlines()[-1:] and "Traceback" not in err, err
    assert errors[0].startswith(f"ERROR: {path}:{line}: ") and all(w in errors[0] for w in words), errors[0]
