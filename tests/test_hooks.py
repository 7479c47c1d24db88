"""The pre-generation hook: a bad answer stops the bake with one ERROR line, leaving nothing."""

import ast
import json
import os
import subprocess
import sys
import tomllib

import pytest

from conftest import TEMPLATE, relative_files

BAD_SLUGS = ["a/b", "../evil", "Bad Name", "UPPER", "1abc", "a--b", "-ab", "ab-", "a_b", "a.b"]

BAD_PACKAGES = {
    "class": "is a Python keyword",
    "match": "is a Python keyword",  # soft keyword
    "torch": "would shadow the module",
    "lightning": "would shadow the module",
    "test": "would shadow the module",
    "json": "would shadow the module",  # standard library
    "bad-name": "is not a lowercase Python identifier",
    "Caps": "is not a lowercase Python identifier",
    "1pkg": "is not a lowercase Python identifier",
}

BAD_EMAILS = ["nope", "a@b", "a b@c.d", "a@b@c.d", "a@b."]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR:")]


def assert_rejected(proc: subprocess.CompletedProcess, field: str, value: str, reason: str) -> None:
    """Exit code != 0 and exactly one ERROR line, naming the field, the value and the reason."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ERROR: {field}: {value!r} {reason}"), lines[0]


@pytest.mark.parametrize("slug", BAD_SLUGS)
def test_bad_slug_is_rejected_and_leaves_nothing(tmp_path, run_cookiecutter, slug):
    out = tmp_path / "out"
    out.mkdir()

    proc = run_cookiecutter(out, f"project_slug={slug}", "package_name=digit_lab")

    assert_rejected(proc, "project_slug", slug, "is not a valid folder name")
    assert "e.g. 'digit-lab'" in error_lines(proc.stderr)[0]
    assert os.listdir(out) == []
    # Nothing escaped the output folder either ('../evil' would land here).
    assert os.listdir(tmp_path) == ["out"]


def test_dotdot_slug_never_touches_the_output_folder(tmp_path, run_cookiecutter):
    """'..' slugifies to '' so the project folder would be the output folder itself.

    cookiecutter refuses before the hook runs (the folder exists); with --overwrite-if-exists
    the hook runs, rejects it, and the files already in the output folder stay.
    """
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    refused = run_cookiecutter(out, "project_slug=..", "package_name=digit_lab")
    assert refused.returncode != 0
    assert relative_files(tmp_path) == {"out/keep.txt"}

    forced = run_cookiecutter(out, "--overwrite-if-exists", "project_slug=..", "package_name=digit_lab")
    assert_rejected(forced, "project_slug", "..", "is not a valid folder name")
    assert relative_files(tmp_path) == {"out/keep.txt"}
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_slug_also_reports_the_package_derived_from_it(tmp_path, run_cookiecutter):
    proc = run_cookiecutter(tmp_path, "project_slug=Bad Name")

    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        "ERROR: project_slug: 'Bad Name' is not a valid folder name (use lowercase letters, digits "
        "and single hyphens, starting with a letter, e.g. 'digit-lab')",
        "ERROR: package_name: 'Bad Name' is not a lowercase Python identifier (use lowercase "
        "letters, digits and underscores, e.g. 'digit_lab')",
    ]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("package", BAD_PACKAGES)
def test_bad_package_is_rejected_and_leaves_nothing(tmp_path, run_cookiecutter, package):
    proc = run_cookiecutter(tmp_path, "project_name=Digit Lab", f"package_name={package}")

    assert_rejected(proc, "package_name", package, BAD_PACKAGES[package])
    assert os.listdir(tmp_path) == []


def test_shadowing_package_message_suggests_a_name(tmp_path, run_cookiecutter):
    proc = run_cookiecutter(tmp_path, "package_name=json")

    assert "(pick another name, e.g. 'my_json')" in error_lines(proc.stderr)[0]


@pytest.mark.parametrize("email", BAD_EMAILS)
def test_bad_email_is_rejected_and_leaves_nothing(tmp_path, run_cookiecutter, email):
    proc = run_cookiecutter(tmp_path, "project_name=Digit Lab", f"author_email={email}")

    assert_rejected(proc, "author_email", email, "is not an email address")
    assert os.listdir(tmp_path) == []


def test_rejection_through_the_python_api(bake):
    result = bake(project_name="Digit Lab", package_name="torch")

    assert result.exit_code != 0
    assert result.exception is not None
    assert result.project_path is None


@pytest.mark.parametrize(
    ("slug", "package", "email"),
    [
        ("a", "a", "x@y.io"),
        ("digit-lab-2", "digit_lab_2", "first.last+ml@mail.example.co.uk"),
        ("x1-y2", "_private", "o'neil@example.org"),
        ("lab", "my_json", "me@example.com"),
    ],
)
def test_unusual_but_valid_answers_bake(bake, slug, package, email):
    result = bake(project_slug=slug, package_name=package, author_email=email)

    assert result.exit_code == 0, result.exception
    assert result.project_path.name == slug
    assert (result.project_path / "src" / package / "cli.py").is_file()
    meta = tomllib.loads((result.project_path / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["authors"][0]["email"] == email
    assert meta["project"]["scripts"] == {slug: f"{package}.cli:main", f"{slug}-doctor": f"{package}.doctor:main"}


def test_quotes_backslashes_and_unicode_survive(bake):
    # Long too: the description must not end up in a Python line that ruff finds too long.
    description = 'Says "hi" to C:\\Users\\me\\new; naïve 🔢 ' + "and so on " * 12 + 'ends with a quote"'
    author = 'Zoë "Z" O\'Brien \\ 李'
    result = bake(project_name="Digit Lab", description=description, author_name=author)

    assert result.exit_code == 0, result.exception
    project = result.project_path
    meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert meta["description"] == description
    assert meta["authors"] == [{"name": author, "email": "you@example.com"}]
    assert author in (project / "LICENSE").read_text(encoding="utf-8")
    for path in project.rglob("*.py"):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert description in (project / "README.md").read_text(encoding="utf-8")
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode == 0, lint.stdout


def post_gen_tables(package: str) -> dict:
    """The post-generation hook's tables (PARTS, SHARED), for package `package` (the hook is a Jinja template)."""
    source = (TEMPLATE / "hooks" / "post_gen_project.py").read_text(encoding="utf-8")
    source = source.replace("{{ cookiecutter.package_name }}", package)
    source = source.replace("{{ cookiecutter | jsonify | jsonify }}", repr("{}"))
    namespace = {"__name__": "post_gen_project"}  # not __main__: nothing is removed
    exec(compile(source, "post_gen_project.py", "exec"), namespace)
    return namespace


