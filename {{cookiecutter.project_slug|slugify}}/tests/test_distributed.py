"""Several processes, as `python train.py` starts them
(torchrun and SLURM: tests/test_cluster.py, with the cluster part).

Lightning's DDP launcher starts the other processes by running the same command line
again, so these tests run train.py in subprocesses (from inside pytest it would re-run
pytest). The `probe.Probe` callback leaves a record per process of what it saw.
`-m slow` runs them on a CPU (gloo); `-m gpu` runs the ones that need an NVIDIA GPU.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, run_train_py
from torch._dynamo.utils import counters

from {{ cookiecutter.package_name }}.cli import run
from {{ cookiecutter.package_name }}.models import Classifier

PRESETS = ROOT / "configs" / "trainer"
CPU = ["--trainer.accelerator=cpu", *SMALL, "--trainer.callbacks+=probe.Probe"]
TRAIN_SAMPLES, VAL_SAMPLES = 500, 100  # conftest's 600 training images, 100 of them held out
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
pytestmark = pytest.mark.usefixtures("probe_importable")


def train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = run_train_py(*args, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def probes(where: Path, stage: str = "fit") -> list[dict]:
    """The probe's records of every process, in rank order."""
    found = sorted(where.glob(f"probe/{stage}-rank*.json"))
    return sorted((json.loads(p.read_text()) for p in found), key=lambda r: r["rank"])


def summary(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("Effective batch size")]


def files_under(where: Path) -> list[str]:
    return sorted(p.relative_to(where).as_posix() for p in where.rglob("*") if p.is_file())


def check_shards_and_reduced_metrics(ranks: list[dict]) -> None:
    """Each process trained on its own half of the data; the epoch metrics cover both halves."""
    first, second = (set(r["trained"]) for r in ranks)
    assert len(first) == len(second) == TRAIN_SAMPLES // 2
    assert not first & second and len(first | second) == TRAIN_SAMPLES
    # Each process validated its own half; val/acc is the accuracy over both, the same on both.
    assert [r["val_seen"] for r in ranks] == [VAL_SAMPLES // 2] * 2
    hits = sum(r["val_hits"] for r in ranks)
    for r in ranks:
        assert r["metrics"]["val/acc"] == pytest.approx(hits / VAL_SAMPLES, abs=1e-6)
        for name in ("val/loss", "val/f1", "train/acc"):
            assert r["metrics"][name] == pytest.approx(ranks[0]["metrics"][name], abs=1e-6), name


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_fit_resume_and_test_on_one(workdir):
    run = workdir / "logs" / "digits_mlp"
    # `--trainer.devices=2` is the only change: Lightning picks DDP and starts a second process.
    fitted = train("fit", "--trainer.devices=2", "--trainer.max_epochs=1", *CPU, cwd=workdir)
    assert summary(fitted.stdout) == [
        "Effective batch size 128 = 64 per device x 1 accumulation x 2 devices x 1 node; precision 32-true; "
        "strategy ddp"
    ]
    ranks = probes(workdir)
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert all(r["modules"].get("DistributedDataParallel") == 1 for r in ranks)
    check_shards_and_reduced_metrics(ranks)
    steps = ranks[0]["global_step"]
    assert steps == -(-TRAIN_SAMPLES // 2 // 64)  # an epoch is half as many steps on two processes

    # Written once, by rank 0: one run folder, one event file, one config.yaml, the two checkpoints.
    files = files_under(run)
    assert [f for f in files if "tfevents" in f] == [f for f in files if f.startswith("version_0/events.out")]
    assert len([f for f in files if "tfevents" in f]) == 1
    assert {f for f in files if "tfevents" not in f} == {
        "version_0/config.yaml", "version_0/hparams.yaml",
        "version_0/checkpoints/best.ckpt", "version_0/checkpoints/last.ckpt",
    }  # fmt: skip

    # Resume with two processes: training continues from the checkpoint, in the same folder.
    resumed = train("fit", "--trainer.devices=2", "--trainer.max_epochs=2", "--ckpt_path=last", *CPU, cwd=workdir)
    assert resumed.stdout.count("Using checkpoint") == 1  # printed by rank 0 only
    ranks = probes(workdir)
    assert [r["optimizer_steps"] for r in ranks] == [steps, steps]  # only the second epoch was trained
    assert [r["global_step"] for r in ranks] == [2 * steps, 2 * steps]
    last = torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 2 * steps)
    assert sorted(p.name for p in run.iterdir()) == ["version_0"]
    assert len(list((run / "version_0").glob("events.out.tfevents.*"))) == 2  # one per run, none per rank

    # The DDP checkpoint is a plain one: test it on one process, over the whole test set.
    tested = train("test", "--trainer.devices=1", "--ckpt_path=last", *CPU, cwd=workdir)
    (record,) = probes(workdir, "test")
    assert record["world_size"] == 1 and record["metrics"]["test/acc"] >= 0.5  # chance is 0.1
    assert "test/acc" in tested.stdout


@pytest.mark.slow
def test_ddp_preset_on_two_cpu_processes(workdir):
    config = ROOT / "configs" / "mnist_cnn.yaml"
    result = train(
        "fit", f"--config={config}", f"--config={PRESETS / 'ddp.yaml'}", "--trainer.devices=2",
        "--trainer.fast_dev_run=true", *CPU, cwd=workdir,
    )  # fmt: skip
    assert summary(result.stdout) == [
        "Effective batch size 256 = 128 per device x 1 accumulation x 2 devices x 1 node; precision 32-true; "
        "strategy ddp"
    ]
    ranks = probes(workdir)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["optimizer_steps"] for r in ranks] == [1, 1]
    first, second = (set(r["trained"]) for r in ranks)
    assert len(first) == len(second) == 128 and not first & second


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_compile_trains_and_matches_the_plain_network(workdir, capsys):
    counters.clear()
    cli = run(["fit", *SMALL, "--model.compile=true", "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert summary(capsys.readouterr().out) == [
        "Effective batch size 64 = 64 per device x 1 accumulation x 1 device x 1 node; precision 32-true; "
        "strategy single_device; backbone compiled (torch.compile)"
    ]
    assert counters["stats"]["unique_graphs"] >= 1  # the training step ran the compiled backbone
    model = cli.model.eval()
    assert isinstance(model.compiled, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), model.head(model.backbone(model.normalize(x))), atol=1e-5)


