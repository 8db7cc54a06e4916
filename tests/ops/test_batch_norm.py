"""dsd2's BatchNorm2d (the cpp kernel for CPU training) against torch's in float64: outputs, running statistics and
gradients within fp32 reduction-order tolerance at every CPU level, the same bits at any thread count, and the
module a drop-in for nn.BatchNorm2d."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from dsd2.ops import BatchNorm2d, batch_norm, swap_in_batch_norms

# The kernel sums in fp32 over at most 256 rows, then in double: each sum is within ~257 units of roundoff of its
# sum of |terms|; 2e-5 (~335 units) bounds it with room for the products and the final rounding to fp32.
SUM_TOL = 2e-5

CASES = [  # (shape, layout): channels_last rows, contiguous planes, odd sizes, one image, a 1x1 map
    ((64, 32, 8, 8), "channels_last"), ((7, 5, 3, 9), "channels_last"), ((7, 5, 3, 9), "contiguous"),
    ((3, 70, 4, 4), "channels_last"), ((5, 3, 1, 1), "contiguous"), ((1, 17, 5, 7), "contiguous"),
    ((6, 16, 6, 5), "sliced"),
]


def make_input(shape, layout, seed=0, offset=0.0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * spread + offset
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # a view of every other row: neither layout, read through a contiguous copy
        return torch.cat([x, x], dim=2)[:, :, ::2]
    return x


def pair(c, **kwargs):
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(c, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    return swap_in_batch_norms(copy.deepcopy(ref)), ref.double()


def step(module, x, grad, dtype):
    x = x.detach().to(dtype).requires_grad_()
    y = module(x)
    y.backward(grad.to(dtype))
    return y, x.grad


def assert_within(ours, ref, bound):
    err = (ours.double() - ref).abs()
    assert bool((err <= bound).all()), f"largest error {err.max().item():.3g} over a bound of {bound}"


@pytest.mark.parametrize("shape, layout", CASES)
def test_training_step_matches_float64_torch(shape, layout, cpu_isa_level):
    x = make_input(shape, layout, offset=3.0, spread=2.0)
    grad = make_input(shape, layout, seed=2)
    ours, ref = pair(shape[1])
    for _ in range(2):  # twice: the running statistics are updated from their last values
        y, dx = step(ours, x, grad, torch.float32)
        y64, dx64 = step(ref, x, grad, torch.float64)
    m = x.numel() // shape[1]
    assert_within(y, y64, SUM_TOL * (1 + y64.abs()))
    assert_within(ours.running_mean, ref.running_mean, SUM_TOL * (1 + ref.running_mean.abs()))
    assert_within(ours.running_var, ref.running_var, SUM_TOL * (1 + ref.running_var.abs()))
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    xhat = ((x.double() - x.double().mean((0, 2, 3), keepdim=True)) /
            (x.double().var((0, 2, 3), unbiased=False, keepdim=True) + ref.eps).sqrt())
    terms_w = (grad.double() * xhat).abs().sum((0, 2, 3))
    assert_within(ours.weight.grad, ref.weight.grad, SUM_TOL * (1 + terms_w))
    assert_within(ours.bias.grad, ref.bias.grad, SUM_TOL * (1 + grad.double().abs().sum((0, 2, 3))))
    # dx = a (dy - mean dy) + b xhat: each term within the tolerance of its sums' means
    a = (ref.weight.detach() / (x.double().var((0, 2, 3), unbiased=False) + ref.eps).sqrt()).view(1, -1, 1, 1)
    scale = a.abs() * (grad.double().abs() + grad.double().abs().mean((0, 2, 3), keepdim=True)
                       + xhat.abs() * terms_w.view(1, -1, 1, 1) / m)
    assert_within(dx, dx64, SUM_TOL * (1 + scale))
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last" or shape[2:] == (1, 1))


def test_a_map_far_from_zero_keeps_its_variance(cpu_isa_level):
    """Statistics about a shift (each channel's first value): a mean of 1000 and a spread of 0.01 (a naive fp32
    E[x^2] - E[x]^2 would lose every digit of the variance)."""
    x = make_input((32, 8, 6, 6), "channels_last", offset=1000.0, spread=0.01)
    ours, ref = pair(8)
    y, _ = step(ours, x, torch.ones_like(x), torch.float32)
    y64, _ = step(ref, x, torch.ones_like(x), torch.float64)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-6, atol=0)
    # normalised as x - k, exact here: x - mean with the mean rounded to fp32 (~6e-5 off at 1000) would be 3e-3 off
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_the_same_bits_at_any_thread_count(layout):
    x = make_input((32, 16, 12, 12), layout)
    grad = make_input((32, 16, 12, 12), layout, seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            ours, _ = pair(16)
            y, dx = step(ours, x, grad, torch.float32)
            results.append((y, dx, ours.weight.grad, ours.bias.grad, ours.running_mean, ours.running_var))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"momentum": None}, {"track_running_stats": False}, {"affine": False}],
                         ids=["cumulative-average", "no-running-stats", "no-affine"])
def test_every_nn_batchnorm_option_trains_as_torch_does(kwargs, cpu_isa_level):
    x = make_input((16, 6, 5, 5), "channels_last", offset=1.0)
    grad = make_input((16, 6, 5, 5), "channels_last", seed=3)
    ours, ref = pair(6, **kwargs)
    for i in range(3):
        y, dx = step(ours, x * (i + 1), grad, torch.float32)
        y64, dx64 = step(ref, x * (i + 1), grad, torch.float64)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-4, atol=1e-4)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name].double(), buf.double(), rtol=1e-4, atol=1e-5)


def test_eval_mode_is_torchs_own_kernel():
    x = make_input((8, 4, 5, 5), "channels_last")
    ours, ref = pair(4)
    ref = ref.float()
    for m in (ours, ref):
        m.train()(x)  # the same running statistics in both (within tolerance), then copied exactly
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.eval()(x), ref.eval()(x))


def test_a_double_backward_follows_torchs_gradient():
    x = make_input((8, 4, 5, 5), "channels_last").requires_grad_()
    ours, ref = pair(4)
    ref = ref.float()
    second = []
    for m in (ours, ref):
        (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
        second.append(ggx)
    torch.testing.assert_close(second[0], second[1], rtol=1e-3, atol=1e-4)


def test_the_module_is_a_drop_in():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    swapped = swap_in_batch_norms(model)
    assert [type(m) for m in model.modules()].count(nn.BatchNorm2d) == 2  # the given model keeps its layers
    assert [type(m) for m in swapped.modules()].count(BatchNorm2d) == 2
    assert swapped.state_dict().keys() == model.state_dict().keys()
    assert swapped[1].weight is model[1].weight and swapped[2][1].running_mean is model[2][1].running_mean
    x = make_input((4, 3, 7, 7), "channels_last")
    y = swapped(x)
    twin = copy.deepcopy(swapped)
    loaded = pickle.loads(pickle.dumps(swapped))
    assert torch.equal(twin.eval()(x), swapped.eval()(x)) and torch.equal(loaded.eval()(x), swapped(x))
    assert y.shape == (4, 4, 5, 5)
    assert type(swap_in_batch_norms(nn.BatchNorm2d(3))) is BatchNorm2d


def test_bad_input_gets_one_sentence():
    x64 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="trains on 4-D float32 CPU tensors"):
        batch_norm(x64, None, None, training=True, backend="cpp")
    with pytest.raises(ValueError, match="backend 'cuda' is not known for batch_norm"):
        batch_norm(x64, None, None, training=True, backend="cuda")
    one = swap_in_batch_norms(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        one(torch.randn(1, 3, 1, 1))
    assert batch_norm(x64, None, None, training=True).dtype == torch.float64  # other dtypes: torch's kernel
