"""Every Triton kernel variant the launchers can pick compiles to a cubin for sm_80 and sm_90 on this CPU-only
machine, and no tile kernel spills registers. The variants come from the launchers' own planners
(`dsd2.kernels.aot`), so the check cannot drift from what runs on a GPU. The compile subprocess imports the
same dsd2 as the tests (tests/conftest.py puts a source tree tested in place on its PYTHONPATH)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    done = subprocess.run([sys.executable, "-m", "dsd2.kernels.aot", "--json", str(out)], capture_output=True,
                          text=True, env=env, timeout=900, cwd=out.parent)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_variant_compiles_for_both_targets(records):
    by_arch = {}
    for r in records:
        assert r["cubin_bytes"] > 0, r
        key = (r["kernel"], json.dumps(r["signature"], sort_keys=True), json.dumps(r["constexprs"], sort_keys=True),
               json.dumps(r["options"], sort_keys=True))
        by_arch.setdefault(r["arch"], set()).add(key)
    assert set(by_arch) == {"sm_80", "sm_90"}
    assert by_arch["sm_80"] == by_arch["sm_90"]
    kernels = {k[0] for k in by_arch["sm_90"]}
    assert kernels == {"_kd_tile_kernel", "_kd_chunked_kernel", "_kd_split_stats_kernel", "_kd_split_grad_kernel",
                       "_kd_scale_kernel", "_kd_count_kernel", "_kd_finish_kernel", "_count_cols_kernel",
                       "_count_channels_kernel", "_masked_sgd_kernel", "_masked_matmul_kernel", "_conv_fwd_kernel",
                       "_conv_dgrad_kernel", "_conv_wgrad_kernel"}


@pytest.mark.slow
def test_kd_configurations_cover_every_dtype_and_class_count(records):
    kd = [r for r in records if r["kernel"].startswith("_kd_") and r["arch"] == "sm_90" and "s_ptr" in r["signature"]]
    dtypes = {r["signature"]["s_ptr"] for r in kd}
    assert dtypes == {"*fp32", "*bf16", "*fp16"}
    assert {r["signature"]["g_ptr"] for r in records if r["kernel"] == "_kd_scale_kernel"} == dtypes
    tile_widths = {r["constexprs"]["BLOCK_C"] for r in kd if r["kernel"] == "_kd_tile_kernel"}
    assert tile_widths == {16, 32, 64, 128, 256, 512, 1024, 2048, 4096}  # C = 10 ... 4000
    for wide in ("_kd_chunked_kernel", "_kd_split_stats_kernel", "_kd_split_grad_kernel"):  # C = 32000, B = 8192 / 8
        assert {r["signature"]["s_ptr"] for r in kd if r["kernel"] == wide} == dtypes
    split = [r["grid_example"] for r in kd if r["kernel"].startswith("_kd_split_")]
    assert split and all(rows * spans >= 132 for rows, spans in split)  # B = 8 rows still fill an H100's 132 SMs


@pytest.mark.slow
def test_kd_kernels_keep_two_ctas_per_sm_without_spills(records):
    """Every KD configuration on both targets: no stack or local memory, and registers low enough for at least two
    CTAs per SM (the C = 100 tile once took 139 registers per thread: one CTA of 8 warps per SM)."""
    kd = [r for r in records if r["kernel"].startswith("_kd_")]
    assert len({r["arch"] for r in kd}) == 2
    bad = [(r["kernel"], r["arch"], r["constexprs"], r["options"], r["reg"], r["stack"], r["local"]) for r in kd
           if r["stack"] or r["local"] or r["ctas_per_sm"] < 2]
    assert not bad
    c100 = [r for r in kd if r["kernel"] == "_kd_tile_kernel" and r["constexprs"]["BLOCK_C"] == 128
            and r["grid_example"][0] > 1]  # C = 100, B = 8192
    assert c100 and all(r["ctas_per_sm"] >= 4 for r in c100)


@pytest.mark.slow
def test_masked_sgd_variants(records):
    sgd = [r["constexprs"] for r in records if r["kernel"] == "_masked_sgd_kernel" and r["arch"] == "sm_80"]
    modes = {(c["LR_FROM_PTR"], c["HAS_MOMENTUM"], c["NESTEROV"], c["ALIGNED"]) for c in sgd}
    assert modes == {(lr, m, n, a) for lr in (False, True) for m, n in ((False, False), (True, False), (True, True))
                     for a in (False, True)}


@pytest.mark.slow
def test_aligned_masked_sgd_moves_vectors(records):
    """With the tables' addresses known to be 16-byte aligned, the full blocks load and store vectors; without
    the hint every access of a table-read pointer is scalar."""
    sgd = [r for r in records if r["kernel"] == "_masked_sgd_kernel"]
    assert all(r["vector_accesses"] > 0 for r in sgd if r["constexprs"]["ALIGNED"])
    assert all(r["vector_accesses"] == 0 for r in sgd if not r["constexprs"]["ALIGNED"])


@pytest.mark.slow
def test_no_kernel_spills(records):
    spills = [(r["kernel"], r["arch"], r["constexprs"], r["stack"], r["local"]) for r in records
              if r["stack"] or r["local"]]
    assert not spills
    assert max(r["reg"] for r in records) <= 255


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["_kd_", "_count_", "_masked_sgd_", "_masked_matmul_", "_conv_"])
def test_at_least_two_ctas_per_sm(records, prefix):
    """Registers x threads and shared memory of every configuration leave room for two CTAs on each SM of both
    targets, so one CTA's memory waits overlap another's work."""
    mine = [r for r in records if r["kernel"].startswith(prefix)]
    assert mine
    low = [(r["kernel"], r["arch"], r["reg"], r["num_warps"], r["shared_total"], r["constexprs"]) for r in mine
           if r["ctas_per_sm"] < 2]
    assert not low


@pytest.mark.parametrize("regs, warps, shared, arch, ctas", [
    (139, 8, 0, "sm_90", 1),           # 144 x 32 = 4608 registers a warp: 14 warps fit, one CTA of 8
    (64, 8, 0, "sm_90", 4),            # 2048 a warp: 32 warps
    (32, 4, 0, "sm_90", 16),           # threads bound: 2048 / 128
    (16, 1, 0, "sm_90", 32),           # the resident-CTA bound
    (32, 4, 100 * 1024, "sm_90", 2),   # shared memory bound: 228 KB / (100 KB + 1 KB)
    (32, 4, 100 * 1024, "sm_80", 1),   # 164 KB on sm_80
    (255, 32, 0, "sm_90", 0),          # does not fit at all
])
def test_ctas_per_sm_by_hand(regs, warps, shared, arch, ctas):
    from dsd2.kernels.aot import ctas_per_sm

    assert ctas_per_sm(regs, warps, shared, arch) == ctas


def test_ctas_per_sm_refuses_an_unknown_arch_in_one_sentence():
    from dsd2.kernels.aot import ctas_per_sm

    with pytest.raises(ValueError, match="arch 'sm_70' has no SM limits here; allowed: sm_80, sm_90"):
        ctas_per_sm(32, 4, 0, "sm_70")


@pytest.mark.slow
def test_masked_layer_products_cover_every_mode_dtype_and_precision(records):
    """The masked linear kernel's three products (forward with and without bias, dX, dW) and the conv kernels on
    NCHW and channels_last, each in fp32 (IEEE and TF32), bf16 and fp16, with the mask read as bool bytes and as
    packed bits."""
    mm = [r for r in records if r["kernel"] == "_masked_matmul_kernel" and r["arch"] == "sm_90"]
    modes = {(r["signature"]["a_ptr"], r["constexprs"]["PRECISION"], r["constexprs"]["MASK_B"],
              r["constexprs"]["MASK_C"], r["constexprs"]["HAS_BIAS"], r["constexprs"]["PACKED"]) for r in mm}
    for (dtype, precision), packed in itertools.product(
            (("*fp32", "ieee"), ("*fp32", "tf32"), ("*bf16", "tf32"), ("*fp16", "tf32")), (False, True)):
        assert {(dtype, precision, True, False, True, packed), (dtype, precision, True, False, False, packed),
                (dtype, precision, False, True, False, packed)} <= modes
    for kernel, tensor in (("_conv_fwd_kernel", "x_ptr"), ("_conv_dgrad_kernel", "dy_ptr"),
                           ("_conv_wgrad_kernel", "x_ptr")):
        conv = [r for r in records if r["kernel"] == kernel and r["arch"] == "sm_90"]
        assert {(r["signature"][tensor], r["constexprs"]["PRECISION"], r["constexprs"]["C_FAST"],
                 r["constexprs"]["PACKED"]) for r in conv} == {
            (d, p, fast, packed) for d, p in (("*fp32", "ieee"), ("*fp32", "tf32"), ("*bf16", "tf32"),
                                              ("*fp16", "tf32")) for fast in (False, True) for packed in (False, True)}
        assert {r["signature"]["m_ptr"] for r in conv} == {"*u8"}


@pytest.mark.slow
def test_counting_atomics_are_relaxed(records):
    """Split counting adds partial counts atomically; only the sum matters, so no atomic may order memory."""
    atomic = [r for r in records if r["kernel"].startswith("_count_") and r["constexprs"].get("ATOMIC")]
    assert atomic
    assert not [(r["kernel"], r["arch"], r["ordered_atomics"]) for r in atomic if r["ordered_atomics"]]
