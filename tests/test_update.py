"""Template updates reach a generated project through cruft, and a user's own edits survive them.

A temporary git copy of this template gets a new commit; `cruft update` brings it into a project
made from the earlier commit, in which the user had changed some lines of their own.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_first_run import copy_of_template

PROJECT_CONFIG = Path("{{cookiecutter.project_slug|slugify}}") / "configs" / "digits_mlp.yaml"
GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}  # fmt: skip


def sh(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env={**os.environ, **GIT}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def cruft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "cruft", *args, cwd=cwd)


def commit(folder: Path, message: str) -> str:
    sh("git", "add", "-A", cwd=folder)
    sh("git", "commit", "-q", "-m", message, cwd=folder)
    return sh("git", "rev-parse", "HEAD", cwd=folder).stdout.strip()


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


@pytest.fixture
def template(tmp_path) -> Path:
    folder = copy_of_template(tmp_path / "template")
    sh("git", "init", "-q", cwd=folder)
    commit(folder, "the template as it is")
    return folder


def test_cruft_create_records_the_template_and_commit(template, tmp_path):
    cruft("create", str(template), "--no-input", "--extra-context", '{"project_name": "Digit Lab"}', cwd=tmp_path)
    recorded = json.loads((tmp_path / "digit-lab" / ".cruft.json").read_text())
    head = sh("git", "rev-parse", "HEAD", cwd=template).stdout.strip()
    assert recorded["template"] == str(template) and recorded["commit"] == head
    assert recorded["context"]["cookiecutter"]["package_name"] == "digit_lab"


def test_cruft_update_brings_template_changes_and_keeps_the_users_edits(template, tmp_path):
    cruft("create", str(template), "--no-input", "--extra-context", '{"project_name": "Digit Lab"}', cwd=tmp_path)
    project = tmp_path / "digit-lab"
    sh("git", "init", "-q", cwd=project)
    commit(project, "generated")
    config = project / "configs" / "digits_mlp.yaml"
    # The user's own edits: one line the template will not touch, one it will.
    replace(config, "  max_epochs: 20\n", "  max_epochs: 5\n")
    replace(config, "    width: 256          # hidden units per layer", "    width: 128          # mine")
    (project / "notes.md").write_text("my notes\n")
    commit(project, "my changes")

    # A template change: the same width line (a conflict), another line (no conflict), a new file.
    width = "    width: 256          # hidden units per layer"
    replace(template / PROJECT_CONFIG, width, "    width: 512          # wider")
    replace(template / PROJECT_CONFIG, "    dropout: 0.1\n", "    dropout: 0.2\n")
    (template / PROJECT_CONFIG.parents[1] / "NEWS.md").write_text("what changed in the template\n")
    new = commit(template, "a template change")

    updated = cruft("update", "-y", cwd=project)
    text = config.read_text()
    assert "    dropout: 0.2\n" in text  # the template's change arrived
    assert (project / "NEWS.md").read_text() == "what changed in the template\n"
    assert "  max_epochs: 5\n" in text and (project / "notes.md").is_file()  # the user's edits survived
    # The conflict is reported, not swallowed: markers in the file, a message, an unmerged path.
    assert "<<<<<<<" in text and "    width: 128          # mine" in text and "    width: 512          # wider" in text
    assert "Applied patch to 'configs/digits_mlp.yaml' with conflicts." in updated.stdout + updated.stderr
    status = sh("git", "status", "--porcelain", cwd=project).stdout.splitlines()
    assert "UU configs/digits_mlp.yaml" in status
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new
