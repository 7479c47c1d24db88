"""The learning-rate and batch-size finders (configs/tune/*.yaml), stacked on a run config, on the CPU."""

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, SMALL
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.models import Classifier
from {{ cookiecutter.package_name }}.tuning import BatchFinder

TUNE = ROOT / "configs" / "tune"
# A small MLP on the synthetic data; --model.scheduler=constant keeps the learning rate it starts with.
RUN = ["--config", str(ROOT / "configs" / "mnist_cnn.yaml"), *SMALL, "--model.backbone=mlp", "--model.width=32",
       "--trainer.max_epochs=1", "--model.scheduler=constant"]  # fmt: skip


def checkpoints(cli) -> set[str]:
    return {p.name for p in Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt")}


def test_lr_finder_trains_with_its_suggestion_and_logs_the_curve(workdir, capsys):
    # --trainer.callbacks.init_args.X sets an option of the last callback: the finder, appended by lr_find.yaml.
    steps = "--trainer.callbacks.init_args.num_training_steps=30"
    cli = run(["fit", *RUN, "--data.batch_size=16", "--config", str(TUNE / "lr_find.yaml"), steps])
    out = capsys.readouterr().out
    found = re.search(r"Learning-rate finder: suggested lr (\S+) \(was 2\.0e-03\); training continues with it", out)
    assert found, out
    lr = cli.model.hparams.lr
    assert f"{lr:.1e}" == found.group(1) and lr != 2e-3
    # The run trained with it: the optimizer's (constant) learning rate and the one LearningRateMonitor logged.
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr)
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    assert events.Scalars("lr-AdamW")[-1].value == pytest.approx(lr, rel=1e-6)
    # The range test's curve and the suggestion are in the run's TensorBoard logs.
    [suggested] = events.Scalars("lr_find/suggested_lr")
    assert suggested.value == pytest.approx(lr, rel=1e-6)
    lrs = [e.value for e in events.Scalars("lr_find/lr")]
    losses = events.Scalars("lr_find/loss")
    assert 12 <= len(lrs) == len(losses) <= 30 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-6, rel=0.01)
    assert "lr_find/text_summary" in events.Tags()["tensors"]
    # ... and then an ordinary run: the run config's checkpoints and a full epoch.
    assert cli.trainer.current_epoch == 1 and cli.trainer.global_step == 32  # 500 training images / 16
    assert {"best.ckpt", "last.ckpt"} <= checkpoints(cli)


def test_batch_size_finder_trains_with_the_largest_batch(workdir, capsys):
    quick = ["--trainer.callbacks.init_args.init_val=128", "--trainer.callbacks.init_args.steps_per_trial=1"]
    cli = run(["fit", *RUN, "--trainer.accumulate_grad_batches=2", "--config", str(TUNE / "batch_size.yaml"), *quick])
    out = capsys.readouterr().out
    found = re.search(r"Batch-size finder: largest batch that fits: (\d+); Effective batch size (\d+) = (\d+) per "
                      r"device x 2 accumulation x 1 device x 1 node", out)  # fmt: skip
    assert found, out
    size = int(found.group(1))
    # On a CPU nothing runs out of memory: the doubling stops at the training set (500 images), less the margin.
    assert size == int(512 * 0.95) and int(found.group(2)) == 2 * size and int(found.group(3)) == size
    assert cli.datamodule.batch_size == size and cli.trainer.train_dataloader.batch_size == size
    assert f"Effective batch size {2 * size} = {size} per device x 2 accumulation" in out
    assert cli.trainer.current_epoch == 1 and cli.trainer.global_step == 1  # 2 batches of 486 and 14, accumulated
    assert {"best.ckpt", "last.ckpt"} <= checkpoints(cli)


def test_batch_size_finder_backs_off_from_out_of_memory(workdir, capsys, monkeypatch):
    """A GPU's out-of-memory error, injected above 100 samples per batch: the finder stops doubling
    there, and binsearch narrows down to the largest size that ran (less the margin)."""
    step = Classifier.training_step

    def limited(self, batch, batch_idx):
        if len(batch[0]) > 100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "training_step", limited)
    quick = ["--trainer.callbacks.init_args.init_val=16", "--trainer.callbacks.init_args.steps_per_trial=1"]
    # The first trial runs with the loader the run built already: give it init_val's size too.
    cli = run(["fit", *RUN, "--data.batch_size=16", "--config", str(TUNE / "batch_size.yaml"), *quick])
    found = re.search(r"Batch-size finder: largest batch that fits: (\d+);", capsys.readouterr().out)
    assert found and int(found.group(1)) == int(100 * 0.95)  # 16, 32, 64 fit, 128 not; binsearch finds 100
    assert cli.datamodule.batch_size == int(100 * 0.95) and cli.trainer.current_epoch == 1


def test_batch_size_finder_is_skipped_on_resume(workdir, capsys):
    quick = ["--trainer.callbacks.init_args.init_val=128", "--trainer.callbacks.init_args.steps_per_trial=1"]
    finder = ["--config", str(TUNE / "batch_size.yaml"), *quick]
    run(["fit", *RUN, *finder, "--trainer.limit_train_batches=1"])
    capsys.readouterr()
    cli = run(["fit", *RUN, "--data.batch_size=32", *finder, "--trainer.max_epochs=2", "--ckpt_path=last"])
    out = capsys.readouterr().out
    assert "Batch-size finder: skipped, the run resumes from a checkpoint" in out
    assert "largest batch that fits" not in out
    assert cli.datamodule.batch_size == 32 and cli.trainer.train_dataloader.batch_size == 32


def test_batch_size_finder_refuses_more_than_one_device():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    with pytest.raises(UserError, match="runs on one device only.*--trainer.devices=1"):
        BatchFinder().setup(trainer, Classifier())