# --- on an NVIDIA GPU (pytest -m gpu) ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FSDP needs an NVIDIA GPU: Lightning's FSDPStrategy refuses accelerator=cpu (run pytest -m gpu on a GPU)",
)
def test_fsdp_preset_shards_and_checkpoints_each_vit_block(workdir):
    depth = 3
    result = train(
        "fit", f"--config={ROOT / 'configs' / 'mnist_vit.yaml'}", f"--config={PRESETS / 'gpu.yaml'}",
        f"--config={PRESETS / 'fsdp.yaml'}", "--trainer.devices=1", f"--model.depth={depth}", "--model.width=64",
        "--trainer.max_epochs=1", *SMALL, "--trainer.callbacks+=probe.Probe", cwd=workdir,
    )  # fmt: skip
    assert summary(result.stdout) == [
        "Effective batch size 128 = 128 per device x 1 accumulation x 1 device x 1 node; precision bf16-mixed; "
        "strategy fsdp"
    ]
    (record,) = probes(workdir)
    assert record["modules"]["FullyShardedDataParallel"] == depth + 1  # one unit per block, one for the rest
    assert record["modules"]["CheckpointWrapper"] == depth
    # The checkpoint is whole: it loads into a plain model with the same keys.
    ckpt = torch.load(workdir / "logs" / "mnist_vit" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    plain = Classifier(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    plain.load_state_dict(ckpt["state_dict"])
    train("test", f"--config={ROOT / 'configs' / 'mnist_vit.yaml'}", "--ckpt_path=last", "--trainer.devices=1", *SMALL,
          cwd=workdir)  # fmt: skip


@pytest.mark.gpu
@needs_gpu
def test_gpu_preset_ddp_with_sync_batchnorm(workdir):
    result = train(
        "fit", f"--config={ROOT / 'configs' / 'mnist_cnn.yaml'}", f"--config={PRESETS / 'gpu.yaml'}",
        f"--config={PRESETS / 'ddp.yaml'}", "--trainer.devices=1", "--trainer.sync_batchnorm=true",
        "--trainer.fast_dev_run=true", *SMALL, "--trainer.callbacks+=probe.Probe", cwd=workdir,
    )  # fmt: skip
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert summary(result.stdout) == [
        f"Effective batch size 128 = 128 per device x 1 accumulation x 1 device x 1 node; precision {precision}; "
        "strategy ddp"
    ]
    (record,) = probes(workdir)
    assert record["modules"]["SyncBatchNorm"] == 4 and "BatchNorm2d" not in record["modules"]


@pytest.mark.gpu
@needs_gpu
def test_compile_on_the_gpu(workdir):
    result = train(
        "fit", f"--config={ROOT / 'configs' / 'mnist_vit.yaml'}", f"--config={PRESETS / 'gpu.yaml'}",
        "--trainer.devices=1", "--model.compile=true", "--trainer.max_epochs=1", *SMALL,
        "--trainer.callbacks+=probe.Probe", cwd=workdir,
    )  # fmt: skip
    assert summary(result.stdout)[0].endswith("; backbone compiled (torch.compile)")
    # The line comes from the hyperparameter; the probe shows the steps really ran the compiled backbone.
    (record,) = probes(workdir)
    assert record["backbone_calls"]["compiled"] > 0 and record["backbone_calls"]["plain"] == 0, record