def post_gen_parts(package: str) -> dict[str, list[str]]:
    return post_gen_tables(package)["PARTS"]


def test_every_path_of_the_hooks_table_is_in_a_full_bake(bake):
    """A part's entry that names a moved or renamed file would silently leave the file in place."""
    project = bake(project_name="Digit Lab").project_path
    parts = post_gen_parts("digit_lab")
    context = json.loads((TEMPLATE / "cookiecutter.json").read_text(encoding="utf-8"))
    assert set(parts) <= set(context), "a part of the hook's table is no question of cookiecutter.json"
    shared = post_gen_tables("digit_lab")["SHARED"]
    assert {part for parts in shared.values() for part in parts} <= set(parts), "SHARED names a part PARTS lacks"
    missing = [f"{part}: {path}" for part, paths in parts.items() for path in paths if not (project / path).exists()]
    missing += [f"shared: {path}" for path in shared if not (project / path).exists()]
    assert missing == [], missing


def test_parts_switched_off_on_the_command_line(tmp_path, run_cookiecutter):
    """The issue's own command: `cookiecutter --no-input . text=no search=no`."""
    proc = run_cookiecutter(tmp_path, "project_name=Digit Lab", "text=no", "search=no")
    assert proc.returncode == 0, proc.stderr
    project = tmp_path / "digit-lab"
    files = relative_files(project)
    assert not [path for path in files if "text" in path.rsplit("/", 1)[-1] or "search" in path], files
    assert {"src/digit_lab/export.py", "src/digit_lab/doctor.py", "scripts/slurm.sbatch"} <= files
