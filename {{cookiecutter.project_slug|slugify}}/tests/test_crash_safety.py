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
{%- if cookiecutter.cluster == "yes" %}
from types import SimpleNamespace
{%- endif %}

import pytest
import torch
from conftest import ROOT, SMALL, run_train_py
{%- if cookiecutter.cluster == "yes" %}
from lightning.fabric.plugins.environments import SLURMEnvironment
{%- endif %}
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from {{ cookiecutter.package_name }}.checkpointing import AtomicCheckpointIO{% if cookiecutter.cluster == "yes" %}, LastCheckpoint{% endif %}
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
    assert "weights equal the reference" in result.stdout{%- if cookiecutter.cluster == "yes" %}


SLURM_OPTIONS = ["--config=configs/digits_mlp.yaml", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                 "--trainer.strategy=auto", *SMALL, "--trainer.limit_train_batches=2",
                 "--trainer.limit_val_batches=1"]  # fmt: skip


def fake_slurm(workdir: Path) -> None:
    """bin/srun runs the task here as rank 0 (and notes its pid); bin/scontrol records its arguments
    and, for `requeue`, stops the job with SIGTERM, as SLURM does before starting it again."""
    fake = workdir / "bin"
    fake.mkdir()
    ranks = "SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0"
    (fake / "srun").write_text(f'#!/bin/sh\necho $$ > srun.pid\n{ranks} exec "$@"\n')
    requeue = '[ "$1" = requeue ] && kill -TERM $PPID'  # $PPID: the training process that called it
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> scontrol.log\n{requeue}\nexit 0\n')
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    (workdir / "configs").symlink_to(ROOT / "configs")
    (workdir / "train.py").symlink_to(ROOT / "train.py")


def slurm_job(workdir: Path, job_id: str, *options: str) -> subprocess.Popen:
    """scripts/slurm.sbatch as SLURM would start it for job `job_id`, with the fakes above on PATH."""
    pythonpath = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    slurm = {"SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "test", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
             "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip
    path = os.pathsep.join([str(workdir / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**os.environ, **slurm, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "PYTHONPATH": pythonpath, "PATH": path}
    # A session of its own: a job that does not end is killed whole (bash and train.py) by `finished`.
    return subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm.sbatch"), *SLURM_OPTIONS, *options], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def finished(job: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    assert job.returncode == 0, out[-2000:] + err[-2000:]
    return out, err


def test_under_slurm_sigusr1_runs_lightnings_requeue_at_the_end_of_the_step():
    """SLURM's warning signal is only noted when it comes: Lightning's handler (which closes the
    loggers, saves hpc_ckpt and requeues) then runs between two steps, never inside a log write."""
    lightning_handler = []  # stands in for Lightning's SLURM SIGUSR1 handler
    before = signal.signal(signal.SIGUSR1, lambda number, frame: lightning_handler.append(number))
    callback = LastCheckpoint()
    trainer = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=SLURMEnvironment(auto_requeue=True)))
    try:
        callback.on_train_start(trainer, None)
        signal.raise_signal(signal.SIGUSR1)
        assert lightning_handler == [] and callback.stopped_by is None
        callback.requeue_if_asked()  # what on_train_batch_end does first
        callback.requeue_if_asked()
        assert lightning_handler == [signal.SIGUSR1]
    finally:
        callback.teardown(trainer, None, "fit")
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.slow
def test_a_requeued_slurm_job_continues_in_its_own_folder(workdir):
    """scripts/slurm.sbatch run twice with the same job id (a requeue): the second run resumes
    last.ckpt of logs/<name>/slurm-<id>/ and logs there; another job id starts from scratch."""
    fake_slurm(workdir)
    for job_id, epochs, steps in (("7", 1, 2), ("7", 2, 4), ("8", 1, 2)):
        finished(slurm_job(workdir, job_id, f"--trainer.max_epochs={epochs}"))
        last = workdir / RUNS / f"slurm-{job_id}" / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == steps, (job_id, epochs)
    assert sorted(p.name for p in (workdir / RUNS).iterdir()) == ["slurm-7", "slurm-8"]


@pytest.mark.slow
def test_slurm_preemption_saves_requeues_and_the_requeued_job_resumes(workdir):
    """SLURM's warning signal (SIGUSR1, --signal in the script): Lightning saves hpc_ckpt_1.ckpt and
    calls `scontrol requeue <job id>`; SLURM's SIGTERM then makes the run save last.ckpt and exit 0;
    the requeued job (same id) resumes from that last.ckpt."""
    fake_slurm(workdir)
    job = slurm_job(workdir, "9", "--trainer.max_epochs=100000")
    last = workdir / RUNS / "slurm-9" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first epoch is done: training is under way
    if job.poll() is not None or not last.exists():
        finished(job, timeout=1)
        pytest.fail("the job ended or did not train an epoch")
    os.kill(int((workdir / "srun.pid").read_text()), signal.SIGUSR1)
    out, err = finished(job, timeout=120)
    assert (workdir / "scontrol.log").read_text().splitlines() == ["requeue 9"]
    (hpc,) = workdir.glob("hpc_ckpt_*.ckpt")
    saved = torch.load(last, weights_only=True)
    assert 2 <= torch.load(hpc, weights_only=True)["global_step"] <= saved["global_step"]
    assert saved["global_step"] < 2 * 100000 and "Received SIGTERM: saved" in out, out[-2000:]

    epochs = saved["epoch"] + 2
    out, err = finished(slurm_job(workdir, "9", f"--trainer.max_epochs={epochs}"))
    resumed_from = f"Restoring states from the checkpoint path at {last.relative_to(workdir)}"
    assert resumed_from in out + err, (out + err)[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 2 * epochs
    assert sorted(p.name for p in (workdir / RUNS).iterdir()) == ["slurm-9"]{%- endif %}
