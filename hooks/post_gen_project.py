"""Remove what the answers turned off."""

import shutil
from pathlib import Path

if {{ cookiecutter.github_actions | jsonify }} != "yes":
    shutil.rmtree(".github")
if {{ cookiecutter.license | jsonify }} == "Proprietary":
    Path("LICENSE").unlink()
if {{ cookiecutter.chat | jsonify }} != "yes":
    package = Path("src") / {{ cookiecutter.package_name | jsonify }}
    for path in [
        package / "chat_template.py",
        package / "chat_generate.py",
        package / "chat_export.py",
        package / "data" / "chat.py",
        package / "models" / "chat.py",
        Path("configs") / "sft_lora.yaml",
        Path("configs") / "sft_full.yaml",
        Path("benchmarks") / "sft.py",
        Path("tests") / "chatdata.py",
        *Path("tests").glob("test_chat*.py"),
    ]:
        path.unlink()
