"""What keeps a generated project current: pre-commit with ruff, and a weekly run on the newest releases."""

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import TEMPLATE


def pinned(name: str) -> str:
    """The version requirements-dev.txt pins for `name`."""
    lines = (TEMPLATE / "requirements-dev.txt").read_text().splitlines()
    return next(line.split("==")[1] for line in lines if line.startswith(f"{name}=="))


def test_pre_commit_runs_ruff_lint_and_format(bake):
    project = bake(project_name="Digit Lab").project_path
    config = yaml.safe_load((project / ".pre-commit-config.yaml").read_text())
    (repo,) = config["repos"]
    assert repo["repo"] == "https://github.com/astral-sh/ruff-pre-commit"
    assert repo["rev"] == f"v{pinned('ruff')}"  # the ruff release the template lints the project with
    assert [hook["id"] for hook in repo["hooks"]] == ["ruff-check", "ruff-format"]
    pre_commit = Path(sys.executable).parent / "pre-commit"
    checked = subprocess.run(
        [str(pre_commit), "validate-config", ".pre-commit-config.yaml"], cwd=project, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_workflow_runs_weekly_on_the_newest_releases(bake):
    project = bake(project_name="Digit Lab", github_actions="yes").project_path
    workflow = yaml.safe_load((project / ".github" / "workflows" / "ci.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    (schedule,) = triggers["schedule"]
    minute, hour, day, month, weekday = schedule["cron"].split()
    assert (day, month) == ("*", "*") and weekday.isdigit()  # once a week
    newest = workflow["jobs"]["newest-releases"]
    assert "schedule" in newest["if"]
    installs = [step["run"] for step in newest["steps"] if "pip install" in step.get("run", "")]
    assert installs and all(
        "-U" in line.split()
        for line in installs[0].splitlines()
        if "pip install" in line and "--upgrade pip" not in line
    )
    assert any(step.get("run") == "python -m pytest" for step in newest["steps"])
    assert "if" not in workflow["jobs"]["test"]  # the usual job still runs on every push
