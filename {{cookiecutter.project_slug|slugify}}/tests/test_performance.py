"""The fast path: cheap per-step bookkeeping that still reports the right numbers, and the
overhead benchmark, which must run and show numerical parity with a hand-written loop."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ROOT, SMALL, write_dataset
from lightning.pytorch.callbacks import TQDMProgressBar
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.data.mnist import MNISTDataModule
from {{ cookiecutter.package_name }}.models import Classifier
from {{ cookiecutter.package_name }}.models.metrics import ClassificationScores


def test_scores_equal_torchmetrics_accuracy_and_macro_f1():
    g = torch.Generator().manual_seed(0)
    scores = ClassificationScores(7, prefix="val/")
    accuracy, f1 = MulticlassAccuracy(7, average="micro"), MulticlassF1Score(7, average="macro")
    for _ in range(4):
        logits = torch.randn(50, 7, generator=g)
        logits[:, 6] -= 10  # class 6 is never predicted
        target = torch.randint(0, 5, (50,), generator=g)  # classes 5 and 6 never occur
        for metric in (scores, accuracy, f1):
            metric.update(logits, target)
    values = scores.compute()
    assert set(values) == {"val/acc", "val/f1"}
    assert values["val/acc"].item() == pytest.approx(accuracy.compute().item(), abs=1e-6)
    assert values["val/f1"].item() == pytest.approx(f1.compute().item(), abs=1e-6)


def test_scores_count_every_sample_and_reset():
    scores = ClassificationScores(3)
    scores.update(torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0]]), torch.tensor([0, 1, 2]))
    assert scores.counts.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert scores.compute()["acc"].item() == pytest.approx(2 / 3)
    scores.reset()
    assert scores.counts.sum().item() == 0


class StepLosses(L.Callback):
    def __init__(self):
        self.losses, self.sizes = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.sizes.append(len(batch[1]))


def test_epoch_loss_is_the_mean_loss_over_the_epochs_samples(workdir):
    """Each step's mean loss weighted by its batch's size, as val/loss and test/loss are: the last,
    smaller batch counts for its samples, not as much as a full one."""
    cli = run(
        [
            "fit", *SMALL, "--trainer.max_epochs=1", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=3",
            "--trainer.callbacks+=test_performance.StepLosses",
        ]
    )  # fmt: skip
    steps = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StepLosses")
    losses, sizes = steps.losses, steps.sizes
    assert sizes == [64] * 7 + [52]  # 500 training images
    logged = cli.trainer.logged_metrics
    mean = sum(loss * n for loss, n in zip(losses, sizes)) / 500
    assert logged["train/loss_epoch"].item() == pytest.approx(mean, rel=1e-5)
    # The step loss reaches the logger only on logging steps: the last one was step 6 of 8.
    assert logged["train/loss_step"].item() == pytest.approx(losses[5], rel=1e-5)


def test_default_progress_bar_redraws_every_20_steps(workdir):
    cli = run(["fit", "--data.val_size=100", "--trainer.fast_dev_run=true"])
    assert isinstance(cli.trainer.progress_bar_callback, TQDMProgressBar)
    assert cli.trainer.progress_bar_callback.refresh_rate == 20
    assert run(["fit", *SMALL, "--trainer.fast_dev_run=true"]).trainer.progress_bar_callback is None


def test_the_optimizer_is_the_fused_adamw_kernel_on_a_cpu(workdir):
    """A third of the MLP's optimizer step on a CPU (benchmarks/overhead.py, 'minimal, fused Adam')."""
    [optimizer] = run(["fit", *SMALL, "--trainer.fast_dev_run=true"]).trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    assert optimizer.defaults["weight_decay"] == 1e-4


@pytest.mark.parametrize(("precision", "fused"), [("16-mixed", None), ("bf16-mixed", True), ("32-true", True)])
def test_no_fused_kernel_where_a_gradient_scaler_steps(precision, fused):
    """Under 16-mixed (a GPU without bfloat16), Lightning raises on gradient clipping with a fused optimizer."""
    model = Classifier()
    model.trainer = SimpleNamespace(precision=precision, estimated_stepping_batches=10)
    assert model.configure_optimizers()["optimizer"].defaults["fused"] is fused


def test_on_device_keeps_the_data_where_the_trainer_runs(workdir):
    cli = run(["fit", *SMALL, "--data.on_device=true", "--trainer.fast_dev_run=true"])
    assert cli.trainer.state.finished
    assert cli.datamodule.splits["train"][0].device == cli.trainer.strategy.root_device


@pytest.mark.parametrize("on_device", [True, False])
def test_on_device_moves_each_split_to_the_trainers_device(workdir, on_device):
    """On a CPU the test above holds either way; a stand-in device ("meta") tells the two apart."""
    data = MNISTDataModule(val_size=100, on_device=on_device)
    data.prepare_data()
    data.setup("fit")
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), world_size=1)
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader(), "test": data.test_dataloader()}
    for split, loader in loaders.items():
        expected = "meta" if on_device else "cpu"
        assert [t.device.type for t in data.splits[split]] == [expected, expected], split
        assert loader.dataset.x.device.type == expected  # batches are cut from the moved tensors


@pytest.mark.slow
def test_overhead_benchmark_runs_and_shows_parity(tmp_path):
    write_dataset(tmp_path / "data" / "mnist", train=1300, test=100)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--dataset=mnist", f"--data-dir={tmp_path / 'data'}",
         "--val-size=300", "--epochs=2", "--repeats=1", "--parity-steps=15", "--startup-rounds=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for variant in (
        "hand-written loop",
        "fit, default config",
        "minimal, bare Trainer",
        "fit, bare Trainer",
        "minimal, fused Adam",
    ):
        assert variant in table
    assert "equal to 5 decimals" in table
    assert re.search(r"default config / minimal \d\.\d{3} \(ours\)", table)
    assert re.search(r"same fused optimizer on both sides: default config / minimal \d\.\d{3}", table)
    assert "start-up: `train.py --help`" in table


def test_worker_processes_deliver_the_same_batches(workdir):
    """num_workers > 0: the batches come from worker processes, and training ends where it does without."""
    short = [*SMALL, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
             "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=null"]  # fmt: skip
    states = {}
    for workers in (0, 2):
        cli = run(["fit", *short, f"--data.num_workers={workers}"])
        loader = cli.trainer.train_dataloader
        assert loader.num_workers == workers and loader.persistent_workers == (workers > 0)
        assert cli.trainer.global_step == 3
        states[workers] = cli.model.state_dict()
    assert all(torch.equal(states[0][k], states[2][k]) for k in states[0])
