"""masked_conv2d on every backend against the float64 oracle: forward, dX, dW (pruned entries exactly 0.0) and db
at the stated product tolerance, over stride, padding, dilation and groups, NCHW, channels_last and strided inputs;
gradcheck in float64; 0 % / 100 % masks and a wholly pruned output channel; the C++ path bit for bit against the
plain layers (nn.Conv2d, and dsd2's small-map Conv2d) on the masked weight, in fp32 and under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from isa_levels import per_level
from oracles import masked_conv2d_oracle

from dsd2.models import Conv2d as SmallMapConv2d
from dsd2.ops import masked_conv2d, pack_mask
from dsd2.ops.masked_linear import product_tolerance

# (x shape, weight shape, stride, padding, dilation, groups)
CASES = [
    ((2, 3, 7, 6), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),     # odd sizes
    ((2, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 0), (2, 1), 2),     # every knob at once, a non-square kernel
    ((1, 8, 5, 5), (8, 1, 3, 3), (1, 1), (1, 1), (1, 1), 8),     # depthwise
    ((3, 4, 4, 4), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),     # a 4x4 map: the CPU's small-map weight gradient
    ((2, 5, 6, 7), (4, 5, 1, 1), (2, 2), (0, 0), (1, 1), 1),     # a 1x1 stride-2 shortcut
]
IDS = ["odd", "all-knobs", "depthwise", "small-map", "1x1-s2"]
LAYOUTS = ["nchw", "channels_last", "strided"]


def device_of(backend):
    return triton_device() if backend == "triton" else "cpu"


def problem(case, layout="nchw", dtype=torch.float32, density=0.5, seed=0, bias=True):
    x_shape, w_shape, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape[0], x_shape[1], x_shape[2] + 2, x_shape[3], generator=g).to(dtype)
    x = x[:, :, 1:-1] if layout == "strided" else x[:, :, :x_shape[2]].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(w_shape, generator=g).to(dtype)
    mask = torch.rand(w_shape, generator=g) < density
    b = torch.randn(w_shape[0], generator=g).to(dtype) if bias else None
    out_hw = [(s + 2 * p - d * (k - 1) - 1) // st + 1
              for s, k, st, p, d in zip(x_shape[2:], w_shape[2:], stride, padding, dilation)]
    grad_out = torch.randn(x_shape[0], w_shape[0], *out_hw, generator=g).to(dtype)
    return x, w, mask, b, grad_out


def run(backend, case, x, w, mask, b, grad_out):
    """Forward and backward on `backend`'s device: (y, dx, dw, db) back on the CPU."""
    _, _, stride, padding, dilation, groups = case
    dev = device_of(backend)
    x, w = (t.detach().to(dev, copy=True).requires_grad_() for t in (x, w))
    b = b.detach().to(dev, copy=True).requires_grad_() if b is not None else None
    y = masked_conv2d(x, w, mask.to(dev), b, stride, padding, dilation, groups, backend=backend)
    y.backward(grad_out.to(dev))
    return y.detach().cpu(), x.grad.cpu(), w.grad.cpu(), (b.grad.cpu() if b is not None else None)


def assert_within(got, oracle, key, dtype, reduction):
    tol = product_tolerance(dtype, reduction) * oracle[f"{key}_terms"] + 1e-30
    err = (got.double() - oracle[key]).abs()
    assert bool((err <= tol).all()), f"{key}: worst error {float((err - tol).max()):.3g} over the bound"


