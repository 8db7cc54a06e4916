"""The shape of the code a newcomer reads: short functions, and no module reaching into another's privates."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "dsd2").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])
MAX_FUNCTION_LINES = 60


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_a_screen(path):
    tree = ast.parse(path.read_text())
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in functions(tree)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def imported_modules(tree: ast.AST) -> set[str]:
    """Names bound to modules of this project or of its dependencies by `import` statements."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_reaches_into_another_modules_private_names(path):
    """`module._name` on an imported name is a reach into a private; torch's own underscored API (`torch._C`,
    `torch._foreach_*`, `torch._dynamo`) is what torch offers for those jobs and is allowed."""
    tree = ast.parse(path.read_text())
    modules = imported_modules(tree) - {"torch", "triton", "tl", "np", "F", "nn", "dist"}
    reaches = [f"{node.value.id}.{node.attr} (line {node.lineno})" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
               and node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not reaches, f"{path.name}: {', '.join(reaches)}"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_or_module_is_imported_from_another_package():
    """A package's private modules (`dsd2.ops._backend`) and a module's private names are used inside their
    own package only."""
    found = []
    for path in SOURCES:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]).replace("kernels", "dsd2.kernels", 1)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsd2")):
                continue
            parts = node.module.split(".")
            inside = node.module.rsplit(".", 1)[0] == package or node.module == package
            if any(private(p) for p in parts) and not inside:
                found.append(f"{path.name}: {node.module}")
            found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if private(a.name) and not inside]
    assert not found, ", ".join(found)


def package_imports(folder: Path, package: str) -> dict[str, set[str]]:
    """Each module of one package (by dotted name) -> the modules of that package it imports, at any depth of
    its code: a function-level import closes a cycle as surely as a top-level one, only later."""
    modules = {(package if p.stem == "__init__" else f"{package}.{p.stem}"): p for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import mod` imports the module mod; `from pkg import name` runs pkg/__init__.py
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as the list of its modules (first repeated last), or [] when there is none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_the_data_package_imports_without_a_cycle():
    """A cycle between two modules of dsd2/data means neither can be read, tested or moved alone (the shared
    types live in dsd2/data/raw.py so that folder.py and sources.py need not import each other)."""
    graph = package_imports(ROOT / "dsd2" / "data", "dsd2.data")
    assert graph["dsd2.data.sources"], "the import graph of dsd2/data found no edge at all: the scan is broken"
    cycle = import_cycle(graph)
    assert not cycle, f"dsd2/data imports in a cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_a_function_level_import(tmp_path):
    (tmp_path / "__init__.py").write_text("from pkg.a import f\n")
    (tmp_path / "a.py").write_text("from pkg.b import B\n\ndef f():\n    pass\n")
    (tmp_path / "b.py").write_text("B = 1\n\ndef g():\n    from . import a\n    return a\n")
    graph = package_imports(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert import_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
