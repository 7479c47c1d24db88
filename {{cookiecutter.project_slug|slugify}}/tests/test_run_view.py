"""What a run shows: `validate`, `test` and `predict` of a run's checkpoint add their results to
that run's folder (a second `test` replaces the first's), the model summary lists shapes and FLOPs
without the metrics, and the console of a default `fit` holds only lines that say something."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL, run_train_py
from lightning.pytorch.utilities.model_summary import summarize
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.models import Classifier
from {{ cookiecutter.package_name }}.models.nets import example_batch

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

RUN = Path("logs") / "digits_mlp" / "version_0"
SHORT = [*SMALL, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--model.lr=1e-4"]


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    found = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    found.Reload()
    return [(e.step, e.value) for e in found.Scalars(tag)] if tag in found.Tags()["scalars"] else []


def event_files(folder: Path, suffix: str = "") -> list[str]:
    return sorted(p.name for p in folder.glob(f"events.out.tfevents.*{suffix}"))


def test_evaluations_land_in_the_run_they_evaluate(workdir, capsys):
    run(["fit", *SHORT])
    run_dir = workdir / RUN
    config, hparams = (run_dir / "config.yaml").read_bytes(), (run_dir / "hparams.yaml").read_bytes()
    training = event_files(run_dir)
    best, last = (run_dir / "checkpoints" / f"{n}.ckpt" for n in ("best", "last"))
    best_step = torch.load(best, weights_only=True)["global_step"] - 1  # where fit logged that epoch's val
    last_step = torch.load(last, weights_only=True)["global_step"] - 1
    capsys.readouterr()

    first = run(["test", *SMALL, "--ckpt_path=best"]).trainer.callback_metrics["test/acc"].item()
    assert f"Results are added to the checkpoint's run, {RUN}" in capsys.readouterr().out
    assert sorted(p.name for p in (workdir / "logs" / "digits_mlp").iterdir()) == ["version_0"]  # no new run
    assert scalars(run_dir, "test/acc") == [(best_step, pytest.approx(first))]
    # The training run's own files are as fit left them; the test's config lies beside them.
    assert (run_dir / "config.yaml").read_bytes() == config and (run_dir / "hparams.yaml").read_bytes() == hparams
    assert yaml.safe_load((run_dir / "test_config.yaml").read_text())["ckpt_path"] == str(best.relative_to(workdir))
    (test_file,) = event_files(run_dir, ".test")
    assert event_files(run_dir) == sorted([*training, test_file])
    only_test = EventAccumulator(str(run_dir / test_file))
    only_test.Reload()
    assert set(only_test.Tags()["scalars"]) == {"test/acc", "test/f1", "test/loss"}  # no hp_metric, no epoch
    assert only_test.Tags()["tensors"] == []  # no second HPARAMS record: the run keeps fit's

    # A second test replaces the first: once it has finished, the run holds its metrics only.
    second = run(["test", *SMALL, "--ckpt_path=last"]).trainer.callback_metrics["test/acc"].item()
    (replaced,) = event_files(run_dir, ".test")
    assert replaced != test_file
    assert scalars(run_dir, "test/acc") == [(last_step, pytest.approx(second))]
    assert scalars(run_dir, "test/loss")[0][0] == last_step and len(scalars(run_dir, "test/loss")) == 1

    # validate adds one point to the validation curve: at the checkpoint's step, with fit's value there.
    fitted = scalars(run_dir, "val/acc")
    assert len(fitted) == 2
    run(["validate", *SMALL, "--ckpt_path=best"])
    curve = scalars(run_dir, "val/acc")
    assert len(curve) == 3 and curve[-1][0] == best_step
    assert curve[-1][1] == pytest.approx(dict(fitted)[best_step])
    images = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    images.Reload()
    assert [e.step for e in images.Images("val/confusion_matrix")][-1] == best_step  # its image too

    # predict writes its CSV into the run; the run's config stays that of fit.
    run(["predict", *SMALL, "--ckpt_path=best"])
    assert (run_dir / "predictions.csv").is_file() and (run_dir / "predict_config.yaml").is_file()
    assert (run_dir / "config.yaml").read_bytes() == config and (run_dir / "hparams.yaml").read_bytes() == hparams
    assert sorted(p.name for p in (workdir / "logs" / "digits_mlp").iterdir()) == ["version_0"]

    # A checkpoint from elsewhere: the evaluation gets a folder of its own, as before.
    shutil.copy(best, workdir / "elsewhere.ckpt")
    run(["test", *SMALL, "--ckpt_path=elsewhere.ckpt"])
    own = workdir / "logs" / "digits_mlp" / "version_1"
    assert scalars(own, "test/acc") and not (own / "config.yaml").exists() and (own / "test_config.yaml").is_file()
    assert len(scalars(run_dir, "test/acc")) == 1  # the training run is untouched


def test_a_failed_test_keeps_the_earlier_results(workdir, monkeypatch):
    run(["fit", *SHORT])
    run(["test", *SMALL, "--ckpt_path=best"])
    (earlier,) = event_files(workdir / RUN, ".test")
    before = scalars(workdir / RUN, "test/acc")

    def fails(self, batch, batch_idx):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(Classifier, "test_step", fails)
    with pytest.raises(RuntimeError, match="simulated"):
        run(["test", *SMALL, "--ckpt_path=best"])
    assert earlier in event_files(workdir / RUN, ".test")
    assert scalars(workdir / RUN, "test/acc") == before


@pytest.mark.parametrize(
    ("backbone", "input_shape", "out_features"),
    [("mlp", (1, 28, 28), 256), ("cnn", (3, 12, 12), 64), ("lenet", (3, 12, 12), 256), ("vit", (1, 28, 28), 256)],
)
def test_summary_shows_each_layers_shapes_and_flops(backbone, input_shape, out_features):
    width = {"mlp": 256, "cnn": 32, "lenet": 32, "vit": 256}[backbone]
    model = Classifier(num_classes=10, input_shape=input_shape, backbone=backbone, width=width, depth=2)
    summary = summarize(model)
    rows = dict(zip(summary.layer_names, zip(summary.in_sizes, summary.out_sizes)))
    assert rows["backbone"] == ([1, *input_shape], [1, out_features])
    assert rows["head"] == ([1, out_features], [1, 10])
    flops = summary.flop_counts
    assert flops["head"] and sum(flops["head"].values()) == 2 * out_features * 10  # a multiply and an add each
    if backbone == "mlp":  # 784 -> 256 -> 256: two matrix products
        assert sum(flops["backbone"].values()) == 2 * (784 * 256 + 256 * 256)
    if backbone == "lenet":  # 12x12 -> 6x6 (32 channels) -> 3x3 (64 channels), flattened: 576 -> 8 x 32
        assert [m.out_channels for m in model.backbone if isinstance(m, torch.nn.Conv2d)] == [32, 64]
        assert [(m.in_features, m.out_features) for m in model.backbone if isinstance(m, torch.nn.Linear)] == [
            (64 * 3 * 3, 256)
        ]
    assert summary.total_flops == sum(sum(f.values()) for f in flops.values()) > 0


def test_example_batch_has_the_weights_dtype():
    assert example_batch((3, 8, 8)).shape == (1, 3, 8, 8) and example_batch((4,)).dtype == torch.float32
    assert example_batch((4,), "bf16-true").dtype == torch.bfloat16
    assert example_batch((4,), "bf16-mixed").dtype == torch.float32  # autocast: float32 weights


@pytest.mark.parametrize(
    ("options", "dtype"), [(["--trainer.precision=bf16-true"], torch.bfloat16), (["--model.compile=true"], None)]
)
def test_fit_draws_the_summary_in_the_weights_dtype_and_without_forward_under_compile(workdir, options, dtype):
    # bf16-true: float32 inputs fail in bfloat16 layers (the batches too: they are uint8 until the
    # transfer); compile: the summary's forward pass would trace the network once more.
    cli = run(["fit", *SMALL, "--trainer.enable_model_summary=true", "--trainer.fast_dev_run=true", *options])
    example = cli.model.example_input_array
    if dtype is None:
        assert example is None
    else:
        assert (example.dtype, tuple(example.shape)) == (dtype, (1, 1, 28, 28))


# Every line a default `fit` may print (stdout and stderr): Lightning's lines about the machine and
# the run, the summary table (drawn by Rich when it is installed, else as text), and ours.
KNOWN = [
    r"Seed set to \d+",
    r"GPU available: (True|False).*",
    r"TPU available: (True|False).*",
    r"[┏┃┡│└].*",  # a Rich table
    r"\s*\|.*|-+|\d+\s+\|.*",  # a text table
    r"[\d.]+ [KMGT]?\s+(Trainable params|Non-trainable params|Total params|Total estimated model params size \(MB\)"
    r"|Modules in train mode|Modules in eval mode|Total Flops)",
    r"(Trainable params|Non-trainable params|Total params|Total estimated model params size \(MB\)"
    r"|Modules in train mode|Modules in eval mode|Total FLOPs): [\d.]+ ?[KMGT]?\s*",
    r"Effective batch size \d+ = .*",
    r"Trainable parameters: [\d,]+ of [\d,]+ .*",
    r"`Trainer.fit` stopped: `max_epochs=1` reached\.",
]


@pytest.mark.slow
def test_default_fit_prints_only_known_useful_lines(workdir):
    # As unset: jsonargparse's warnings are not turned off. A terminal 200 columns wide, so that
    # Rich keeps each row of the summary on one line.
    as_a_user = {"JSONARGPARSE_DEPRECATION_WARNINGS": "", "COLUMNS": "200"}
    # The default config (the shipped digits), one epoch, no progress bar to parse.
    result = run_train_py(
        "fit", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", cwd=workdir, env=as_a_user
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    unknown = [line for line in output.splitlines() if line.strip() and not any(re.fullmatch(k, line) for k in KNOWN)]
    assert unknown == [], "\n".join(unknown)
    for noise in ("Tip", "litlogger", "deprecated", "Warning", "estimate number of stepping batches"):
        assert noise not in output
    # The summary: shapes through the network and non-zero FLOPs; no rows for the metrics.
    table = [line for line in output.splitlines() if "backbone" in line or "head" in line]
    assert len(table) == 2, output
    assert "[1, 1, 8, 8]" in table[0] and "[1, 256]" in table[0] and "[1, 10]" in table[1]
    assert "Metric" not in output and "ClassificationScores" not in output and "train_metrics" not in output
    rich, text = r"Total FLOPs: ([\d.]+ ?[KMGT]?)", r"([\d.]+ [KMGT]?)\s+Total Flops"
    (flops,) = re.findall(rich, output) or re.findall(text, output)
    assert flops.strip() == "168 K", output  # 2 x (64 x 256 + 256 x 256 + 256 x 10) = 168,960, shown rounded down
