"""The README's Quick start is what CI runs: keep the two in sync."""

import re

from conftest import REPO


def quick_start_commands():
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_has_exactly_two_commands_install_and_run():
    cmds = quick_start_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("dsd2-engine train") and "pip install" in cmds[0]
    assert cmds[1].endswith("pytest") and "[test]" in cmds[1]


def test_ci_runs_the_second_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci
