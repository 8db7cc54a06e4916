"""Shared helpers of the op benchmarks (pytest-benchmark): one file per op, ours against eager PyTorch and
torch.compile of the same eager code.

    pytest benchmarks/ops --benchmark-enable --benchmark-json=ops.json
    python benchmarks/results_table.py ops.json      # regenerates the table in RESULTS.md

Our C++ kernels run once per CPU instruction-set level this machine has (the `ours` fixture: variants
`ours@default`, `ours@avx2`, `ours@avx512`), so one AVX-512 machine also measures what an AVX2-only or a baseline
x86-64 CPU gets from them; eager and torch.compile run at ATen's own level (`ATEN_CPU_CAPABILITY` sets it). Each
benchmark sets `extra_info` (op, size, variant, and `bytes`: the least memory traffic the operation needs, inputs
read once and outputs written once), so the table can show achieved bandwidth next to a measured copy bandwidth
(bench_copy.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dsd2.ops import cpu_isa_levels, use_cpu_isa

torch.set_flush_denormal(True)

LEVELS = ("default", "avx2", "avx512")


def pytest_collect_file(file_path, parent):
    """Collect the bench_*.py files of this folder (pytest's own pattern is test_*.py); a file named on the command
    line is collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(params=LEVELS, ids=[f"ours@{level}" for level in LEVELS])
def ours(request):
    """Our kernels at one CPU level for the whole test (skipped where this CPU lacks it): its variant name."""
    level = request.param
    if level not in cpu_isa_levels():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    with use_cpu_isa(level):
        yield f"ours@{level}"


@pytest.fixture(scope="session")
def compiled():
    """torch.compile of a baseline function, compiled once per function for the whole run."""
    return functools.cache(lambda fn: torch.compile(fn, dynamic=False))


@pytest.fixture
def label(benchmark):
    """label(group, op, size, variant, nbytes): the benchmark's group, and the fields results_table.py reads."""

    def set_label(group: str, op: str, size: str, variant: str, nbytes: int) -> None:
        benchmark.group = group
        benchmark.extra_info.update(op=op, size=size, variant=variant, bytes=nbytes)

    return set_label
