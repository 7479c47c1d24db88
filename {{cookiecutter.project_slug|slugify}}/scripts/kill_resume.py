"""Kill training with SIGKILL at random moments, resume it, and check nothing was lost.

    python scripts/kill_resume.py                     # 10 kills, in a temporary folder
    python scripts/kill_resume.py --kills 30 --seed 7 --epochs 3

First an uninterrupted reference run (CPU, deterministic, a small MLP with dropout on small
synthetic data augmented with shifts and random erasing, last.ckpt every few steps). Then each
trial starts the same run, kills it with SIGKILL after a random delay (anywhere from start-up to
the end of training, so also during checkpoint saves), checks that last.ckpt still loads with
torch.load(weights_only=True), and restarts it with --ckpt_path=last, until a run is not killed
before its end; further trials follow until `--kills` kills are done, and the last run goes to
the end. Each trial's final weights must equal the reference's exactly (torch.equal, every
tensor), and everything must have been logged into one TensorBoard run folder. Prints a table;
exits 1 on any failure.
"""

import argparse
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from {{ cookiecutter.package_name }}.data.idx import write_idx  # noqa: E402
from {{ cookiecutter.package_name }}.data.mnist import FILES  # noqa: E402

CONFIG = """\
trainer:
  callbacks:
    - class_path: {{ cookiecutter.package_name }}.checkpointing.LastCheckpoint
      init_args:
        every_n_train_steps: {every}
"""


def write_data(folder: Path, train: int, test: int = 100) -> None:
    """Random 28x28 images with labels 0..9: enough for the weights to move."""
    g = torch.Generator().manual_seed(0)
    for stem, n in zip(FILES, (train, train, test, test)):
        if "images" in stem:
            values = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        else:
            values = (torch.arange(n) % 10).to(torch.uint8)
        write_idx(folder / f"{stem}.gz", values)


def fit_command(folder: Path, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "fit", f"--config={folder / 'every.yaml'}",
        f"--data.data_dir={folder / 'data'}", "--data.name=mnist", "--data.download=false", "--data.val_size=100",
        "--data.batch_size=32", "--data.translate=2", "--data.erase=0.25", "--model.width=64", "--model.dropout=0.2",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu", "--trainer.deterministic=true", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger.init_args.version=run", *extra,
    ]  # fmt: skip


def environment() -> dict:
    pythonpath = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": pythonpath, "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}


def last_ckpt(workdir: Path) -> Path:
    return workdir / "logs" / "digits_mlp" / "run" / "checkpoints" / "last.ckpt"


def step_of(path: Path) -> int | str:
    """The global step stored in `path`, '-' if there is none yet; raises if the file is damaged."""
    if not path.exists():
        return "-"
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def start(command: list[str], cwd: Path, env: dict, wait: bool = True) -> tuple[subprocess.Popen, float]:
    """Start `command`; with `wait`, return once it printed the line that opens training, and the seconds it took."""
    began = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout if wait else ():  # RunSummary's line comes when fit starts
        if line.startswith("Effective batch size"):
            break
    return process, time.monotonic() - began


def finish(process: subprocess.Popen, kill_after: float | None) -> tuple[bool, str]:
    """Wait for the end, or SIGKILL the process after `kill_after` s; return (killed, output)."""
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        process.wait(timeout=kill_after)
        killed = False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = True
    reader.join()
    return killed, "".join(output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs in all (a trial ends when a run finishes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=900, help="training images (100 of them validate)")
    parser.add_argument("--every", type=int, default=3, help="every_n_train_steps of last.ckpt")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume-"))
    folder.mkdir(parents=True, exist_ok=True)
    write_data(folder / "data" / "mnist", args.train)
    (folder / "every.yaml").write_text(CONFIG.format(every=args.every))
    env, rng = environment(), random.Random(args.seed)

    reference = folder / "reference"
    reference.mkdir(exist_ok=True)
    began = time.time()
    process, startup = start(fit_command(folder, args.epochs), reference, env)
    _, output = finish(process, None)
    training = last_ckpt(reference).stat().st_mtime - began - startup  # until the final checkpoint
    if process.returncode != 0:
        print(output[-3000:], file=sys.stderr)
        return 1
    expected = torch.load(last_ckpt(reference), weights_only=True)
    print(f"reference: start-up {startup:.1f} s, then {training:.1f} s of training, {expected['global_step']} steps")

    rows, failures = [], []
    kills, trial, total = 0, 0, expected["global_step"]
    while kills < args.kills:
        trial += 1
        workdir = folder / f"trial{trial}"
        workdir.mkdir(exist_ok=True)
        for run in itertools.count(1):
            command = fit_command(folder, args.epochs, *(["--ckpt_path=last"] if run > 1 else []))
            left = 1 - (step_of(last_ckpt(workdir)) if last_ckpt(workdir).exists() else 0) / total
            if kills >= args.kills or left <= 0:  # enough, or nothing left to train: run to the end
                delay = None
            elif rng.random() < 0.2:  # during start-up: imports, data, restoring the checkpoint
                delay = rng.uniform(0.5, startup)
            else:  # during training (steps, validation, checkpoint saves), before its end
                delay = -1.0
            process, waited = start(command, workdir, env, wait=delay is not None and delay < 0)
            if delay is not None and delay < 0:
                delay = waited + rng.uniform(0, training * left)
            killed, output = finish(process, None if delay is None else max(0.0, delay - waited))
            delay = delay if killed else None
            kills += killed
            try:
                step = step_of(last_ckpt(workdir))
            except Exception as err:  # a damaged last.ckpt: the very thing this script looks for
                step, outcome = "?", f"FAIL: last.ckpt unreadable ({type(err).__name__})"
                failures.append(outcome)
            else:
                if delay is not None:
                    outcome = "killed, last.ckpt ok"
                elif process.returncode == 0:
                    outcome = "finished"
                else:
                    outcome = f"FAIL: exit {process.returncode}: {output.strip().splitlines()[-1:]}"
                    failures.append(outcome)
            rows.append((trial, run, "-" if delay is None else f"{delay:.2f}", step, outcome))
            if delay is None:
                break

        final = torch.load(last_ckpt(workdir), weights_only=True)
        same = final["global_step"] == expected["global_step"] and set(final["state_dict"]) == set(
            expected["state_dict"]
        )
        same = same and all(torch.equal(final["state_dict"][k], v) for k, v in expected["state_dict"].items())
        versions = sorted(p.name for p in (workdir / "logs" / "digits_mlp").iterdir())
        verdict = "weights equal the reference" if same else "FAIL: weights differ from the reference"
        if versions != ["run"]:
            verdict += f"; FAIL: run folders {versions}"
        if not same or versions != ["run"]:
            failures.append(verdict)
        rows.append((trial, "end", "-", final["global_step"], verdict))

    print(f"{'trial':>5}  {'run':>4}  {'kill at s':>9}  {'step':>5}  outcome")
    for trial, kill, at, step, outcome in rows:
        print(f"{trial:>5}  {kill:>4}  {at:>9}  {step!s:>5}  {outcome}")
    print(f"{kills} kills, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
