"""masked_linear on every backend against the float64 oracle: forward, dX, dW (pruned entries exactly 0.0) and db,
at the stated product tolerance; gradcheck in float64; odd sizes, views, 0 % / 100 % masks, a pruned output row,
non-finite pruned weights; the C++ path bit for bit against nn.Linear on the masked weight."""

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from isa_levels import per_level
from oracles import masked_linear_oracle

from dsd2.ops import masked_linear, pack_mask
from dsd2.ops._backend import cpp_extension
from dsd2.ops.masked_linear import product_tolerance

SHAPES = [((5, 7), 6), ((33, 70), 19), ((2, 3, 17), 4)]  # (x shape, out features): odd sizes, a 3-D input


def device_of(backend):
    return triton_device() if backend == "triton" else "cpu"


def problem(x_shape, out_features, density=0.5, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g).to(dtype)
    w = torch.randn(out_features, x_shape[-1], generator=g).to(dtype)
    mask = torch.rand(w.shape, generator=g) < density
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    grad_out = torch.randn(*x_shape[:-1], out_features, generator=g).to(dtype)
    return x, w, mask, b, grad_out


def run(backend, x, w, mask, b, grad_out):
    """Forward and backward on `backend`'s device: (y, dx, dw, db) back on the CPU."""
    dev = device_of(backend)
    x, w = (t.detach().to(dev, copy=True).requires_grad_() for t in (x, w))
    b = b.detach().to(dev, copy=True).requires_grad_() if b is not None else None
    y = masked_linear(x, w, mask.to(dev), b, backend=backend)
    y.backward(grad_out.to(dev))
    return y.detach().cpu(), x.grad.cpu(), w.grad.cpu(), (b.grad.cpu() if b is not None else None)