def check_against_oracle(case, x, w, mask, b, grad_out, got, dtype):
    y, dx, dw, db = got
    _, w_shape, stride, padding, dilation, groups = case
    oracle = masked_conv2d_oracle(x, w, mask, b, grad_out, stride, padding, dilation, groups)
    taps = w_shape[2] * w_shape[3]
    positions = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
    assert_within(y, oracle, "y", dtype, w_shape[1] * taps)
    assert_within(dx, oracle, "dx", dtype, w_shape[0] // groups * taps)
    assert_within(dw, oracle, "dw", dtype, positions)
    if b is not None:
        assert_within(db, oracle, "db", dtype, positions)
    assert bool((dw[~mask] == 0).all())


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_matches_the_oracle_within_reduction_order(backend, cpu_isa_level, case, layout):
    x, w, mask, b, grad_out = problem(case, layout)
    got = run(backend, case, x, w, mask, b, grad_out)
    check_against_oracle(case, x, w, mask, b, grad_out, got, torch.float32)
    if layout == "channels_last" and backend != "reference":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_the_oracle_within_its_tolerance(backend, cpu_isa_level, dtype):
    case = CASES[1]
    x, w, mask, b, grad_out = problem(case, "channels_last", dtype=dtype)
    got = run(backend, case, x, w, mask, b, grad_out)
    assert all(t.dtype == dtype for t in got[:3])
    check_against_oracle(case, x, w, mask, b, grad_out, got, dtype)


GRADCHECK_CASES = [((1, 4, 5, 4), (4, 2, 3, 2), (2, 1), (1, 0), (2, 1), 2), ((2, 3, 3, 3), (4, 3, 3, 3), (1, 1), (1, 1),
                                                                             (1, 1), 1)]


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "reference"))
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=["all-knobs", "small-map"])
def test_gradcheck_in_float64(backend, cpu_isa_level, case):
    x, w, mask, b, _ = problem(case, dtype=torch.float64)
    _, _, stride, padding, dilation, groups = case

    def conv(x, w, b):
        return masked_conv2d(x, w, mask, b, stride, padding, dilation, groups, backend=backend)

    assert torch.autograd.gradcheck(conv, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_padding_strings_and_an_unbatched_input(backend, cpu_isa_level):
    """'same' with an even kernel pads one more at the end, as F.conv2d does (torch's float64 convolution is the
    expected value here); 'valid' is no padding; an unbatched [C, H, W] input works."""
    x, w, mask, b, _ = problem(((2, 4, 6, 5), (3, 4, 2, 2), (1, 1), (0, 0), (1, 1), 1))
    dev = device_of(backend)
    wm = torch.where(mask, w, 0.0)
    for padding in ("same", "valid"):
        got = masked_conv2d(x.to(dev), w.to(dev), mask.to(dev), b.to(dev), padding=padding, backend=backend).cpu()
        want = F.conv2d(x.double(), wm.double(), b.double(), padding=padding)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    one = masked_conv2d(x[0].to(dev), w.to(dev), mask.to(dev), b.to(dev), padding=1, backend=backend).cpu()
    torch.testing.assert_close(one.double(), F.conv2d(x[:1].double(), wm.double(), b.double(), padding=1)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_all_kept_all_pruned_and_a_pruned_output_channel(backend, cpu_isa_level):
    case = CASES[0]
    x, w, _, b, grad_out = problem(case)
    full = torch.ones_like(w, dtype=torch.bool)
    got = run(backend, case, x, w, full, b, grad_out)
    check_against_oracle(case, x, w, full, b, grad_out, got, torch.float32)

    y, dx, dw, _ = run(backend, case, x, w, torch.zeros_like(full), b, grad_out)
    assert torch.equal(y, b.view(1, -1, 1, 1).expand_as(y)) and bool((dx == 0).all()) and bool((dw == 0).all())

    channel = full.clone()
    channel[3] = False  # output channel 3 wholly pruned: its map is its bias, its filter takes no gradient
    got = run(backend, case, x, w, channel, b, grad_out)
    assert torch.equal(got[0][:, 3], b[3].expand_as(got[0][:, 3])) and bool((got[2][3] == 0).all())
    check_against_oracle(case, x, w, channel, b, grad_out, got, torch.float32)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_pruned_weights_holding_inf_and_nan_contribute_nothing(backend, cpu_isa_level):
    case = CASES[0]
    x, w, mask, b, grad_out = problem(case)
    w[~mask] = float("nan")
    w[0][~mask[0]] = float("inf")
    got = run(backend, case, x, w, mask, b, grad_out)
    assert bool(torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all())
    check_against_oracle(case, x, w, mask, b, grad_out, got, torch.float32)


def _plain_and_masked(layer_type, x_shape, cin, cout, autocast, seed=5):
    """The C++ masked conv and the plain layer on the same masked weight, channels_last as the level loop runs
    them: (outputs, input grads, weight grads, bias grads, mask) of each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g).contiguous(memory_format=torch.channels_last)
    layer = layer_type(cin, cout, 3, padding=1).to(memory_format=torch.channels_last)
    mask = torch.rand(layer.weight.shape, generator=g) < 0.4
    with torch.no_grad():
        layer.weight.mul_(mask)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        ys = [layer(xs[0]), masked_conv2d(xs[1], w, mask, b, padding=1, backend="cpp")]
    for y in ys:
        y.float().square().sum().backward()
    return ys, xs, (layer.weight.grad, w.grad), (layer.bias.grad, b.grad), mask


@pytest.mark.parametrize("cpu_isa_level", [None], ids=["process-level"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("layer_type, x_shape", [(torch.nn.Conv2d, (4, 6, 9, 9)), (SmallMapConv2d, (8, 16, 4, 4))],
                         ids=["nn.Conv2d", "small-map"])
def test_cpp_is_the_plain_layer_on_the_masked_weight_bit_for_bit(layer_type, x_shape, autocast, cpu_isa_level):
    """On a weight already zero where it is pruned (the level loop's), the C++ path's output and gradients are the
    plain layer's bit for bit: the same oneDNN calls (and dsd2's small-map weight gradient on 4x4 maps)."""
    ys, xs, dws, dbs, mask = _plain_and_masked(layer_type, x_shape, x_shape[1], 12, autocast)
    assert ys[1].dtype == ys[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad) and torch.equal(dbs[0], dbs[1])
    assert torch.equal(dws[0][mask], dws[1][mask]) and bool((dws[1][~mask] == 0).all())


def test_bad_arguments_are_refused_in_one_sentence():
    x, w, m = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.ones(6, 2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="groups=1 does not fit an input of 4 channels and a weight of shape"):
        masked_conv2d(x, w, m)
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1, not \(2, 2\)"):
        masked_conv2d(x, w, m, groups=2, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding 'full' is not known; allowed: an int, a pair, 'valid', 'same'"):
        masked_conv2d(x, w, m, groups=2, padding="full")
    with pytest.raises(ValueError, match=r"the input must be \[N, C, H, W\] or \[C, H, W\]"):
        masked_conv2d(torch.randn(4, 5), w, m)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_bit_packed_mask_gives_the_bool_masks_results_bit_for_bit(backend, cpu_isa_level, case, layout):
    """Forward, input and weight gradients read each weight's bit (row-major over (oc, c, kh, kw)) as its tile is
    loaded on Triton; the other backends unpack: the bool mask's results, bit for bit."""
    x, w, mask, b, grad_out = problem(case, layout, seed=5)
    want = run(backend, case, x, w, mask, b, grad_out)
    got = run(backend, case, x, w, pack_mask(mask), b, grad_out)
    for name, g, e in zip(("y", "dx", "dw", "db"), got, want):
        assert torch.equal(g, e), name
