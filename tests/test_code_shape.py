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
