"""The numbered commands of the template README's first bash block, which a new user copies.

Standard library only: `.ci/run` reads command 2 with it before anything is installed:
    python3 tests/readme_commands.py 2
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> dict[str, str]:
    """{"1": "...", "2": "..."}: each `# N. ` comment line names the command on the lines after it."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    commands, number = {}, None
    for line in block.splitlines():
        if match := re.match(r"# (\d)\. ", line):
            number = match.group(1)
        elif line.strip() and number:
            commands[number] = line.strip()
    return commands


if __name__ == "__main__":
    print(readme_commands()[sys.argv[1]])
