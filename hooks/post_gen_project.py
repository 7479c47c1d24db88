"""Remove what the answers turned off."""

import shutil
from pathlib import Path

if {{ cookiecutter.github_actions | jsonify }} != "yes":
    shutil.rmtree(".github")
if {{ cookiecutter.license | jsonify }} == "Proprietary":
    Path("LICENSE").unlink()
if {{ cookiecutter.serve | jsonify }} != "yes":  # the serve part: its command, benchmark and tests
    tests = Path("tests")
    for path in [
        Path("src", {{ cookiecutter.package_name | jsonify }}, "serve.py"),
        Path("benchmarks", "serve.py"),
        *(tests / name for name in ("test_serve.py", "test_serve_generate.py", "serving.py", "standin.py")),
    ]:
        path.unlink()
