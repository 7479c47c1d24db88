"""Remove what the answers turned off."""

import shutil
from pathlib import Path

if {{ cookiecutter.github_actions | jsonify }} != "yes":
    shutil.rmtree(".github")
if {{ cookiecutter.license | jsonify }} == "Proprietary":
    Path("LICENSE").unlink()
