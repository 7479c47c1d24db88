"""The cluster part: several machines started by torchrun, and SLURM (scripts/slurm.sbatch, its
requeue and preemption), all on this one machine. srun and scontrol are small fakes that do what
SLURM would; the `probe.Probe` callback (tests/probe.py) records what each process saw.
`-m slow` runs the ones that train.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SMALL, write_dataset
from lightning.fabric.plugins.environments import SLURMEnvironment
from test_crash_safety import RUNS
from test_distributed import CPU, PRESETS, check_shards_and_reduced_metrics, files_under, probes, summary

from {{ cookiecutter.package_name }}.checkpointing import LastCheckpoint

pytestmark = pytest.mark.usefixtures("probe_importable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_torchrun(tmp_path):
    """Two 'machines' of one process each, on this one: two torchrun launches, separate folders."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        write_dataset(node / "data" / "mnist")  # every machine has its own copy of the data
    port = free_port()
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ["PYTHONPATH"]])}  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
    train_py = [str(ROOT / "train.py"), "fit", f"--config={PRESETS / 'multinode.yaml'}", "--trainer.max_epochs=1", *CPU]
    launches = [
        subprocess.Popen(
            [*torchrun, f"--node_rank={rank}", *train_py],
            cwd=node,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, node in enumerate(nodes)
    ]
    outputs = []
    try:
        for launch in launches:
            outputs.append(launch.communicate(timeout=120))
    finally:
        for launch in launches:
            launch.kill()
    for launch, (out, err) in zip(launches, outputs):
        assert launch.returncode == 0, out[-3000:] + err[-3000:]
    assert summary(outputs[0][0]) == [
        "Effective batch size 128 = 64 per device x 1 accumulation x 1 device x 2 nodes; precision 32-true; "
        "strategy ddp"
    ]
    assert summary(outputs[1][0]) == []

    ranks = [*probes(nodes[0]), *probes(nodes[1])]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert {r["cluster_environment"] for r in ranks} == {"TorchElasticEnvironment"}
    check_shards_and_reduced_metrics(ranks)
    # Node 0 wrote the logs and checkpoints; node 1 wrote nothing but its probe record.
    assert {"logs/digits_mlp/version_0/checkpoints/last.ckpt", "logs/digits_mlp/version_0/config.yaml"} <= set(
        files_under(nodes[0])
    )
    assert [f for f in files_under(nodes[1]) if not f.startswith("data/")] == ["probe/fit-rank1.json"]


@pytest.mark.slow
def test_slurm_script_starts_train_py_under_srun(workdir):
    """scripts/slurm.sbatch as SLURM would run it, on one 'node' with one task: srun is faked,
    SLURM's variables are set, and Lightning must recognise the SLURM cluster."""
    fake = workdir / "bin"
    fake.mkdir()
    # srun starts the command once per task, with the task's ids in its environment.
    (fake / "srun").write_text('#!/bin/sh\nSLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 exec "$@"\n')
    (fake / "srun").chmod(0o755)
    (workdir / "configs").symlink_to(ROOT / "configs")  # the script is run from the project folder
    (workdir / "train.py").symlink_to(ROOT / "train.py")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
             "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip
    env = {**os.environ, **slurm, "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "PATH": os.pathsep.join([str(fake), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ["PYTHONPATH"]])}  # fmt: skip
    options = ["--config=configs/mnist_cnn.yaml", "--trainer.precision=32-true", "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *CPU]  # fmt: skip
    script = ROOT / "scripts" / "slurm.sbatch"
    result = subprocess.run(
        ["bash", str(script), *options], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (record,) = probes(workdir)
    assert record["cluster_environment"] == "SLURMEnvironment"
    assert record["optimizer_steps"] == 2
    # The run logs into a folder named after the job, which a requeued job (same id) continues.
    assert (workdir / "logs" / "mnist_cnn" / "slurm-4242" / "checkpoints" / "last.ckpt").is_file()


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
    assert sorted(p.name for p in (workdir / RUNS).iterdir()) == ["slurm-9"]
