"""The built dsd2._C: each CPU level's kernels are vectorised at that level's width and use nothing wider.

GCC leaves a loop scalar without a word when it cannot vectorise it (a call under a condition, for one), and
the result still passes every numeric test, only slower. So this reads the machine code: every hot kernel of
every level must hold packed instructions on that level's registers (xmm for the x86-64 baseline, ymm for AVX2,
zmm for AVX-512), the KD kernels packed fused multiply-adds where the level has FMA, and no kernel may touch a
register wider than its level allows (a `default` kernel with a ymm in it would crash a CPU without AVX).
The extension is built with GCC (torch's cpp_extension default), which builds all three x86-64 levels.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from dsd2.ops import cpp_extension

KERNELS = ("sgd_f32", "count_cols_f32", "count_cols_u16", "relu_rows_f32", "relu_rows_u16", "kd_row", "kd_block")
LEVELS = {"default": "xmm", "avx2": "ymm", "avx512": "zmm"}
WIDER = {"default": ("ymm", "zmm"), "avx2": ("zmm",), "avx512": ()}
# packed arithmetic and compares (moves, logic and shuffles excluded: scalar code uses those on vector registers
# too): float ops ending in ps/pd, integer ops starting with p (SSE) or vp (VEX/EVEX)
PACKED = re.compile(r"^\s*[0-9a-f]+:\s+(v?p(add|sub|mul|min|max|cmp|abs|sll|srl|sra)\w*|"
                    r"v?(add|sub|mul|div|max|min|cmp|fn?madd|fn?msub)\w*p[sd])\s")
# the on-state test of the counting kernels: packed compares (unsigned 16-bit ones are min/max + equality)
PACKED_COMPARE = re.compile(r"^\s*[0-9a-f]+:\s+(v?cmp\w*p[sd]|v?pcmp\w+|v?pminu\w|v?pmaxu\w)\s")
# float arithmetic, packed (ps) or scalar (ss)
ARITH = r"^\s*[0-9a-f]+:\s+v?(add|sub|mul|div|max|min|fn?madd\w*|fn?msub\w*)"
PACKED_ARITH, SCALAR_ARITH = re.compile(ARITH + r"ps\s"), re.compile(ARITH + r"ss\s")
FLOAT_KERNELS = ("sgd_f32", "kd_row", "kd_block")

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the per-level kernels are x86-64 code")


def disassembly() -> dict[str, list[str]]:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump (binutils) is needed to check the kernels' machine code; install binutils")
    ext = cpp_extension()
    assert ext is not None, "dsd2._C is not built"
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", ext.__file__], check=True,
                          capture_output=True, text=True).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <dsd2::isa_(\w+)::(\w+)\(", line)
        if head:
            current = f"{head.group(1)}::{head.group(2)}"
            functions[current] = []
        elif not line.strip():
            current = None
        elif current:
            functions[current].append(line)
    return functions


@pytest.fixture(scope="module")
def code():
    return disassembly()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("level", list(LEVELS))
def test_kernel_is_vectorised_at_its_level(code, level, kernel):
    body = code.get(f"{level}::{kernel}")
    assert body, f"dsd2::isa_{level}::{kernel} is missing from the built extension"
    reg = LEVELS[level]
    packed = [line for line in body if PACKED.match(line) and f"%{reg}" in line]
    assert len(packed) >= 8, f"{level}::{kernel} has {len(packed)} packed instructions on {reg}: its loops are scalar"
    if kernel not in FLOAT_KERNELS:
        # only the hot loops compare (the zero-fills and merges around them do not)
        compares = [line for line in body if PACKED_COMPARE.match(line) and f"%{reg}" in line]
        assert len(compares) >= 2, f"{level}::{kernel}: the on-state test is not a packed compare on {reg}"
    if kernel in FLOAT_KERNELS:
        # the tails, per-row logs and pairwise folds are scalar float arithmetic; the loops over classes and
        # elements are packed, and more so. Measured: packed / scalar >= 0.74 when they vectorise, <= 0.24 on
        # the levels where GCC left the KD loops scalar (built without -fno-trapping-math)
        vector = sum(bool(PACKED_ARITH.match(line)) and f"%{reg}" in line for line in body)
        scalar = sum(bool(SCALAR_ARITH.match(line)) for line in body)
        assert 2 * vector >= scalar, f"{level}::{kernel}: {scalar} scalar against {vector} packed float instructions"
    for wider in WIDER[level]:
        assert not any(f"%{wider}" in line for line in body), f"{level}::{kernel} uses {wider} registers"


@pytest.mark.parametrize("kernel", ["kd_row", "kd_block"])
@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_kd_kernels_use_packed_fma(code, level, kernel):
    reg = LEVELS[level]
    fma = [line for line in code[f"{level}::{kernel}"] if re.search(r"\svfn?m(add|sub)\w*ps\s", line)
           and f"%{reg}" in line]
    assert len(fma) >= 8, f"{level}::{kernel}: the exp/log polynomials are not packed FMAs on {reg}"


@pytest.mark.parametrize("level", list(LEVELS))
def test_float64_kd_row_uses_nothing_wider_than_its_level(code, level):
    """kd_row_f64 calls the standard library's exp and log, so it is not required to be packed; it is compiled
    per level like the others and must not touch a register its level lacks."""
    body = code.get(f"{level}::kd_row_f64")
    assert body, f"dsd2::isa_{level}::kd_row_f64 is missing from the built extension"
    for wider in WIDER[level]:
        assert not any(f"%{wider}" in line for line in body), f"{level}::kd_row_f64 uses {wider} registers"


@pytest.mark.parametrize("kernel", ["mask_f32", "mask_u16"])
@pytest.mark.parametrize("level", list(LEVELS))
def test_mask_kernels_are_vectorised_at_their_level(code, level, kernel):
    """The masked layers' select (bits and-ed with a mask of ones or zeros) is too short a loop for the counts
    above: it must test the mask bytes with packed compares and store whole vectors of its level's width."""
    body = code.get(f"{level}::{kernel}")
    assert body, f"dsd2::isa_{level}::{kernel} is missing from the built extension"
    reg = LEVELS[level]
    compares = [line for line in body if re.search(r"\s(v?pcmp\w+|vptestn?m\w+)\s", line) and f"%{reg}" in line]
    stores = [line for line in body if re.search(rf"\sv?mov\w*\s+%{reg}\d+,[^%]*\(", line)]
    assert compares and stores, f"{level}::{kernel}: {len(compares)} packed compares, {len(stores)} vector stores"
    assert not any("maskmov" in line for line in body), f"{level}::{kernel}: masked moves (a conditional load)"
    for wider in WIDER[level]:
        assert not any(f"%{wider}" in line for line in body), f"{level}::{kernel} uses {wider} registers"


