"""A baked project installs into a fresh virtual environment and passes its own test suite.

Offline on purpose: the new environment has no packages of its own and sees this environment's
(pip, setuptools, torch, lightning, ...) through a .pth file, and the project is installed with
--no-index --no-deps --no-build-isolation, so pip downloads nothing.
(`venv --system-site-packages` would not do: made from a virtual environment's Python it exposes
the base interpreter's site-packages, not this one's; and a venv with its own pip gets the old
setuptools that ensurepip bundles, too old for the SPDX license string.)
"""

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import baked_suite, outside_env
from test_bake import ALL_OFF

pytestmark = pytest.mark.slow


def run(command: list, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = outside_env()
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# The one acceptable reason to skip here: the test needs a GPU (or, the other way round, a machine
# without one). Anything else (an extra that stopped importing, a missing data package) would
# turn a broken feature into a green run.
GPU_REASON = re.compile(r"\bGPU\b")


def unexpected_skips(stdout: str) -> list[str]:
    """The `SKIPPED [n] file:line: reason` lines of pytest's `-rs` summary whose reason is not a GPU."""
    skipped = re.findall(r"^SKIPPED \[\d+\] (.+)$", stdout, flags=re.M)
    return [line for line in skipped if not GPU_REASON.search(line.split(": ", 1)[-1])]


def assert_suite_passed(tests: subprocess.CompletedProcess, label: str) -> None:
    """pytest exited 0, its summary line reports passed tests and no failure or error, and
    nothing was skipped except for want of a GPU (the run must use `-rfEs`: the FAILED and ERROR
    lines name what broke even when warnings fill the end of the output)."""
    lines = tests.stdout.strip().splitlines()
    summary = lines[-1] if lines else "(no output)"
    broken = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    tail = "\n".join(broken + lines[-40:]) + tests.stderr[-2000:]
    assert tests.returncode == 0, f"{label}: {summary}\n{tail}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, tail
    if " skipped" in summary:
        assert "SKIPPED [" in tests.stdout, f"{label}: skips without their reasons (run pytest with -rs)\n{tail}"
    assert not unexpected_skips(tests.stdout), f"{label}: skipped for a reason other than a GPU:\n" + "\n".join(
        unexpected_skips(tests.stdout)
    )
    print(f"{label}: {summary}")


def make_venv(path: Path) -> Path:
    """A virtual environment made by this interpreter that sees this environment's packages."""
    made = run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    assert made.returncode == 0, made.stderr
    python = path / "bin" / "python"
    found = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], path)
    assert found.returncode == 0, found.stderr
    (Path(found.stdout.strip()) / "outer-env.pth").write_text("\n".join(site.getsitepackages()))
    return python


def bake_both(bake) -> tuple[Path, Path]:
    """(every part on, every part off): the two shapes whose own tests CI runs."""
    on, off = bake(project_name="Digit Lab"), bake(project_name="Digit Lab", **ALL_OFF)
    assert on.exit_code == 0 and off.exit_code == 0, (on.exception, off.exception)
    return on.project_path, off.project_path


def split_test_files(on: Path, off: Path) -> tuple[list[str], list[str]]:
    """(files for the all-off bake, files for the all-on bake): each test file runs once.

    The core's tests run in the core alone (every part off). The all-on bake runs the parts' own
    test files, and those core files whose all-on copy differs (a part adds cases to them with a
    Jinja conditional): the rest would only repeat, on the same core code, what the core's run checked.
    """
    core = sorted(p.name for p in (off / "tests").glob("test_*.py"))
    full = sorted(p.name for p in (on / "tests").glob("test_*.py"))
    assert set(core) <= set(full), set(core) - set(full)
    differs = [n for n in core if (on / "tests" / n).read_bytes() != (off / "tests" / n).read_bytes()]
    return [f"tests/{n}" for n in core], [f"tests/{n}" for n in full if n not in core or n in differs]


