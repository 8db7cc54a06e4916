"""Shared fixtures: tiny configs and a fake CIFAR folder in torchvision's layout (never downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run on the CPU through the interpreter when no GPU is present; the variable must be set
# before triton decorates the kernels, i.e. before dsd2.kernels is first imported.
if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import importlib.util
import tempfile

# measurements the suite makes (the sparse kernels' crossovers) go to a folder of its own, never the user's cache;
# engine subprocesses inherit it
os.environ["DSD2_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsd2-test-cache-")

import pytest
import torch

import dsd2
from dsd2.config import build_config

REPO = Path(__file__).resolve().parents[1]
ENGINE = [sys.executable, "-m", "dsd2"]
# True under `python -m pytest` from the repository root (the working tree is imported), False under plain
# `pytest` (the installed copy is imported; tests/test_source_tree.py checks that it is this tree's)
FROM_SOURCE_TREE = Path(dsd2.__file__).resolve().parent == REPO / "dsd2"
if FROM_SOURCE_TREE:
    # the engine subprocesses the tests start (from temporary directories) import the same dsd2
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def pytest_configure(config):
    if not FROM_SOURCE_TREE:
        return
    spec = importlib.util.find_spec("dsd2._C")
    if spec is None:
        raise pytest.UsageError(
            f"dsd2._C is not built in the source tree {REPO}: build it there with `python setup.py build_ext "
            "--inplace` (then `python -m pytest`), or install with `pip install --no-build-isolation .` and run "
            "plain `pytest`.")
    built = Path(spec.origin).stat().st_mtime
    newer = sorted(p.name for p in (REPO / "csrc").iterdir() if p.stat().st_mtime > built)
    if newer:
        raise pytest.UsageError(f"dsd2._C in the source tree is older than csrc/{', csrc/'.join(newer)}: rebuild it "
                                "with `python setup.py build_ext --inplace`.")


def tiny_overrides(**extra):
    """The embedded default shrunk to seconds: few epochs and levels."""
    base = {"optim": {"epochs": 2, "dense_epochs": 3}, "prune": {"levels": 3}}
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base[key] = value
    return base


@pytest.fixture
def tiny_config():
    def make(**extra):
        return build_config(None, None, tiny_overrides(**extra))

    return make


@pytest.fixture
def fake_cifar(tmp_path):
    from fake_data import write_fake_cifar

    root = tmp_path / "cifar"
    write_fake_cifar(root, "cifar10", train_per_file=12, test_size=16)
    write_fake_cifar(root, "cifar100", train_per_file=60, test_size=16)
    return root


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    # the engine flushes denormals for the whole process; a later test (hypothesis's float strategies) must not
    # inherit that
    torch.set_flush_denormal(False)


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cpu_backends() -> list[str]:
    """Backends testable here: the reference, the C++ extension, and Triton (interpreted without a GPU)."""
    return ["reference", "cpp", "triton"]


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