def assert_within(got, oracle, key, dtype, reduction):
    tol = product_tolerance(dtype, reduction) * oracle[f"{key}_terms"] + 1e-30
    err = (got.double() - oracle[key]).abs()
    assert bool((err <= tol).all()), f"{key}: worst error {float((err - tol).max()):.3g} over the bound"


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("x_shape, out_features", SHAPES)
def test_fp32_matches_the_oracle_within_reduction_order(backend, cpu_isa_level, x_shape, out_features):
    x, w, mask, b, grad_out = problem(x_shape, out_features)
    y, dx, dw, db = run(backend, x, w, mask, b, grad_out)
    oracle = masked_linear_oracle(x, w, mask, b, grad_out)
    rows = grad_out.numel() // out_features
    assert_within(y, oracle, "y", torch.float32, x_shape[-1])
    assert_within(dx, oracle, "dx", torch.float32, out_features)
    assert_within(dw, oracle, "dw", torch.float32, rows)
    assert_within(db, oracle, "db", torch.float32, rows)
    assert bool((dw[~mask] == 0).all())


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_the_oracle_within_its_tolerance(backend, cpu_isa_level, dtype):
    x, w, mask, b, grad_out = problem((9, 40), 11, dtype=dtype)
    y, dx, dw, db = run(backend, x, w, mask, b, grad_out)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    oracle = masked_linear_oracle(x, w, mask, b, grad_out)
    assert_within(y, oracle, "y", dtype, 40)
    assert_within(dx, oracle, "dx", dtype, 11)
    assert_within(dw, oracle, "dw", dtype, 9)
    assert bool((dw[~mask] == 0).all())


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "reference"))
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_in_float64(backend, cpu_isa_level, bias):
    x, w, mask, b, _ = problem((4, 5), 3, dtype=torch.float64, bias=bias)
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_() if bias else None)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, mask, b, backend=backend), inputs)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_views_of_other_layouts(backend, cpu_isa_level):
    """A transposed input and a strided weight view give what their contiguous copies give."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 9, generator=g).t()  # [9, 13], column-major
    w = torch.randn(7, 26, generator=g)[:, ::2]  # [7, 13], every other column
    mask = torch.rand(7, 13, generator=g) < 0.6
    grad_out = torch.randn(9, 7, generator=g)
    y, dx, dw, _ = run(backend, x, w, mask, None, grad_out)
    oracle = masked_linear_oracle(x, w, mask, None, grad_out)
    assert_within(y, oracle, "y", torch.float32, 13)
    assert_within(dx, oracle, "dx", torch.float32, 7)
    assert_within(dw, oracle, "dw", torch.float32, 9)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_all_kept_all_pruned_and_a_pruned_output_row(backend, cpu_isa_level):
    x, w, _, b, grad_out = problem((6, 10), 5)
    full = torch.ones(5, 10, dtype=torch.bool)
    y, *_ = run(backend, x, w, full, b, grad_out)
    assert_within(y, masked_linear_oracle(x, w, full, b, grad_out), "y", torch.float32, 10)

    y, dx, dw, db = run(backend, x, w, torch.zeros_like(full), b, grad_out)
    assert torch.equal(y, b.expand(6, 5)) and bool((dx == 0).all()) and bool((dw == 0).all())
    assert_within(db, masked_linear_oracle(x, w, full, b, grad_out), "db", torch.float32, 6)

    row = full.clone()
    row[2] = False  # output 2 wholly pruned: its output is its bias, its weight row takes no gradient
    y, dx, dw, _ = run(backend, x, w, row, b, grad_out)
    assert torch.equal(y[:, 2], b[2].expand(6)) and bool((dw[2] == 0).all())
    assert_within(dx, masked_linear_oracle(x, w, row, b, grad_out), "dx", torch.float32, 5)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_pruned_weights_holding_inf_and_nan_contribute_nothing(backend, cpu_isa_level):
    x, w, mask, b, grad_out = problem((4, 8), 3)
    w[~mask] = float("nan")
    w[~mask & (torch.arange(8) % 2 == 0)] = float("inf")
    y, dx, dw, _ = run(backend, x, w, mask, b, grad_out)
    assert bool(torch.isfinite(y).all() and torch.isfinite(dx).all()) and bool((dw[~mask] == 0).all())
    assert_within(y, masked_linear_oracle(x, w, mask, b, grad_out), "y", torch.float32, 8)


@pytest.mark.parametrize("cpu_isa_level", [None], ids=["process-level"])
def test_cpp_is_nn_linear_on_the_masked_weight_bit_for_bit(cpu_isa_level):
    """The C++ path computes with the same oneDNN/MKL products as nn.Linear: on a weight already zero where it is
    pruned (the level loop's), its output and gradients are those of the plain layer, bit for bit."""
    x, w, mask, b, grad_out = problem((32, 64), 48)
    w = w * mask
    y, dx, dw, db = run("cpp", x, w, mask, b, grad_out)
    yr, dxr, dwr, dbr = nn_linear(x, w, b, grad_out)
    assert torch.equal(y, yr) and torch.equal(dx, dxr) and torch.equal(db, dbr)
    assert torch.equal(dw[mask], dwr[mask]) and bool((dw[~mask] == 0).all())


def nn_linear(x, w, b, grad_out):
    """F.linear's forward and backward: (y, dx, dw, db)."""
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    yr = F.linear(xr, wr, br)
    yr.backward(grad_out)
    return yr.detach(), xr.grad, wr.grad, br.grad


@pytest.fixture
def linear_split():
    """dsd2._C at two threads (the split's smallest case); after the test, the threads and the split's mode back
    as they were (auto, keeping what it had measured)."""
    from dsd2.ops import cpp_extension

    ext, threads = cpp_extension(), torch.get_num_threads()
    torch.set_num_threads(2)
    yield ext
    torch.set_num_threads(threads)
    ext.set_linear_split("auto")


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
@pytest.mark.parametrize("rows, in_features, out_features", [(128, 784, 300), (67, 300, 101), (128, 256, 10),
                                                             (64, 100, 64)])
def test_cpp_backward_products_split_by_rows_are_nn_linear_bit_for_bit(linear_split, cpu_isa_level, mode, rows,
                                                                      in_features, out_features):
    """The backward's products, split into one product per thread over blocks of rows (dX by the batch, dW by the
    output rows, each block masked as it is made), run side by side (dX on one thread, dW on the other: "on" with
    784->300 and 300->101) or neither: the gradients are nn.Linear's bit for bit, at two threads, an odd batch and
    odd widths included, an all-pruned output row too."""
    linear_split.set_linear_split(mode)
    x, w, mask, b, grad_out = problem((rows, in_features), out_features, density=0.2, seed=rows)
    mask[3] = False
    w = w * mask
    y, dx, dw, db = run("cpp", x, w, mask, b, grad_out)
    yr, dxr, dwr, dbr = nn_linear(x, w, b, grad_out)
    assert torch.equal(y, yr) and torch.equal(dx, dxr) and torch.equal(db, dbr)
    assert torch.equal(dw, torch.where(mask, dwr, 0.0))


def test_cpp_auto_split_measures_each_shape_once_and_lists_it(linear_split):
    """`auto` times a splittable shape's two ways at its first call and keeps the verdict: the shape is listed once
    per choice (product, rows, cols, depth, threads, split) however often it runs: each product split by rows or
    not, and both side by side or one after the other; a shape too small to split is not listed."""
    linear_split.set_linear_split("auto")
    for _ in range(3):
        run("cpp", *problem((96, 320), 160, density=0.2))
        run("cpp", *problem((96, 16), 8, density=0.2))
    listed = [c for c in linear_split.linear_split_choices() if c[4] == 2 and c[1:4] in {(96, 320, 160),
                                                                                         (160, 320, 96)}]
    assert sorted(c[0] for c in listed) == ["both_masked", "grad_input", "grad_weight_masked"]
    assert not [c for c in linear_split.linear_split_choices() if 16 in c[1:4] and 8 in c[1:4]]


def test_cpp_linear_split_refuses_an_unknown_mode_in_one_sentence(linear_split):
    with pytest.raises(RuntimeError, match="linear split 'fast' is not known; allowed: auto, on, off"):
        linear_split.set_linear_split("fast")


def test_cpp_under_cpu_autocast_is_nn_linear_under_autocast():
    x, w, mask, b, _ = problem((16, 24), 8)
    w = (w * mask).requires_grad_()
    plain = w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_linear(x, w, mask, b, backend="cpp")
        yr = F.linear(x, plain, b)
    assert y.dtype == torch.bfloat16 and torch.equal(y, yr)
    y.float().sum().backward()
    yr.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad[mask], plain.grad[mask])
    assert bool((w.grad[~mask] == 0).all())


