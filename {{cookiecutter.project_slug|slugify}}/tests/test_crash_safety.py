"""Crash safety: checkpoints are never half-written, a run killed at any moment resumes exactly,
SIGTERM/SIGUSR1 save and exit cleanly, and a resumed run logs into the folder it started in.

`-m slow` also kills processes while they save, and runs scripts/kill_resume.py (10 SIGKILLs).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, run_train_py
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{ cookiecutter.package_name }}.checkpointing import AtomicCheckpointIO
from {{ cookiecutter.package_name }}.cli import run

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

RUNS = Path("logs") / "digits_mlp"
LAST = RUNS / "version_0" / "checkpoints" / "last.ckpt"


def every_n_steps_config(where: Path, steps: int) -> str:
    """A config whose only callback is last.ckpt, also saved every `steps` optimizer steps."""
    path = where / f"every{steps}.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: {{ cookiecutter.package_name }}.checkpointing.LastCheckpoint\n"
        f"      init_args:\n        every_n_train_steps: {steps}\n"
    )
    return f"--config={path}"


# --- atomic writes -------------------------------------------------------------------------


def test_a_failing_save_keeps_the_previous_checkpoint_and_no_stray_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # the disk filled up half-way
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_cli_saves_through_the_atomic_writer_every_n_steps_and_at_epoch_end(workdir, monkeypatch):
    saved = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append((Path(path).name, checkpoint["global_step"]))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    cli = run(["fit", *SMALL, every_n_steps_config(workdir, 2), "--trainer.max_epochs=2",
               "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1"])  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # Every 2 steps, plus each epoch's end (5 and 10); step 10 is saved once.
    assert saved == [("last.ckpt", s) for s in (2, 4, 5, 6, 8, 10)]
    assert sorted(p.name for p in (workdir / LAST).parent.iterdir()) == ["last.ckpt"]


# --- exact resume --------------------------------------------------------------------------


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Crashes the run when step `step` would start (after last.ckpt of `step` was saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_resume_mid_epoch_gives_the_same_weights_as_an_uninterrupted_run(workdir):
    args = ["fit", *SMALL, every_n_steps_config(workdir, 3), "--trainer.max_epochs=2", "--model.dropout=0.3",
            "--trainer.limit_val_batches=2", "--trainer.deterministic=true"]  # fmt: skip
    run([*args, "--trainer.logger.init_args.version=reference"])
    reference = weights(workdir / RUNS / "reference" / "checkpoints" / "last.ckpt")

    with pytest.raises(Crash):  # 8 steps per epoch: step 11 is in the middle of the second
        run([*args, "--trainer.logger.init_args.version=crashed"], callbacks=[CrashAt(12)])
    last = workdir / RUNS / "crashed" / "checkpoints" / "last.ckpt"
    crashed = torch.load(last, weights_only=True)
    assert crashed["global_step"] == 12
    # Saved with it: the position in the epoch's shuffled order, and the random generators.
    assert crashed["MNISTDataModule"] == {"shuffle_seed": 42, "epoch": 1, "samples": 4 * 64}
    assert "rng_states" in next(iter(crashed["callbacks"].values()))
    resumed = run([*args, "--trainer.logger.init_args.version=crashed", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 16
    final = weights(last)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert not all(torch.equal(crashed["state_dict"][k], reference[k]) for k in reference)


# --- log folders ---------------------------------------------------------------------------


def test_resuming_never_starts_a_new_version_unless_asked(workdir):
    short = ["fit", *SMALL, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    run([*short, "--trainer.max_epochs=1"])
    run([*short, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert sorted(p.name for p in (workdir / RUNS).iterdir()) == ["version_0"]
    assert torch.load(workdir / LAST, weights_only=True)["global_step"] == 4

    # Asked: continue from that checkpoint, but log into a new run folder.
    cli = run([*short, "--trainer.max_epochs=3", f"--ckpt_path={workdir / LAST}",
               "--trainer.logger.init_args.version=branch"])  # fmt: skip
    assert cli.trainer.global_step == 6
    assert sorted(p.name for p in (workdir / RUNS).iterdir()) == ["branch", "version_0"]
    assert torch.load(workdir / RUNS / "branch" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    # A named run resumes only its own checkpoint; a new name starts from scratch.
    cli = run([*short, "--trainer.max_epochs=1", "--ckpt_path=last", "--trainer.logger.init_args.version=fresh"])
    assert cli.trainer.ckpt_path is None and cli.trainer.global_step == 2


# --- signals -------------------------------------------------------------------------------


SLOW_STEPS = '''
import time
from lightning.pytorch.callbacks import Callback

class Slow(Callback):
    """Makes each step take 50 ms, so that a signal arrives in the middle of training."""
    def on_train_batch_end(self, *args):
        time.sleep(0.05)
'''


def start_fit(workdir: Path, *args: str) -> subprocess.Popen:
    (workdir / "slow.py").write_text(SLOW_STEPS)
    pythonpath = os.pathsep.join([str(ROOT / "src"), str(workdir), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def logged_steps(folder: Path) -> list[int]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [s.step for s in events.Scalars("train/loss_step")]


@pytest.mark.parametrize("name", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_stop_signal_saves_exits_cleanly_and_the_run_continues_in_the_same_folder(workdir, name):
    args = [*SMALL, every_n_steps_config(workdir, 1), "--trainer.max_epochs=3", "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1", "--trainer.callbacks+=slow.Slow"]  # fmt: skip
    process = start_fit(workdir, *args)
    deadline = time.monotonic() + 120
    while not (workdir / LAST).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(getattr(signal, name))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Traceback" not in err, err
    step = torch.load(workdir / LAST, weights_only=True)["global_step"]
    assert 1 <= step < 24  # stopped early: 8 steps per epoch, 3 epochs
    message = [line for line in out.splitlines() if line.startswith(f"Received {name}")]
    assert message == [f"Received {name}: saved {Path('logs/digits_mlp/version_0/checkpoints/last.ckpt').resolve()}; "
                       f"resume with: python train.py fit {' '.join(args)} --ckpt_path=last"], out  # fmt: skip

    resumed = run_train_py("fit", *args[:-1], "--ckpt_path=last", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(workdir / LAST, weights_only=True)["global_step"] == 24
    assert sorted(p.name for p in (workdir / RUNS).iterdir()) == ["version_0"]
    # TensorBoard: two event files in one run folder, together every step once.
    folder = workdir / RUNS / "version_0"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    assert sorted(logged_steps(folder)) == list(range(24))


# --- slow: real kills ----------------------------------------------------------------------

SAVER = """
import sys, torch
from {{ cookiecutter.package_name }}.checkpointing import AtomicCheckpointIO
io, n = AtomicCheckpointIO(), 0
while True:  # big enough that a kill lands in the middle of a write
    n += 1
    io.save_checkpoint({"global_step": n, "w": torch.full((4_000_000,), float(n))}, sys.argv[1])
    print(n, flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for delay in (0.05, 0.13, 0.21, 0.29, 0.37):
        process = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env, stdout=subprocess.PIPE,
                                   text=True)  # fmt: skip
        process.stdout.readline()  # one save done
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        state = torch.load(path, weights_only=True)
        assert torch.equal(state["w"], torch.full((4_000_000,), float(state["global_step"])))
        # Only last.ckpt, or a temporary file of the killed process that is never taken for a checkpoint.
        assert {p.name for p in tmp_path.iterdir()} <= {"last.ckpt", f"last.ckpt.tmp-{process.pid}"}
        for p in tmp_path.glob("*.tmp-*"):
            p.unlink()


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_then_resume_give_the_reference_weights(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kill_resume.py"), "--kills=10", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "10 kills, 0 failures" in result.stdout
    assert "weights equal the reference" in result.stdout
