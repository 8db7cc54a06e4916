"""The README's Quick start is what CI runs: keep the two in sync."""

import re

import pytest
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


@pytest.mark.slow
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


def readme_text() -> str:
    return (REPO / "README.md").read_text()


def section_headings(text: str) -> list[str]:
    """The titles of the README's `## ` sections, in order (a `#` line inside a fenced block is code)."""
    titles, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            titles.append(line[3:].strip())
    return titles


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def github_anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, every character but letters, digits, '_', '-' and spaces dropped,
    spaces made '-'."""
    return "".join(c for c in title.lower() if c.isalnum() or c in " _-").replace(" ", "-")


def test_github_anchor_of_the_links_the_readme_already_had():
    assert github_anchor("Verdicts: seeds, intervals and what the data can show") == \
        "verdicts-seeds-intervals-and-what-the-data-can-show"
    assert github_anchor("When does distillation dodge sparse double descent?") == \
        "when-does-distillation-dodge-sparse-double-descent"
    assert github_anchor("Distillation from a sparse teacher (DSD²)") == "distillation-from-a-sparse-teacher-dsd²"


def test_the_contents_list_follows_the_quick_start_and_names_every_section_in_order():
    text = readme_text()
    titles = section_headings(text)
    assert titles[:2] == ["Quick start", "Contents"], "the README opens with Quick start, then Contents"
    assert len(set(titles)) == len(titles), "two sections share a title, so GitHub numbers their anchors"
    links = re.findall(r"^- \[([^\]]+)\]\(#([^)]+)\)", section(text, "Contents"), flags=re.M)
    sections = [t for t in titles if t != "Contents"]
    listed = [title for title, _ in links]
    assert listed == sections, (
        "the Contents list must name every `## ` section of the README in order, by its exact title; unlisted: "
        f"{[t for t in sections if t not in listed]}, no such section: {[t for t in listed if t not in sections]}")
    wrong = [f"{title} -> #{anchor}" for title, anchor in links if anchor != github_anchor(title)]
    assert not wrong, f"Contents links whose anchor is not GitHub's for the title: {', '.join(wrong)}"


def named_places(text: str) -> list[str]:
    """Paths in backticks (a `<name>` in one stands for any name: `tests/ops/test_<op>.py`)."""
    return [p for p in re.findall(r"`([\w./<>*-]+)`", text) if "/" in p]


def matching_files(place: str) -> list:
    return sorted(REPO.glob(re.sub(r"<\w+>", "*", place))) if re.search(r"[<*]", place) else \
        [REPO / place] if (REPO / place).exists() else []


def named_in_files(text: str) -> list[tuple[str, str]]:
    """(name, path) for every "`A`, `B` and `C` in `path`" of the text: names said to be defined in a file."""
    pairs = []
    name_list = r"((?:`[A-Za-z_][\w.]*(?:\(\))?`(?:,\s+|\s+and\s+)?)+)"
    for names, place in re.findall(name_list + r"\s+in\s+`([\w./<>*-]+)`", text):
        pairs += [(name.removesuffix("()"), place) for name in re.findall(r"`([^`]+)`", names)]
    return pairs


def test_every_file_and_name_the_extending_recipes_give_exists():
    """The recipes cannot rot: each path they name exists (a templated one matches a file), and each name said to be
    in a file is there, every dotted part as a word of it."""
    text = section(readme_text(), "Extending dsd2")
    places = named_places(text)
    assert places, "the Extending section names no file"
    missing = sorted({p for p in places if not matching_files(p)})
    assert not missing, f"Extending dsd2 names places that do not exist: {', '.join(missing)}"
    pairs = named_in_files(text)
    assert {place for _, place in pairs} >= {"dsd2/config.py", "dsd2/models/__init__.py", "dsd2/pruning/__init__.py",
                                             "dsd2/data/sources.py", "dsd2/ops/_backend.py"}
    absent = []
    for name, place in pairs:
        sources = " ".join(f.read_text() for f in matching_files(place) if f.is_file())
        if not all(re.search(rf"\b{re.escape(part)}\b", sources) for part in name.split(".")):
            absent.append(f"{name} in {place}")
    assert not absent, f"Extending dsd2 names what its file does not hold: {', '.join(absent)}"