def _edge_values(n=4099, seed=3):
    """fp32 over its whole range (denormals to the largest finite) with ties, signed zeros, inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * torch.logspace(-45, 38, n)
    w[:12] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"),
                           1.00390625, 1.01171875, 2.0**-127])  # 1.00390625, 1.01171875: ties to even, down and up
    return w


def test_cpp_masks_and_casts_to_bf16_in_one_pass_as_autocast_casts(cpu_isa_level):
    w = _edge_values().reshape(-1, 1).requires_grad_()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    mask[:12] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wm = cpp_extension().masked_weight(w, mask)
    expected = torch.where(mask, w.detach(), 0.0).to(torch.bfloat16)
    nan = expected.isnan()  # NaN stays NaN; its bits are not compared: torch's scalar and vector casts differ there
    assert wm.dtype == torch.bfloat16 and torch.equal(wm.isnan(), nan) and int(nan.sum()) == 1
    assert torch.equal(wm.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    g = _edge_values(seed=5).to(torch.bfloat16).reshape(w.shape)
    wm.backward(g)
    assert w.grad.dtype == torch.float32
    assert torch.equal(w.grad.view(torch.int32), torch.where(mask, g.float(), 0.0).view(torch.int32))


def test_bad_masks_are_refused_in_one_sentence():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="the mask must be a bool tensor \\(True = kept\\) or a dsd2.ops.PackedMask, "
                                        "not torch.float32"):
        masked_linear(x, w, torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"mask shape \(3, 4\) differs from weight shape \(4, 3\)"):
        masked_linear(x, w, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask shape \(2, 6\) differs from weight shape \(4, 3\)"):
        masked_linear(x, w, pack_mask(torch.ones(2, 6, dtype=torch.bool)))
    with pytest.raises(ValueError, match="the mask is on meta but the weight on cpu"):
        masked_linear(x, w, torch.ones(4, 3, dtype=torch.bool, device="meta"))
    dev = triton_device()
    with pytest.raises(TypeError, match="the input is torch.float32 but the weight torch.bfloat16; give both one"):
        masked_linear(x.to(dev), w.to(dev, torch.bfloat16), torch.ones(4, 3, dtype=torch.bool, device=dev),
                      backend="triton")


@pytest.mark.parametrize("cpu_isa_level", [None], ids=["process-level"])
def test_cpp_masks_the_weight_gradient_in_place_only_when_nothing_else_holds_it(cpu_isa_level):
    """A gradient kept elsewhere (here by retain_grad on W⊙M) is not masked under its holder's feet."""
    from dsd2.ops import cpp_extension

    x, w, mask, _, grad_out = problem((6, 9), 5)
    w.requires_grad_()
    wm = cpp_extension().masked_weight(w, mask)
    wm.retain_grad()
    F.linear(x, wm).backward(grad_out)
    unmasked = grad_out.t() @ x
    torch.testing.assert_close(wm.grad, unmasked)
    assert bool((w.grad[~mask] == 0).all()) and torch.equal(w.grad[mask], wm.grad[mask])


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_uses_a_weight_already_zero_where_pruned_as_it_is(backend, cpu_isa_level, dtype):
    """W⊙M is W when every pruned entry is +0 or -0 (the loop's weights): no copy is made, with or without
    autograd; one nonzero pruned entry, even the last one, and the masked copy is made instead."""
    from dsd2.ops import cpp_extension

    ext = cpp_extension()
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(300, 500, generator=g) < 0.3
    clean = (torch.randn(300, 500, generator=g) * mask).to(dtype)
    clean[~mask & (torch.arange(500) % 3 == 0)] = -0.0
    dirty = clean.clone()
    dirty.view(-1)[int((~mask).view(-1).nonzero()[-1])] = 1e-30 if dtype == torch.float32 else 1e-3
    expected = torch.where(mask, dirty, torch.zeros((), dtype=dtype))
    for grad in (False, True):
        w_clean, w_dirty = clean.clone().requires_grad_(grad), dirty.clone().requires_grad_(grad)
        got_clean, got_dirty = ext.masked_weight(w_clean, mask), ext.masked_weight(w_dirty, mask)
        assert got_clean.data_ptr() == w_clean.data_ptr() and torch.equal(got_clean, clean)
        assert got_dirty.data_ptr() != w_dirty.data_ptr() and torch.equal(got_dirty, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 63, 64, 65, 127, 200, 8193])
