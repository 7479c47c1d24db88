"""Check the answers before any file is written.

Each problem is printed as one line, ``ERROR: <field>: <what is wrong> (<how to fix>)``,
and the hook exits 1, so cookiecutter stops and removes the project folder it made.
The values arrive as JSON string literals, so quotes or backslashes in an answer cannot
break this script.
"""

import keyword
import re
import sys

SLUG = {{ cookiecutter.project_slug | jsonify }}
PACKAGE = {{ cookiecutter.package_name | jsonify }}
EMAIL = {{ cookiecutter.author_email | jsonify }}

# Names a package must not take: the generated project imports these (or runs files named
# so from its root), and a package of the same name would shadow them.
TAKEN = {
    "benchmarks", "configs", "data", "jsonargparse", "lightning", "lightning_fabric", "logs",
    "numpy", "pil", "probe", "pytest", "pytorch_lightning", "scripts", "setuptools", "src",
    "tensorboard", "test", "tests", "torch", "torchmetrics", "train", "yaml",
}  # fmt: skip


def problems(slug: str, package: str, email: str) -> list[str]:
    found = []
    # One lowercase word or several joined by single hyphens: no '/', '..', spaces or
    # capitals, so the folder can never land outside the output directory.
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", slug):
        found.append(
            f"project_slug: {slug!r} is not a valid folder name "
            "(use lowercase letters, digits and single hyphens, starting with a letter, "
            "e.g. 'digit-lab')"
        )
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", package) or not package.isidentifier():
        found.append(
            f"package_name: {package!r} is not a lowercase Python identifier "
            "(use lowercase letters, digits and underscores, e.g. 'digit_lab')"
        )
    elif keyword.iskeyword(package) or keyword.issoftkeyword(package):
        found.append(f"package_name: {package!r} is a Python keyword (pick another name)")
    elif package in TAKEN or package in sys.stdlib_module_names:
        found.append(
            f"package_name: {package!r} would shadow the module of the same name "
            "that the project imports (pick another name, e.g. 'my_" + package + "')"
        )
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s.]+", email):
        found.append(
            f"author_email: {email!r} is not an email address (use the form name@example.com)"
        )
    return found


if __name__ == "__main__":
    errors = problems(SLUG, PACKAGE, EMAIL)
    for line in errors:
        print(f"ERROR: {line}", file=sys.stderr)
    sys.exit(1 if errors else 0)