@pytest.mark.parametrize("kernel", ["pruned_zero_f32", "pruned_zero_u16"])
@pytest.mark.parametrize("level", list(LEVELS))
def test_pruned_zero_checks_are_vectorised_at_their_level(code, level, kernel):
    """The read-only check that a weight is 0 wherever pruned: packed compares of the mask bytes and packed ors
    (or ternary logic) on the level's registers, nothing wider."""
    body = code.get(f"{level}::{kernel}")
    assert body, f"dsd2::isa_{level}::{kernel} is missing from the built extension"
    reg = LEVELS[level]
    compares = [line for line in body if re.search(r"\s(v?pcmp\w+|vptestn?m\w+)\s", line) and f"%{reg}" in line]
    logic = [line for line in body if re.search(r"\s(v?por\w*|vpternlog\w+)\s", line) and f"%{reg}" in line]
    assert compares and logic, f"{level}::{kernel}: {len(compares)} packed compares, {len(logic)} packed ors"
    for wider in WIDER[level]:
        assert not any(f"%{wider}" in line for line in body), f"{level}::{kernel} uses {wider} registers"


def test_sgd_kernels_have_no_fma(code):
    """The SGD update rounds each product on its own at every level (bit-identical results)."""
    for level in LEVELS:
        assert not any(re.search(r"\svfn?m(add|sub)", line) for line in code[f"{level}::sgd_f32"]), level
