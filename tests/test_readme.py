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


def layout_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", text, flags=re.M))


def test_layout_table_matches_the_tree():
    """Every place the Layout table names exists, every module and package of dsd2/ has its row, and every
    file a row names in backticks exists in that place."""
    rows = layout_rows()
    for place in rows:
        assert (REPO / place).exists(), f"the Layout table names {place}, which does not exist"
    top = {p.relative_to(REPO).as_posix() + ("/" if p.is_dir() else "") for p in (REPO / "dsd2").iterdir()
           if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem not in
                                                                 ("__init__", "__main__"))}
    missing = sorted(t for t in top if t not in rows)
    assert not missing, f"dsd2 parts without a row in the README's Layout table: {', '.join(missing)}"
    for place, text in rows.items():
        if not place.endswith("/"):
            continue
        for name in re.findall(r"`([\w./-]+\.(?:py|cpp|h|md))`", text):
            assert any((REPO / place).rglob(name.split("/")[-1])), f"{place} row names {name}, not in {place}"


def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """The README's example of `dsd2.prune`, executed verbatim (in a scratch folder)."""
    text = (REPO / "README.md").read_text().split("## Your own model and data: the Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["levels"] == 3 and len(summary["relu_layers"]) == 17
    assert (tmp_path / "runs" / "resnet18-mine" / "summary.json").exists()
