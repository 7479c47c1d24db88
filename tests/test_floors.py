"""The generated project's lower bounds are true: its tests pass on the lowest versions they allow.

pip keeps an already-installed release that meets a floor, so a floor that is too low breaks real
users. Here a fresh environment gets this machine's torch (held: the CPU build), then uv installs
every other dependency, extras included, at the lowest version that `pyproject.toml` allows
(`--resolution lowest-direct`), and the project's fast tier runs on them, but for the files in
`SAME_ON_EVERY_VERSION`: their tests exercise torch and the data code (held at this machine's torch)
through CLI and Trainer paths that the other files cover too, so CI does not pay twice for them.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import outside_env
from test_baked_project import assert_suite_passed, bake_both, split_test_files

pytestmark = pytest.mark.slow

SAME_ON_EVERY_VERSION = [
    "test_augment.py", "test_crash_safety.py", "test_dataset_table.py", "test_digits.py", "test_distributed.py",
    "test_download.py", "test_idx.py", "test_mnist_data.py", "test_own_network.py",
    "test_readme.py", "test_vit.py",
]  # fmt: skip


def run(command: list, cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = outside_env()
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("shape", ["core", "parts"])
def test_fast_tier_passes_on_the_lowest_allowed_versions(bake, tmp_path, shape):
    """Two halves that run side by side (pytest -n): the core's files in the all-off bake, with the core
    dependencies; the parts' files (and the core files a part changes) in the all-on bake, with every extra."""
    on, off = bake_both(bake)
    core, full = split_test_files(on, off)
    project, files = (off, core) if shape == "core" else (on, full)
    files = [name for name in files if name.removeprefix("tests/") not in SAME_ON_EVERY_VERSION]
    extras = ",".join(tomllib.loads((project / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    made = run([sys.executable, "-m", "venv", tmp_path / "floors"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = tmp_path / "floors" / "bin" / "python"
    torch_release = torch.__version__.split("+")[0]
    # The same install as .ci/run's: on this machine it resolves to the small CPU wheel.
    got_torch = run([python, "-m", "pip", "install", "-q", f"torch=={torch_release}"], cwd=tmp_path)
    assert got_torch.returncode == 0, got_torch.stdout[-2000:] + got_torch.stderr[-2000:]
    held = tmp_path / "constraints.txt"
    held.write_text(f"torch=={torch_release}\n")
    uv = Path(sys.executable).parent / "uv"
    lowest = run(
        [uv, "pip", "install", "--python", python, "--resolution", "lowest-direct", "-c", held, "-e",
         f"{project}[{extras}]" if extras else project],
        cwd=tmp_path,
    )  # fmt: skip
    assert lowest.returncode == 0, lowest.stdout[-3000:] + lowest.stderr[-3000:]
    frozen = run([python, "-m", "pip", "list", "--format=freeze"], cwd=tmp_path).stdout.splitlines()
    print("lowest versions:", " ".join(frozen))
    installed = {name.lower(): Version(version) for name, version in (line.split("==") for line in frozen)}
    # Every floor of the core dependencies but torch's was installed, not a newer release.
    for line in tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        floor = next(Version(s.version) for s in requirement.specifier if s.operator == ">=")
        if requirement.name != "torch":
            assert installed[requirement.name.lower()] == floor, (requirement.name, installed[requirement.name.lower()])
    assert all((off / "tests" / name).is_file() for name in SAME_ON_EVERY_VERSION)  # none renamed away
    tests = run([python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files], cwd=project)
    assert_suite_passed(tests, f"fast tier of the {shape} on the lowest versions")
