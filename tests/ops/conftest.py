"""Per-level runs of the C++ kernels: a test opts in by taking a `cpu_isa_level` argument, and then runs once per
level this CPU has (`default` always, `avx2`, `avx512`); a test over backends takes `backend, cpu_isa_level` from
`isa_levels.per_level(...)`, so that only its cpp rows repeat. Every other test runs once, at the process's level.

Only the C++ kernels depend on the level: the reference, foreach and Triton paths would give the same result at
each, so repeating them would only cost time (and levels this CPU lacks are never generated, so none is skipped).
"""

import pytest
from isa_levels import isa_levels

from dsd2.ops import use_cpu_isa


def parametrized_names(metafunc) -> set[str]:
    names = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs["argnames"]
        if isinstance(argnames, str):
            argnames = argnames.split(",")
        names.update(name.strip() for name in argnames)
    return names


def pytest_generate_tests(metafunc):
    if "cpu_isa_level" in metafunc.fixturenames and "cpu_isa_level" not in parametrized_names(metafunc):
        levels = isa_levels()
        metafunc.parametrize("cpu_isa_level", levels, ids=[f"isa-{level}" for level in levels])


@pytest.fixture(autouse=True)
def _run_at_cpu_isa_level(request):
    """Sets the level a test's `cpu_isa_level` names for its duration (None: left as it is)."""
    callspec = getattr(request.node, "callspec", None)
    level = callspec.params.get("cpu_isa_level") if callspec is not None else None
    if level is None:
        yield
        return
    with use_cpu_isa(level):
        yield
