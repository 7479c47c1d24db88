"""Shared helpers for the template's tests: bake with pytest-cookies or with the real CLI."""

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
