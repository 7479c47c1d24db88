"""A new user's first commands: the README's command 1 on a fresh machine, and what it relies on.

The machine is like a cluster's compute node: it reaches the Python package index and nothing
else, so neither the install nor the default run may fetch anything from elsewhere.
"""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TEMPLATE, outside_env
from readme_commands import readme_commands


def copy_of_template(target: Path) -> Path:
    """The template's files as a clone of it has them (tracked and new files, nothing ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=TEMPLATE, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = TEMPLATE / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def test_readme_has_the_two_commands_and_they_need_only_the_package_index():
    commands = readme_commands()
    assert set(commands) == {"1", "2"}
    for command in commands.values():
        assert not re.search(r"index-url|https?://|download\.pytorch", command), command
    assert "cookiecutter" in commands["1"] and "python train.py fit" in commands["1"]
    assert "pip install torch" not in commands["1"]  # torch comes with the project, from the default index
    assert commands["2"].endswith("python -m pytest")


def test_the_shipped_data_is_in_the_wheel(bake, tmp_path):
    """A non-editable install (`pip install .`) must carry the default run's data set too."""
    project = bake(project_name="Digit Lab").project_path
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(project)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("digit_lab-*.whl")
    assert "digit_lab/data/digits.csv.gz" in zipfile.ZipFile(wheel).namelist()


def fresh_machine_env(tmp_path: Path) -> dict:
    """This machine's environment as a new user's shell has it: no virtual environment active.

    The one liberty: pip is held to this machine's torch release (PIP_CONSTRAINT), so that the
    commands install the CPU build already used here instead of downloading a multi-GB CUDA build.
    """
    held = tmp_path / "torch.txt"
    held.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    outer = str(Path(sys.executable).parent)
    env = outside_env("PIP_REQUIRE_VIRTUALENV")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != outer)
    env["PIP_CONSTRAINT"] = str(held)
    return env


def run_command_1(tmp_path: Path, env: dict, clone: Path | None = None) -> Path:
    """Command 1 exactly as written, in `clone` (default: a fresh copy of the template): its folder."""
    clone = clone or copy_of_template(tmp_path / "lightning-template")
    run = subprocess.run(
        ["bash", "-c", readme_commands()["1"]], cwd=clone, env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = tmp_path / "digit-lab" / "logs" / "digits_mlp" / "version_0"
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert list(folder.glob("events.out.tfevents.*"))
    assert "`Trainer.fit` stopped: `max_epochs=20` reached." in run.stdout + run.stderr
    return clone


@pytest.mark.slow
def test_readme_command_1_in_a_fresh_folder(tmp_path):
    run_command_1(tmp_path, fresh_machine_env(tmp_path))


@pytest.mark.fresh_clone
def test_readme_commands_1_then_2_in_a_fresh_clone(tmp_path):
    """Command 1, then command 2 in the clone with command 1's environment active, both as written.

    Command 2 runs this whole suite again (but for this test, which the default `-m` leaves out), so
    it is run by hand, not in CI: `python -m pytest -m fresh_clone` (about as long as the suite), on a
    machine with nothing else to do (under load, the baked tiers' own time limits end them).
    """
    env = fresh_machine_env(tmp_path)
    # A real clone of the committed template, as a user makes one (git ls-files works in it, which the
    # suite's copies of the template need); what is not committed does not take part.
    clone = tmp_path / "lightning-template"
    subprocess.run(["git", "clone", "-q", str(TEMPLATE), str(clone)], check=True, capture_output=True)
    clone = run_command_1(tmp_path, env, clone)
    run = subprocess.run(
        ["bash", "-c", f". .venv/bin/activate && {readme_commands()['2']}"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "(no output)"
    print("command 2:", summary)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, run.stdout[-5000:]
