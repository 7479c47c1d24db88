"""The GPT part, slow tier: `kill -9` during `fit`, then `--ckpt_path=last`, ends with the weights
of an uninterrupted run (corpus in memory, and streamed with litdata); a real corpus trains; DDP on
two CPU processes.

The real corpus is Debian's `fortunes` (about 14,000 English quotations), unpacked without root:
    apt-get download fortunes && dpkg -x fortunes_*.deb ~/debian && export DEBIAN_FILES=~/debian
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_distributed import files_under, probes, train
from test_gpt import CONFIG, TINY, plain_gpt, write_text

from {{ cookiecutter.package_name }}.cli import main

pytestmark = pytest.mark.slow
FORTUNES = Path(os.environ.get("DEBIAN_FILES", "/")) / "usr" / "share" / "games" / "fortunes"


def fortunes(where: Path) -> Path:
    """The fortunes, one text file: the plain files of the package's folder (not the .dat indexes)."""
    files = sorted(p for p in FORTUNES.glob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not files:
        pytest.fail(
            f"no fortunes under {FORTUNES}: apt-get download fortunes && dpkg -x fortunes_*.deb DIR, "
            "then set DEBIAN_FILES=DIR"
        )
    path = where / "fortunes.txt"
    path.write_text("".join(p.read_text(encoding="utf-8") for p in files), encoding="utf-8")
    return path


def resume_config(where: Path) -> Path:
    """The config's checkpoints, last.ckpt every 5 steps: a kill loses at most 5 steps."""
    path = where / "every5.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/loss, mode: min, save_top_k: 1, filename: best}\n"
        "    - class_path: {{ cookiecutter.package_name }}.checkpointing.LastCheckpoint\n"
        "      init_args: {filename: last, every_n_train_steps: 5}\n"
    )
    return path


def step_of(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):  # not there yet
        return -1


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streamed"])
def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, streaming):
    monkeypatch.chdir(tmp_path)
    corpus = write_text(tmp_path / "zh.txt", lines=600)
    args = ["fit", f"--config={CONFIG}", f"--config={resume_config(tmp_path)}", *TINY, f"--data.path={corpus}",
            f"--data.streaming={str(streaming).lower()}", "--model.dropout=0.1", "--trainer.max_steps=60",
            "--trainer.val_check_interval=30", "--trainer.deterministic=true"]  # fmt: skip
    main([*args, "--trainer.logger.init_args.version=reference"])
    runs = tmp_path / "logs" / "gpt_char"
    reference = torch.load(runs / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    assert reference["global_step"] == 60

    last = runs / "killed" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args,
                                "--trainer.logger.init_args.version=killed"], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while step_of(last) < 10 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = step_of(last)
    assert 10 <= killed_at < 60, f"the run was not killed mid-way (step {killed_at}): {process.stderr.read()[-500:]}"

    main([*args, "--trainer.logger.init_args.version=killed", "--ckpt_path=last"])
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 60
    for name, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


@pytest.mark.debian  # the fortunes come from Debian's package (deselect with -m 'not debian')
def test_a_real_corpus_trains_well_below_uniform_guessing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = fortunes(tmp_path)
    # The config's network, 100 steps (the recipe has 2,000), validated at the end on 20 batches.
    main(["fit", f"--config={CONFIG}", f"--data.path={corpus}", "--trainer.max_steps=100",
          "--trainer.val_check_interval=100", "--trainer.enable_progress_bar=false"])  # fmt: skip
    run = tmp_path / "logs" / "gpt_char" / "version_0"
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    vocab = best["hyper_parameters"]["vocab_size"]
    loss = best["callbacks"][next(k for k in best["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]
    assert 60 < vocab < 200 and float(loss) < 0.7 * math.log(vocab), (vocab, float(loss))


@pytest.mark.usefixtures("probe_importable")
@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streamed"])
def test_gpt_ddp_on_two_cpu_processes(workdir, streaming):
    """The GPT as the classifier above: `--trainer.devices=2`, each process on its own windows of the
    text (in memory: Lightning's distributed sampler; streamed: litdata's own sharding)."""
    corpus, steps = write_text(workdir / "zh.txt"), 6
    train("fit", f"--config={CONFIG}", *TINY, f"--data.path={corpus}", f"--data.streaming={str(streaming).lower()}",
          "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.max_steps={steps}",
          f"--trainer.val_check_interval={steps}", "--trainer.callbacks+=probe.Probe", cwd=workdir)  # fmt: skip
    ranks = probes(workdir)
    assert [(r["rank"], r["world_size"], r["global_step"]) for r in ranks] == [(0, 2, steps), (1, 2, steps)]
    assert all(r["modules"].get("DistributedDataParallel") == 1 for r in ranks)
    first, second = (set(r["trained"]) for r in ranks)
    assert len(first) == len(second) == steps * 4 and not first & second  # TINY's batch of 4 windows per step
    # val/loss is the mean over both processes' batches: the same, finite number on both.
    losses = [r["metrics"]["val/loss"] for r in ranks]
    assert math.isfinite(losses[0]) and losses[1] == pytest.approx(losses[0], abs=1e-6)
    run = workdir / "logs" / "gpt_char"
    files = files_under(run)
    assert len([f for f in files if "tfevents" in f]) == 1  # written once, by rank 0
    assert {f for f in files if "tfevents" not in f} == {
        "version_0/config.yaml", "version_0/hparams.yaml",
        "version_0/checkpoints/best.ckpt", "version_0/checkpoints/last.ckpt",
    }  # fmt: skip
    assert torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    plain_gpt(run / "version_0" / "checkpoints" / "last.ckpt")
