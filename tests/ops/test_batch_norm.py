"""dsd2's BatchNorm2d (the cpp kernel for CPU training) against torch's in float64: outputs, running statistics and
gradients within fp32 reduction-order tolerance at every CPU level, the same bits at any thread count, and the
module a drop-in for nn.BatchNorm2d."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from dsd2.ops import (
    BatchNorm2d,
    CountingReLU,
    FusedReLU,
    batch_norm,
    count_relu_call_sites,
    fuse_relu_batch_norms,
    swap_in_batch_norms,
)

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
    check_two_steps(ours, ref, x, grad, relu=False)


@pytest.mark.parametrize("shape, layout", CASES)
def test_a_fused_relu_trains_as_relu_then_float64_torch(shape, layout, cpu_isa_level):
    """ReLU -> BatchNorm2d fused (`fuse_relu_batch_norms`) against torch's ReLU and BatchNorm2d in float64: half
    the inputs negative, some exactly 0 (no gradient through the ReLU there, as torch.relu's), the same bounds."""
    x = make_input(shape, layout, offset=0.2)
    x.masked_fill_(torch.arange(x.numel()).view(shape) % 7 == 0, 0.0)
    grad = make_input(shape, layout, seed=2)
    ours, ref = pair(shape[1])
    fused = fuse_relu_batch_norms(nn.Sequential(nn.ReLU(), ours))
    assert type(fused[0]) is FusedReLU and fused[1].relu_before is not None
    check_two_steps(fused, nn.Sequential(nn.ReLU(), ref), x, grad, relu=True)


def check_two_steps(ours, ref, x, grad, relu):
    """Two training steps of `ours` (fp32) against `ref` (float64): outputs, running statistics and gradients
    within bounds from each sum's |terms| (`relu`: both norm relu(x), and the input gradient is masked)."""
    shape = x.shape
    for _ in range(2):  # twice: the running statistics are updated from their last values
        y, dx = step(ours, x, grad, torch.float32)
        y64, dx64 = step(ref, x, grad, torch.float64)
    if relu:
        ours, ref, x = ours[-1], ref[-1], torch.relu(x)
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
    if relu:
        assert bool((dx[x == 0] == 0).all())  # exactly 0 where the ReLU's input was not positive
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last) == (channels_last or shape[2:] == (1, 1))


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
@pytest.mark.parametrize("relu", [False, True], ids=["norm", "relu-norm"])
def test_the_same_bits_at_any_thread_count(layout, relu):
    x = make_input((32, 16, 12, 12), layout)
    grad = make_input((32, 16, 12, 12), layout, seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            ours, _ = pair(16)
            model = fuse_relu_batch_norms(nn.Sequential(nn.ReLU(), ours)) if relu else ours
            y, dx = step(model, x, grad, torch.float32)
            ours = model[-1] if relu else ours
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


def vgg_block():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1),
                         nn.ReLU(inplace=True), nn.BatchNorm2d(6), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten())


def test_fusing_keeps_the_model_and_its_state():
    torch.manual_seed(0)
    model = swap_in_batch_norms(vgg_block()).to(memory_format=torch.channels_last)
    fused = fuse_relu_batch_norms(model)
    assert [type(m).__name__ for m in fused] == ["Conv2d", "FusedReLU", "BatchNorm2d", "Conv2d", "FusedReLU",
                                                 "BatchNorm2d", "MaxPool2d", "ReLU", "Flatten"]
    assert type(model[1]) is nn.ReLU and model[2].relu_before is None  # the given model keeps its layers
    assert fused[2].relu_before is model[1] and fused[2].weight is model[2].weight
    assert fused.state_dict().keys() == model.state_dict().keys()
    assert "relu_before=fused" in repr(fused) and "applied by the BatchNorm2d after it" in repr(fused)
    x = make_input((8, 3, 6, 6), "channels_last")
    twin = copy.deepcopy(model)
    ys = []
    for m in (twin, fused):  # the same step from the same state: fused and unfused within fp32 noise
        y = m(x)
        y.pow(2).sum().backward()
        ys.append((y, m[0].weight.grad, m[2].weight.grad, m[5].running_var))
    for a, b in zip(*ys):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert copied[2].relu_before is not None and torch.equal(copied.eval()(x), fused.eval()(x))
    assert torch.equal(fused.eval()(x), twin.eval()(x)) or torch.allclose(fused(x), twin(x), atol=1e-5)
    assert fuse_relu_batch_norms(vgg_block()) is not None  # torch's BatchNorm2d: nothing to fuse
    assert all(type(m) is not FusedReLU for m in fuse_relu_batch_norms(vgg_block()))


def test_eval_mode_of_a_fused_norm_is_relu_then_torchs_kernel():
    x = make_input((8, 4, 5, 5), "channels_last")
    ours, ref = pair(4)
    fused, plain = fuse_relu_batch_norms(nn.Sequential(nn.ReLU(), ours)), nn.Sequential(nn.ReLU(), ref.float())
    fused.train()(x)
    fused[1].load_state_dict(ref.state_dict())
    assert torch.equal(fused.eval()(x), plain.eval()(x))


def test_a_traced_model_fuses_in_its_graph_and_its_counting_relus_still_count():
    """The loop's model: traced by `count_relu_call_sites`, every ReLU a counting call site. Fused, its graph no
    longer calls the ReLUs that feed a norm; while they count, they run and count exactly as unfused."""
    torch.manual_seed(0)
    model = swap_in_batch_norms(vgg_block())
    traced, counters = count_relu_call_sites(model)
    traced = swap_in_batch_norms(traced)
    fused = fuse_relu_batch_norms(traced)
    called = {n.target for n in fused.graph.nodes if n.op == "call_module"}
    relu_sites = {n.target for n in traced.graph.nodes if n.op == "call_module"} - called
    assert len(relu_sites) == 2 and all(type(fused.get_submodule(t)) is CountingReLU for t in relu_sites)
    assert len([n for n in traced.graph.nodes if n.op == "call_module"]) == len(called) + 2  # traced unchanged
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = make_input((8, 3, 6, 6), "channels_last")
    outs = []
    for m in (traced, fused):
        for c in counters.values():
            c.reset_counts()
            c.counting = True
        m.train()
        y = m(x)
        outs.append((y, {name: c.counts.clone() for name, c in counters.items()}))
        for c in counters.values():
            c.counting = False
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys() and all(torch.equal(outs[0][1][k], outs[1][1][k])
                                                          for k in outs[0][1])
    y = fused(x)  # not counting: fused
    y.sum().backward()
    assert all(c.counts is not None for c in counters.values())
    copy.deepcopy(fused)(x)


def test_an_in_place_relu_whose_input_is_read_again_is_not_fused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu, self.bn = nn.ReLU(inplace=True), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.relu(x)) + x  # x is the ReLU's output too, in place

    traced, _ = count_relu_call_sites(Block())
    traced = swap_in_batch_norms(traced)
    assert fuse_relu_batch_norms(traced) is traced


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
