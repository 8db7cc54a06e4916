"""The tests test this source tree: its kernels import from a checkout, and an installed copy that the tests
import instead (plain `pytest`) holds exactly this tree's Python files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FROM_SOURCE_TREE, REPO, engine_env

import dsd2

# the source-tree shim that points dsd2.kernels at kernels/; an install ships kernels/__init__.py in its place
SHIM = Path("kernels") / "__init__.py"


def tree_sources() -> dict[Path, Path]:
    """Each Python file of the tree by the path it has inside the installed package."""
    package = REPO / "dsd2"
    files = {p.relative_to(package): p for p in package.rglob("*.py") if p.relative_to(package) != SHIM}
    files.update({Path("kernels") / p.name: p for p in (REPO / "kernels").glob("*.py")})
    return files


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_installed_copy_is_this_tree():
    if FROM_SOURCE_TREE:
        pytest.skip("the tests import the working tree itself (python -m pytest from the repository root)")
    installed = Path(dsd2.__file__).resolve().parent
    tree = tree_sources()
    shipped = {p.relative_to(installed) for p in installed.rglob("*.py")}
    stale = sorted(str(rel) for rel, src in tree.items()
                   if rel not in shipped or digest(installed / rel) != digest(src))
    extra = sorted(str(rel) for rel in shipped - set(tree))
    assert not stale and not extra, (
        f"the installed dsd2 at {installed} is not this tree's: differing or missing {stale}, not in the tree "
        f"{extra}; reinstall with `pip install --no-build-isolation .`")


def test_kernels_import_from_a_checkout():
    """From the repository root, `import dsd2.kernels.<module>` loads the top-level kernels/ files, whether or not
    an installed copy exists."""
    code = "import dsd2.kernels.masked_sgd as m, dsd2.kernels as k; print(m.__file__); print(k.__doc__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=engine_env(),
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    path, doc = done.stdout.splitlines()[:2]
    assert Path(path).resolve() == REPO / "kernels" / "masked_sgd.py"
    assert doc == (REPO / "kernels" / "__init__.py").read_text().strip().strip('"')


def test_a_broken_kernels_import_is_raised_not_hidden(monkeypatch):
    """The graphed step holds the optimizer kernel's pointer tables; it has none to hold only when Triton itself
    is absent. A kernels package that fails to import (a checkout without dsd2.kernels, say) is an error."""
    import importlib.util

    import dsd2.kernels
    from dsd2.training import graphs

    monkeypatch.delattr(dsd2.kernels, "masked_sgd", raising=False)
    monkeypatch.setitem(sys.modules, "dsd2.kernels.masked_sgd", None)  # importing it now fails
    with pytest.raises(ImportError):
        graphs._optimizer_tables()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    assert graphs._optimizer_tables() == []