def test_cpp_check_and_masking_see_every_lane(n, dtype, cpu_isa_level):
    """The check finds one nonzero pruned entry wherever it lies (each lane of a 64-weight block, the scalar tail,
    -0.0 and denormals counted right), and the masked copy is torch.where's bit for bit, at every level."""
    from dsd2.ops import cpp_extension

    ext = cpp_extension()
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.5
    mask[0] = False
    clean = torch.where(mask, torch.randn(n, generator=g), torch.tensor(-0.0)).to(dtype)
    assert ext.masked_weight(clean, mask).data_ptr() == clean.data_ptr()
    tiny = torch.finfo(dtype).tiny / 4  # a denormal: nonzero, so not W⊙M
    for at in sorted({0, 1, 15, 16, 31, 32, 47, 63, 64, n - 1} & set(range(n))):
        if mask[at]:
            continue
        for value in (tiny, -1.0, float("nan")):
            dirty = clean.clone()
            dirty[at] = value
            got = ext.masked_weight(dirty, mask)
            assert got.data_ptr() != dirty.data_ptr(), (at, value)
            expected = torch.where(mask, dirty, torch.zeros((), dtype=dtype))
            assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "reference"))
def test_gradgradcheck_in_float64(backend, cpu_isa_level):
    x, w, mask, b, _ = problem((3, 4), 2, dtype=torch.float64)
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradgradcheck(lambda x, w, b: masked_linear(x, w, mask, b, backend=backend), inputs)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("x_shape, out_features", SHAPES)
def test_a_bit_packed_mask_gives_the_bool_masks_results_bit_for_bit(backend, cpu_isa_level, x_shape, out_features):
    """The Triton kernels read each weight's bit as its tile is loaded (the forward through the transposed bit
    strides); the other backends unpack. Same tiles, same products: the same bits as with the bool mask."""
    x, w, mask, b, grad_out = problem(x_shape, out_features, seed=3)
    want = run(backend, x, w, mask, b, grad_out)
    got = run(backend, x, w, pack_mask(mask), b, grad_out)
    for name, g, e in zip(("y", "dx", "dw", "db"), got, want):
        assert torch.equal(g, e), name
