"""Every op test runs once per CPU instruction-set level of the C++ kernels: `default` (x86-64 baseline) always,
`avx2` and `avx512` where this CPU has them, so CI on any machine covers every path that machine can reach."""

import pytest

from dsd2.ops import cpu_isa_levels, use_cpu_isa

LEVELS = ("default", "avx2", "avx512")


@pytest.fixture(autouse=True, params=LEVELS, ids=[f"isa-{level}" for level in LEVELS])
def cpu_isa_level(request):
    available = cpu_isa_levels()
    if request.param not in available:
        pytest.skip(f"this CPU cannot run the {request.param} kernels (it runs: {', '.join(available)})")
    with use_cpu_isa(request.param):
        yield request.param
