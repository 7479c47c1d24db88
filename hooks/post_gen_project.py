"""Remove what the answers turned off."""

import shutil
from pathlib import Path

if {{ cookiecutter.github_actions | jsonify }} != "yes":
    shutil.rmtree(".github")
if {{ cookiecutter.license | jsonify }} == "Proprietary":
    Path("LICENSE").unlink()
if {{ cookiecutter.gpt | jsonify }} != "yes":  # the gpt part: a language model on your own text
    package = Path("src", {{ cookiecutter.package_name | jsonify }})
    for path in ("models/gpt.py", "models/lm.py", "data/corpus.py", "generate.py"):
        (package / path).unlink()
    for path in ("configs/gpt_char.yaml", "configs/gpt_small.yaml", "tests/test_gpt.py", "tests/test_gpt_slow.py",
                 "benchmarks/gpt.py"):  # fmt: skip
        Path(path).unlink()
