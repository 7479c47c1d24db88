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

from conftest import TEMPLATE


def readme_commands() -> dict[str, str]:
    """The numbered commands of the README's first bash block: {"1": "...", "2": "..."}."""
    block = re.search(r"```bash\n(.*?)```", (TEMPLATE / "README.md").read_text(), re.S).group(1)
    commands, number = {}, None
    for line in block.splitlines():
        if match := re.match(r"# (\d)\. ", line):
            number = match.group(1)
        elif line.strip() and number:
            commands[number] = line.strip()
    return commands


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


@pytest.mark.slow
def test_readme_command_1_in_a_fresh_folder(tmp_path):
    """Command 1 exactly as written, in a fresh copy of the template with no environment active.

    The one liberty: pip is held to this machine's torch release (PIP_CONSTRAINT), so that the
    test installs the CPU build already used here instead of downloading a multi-GB CUDA build.
    """
    clone = copy_of_template(tmp_path / "lightning-template")
    held = tmp_path / "torch.txt"
    held.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    outer = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != outer)
    env["PIP_CONSTRAINT"] = str(held)
    run = subprocess.run(
        ["bash", "-c", readme_commands()["1"]], cwd=clone, env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = tmp_path / "digit-lab" / "logs" / "digits_mlp" / "version_0"
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert list(folder.glob("events.out.tfevents.*"))
    assert "`Trainer.fit` stopped: `max_epochs=20` reached." in run.stdout + run.stderr