def run_tier(python, project: Path, markers: str, files: list[str], from_source: bool) -> subprocess.CompletedProcess:
    env, selected = baked_suite(markers)
    if from_source:
        env["PYTHONPATH"] = str(project / "src")
    return subprocess.run(
        [str(python), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *selected, *files],
        cwd=project, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip


def test_split_runs_every_test_file_and_the_parts_in_the_full_bake(bake):
    on, off = bake_both(bake)
    core, full = split_test_files(on, off)
    assert set(core) | set(full) == {f"tests/{p.name}" for p in (on / "tests").glob("test_*.py")}
    assert "tests/test_idx.py" in core and "tests/test_idx.py" not in full  # the same file in both shapes
    assert "tests/test_cli.py" in core and "tests/test_cli.py" in full  # a part adds cases to it
    assert {"tests/test_text.py", "tests/test_search.py", "tests/test_doctor.py"} <= set(full)


def test_baked_project_installs_and_passes_its_tests(bake, tmp_path):
    """The full bake installs (editable, offline) and runs its fast tier there: the parts' files and the core
    files that parts change. The core alone runs the rest from source."""
    project, off = bake_both(bake)
    core, full = split_test_files(project, off)
    python = make_venv(tmp_path / "venv")

    install = run(
        [str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(project)],
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    where = run([str(python), "-c", "import digit_lab; print(digit_lab.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == project / "src" / "digit_lab" / "__init__.py"

    script = run([str(python.parent / "digit-lab"), "--help"], cwd=tmp_path)
    assert script.returncode == 0, script.stdout + script.stderr
    assert "fit" in script.stdout

    assert_suite_passed(run_tier(python, project, "not slow and not gpu", full, False), "the full bake's fast tests")


def test_baked_project_passes_its_slow_tests(bake):
    """The full bake's `slow` tests of the same files (DDP on two CPU processes, two torchrun "nodes",
    the SLURM script, real models and corpora), from the source folder."""
    project, off = bake_both(bake)
    core, full = split_test_files(project, off)
    assert_suite_passed(run_tier(sys.executable, project, "slow", full, True), "the full bake's slow tests")


@pytest.mark.parametrize("tier", ["fast", "slow"])
def test_the_core_alone_passes_its_tests(bake, tier):
    """A bake with every part off runs its own fast and slow tiers from the source folder (no second
    install: the core's imports are a subset of the full bake's, which the test above installs)."""
    on, project = bake_both(bake)
    core, full = split_test_files(on, project)
    markers = "slow" if tier == "slow" else "not slow and not gpu"
    assert_suite_passed(run_tier(sys.executable, project, markers, core, True), f"the core's {tier} tests")


def test_a_skip_for_any_reason_but_a_gpu_fails_the_suite(bake):
    """The check above is live: a baked project's test that skips because an import failed is
    reported, one that skips for want of a GPU is not."""
    project = bake(project_name="Digit Lab").project_path
    (project / "tests" / "test_skips.py").write_text(
        "import pytest\n\n\n"
        "def test_extra():\n    pytest.importorskip('no_such_extra_module')\n\n\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA GPU')\ndef test_gpu():\n    pass\n\n\n"
        "def test_runs():\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/test_skips.py"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    found = unexpected_skips(tests.stdout)
    assert len(found) == 1 and "no_such_extra_module" in found[0], tests.stdout
    with pytest.raises(AssertionError, match="skipped for a reason other than a GPU"):
        assert_suite_passed(tests, "project with a skipped extra")


def test_a_failure_is_named_even_when_warnings_fill_the_end_of_the_output():
    """CI once reported "1 failed" with 40 lines of warnings and no test name."""
    stdout = "\n".join(
        ["..F..", "FAILED tests/test_x.py::test_broken - assert 1 == 2"]
        + [f"  warning line {i}" for i in range(60)]
        + ["1 failed, 4 passed, 60 warnings in 1.00s"]
    )
    failed = subprocess.CompletedProcess(args=["pytest"], returncode=1, stdout=stdout, stderr="")
    with pytest.raises(AssertionError, match=r"1 failed, 4 passed(.|\n)*FAILED tests/test_x.py::test_broken"):
        assert_suite_passed(failed, "a suite with a failure")
