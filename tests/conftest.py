"""Shared helpers for the template's tests: bake with pytest-cookies or with the real CLI."""

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[1]


def relative_files(root: Path) -> set[str]:
    """Every file under `root`, as POSIX paths relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bake(cookies):
    """`bake(**answers)`: bake this template (wherever pytest was started) without prompts."""

    def _bake(**answers):
        return cookies.bake(extra_context=answers, template=str(TEMPLATE))

    return _bake


@pytest.fixture(scope="session")
def cookiecutter_config(tmp_path_factory) -> Path:
    """A user config file that keeps the CLI's replay files out of the real home folder."""
    home = tmp_path_factory.mktemp("cookiecutter-home")
    config = home / "config.yaml"
    config.write_text(f"cookiecutters_dir: {home / 'templates'}\nreplay_dir: {home / 'replay'}\n")
    return config


@pytest.fixture
def run_cookiecutter(cookiecutter_config):
    """`run_cookiecutter(output_dir, *key=value, *flags)`: the real `cookiecutter` command line."""

    def _run(output_dir: Path, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cookiecutter", str(TEMPLATE), "--no-input"]
        command += ["--config-file", str(cookiecutter_config), "-o", str(output_dir), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    return _run


# Real data that the baked projects' tests read: Debian packages, fetched without root
# (`apt-get download` + `dpkg -x`) into a cache folder that later runs reuse. The baked
# suites find them through the environment variable DEBIAN_FILES (the folder `dpkg -x` filled).
DEBIAN_PACKAGES = ("dataset-fashion-mnist", "fortunes")
DEBIAN_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning-template" / "debian"


def debian_files() -> Path | None:
    """The folder holding the extracted DEBIAN_PACKAGES, fetched once; None where apt-get or dpkg is missing."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return None
    DEBIAN_CACHE.mkdir(parents=True, exist_ok=True)
    with open(DEBIAN_CACHE.parent / "debian.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist's workers ask at once: one fetches, the others wait
        return fetch_debian_packages(DEBIAN_CACHE)


def fetch_debian_packages(cache: Path) -> Path:
    root, done, debs = cache / "root", cache / "done.txt", cache / "debs"
    if done.is_file() and done.read_text().split() == list(DEBIAN_PACKAGES):
        return root
    shutil.rmtree(cache, ignore_errors=True)
    debs.mkdir(parents=True)
    fetched = subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=debs, capture_output=True, text=True)
    if fetched.returncode != 0 and os.geteuid() == 0:  # a new machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        fetched = subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=debs, capture_output=True, text=True)
    if fetched.returncode != 0:
        raise RuntimeError(
            f"apt-get download {' '.join(DEBIAN_PACKAGES)} failed ({fetched.stderr.strip()[-300:]}): "
            "run `sudo apt-get update` once, then the tests again"
        )
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
    shutil.rmtree(debs)
    done.write_text("\n".join(DEBIAN_PACKAGES) + "\n")
    return root


def pytest_report_header(config) -> str:
    found = debian_files()
    if found is None:
        return (
            "real data: no apt-get/dpkg on this machine, so the baked projects' tests marked `debian` "
            "(the real Fashion-MNIST and fortunes files) are deselected"
        )
    return f"real data: Debian packages {', '.join(DEBIAN_PACKAGES)} extracted in {found}"


def outside_env(*drop: str) -> dict:
    """This process's environment without what points into this checkout's environment or source
    (PYTHONPATH, VIRTUAL_ENV, and `drop`): the environment a baked project's commands run in."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", *drop)}


def baked_suite(markers: str) -> tuple[dict, list[str]]:
    """The environment and `-m` arguments that run a baked project's tests of `markers` here."""
    env = outside_env()
    found = debian_files()
    if found is None:
        return env, ["-m", f"({markers}) and not debian"]
    env["DEBIAN_FILES"] = str(found)
    return env, ["-m", markers]


# The long tests (each runs a baked project's tier, or installs one), longest first, as a CI run on
# 2 cores measured them (s): 357, 357, 332, 324, 259, 255, 122. pytest-xdist (--dist load) hands tests out in
# collection order, so with these at the start the two workers share them; collected in file order,
# the core's slow tier started last and ran alone for its last four minutes.
LONGEST_FIRST = [
    "test_floors.py::test_fast_tier_passes_on_the_lowest_allowed_versions[parts]",
    "test_baked_project.py::test_the_core_alone_passes_its_tests[fast]",
    "test_baked_project.py::test_baked_project_passes_its_slow_tests",
    "test_baked_project.py::test_baked_project_installs_and_passes_its_tests",
    "test_floors.py::test_fast_tier_passes_on_the_lowest_allowed_versions[core]",
    "test_baked_project.py::test_the_core_alone_passes_its_tests[slow]",
    "test_first_run.py::test_readme_command_1_in_a_fresh_folder",
]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("/")[-1], len(rank)))  # stable: the rest in order
