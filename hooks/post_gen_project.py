"""Remove what the answers turned off.

PARTS lists each optional part's own files and folders (relative to the project root); a part
answered "no" loses them all (a file that needs two parts, like text_export.py, gpt_to_hf.py or
tests/test_serve_gpt.py, is listed under both). SHARED lists the files that any of several parts uses (pretrained.py: text and
chat). Files that several parts share (README, pyproject.toml, CI) choose their lines with Jinja
conditionals instead. A new part adds one entry here and one question in
cookiecutter.json.
"""

import json
import shutil
from pathlib import Path

PKG = "src/{{ cookiecutter.package_name }}"

PARTS = {
    "text": [
        f"{PKG}/models/text.py", f"{PKG}/models/text_regressor.py", f"{PKG}/data/text.py", f"{PKG}/text_export.py",
        "configs/text_full.yaml", "configs/text_lora.yaml", "configs/text_regression.yaml",
        "benchmarks/text_finetune.py",
        "tests/test_text.py", "tests/test_text_minilm.py", "tests/test_text_regression.py", "tests/textdata.py",
    ],
    "search": [f"{PKG}/search.py", f"{PKG}/search_report.py", "configs/search", "tests/test_search.py"],
    "export": [
        f"{PKG}/export.py", f"{PKG}/text_export.py",
        "tests/test_export.py", "tests/test_deploy.py",
    ],
    "cluster": ["scripts/slurm.sbatch", "configs/trainer/multinode.yaml", "tests/test_cluster.py"],
    "doctor": [f"{PKG}/doctor.py", "tests/test_doctor.py"],
    "gpt": [
        f"{PKG}/models/gpt.py", f"{PKG}/models/lm.py", f"{PKG}/data/corpus.py", f"{PKG}/generate.py",
        f"{PKG}/gpt_to_hf.py", "configs/gpt_char.yaml", "configs/gpt_small.yaml", "benchmarks/gpt.py",
        "tests/test_gpt.py", "tests/test_gpt_slow.py", "tests/test_serve_gpt.py",
    ],
    "serve": [
        f"{PKG}/serve.py", "benchmarks/serve.py",
        "tests/test_serve.py", "tests/test_serve_generate.py", "tests/serving.py", "tests/standin.py",
        "tests/test_serve_gpt.py", "tests/test_serve_chat.py",
    ],
    "chat": [
        f"{PKG}/chat_template.py", f"{PKG}/chat_generate.py", f"{PKG}/chat_export.py", f"{PKG}/gpt_to_hf.py",
        f"{PKG}/data/chat.py", f"{PKG}/models/chat.py", "configs/sft_lora.yaml", "configs/sft_full.yaml",
        "benchmarks/sft.py", "tests/chatdata.py", "tests/test_chat.py", "tests/test_chat_data.py",
        "tests/test_chat_smollm2.py", "tests/test_serve_chat.py",
    ],
}  # fmt: skip

# Files that several parts use, each kept while ANY of them is on (a PARTS path goes when its part is off).
SHARED = {f"{PKG}/pretrained.py": ["text", "chat"]}

# Every answer, as cookiecutter holds it (a JSON string literal, so no answer can break this file).
ANSWERS = json.loads({{ cookiecutter | jsonify | jsonify }})


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)  # a file two parts own may be gone already


def main() -> None:
    for part, paths in PARTS.items():
        if ANSWERS[part] != "yes":
            for path in paths:
                remove(Path(path))
    for path, parts in SHARED.items():
        if all(ANSWERS[part] != "yes" for part in parts):
            remove(Path(path))
    if ANSWERS["github_actions"] != "yes":
        shutil.rmtree(".github")
    if ANSWERS["license"] == "Proprietary":
        Path("LICENSE").unlink()


if __name__ == "__main__":
    main()
