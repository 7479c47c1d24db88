"""The commands in the READMEs: the English README.md and the Chinese README.zh-CN.md give
the same ones (a translation cannot drift), and each `python train.py ...` among them parses
against the real command line. torchrun, sbatch and srun commands are only compared here;
test_recipes.py and test_distributed.py run what they start."""

import re
import shlex

import pytest
import yaml
from conftest import ROOT

from {{ cookiecutter.package_name }}.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

READMES = ("README.md", "README.zh-CN.md")
PROGRAMS = {"python", "torchrun", "sbatch", "srun", "tensorboard", "pip", "sudo", "apt", "nvidia-smi"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")


def is_command(words: list[str]) -> bool:
    """Whether a line's words start a command (after any leading VAR=value settings)."""
    programs = [w for w in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]
    return bool(programs) and programs[0] in PROGRAMS


def commands(text: str) -> set[str]:
    """Every command of a README: lines of its fenced blocks and `inline code` that start with a program.

    A line ending in a backslash continues on the next; `# comments` are dropped (they may be translated);
    the words are re-joined with shlex, so quoting and spacing do not matter.
    """
    found = set()
    lines = []
    for block in FENCE.findall(text):
        lines += [(line, 1) for line in block.replace("\\\n", " ").splitlines()]
    # In prose, a single word in backticks (`torchrun`) names a program rather than giving a command.
    lines += [(span, 2) for span in INLINE.findall(FENCE.sub("", text))]
    for line, fewest_words in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell syntax (an unbalanced quote in prose)
            continue
        if len(words) >= fewest_words and is_command(words):
            found.add(shlex.join(words))
    return found


def readme_commands() -> dict[str, set[str]]:
    return {name: commands((ROOT / name).read_text(encoding="utf-8")) for name in READMES}


def train_py_commands() -> list[list[str]]:
    """The words after `python train.py` of each such README command without <placeholders> or '...'."""
    found = set().union(*readme_commands().values())
    return sorted(
        shlex.split(c)[2:]
        for c in found
        if shlex.split(c)[:2] == ["python", "train.py"] and not re.search(r"<\w[^>]*>|\.\.\.", c)
    )


def test_both_readmes_link_each_other():
    english, chinese = ((ROOT / name).read_text(encoding="utf-8") for name in READMES)
    assert "(README.zh-CN.md)" in english
    assert "(README.md)" in chinese


def test_both_readmes_give_the_same_commands():
    found = readme_commands()
    english, chinese = found["README.md"], found["README.zh-CN.md"]
    assert len(english) >= 20, sorted(english)  # the extraction still finds the README's commands
    assert sorted(english - chinese) == [], "in README.md only: translate them into README.zh-CN.md"
    assert sorted(chinese - english) == [], "in README.zh-CN.md only"


def test_both_readmes_have_the_same_code_blocks():
    """Fenced blocks are identical but for the text of `# comments`, which may be translated."""
    english, chinese = (
        [re.sub(r"(^|\s)#.*$", r"\1#", block, flags=re.M) for block in FENCE.findall(text)]
        for text in ((ROOT / name).read_text(encoding="utf-8") for name in READMES)
    )
    assert len(english) >= 8, english
    assert [b for b in english if b not in chinese] == [], "README.md's blocks missing from README.zh-CN.md"
    assert chinese == english


def test_readme_programs_and_modules_exist():
    """`python some/script.py` names a file of the project; `python -m <package>.x` a module of the package."""
    package = "{{ cookiecutter.package_name }}"
    checked = 0
    for command in set().union(*readme_commands().values()):
        words = shlex.split(command)
        if words[0] != "python":
            continue
        if words[1] == "-m" and words[2].split(".")[0] == package:
            module = ROOT / "src" / (words[2].replace(".", "/") + ".py")
            assert module.is_file() or (module.with_suffix("") / "__init__.py").is_file(), command
            checked += 1
        elif words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), command
            checked += 1
    assert checked >= 2  # train.py and benchmarks/overhead.py at least


def with_project_paths(args: list[str]) -> list[str]:
    """The arguments with `--config configs/...` made absolute: the README's commands run in the project root."""
    out = []
    for i, arg in enumerate(args):
        if i and args[i - 1] == "--config" and (ROOT / arg).is_file():
            arg = str(ROOT / arg)
        elif arg.startswith("--config=") and (ROOT / arg.split("=", 1)[1]).is_file():
            arg = f"--config={ROOT / arg.split('=', 1)[1]}"
        out.append(arg)
    return out


@pytest.mark.parametrize("args", train_py_commands(), ids=shlex.join)
def test_readme_train_py_command_parses(workdir, capsys, args):
    """Parsed by the real CLI: --print_config prints the configuration and exits before anything runs."""
    with pytest.raises(SystemExit) as exit_:
        main([*with_project_paths(args), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err[-1000:]  # the end of the usage: the error itself
    if "--help" in args:
        assert "usage:" in out
        return
    config = yaml.safe_load(out)
    assert {"model", "data", "trainer"} <= set(config), out[:500]
    assert list(workdir.iterdir()) == [workdir / "data"]  # nothing ran: no logs, no checkpoints


def test_train_py_commands_are_found():
    subcommands = {args[0] for args in train_py_commands() if args}
    assert {"fit", "test", "predict"} <= subcommands, subcommands


def layout(text: str) -> dict[str, int]:
    """The README's Layout block: `path  lines  what it is`, one file per line."""
    block = text.split("## Layout", 1)[-1] if "## Layout" in text else text.split("## 目录结构", 1)[1]
    rows = re.findall(r"^(\S+)\s+(\d+)\s", FENCE.search(block).group(1), flags=re.M)
    return {path: int(count) for path, count in rows}


def test_layout_gives_every_source_file_and_its_rough_size():
    """What a sitting costs: every Python file of the project's code, in both READMEs, with a size that is
    roughly right (within half to double: an edit does not need a README change, a rewrite does)."""
    english, chinese = (layout((ROOT / name).read_text(encoding="utf-8")) for name in READMES)
    assert english == chinese
    code = {p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*.py")} | {"train.py", "my_network.py"}
    assert code <= set(english), f"files missing from the Layout: {sorted(code - set(english))}"
    missing = sorted(path for path in english if not (ROOT / path).is_file())
    assert missing == [], f"the Layout names files that do not exist: {missing}"
    wrong = {
        path: (count, actual)
        for path, count in english.items()
        if not count / 2 <= (actual := len((ROOT / path).read_text(encoding="utf-8").splitlines())) <= count * 2 + 5
    }
    assert wrong == {}, f"(README, actual) line counts far apart: {wrong}"
