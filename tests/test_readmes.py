"""The template's README.md and its Chinese translation README.zh-CN.md say the same commands.

The generated project's pair is checked by its own tests/test_readme.py, which runs in every bake.
"""

import re

from conftest import TEMPLATE

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
PROGRAMS = ("pip ", "python ", "cookiecutter ")


def code(name: str) -> tuple[list[str], set[str]]:
    """The fenced blocks, `# comments` reduced to '#' (they are translated), and the inline commands."""
    text = (TEMPLATE / name).read_text(encoding="utf-8")
    blocks = [re.sub(r"(^|\s)#.*$", r"\1#", block, flags=re.M) for block in FENCE.findall(text)]
    inline = {span for span in INLINE.findall(FENCE.sub("", text)) if " " in span and span.startswith(PROGRAMS)}
    return blocks, inline


def test_readme_translation_has_the_same_code():
    english, chinese = code("README.md"), code("README.zh-CN.md")
    assert len(english[0]) >= 3 and english[1], english  # the blocks and commands are still found
    assert chinese[0] == english[0]
    assert chinese[1] == english[1]


def test_readmes_link_each_other():
    assert "(README.zh-CN.md)" in (TEMPLATE / "README.md").read_text(encoding="utf-8")
    assert "(README.md)" in (TEMPLATE / "README.zh-CN.md").read_text(encoding="utf-8")
