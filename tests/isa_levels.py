"""The CPU instruction-set levels the C++ kernels' tests run at: each level this CPU has, for the cpp backend only
(the reference, foreach and Triton backends do not depend on it, so they run once)."""

from __future__ import annotations

import pytest

from dsd2.ops import cpu_isa_levels


def isa_levels() -> list[str]:
    """The levels of dsd2._C this CPU runs, lowest first: `default` always, `avx2` and `avx512` where present."""
    return cpu_isa_levels()


def per_level(*backends: str) -> list:
    """Rows for `@pytest.mark.parametrize("backend, cpu_isa_level", per_level(...))`: `cpp` once per level of
    this CPU, every other backend once with the level None (left as the process runs it)."""
    rows = []
    for backend in backends:
        if backend == "cpp":
            rows += [pytest.param(backend, level, id=f"cpp-isa-{level}") for level in isa_levels()]
        else:
            rows.append(pytest.param(backend, None, id=backend))
    return rows
