"""The sparse paths of the masked layers (dsd2.ops.sparse_layers at every CPU level; dsd2.ops.sparse_csr, CUDA's,
run on the CPU too) against the float64 oracle: forward, dX and dW (pruned entries exactly 0.0) and db within the
product tolerance the dense masked path is held
to, over odd shapes, stride, padding, dilation and groups, NCHW and channels_last, sparsity 0 %, 50 %, 97 %,
100 %, one kept weight and an empty output channel, at batch 1 and at a training batch. Then the layers' modes:
`on` / `off` / `auto`, the plan listed once per mask, the crossover cached on disk, bad modes refused."""

import json
import pickle

import pytest
import torch
from oracles import masked_conv2d_oracle, masked_linear_oracle

from dsd2.ops import (
    MaskedConv2d,
    MaskedLinear,
    SparsePlan,
    cpu_isa_levels,
    set_sparse_kernels,
    sparse_conv2d,
    sparse_linear,
    sparse_tune,
    use_cpu_isa,
)
from dsd2.ops.masked_linear import product_tolerance
from dsd2.ops.sparse_csr import csr_conv2d, csr_linear
from dsd2.ops.sparse_layers import batch_minor_layout, grid_layout

# (x shape, weight shape, stride, padding, dilation, groups)
CONV_CASES = [
    ((2, 3, 7, 6), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),     # odd sizes, grid layout
    ((2, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 0), (2, 1), 2),     # every knob at once: unfold layout
    ((1, 8, 5, 5), (8, 1, 3, 3), (1, 1), (1, 1), (1, 1), 8),     # depthwise
    ((3, 4, 2, 2), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),     # a 2x2 map (the VGG-like's last block)
    ((2, 5, 6, 7), (4, 5, 1, 1), (2, 2), (0, 0), (1, 1), 1),     # a 1x1 stride-2 shortcut
    ((2, 3, 12, 12), (4, 3, 3, 3), (1, 1), (2, 2), (2, 2), 1),   # dilation 2 on the grid
    ((128, 3, 6, 6), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),   # a training batch
    ((2, 4, 8, 8), (6, 4, 3, 3), (2, 2), (1, 1), (1, 1), 1),     # ResNet's stride-2 3x3, on the grid
    ((2, 3, 10, 10), (4, 3, 3, 3), (3, 3), (0, 0), (1, 1), 1),   # stride 3: unfolded
    ((128, 6, 2, 2), (5, 6, 3, 3), (1, 1), (1, 1), (1, 1), 1),   # a 2x2 map at batch 128: batch-minor, aligned runs
    ((3, 4, 1, 1), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),     # a 1x1 map: batch-minor, one tap reads it
    ((5, 4, 2, 3), (6, 2, 3, 3), (1, 1), (2, 2), (2, 2), 2),     # batch-minor, dilated and grouped
    ((16, 5, 4, 4), (6, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1),    # a 4x4 map: batch-minor below 98.5 % sparsity
]
CONV_IDS = ["odd", "all-knobs", "depthwise", "2x2-map", "1x1-s2", "dilated", "batch-128", "s2-grid", "s3-unfold",
            "2x2-batch-128", "1x1-map", "minor-dilated-grouped", "4x4-map"]


def layout_of(case, sparsity: float = 0.0) -> str:
    args = (case[0][2:], case[1][2:], case[2], case[3], case[4])
    return "batch-minor" if batch_minor_layout(*args, sparsity) else "grid" if grid_layout(*args) else "unfold"


def test_every_layout_is_covered():
    """Every layout runs at the tests' densities; the 4x4 map on batch-minor grids at 3, 50 and 100 % kept, on the
    padded grid at 0 % kept (sparsity 100 %)."""
    layouts = {i: layout_of(c) for i, c in zip(CONV_IDS, CONV_CASES)}
    assert layouts["s2-grid"] == "grid" and layouts["odd"] == "grid" and layouts["dilated"] == "grid"
    assert layouts["s3-unfold"] == "unfold"
    assert {layouts[i] for i in ("2x2-map", "2x2-batch-128", "1x1-map", "minor-dilated-grouped", "4x4-map")} == {
        "batch-minor"}
    case = CONV_CASES[CONV_IDS.index("4x4-map")]
    assert layout_of(case, 0.97) == "batch-minor" and layout_of(case, 0.99) == "grid"
    assert layout_of(CONV_CASES[CONV_IDS.index("2x2-map")], 0.999) == "batch-minor"


def test_a_call_between_forward_and_backward_leaves_the_batch_minor_gradient_right(cpu_isa_level):
    """The layer's kept grid holds the last call's input: a second forward before the first's backward makes
    that backward copy its own input onto the grid again."""
    case = CONV_CASES[CONV_IDS.index("2x2-batch-128")]
    x, w, mask, b, grad_out = conv_problem(case, 0.3, "channels_last")
    plan = SparsePlan(mask)
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = sparse_conv2d(xs, ws, plan, bs, (1, 1), (1, 1), (1, 1))
    other = sparse_conv2d(torch.randn_like(x).requires_grad_(), ws, plan, bs, (1, 1), (1, 1), (1, 1))
    y.backward(grad_out)
    check_conv(case, x, w, mask, b, grad_out, (y.detach(), xs.grad, ws.grad, bs.grad))
    assert other.shape == y.shape
DENSITIES = [0.0, 0.03, 0.5, 1.0]


def assert_within(got, oracle, key, reduction):
    tol = product_tolerance(torch.float32, reduction) * oracle[f"{key}_terms"] + 1e-30
    err = (got.double() - oracle[key]).abs()
    assert bool((err <= tol).all()), f"{key}: worst error {float((err - tol).max()):.3g} over the bound"


def conv_problem(case, density, layout, seed=0):
    x_shape, w_shape, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(w_shape, generator=g)
    mask = torch.rand(w_shape, generator=g) < density
    b = torch.randn(w_shape[0], generator=g)
    out_hw = [(s + 2 * p - d * (k - 1) - 1) // st + 1
              for s, k, st, p, d in zip(x_shape[2:], w_shape[2:], stride, padding, dilation)]
    grad_out = torch.randn(x_shape[0], w_shape[0], *out_hw, generator=g)
    if layout == "channels_last":  # as a channels_last network's backward hands it over
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    return x, w, mask, b, grad_out


def run_conv(case, x, w, mask, b, grad_out, conv=sparse_conv2d):
    _, _, stride, padding, dilation, groups = case
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = conv(x, w, SparsePlan(mask, groups), b, stride, padding, dilation)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, b.grad


def check_conv(case, x, w, mask, b, grad_out, got):
    y, dx, dw, db = got
    _, w_shape, stride, padding, dilation, groups = case
    oracle = masked_conv2d_oracle(x, w, mask, b, grad_out, stride, padding, dilation, groups)
    taps = w_shape[2] * w_shape[3]
    positions = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
    assert_within(y, oracle, "y", w_shape[1] * taps)
    assert_within(dx, oracle, "dx", w_shape[0] // groups * taps)
    assert_within(dw, oracle, "dw", positions)
    assert_within(db, oracle, "db", positions)
    assert bool((dw[~mask] == 0).all())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_sparse_conv_matches_the_oracle(case, density, layout, cpu_isa_level):
    x, w, mask, b, grad_out = conv_problem(case, density, layout)
    got = run_conv(case, x, w, mask, b, grad_out)
    check_conv(case, x, w, mask, b, grad_out, got)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CONV_CASES[:2], ids=CONV_IDS[:2])
def test_one_kept_weight_and_an_empty_output_channel(case, cpu_isa_level):
    x, w, mask, b, grad_out = conv_problem(case, 0.5, "nchw")
    one = torch.zeros_like(mask)
    one.view(-1)[one.numel() // 2] = True
    check_conv(case, x, w, one, b, grad_out, run_conv(case, x, w, one, b, grad_out))
    mask[1] = False
    check_conv(case, x, w, mask, b, grad_out, run_conv(case, x, w, mask, b, grad_out))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_csr_conv_matches_the_oracle(case, density, layout):
    """The CUDA sparse path (torch.sparse CSR products), run here on the CPU: the same cases, the same bounds."""
    x, w, mask, b, grad_out = conv_problem(case, density, layout)
    got = run_conv(case, x, w, mask, b, grad_out, conv=csr_conv2d)
    check_conv(case, x, w, mask, b, grad_out, got)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CONV_CASES[:2], ids=CONV_IDS[:2])
def test_csr_one_kept_weight_and_an_empty_output_channel(case):
    x, w, mask, b, grad_out = conv_problem(case, 0.5, "nchw")
    one = torch.zeros_like(mask)
    one.view(-1)[one.numel() // 2] = True
    check_conv(case, x, w, one, b, grad_out, run_conv(case, x, w, one, b, grad_out, conv=csr_conv2d))
    mask[1] = False
    check_conv(case, x, w, mask, b, grad_out, run_conv(case, x, w, mask, b, grad_out, conv=csr_conv2d))


# the batch is the rows' vector axis: short rows in one or two vectors at a pass (1, 7, 40), long ones in blocks of
# 8, 4, 2 and 1 vectors and a scalar tail (120, 128, 200), at every level's width
@pytest.mark.parametrize("batch", [1, 7, 40, 120, 128, 200])
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_linear_matches_the_oracle(batch, density, cpu_isa_level):
    check_linear(sparse_linear, batch, density)


@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("density", DENSITIES)
def test_csr_linear_matches_the_oracle(batch, density):
    """The CUDA sparse path (torch.sparse CSR products), run here on the CPU."""
    check_linear(csr_linear, batch, density)


def check_linear(linear, batch, density):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 37, generator=g, requires_grad=True)
    w = torch.randn(19, 37, generator=g, requires_grad=True)
    b = torch.randn(19, generator=g, requires_grad=True)
    mask = torch.rand(19, 37, generator=g) < density
    mask[3] = False  # an empty output row
    grad_out = torch.randn(batch, 19, generator=g)
    y = linear(x, w, SparsePlan(mask), b)
    y.backward(grad_out)
    oracle = masked_linear_oracle(x.detach(), w.detach(), mask, b.detach(), grad_out)
    assert_within(y.detach(), oracle, "y", 37)
    assert_within(x.grad, oracle, "dx", 19)
    assert_within(w.grad, oracle, "dw", batch)
    assert_within(b.grad, oracle, "db", batch)
    assert bool((w.grad[~mask] == 0).all())


def test_a_list_long_enough_to_be_prepared_on_both_threads(cpu_isa_level):
    """Over 65,536 kept weights the entry list is prepared by the thread pool, into the calling thread's buffer."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 400, generator=g, requires_grad=True)
    w = torch.randn(300, 400, generator=g, requires_grad=True)
    mask = torch.rand(300, 400, generator=g) < 0.7  # about 84,000 kept
    grad_out = torch.randn(3, 300, generator=g)
    y = sparse_linear(x, w, SparsePlan(mask))
    y.backward(grad_out)
    oracle = masked_linear_oracle(x.detach(), w.detach(), mask, None, grad_out)
    assert_within(y.detach(), oracle, "y", 400)
    assert_within(x.grad, oracle, "dx", 300)
    assert_within(w.grad, oracle, "dw", 3)


# (batch, in, out, h, w, padding, stride, kept): tiles of 2,048 positions (few input channels) and of 1,024, 256
# and 128 (8, 32 and 64 or more: the rows kernels' tile shrinks as the operand's rows grow) that cut map rows and
# images, chunks of 32 output rows and a part of one, strides on the grid, every weight and none kept
MAP_CASES = [(4, 3, 40, 20, 30, 1, 1, 0.5), (3, 4, 70, 17, 13, 2, 1, 0.3), (2, 3, 33, 8, 8, 1, 2, 0.6),
             (5, 6, 9, 12, 10, 0, 2, 0.4), (128, 8, 32, 8, 8, 1, 1, 0.05), (1, 8, 5, 5, 7, 1, 1, 1.0),
             (2, 6, 3, 7, 7, 1, 1, 0.0), (3, 32, 20, 9, 11, 1, 1, 0.2), (2, 70, 5, 6, 13, 1, 2, 0.1)]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", MAP_CASES)
def test_rows_into_a_map_are_the_two_calls_bit_for_bit(case, layout, cpu_isa_level):
    """`sparse_rows_map_` (the rows kernel's tiles stored straight into the map) gives the very bits of
    `sparse_rows_` into a grid then `grid_copy_` out of it: at a stride's positions for an output, at the
    padding's offset for an input gradient."""
    from dsd2.ops._backend import cpp_extension

    ext = cpp_extension()
    n, c, oc, h, w, pad, stride, kept = case
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(oc, c, 3, 3, generator=g) < kept
    plan = SparsePlan(mask)
    hp, wp = h + 2 * pad, w + 2 * pad
    shift, _, most = plan.shifts(wp, (1, 1))
    length = n * hp * wp
    grid = torch.randn(c, length + most, generator=g)
    val, bias = plan.values(torch.randn(oc, c, 3, 3, generator=g)), torch.randn(oc, generator=g)
    rows = torch.empty(oc, length)
    ext.sparse_rows_(rows, length, grid, plan.rowptr, plan.channel, shift, val, bias)
    ho, wo = (h + 2 * pad - 3) // stride + 1, (w + 2 * pad - 3) // stride + 1
    for at, step, size in [((0, 0), (stride, stride), (ho, wo)), ((pad, pad), (1, 1), (h, w))]:
        expect = torch.empty((n, oc, *size), memory_format=layout)
        ext.grid_copy_(rows, expect, hp, wp, *at, False, *step)
        got = torch.full((n, oc, *size), float("nan")).contiguous(memory_format=layout)
        ext.sparse_rows_map_(got, hp, wp, *at, *step, length, grid, plan.rowptr, plan.channel, shift, val, bias)
        assert torch.equal(got, expect)
    with pytest.raises(RuntimeError, match="does not fit grids"):
        ext.sparse_rows_map_(torch.empty(n, oc, hp + 1, w), hp, wp, pad, pad, 1, 1, length, grid, plan.rowptr,
                             plan.channel, shift, val, bias)


# (rows, operand rows, positions): few operand rows take dots of 2,048 positions (two and a tail that is not a
# whole block); 300 take tiles of 512 (their runs would be 2.4 MB at 2,048), three and a tail
DOT_CASES = [(10, 7, 2 * 2048 + 77), (10, 300, 3 * 512 + 77)]


@pytest.mark.parametrize("rows,operand_rows,n", DOT_CASES)
def test_weight_gradient_dots_have_the_same_bits_at_every_level(rows, operand_rows, n):
    """`sparse_dots_` takes a row's entries four at a time at 512 bits (one load of the gradient's vector for
    four products) and one at a time below: each dot's terms go to the same 64 partial sums, folded in the same
    tree, so the levels with FMA (AVX2, AVX-512) give the same bits; `default` has no FMA and rounds each product
    before adding it. Rows of 0 to 9 entries (whole groups and every remainder); every level within reduction
    order of float64."""
    from dsd2.ops._backend import cpp_extension

    g = torch.Generator().manual_seed(6)
    counts = torch.arange(rows)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    nnz = int(rowptr[-1])
    col = torch.randint(0, operand_rows, (nnz,), generator=g)
    off = torch.randint(0, 40, (nnz,), generator=g)
    a = torch.randn(rows, n, generator=g)
    x = torch.randn(operand_rows, n + 40, generator=g)
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    exact = torch.stack([(a[r].double() * x[c, o:o + n].double()).sum() for r, c, o in
                         zip(row_of.tolist(), col.tolist(), off.tolist())])
    results = {}
    for level in cpu_isa_levels():
        with use_cpu_isa(level):
            dval = torch.full((nnz,), float("nan"))
            cpp_extension().sparse_dots_(dval, a, n, x, rowptr, col, off)
        results[level] = dval
        scale = torch.stack([(a[r].double().abs() * x[c, o:o + n].double().abs()).sum() for r, c, o in
                             zip(row_of.tolist(), col.tolist(), off.tolist())])
        # each dot a chain of at most n / 64 + 8 roundings (a tile's lane, its fold, the tiles' sum), each at most
        # 2^-24 of the magnitudes
        bound = (n / 64 + 8) * 2.0 ** -24 * scale
        assert bool(((dval.double() - exact).abs() <= bound).all()), level
    fused = [level for level in results if level != "default"]  # one level only on an AVX2 CPU: nothing to compare
    for level in fused:
        assert torch.equal(results[level], results[fused[0]]), level


def test_pruned_weights_holding_inf_and_nan_are_never_read():
    x, w, mask, b, grad_out = conv_problem(CONV_CASES[0], 0.5, "nchw")
    w[~mask] = float("nan")
    w.view(-1)[(~mask).view(-1).nonzero()[0]] = float("inf")
    for conv in (sparse_conv2d, csr_conv2d):
        y, dx, dw, _ = run_conv(CONV_CASES[0], x, w, mask, b, grad_out, conv=conv)
        assert bool(torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all())


def layers():
    torch.manual_seed(0)
    conv = MaskedConv2d(6, 8, 3, padding=1)
    lin = MaskedLinear(20, 7)
    for layer in (conv, lin):
        layer.mask.copy_(torch.rand_like(layer.weight) > 0.9)
    return [(conv, torch.randn(4, 6, 9, 9)), (lin, torch.randn(5, 20))]


def outputs(layer, x):
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.square().sum().backward()
    grads = (xi.grad, layer.weight.grad.clone())
    layer.weight.grad = None
    return y.detach(), *grads


@pytest.mark.parametrize("index", [0, 1], ids=["conv", "linear"])
def test_on_and_off_compute_the_same_layer(index):
    layer, x = layers()[index]
    layer.sparse_kernels = "off"
    dense = outputs(layer, x)
    assert layer.sparse_path == "dense"
    layer.sparse_kernels = "on"
    sparse = outputs(layer, x)
    assert layer.sparse_path == "sparse"
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the sparse kernels are fp32: autocast stays dense
        layer(x)
    assert layer.sparse_path == "dense"
    layer.sparse_kernels = "on"
    layer(x)
    layer.sparse_kernels = "off"  # the linear layer's one-call CPU path says so too
    assert torch.equal(layer(x), dense[0]) and layer.sparse_path == "dense"
    again = pickle.loads(pickle.dumps(layer))  # the plan is not pickled, and rebuilt from the mask
    assert "_plan" not in again.__dict__ and torch.equal(again(x), layer(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("index", [0, 1], ids=["conv", "linear"])
def test_on_a_cuda_layer_takes_the_csr_path_and_computes_the_same_layer(index, monkeypatch):
    import dsd2.ops.masked_layers as masked_layers_module

    layer, x = layers()[index]
    layer, x = layer.cuda(), x.cuda()
    calls = []
    for name in ("csr_conv2d", "csr_linear"):
        real = getattr(masked_layers_module, name)
        monkeypatch.setattr(masked_layers_module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    layer.sparse_kernels = "off"
    dense = outputs(layer, x)
    layer.sparse_kernels = "on"
    sparse = outputs(layer, x)
    assert layer.sparse_path == "sparse" and calls
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 only: autocast stays dense
        layer(x)
    assert layer.sparse_path == "dense"


def test_the_plan_is_listed_once_per_mask(monkeypatch):
    layer, x = layers()[0]
    layer.sparse_kernels = "on"
    built = []
    init = SparsePlan.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(SparsePlan, "__init__", counted)
    for _ in range(3):
        outputs(layer, x)
    assert len(built) == 1
    with torch.no_grad():
        layer.mask[0] = False  # a new level's mask: listed again, and used
    y = layer(x)
    assert len(built) == 2
    layer.sparse_kernels = "off"
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


def test_auto_measures_the_crossover_once_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD2_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sparse_tune, "_memory", {})
    calls = []
    measure = sparse_tune.measure

    def counted(*args):
        calls.append(1)
        return measure(*args)

    monkeypatch.setattr(sparse_tune, "measure", counted)
    (conv, x), _ = layers()
    set_sparse_kernels(conv, "auto")
    outputs(conv, x)
    table = json.loads((tmp_path / sparse_tune.CACHE_FILE).read_text())
    assert len(calls) == 1 and len(table) == 1
    (value,) = table.values()
    assert value == sparse_tune.NEVER or sparse_tune.FLOOR <= value < 1
    assert conv.sparse_path == ("sparse" if 0.9 >= value else "dense")
    monkeypatch.setattr(sparse_tune, "_memory", {})
    fresh, _ = layers()
    set_sparse_kernels(fresh[0], "auto")
    outputs(fresh[0], x)  # another layer of the same shape, another process: read from the file
    assert len(calls) == 1
    conv.mask.fill_(True)  # 0 % sparse: below the floor, dense whatever the crossover
    outputs(conv, x)
    assert conv.sparse_path == "dense"


def test_a_bad_mode_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"^sparse kernels 'fast' is not known; allowed: auto, on, off$"):
        set_sparse_kernels(layers()[0][0], "fast")


def test_a_sparse_call_that_fails_while_measured_keeps_auto_dense_and_caches_nothing(tmp_path, monkeypatch):
    """auto must not end a run on an optional path: a sparse product that raises (a torch.sparse build without it,
    a GPU out of memory) leaves the layer dense with one warning, and the next process measures again."""
    import importlib

    masked_layers_module = importlib.import_module("dsd2.ops.masked_layers")  # the attribute is the function
    monkeypatch.setenv("DSD2_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sparse_tune, "_memory", {})

    def broken(*args, **kwargs):
        raise RuntimeError("sampled_addmm: not implemented for this build\nsecond line")

    monkeypatch.setattr(masked_layers_module, "sparse_conv2d", broken)
    (conv, x), _ = layers()
    set_sparse_kernels(conv, "auto")
    dense = conv.to_dense()
    with pytest.warns(RuntimeWarning, match=r"failed while its crossover was measured \(RuntimeError: "
                                            r"sampled_addmm: not implemented for this build\); .* keeps it dense"):
        y = conv(x)
    assert conv.sparse_path == "dense" and not (tmp_path / sparse_tune.CACHE_FILE).exists()
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, torch.where(conv.mask, dense.weight, 0.0), dense.bias,
                                                             conv.stride, conv.padding, conv.dilation, conv.groups))
    set_sparse_kernels(conv, "on")  # chosen by the user: the error as it is
    with pytest.raises(RuntimeError, match="not implemented for this build"):
        conv(x)
