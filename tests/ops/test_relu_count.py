"""ReLU-state counting: every backend (the reference included) exactly equal to an independent numpy oracle and to
hand-counted cases; the CountingReLU drop-in."""

import pytest
import torch
from conftest import triton_device
from hypothesis import given, settings
from hypothesis import strategies as st
from isa_levels import per_level
from oracles import positive_counts_oracle
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dsd2.ops import CountingReLU, count_positive_, relu_count, swap_in_counting_relus

SHAPES = [(1, 5), (3, 7), (4, 3, 5, 5), (2, 6, 3), (5, 16, 8, 8)]


def device_for(backend):
    return triton_device() if backend == "triton" else "cpu"


def activation(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[x.abs() < 0.3] = 0.0  # exact zeros tell > 0 from >= 0
    return x.to(dtype).to(device)


def expected(x, per_channel, inclusive):
    return positive_counts_oracle(x, per_channel=per_channel, inclusive=inclusive)


# counted by hand: a [B, C, W] batch of 2 samples (channel 0 holds 1, -1 / 0.5, 0; channel 1 holds 0, 2 / -3, -0.0)
# and a [B, C] batch of 2; (exclusive, inclusive) counts per element and per channel
HAND_COUNTED = [
    ([[[1.0, -1.0], [0.0, 2.0]], [[0.5, 0.0], [-3.0, -0.0]]],
     {False: ([2, 0, 0, 1], [2, 1]), True: ([2, 1, 1, 2], [3, 3])}),
    ([[1.0, 0.0, -2.0], [3.0, -1.0, 0.0]], {False: ([2, 0, 0], [2, 0, 0]), True: ([2, 1, 1], [2, 1, 1])}),
]


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values, counts", HAND_COUNTED, ids=["BCW", "BC"])
def test_hand_counted_cases(backend, cpu_isa_level, dtype, values, counts):
    x = torch.tensor(values, dtype=dtype, device=device_for(backend))
    for inclusive, (per_element, per_channel) in counts.items():
        for channel, want in ((False, per_element), (True, per_channel)):
            assert torch.equal(expected(x, channel, inclusive), torch.tensor(want)), "the oracle itself"
            got = torch.zeros(len(want), dtype=torch.long, device=x.device)
            count_positive_(x, got, inclusive=inclusive, per_channel=channel, backend=backend)
            assert got.tolist() == want, (inclusive, channel)
            got.zero_()
            y = relu_count(x, got, inclusive=inclusive, per_channel=channel, backend=backend)
            assert got.tolist() == want and torch.equal(y.cpu(), torch.tensor(values).clamp_min(0).to(dtype))


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_channel, inclusive", [(False, False), (True, False), (False, True), (True, True)])
def test_count_positive_exact(backend, cpu_isa_level, dtype, shape, per_channel, inclusive):
    x = activation(shape, dtype, device=device_for(backend))
    want = expected(x, per_channel, inclusive)
    counts = torch.full_like(want, 3).to(x.device)  # adds into existing counts
    count_positive_(x, counts, inclusive=inclusive, per_channel=per_channel, backend=backend)
    assert torch.equal(counts.cpu(), want + 3)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("per_channel", [False, True])
def test_relu_count_fuses_relu_and_counts(backend, cpu_isa_level, per_channel):
    x = activation((4, 6, 5, 5), torch.float32, device=device_for(backend))
    n = 6 if per_channel else 150
    counts = torch.zeros(n, dtype=torch.long, device=x.device)
    y = relu_count(x, counts, per_channel=per_channel, backend=backend)
    assert torch.equal(y, torch.relu(x))
    assert torch.equal(counts.cpu(), expected(x, per_channel, False))


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_non_contiguous_and_channels_last(backend, cpu_isa_level):
    base = activation((4, 6, 5, 5), torch.float32, device=device_for(backend))
    for x in (base.contiguous(memory_format=torch.channels_last), base.transpose(2, 3), base[:, ::2]):
        for per_channel in (False, True):
            want = expected(x, per_channel, False)
            counts = torch.zeros_like(want).to(x.device)
            count_positive_(x, counts, per_channel=per_channel, backend=backend)
            assert torch.equal(counts.cpu(), want)
            c2 = torch.zeros_like(want).to(x.device)
            assert torch.equal(relu_count(x, c2, per_channel=per_channel, backend=backend), torch.relu(x))
            assert torch.equal(c2.cpu(), want)


def test_counting_relu_is_a_drop_in(cpu_isa_level):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU())
    model.load_state_dict(ref.state_dict())
    relus = swap_in_counting_relus(model)
    assert list(relus) == ["1", "4"] and all(isinstance(m, CountingReLU) for m in relus.values())
    x = torch.randn(8, 3, 8, 8)
    for r in relus.values():
        r.counting = True
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = model(xa), ref(xb)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    pre = ref[0](x)
    assert torch.equal(relus["1"].counts, (pre > 0).sum(0).flatten())
    assert relus["1"].observations == 8
    with torch.no_grad():
        model(x)
    assert relus["1"].observations == 16 and torch.equal(relus["1"].counts, 2 * (pre > 0).sum(0).flatten())
    relus["1"].reset_counts()
    relus["1"].counting = False
    model(x)
    assert relus["1"].counts is None


def test_per_channel_observations_pool_positions(cpu_isa_level):
    r = CountingReLU(granularity="channel")
    r.counting = True
    x = torch.randn(3, 4, 5, 5)
    r(x)
    assert r.observations == 75 and torch.equal(r.counts, (x > 0).sum((0, 2, 3)))
    with pytest.raises(ValueError, match="granularity"):
        CountingReLU(granularity="layer")


def test_bad_counts_are_errors():
    with pytest.raises(ValueError, match="int64"):
        count_positive_(torch.randn(2, 3), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs 3"):
        count_positive_(torch.randn(2, 3), torch.zeros(4, dtype=torch.long))


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=2, max_size=4), per_channel=st.booleans(),
       inclusive=st.booleans(), seed=st.integers(0, 10_000))
def test_fuzz_cpp_exact(cpu_isa_level, shape, per_channel, inclusive, seed):
    x = activation(tuple(shape), torch.float32, seed=seed)
    want = expected(x, per_channel, inclusive)
    counts = torch.zeros_like(want)
    count_positive_(x, counts, inclusive=inclusive, per_channel=per_channel, backend="cpp")
    assert torch.equal(counts, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("shape", [(6, 16, 8, 8), (9, 1030), (3, 16, 8, 8), (5, 8200), (7, 3, 64, 64)])
def test_cpp_relu_count_row_and_column_paths(cpu_isa_level, dtype, inclusive, shape):
    """Large samples with a batch of several per thread stream row by row; the rest walk column tiles."""
    x = activation(shape, dtype)
    x.view(-1)[:7] = torch.tensor([-0.0, 0.0, float("inf"), float("-inf"), 1e-30, -1e-30, 2.0]).to(dtype)
    counts = torch.zeros(x[0].numel(), dtype=torch.long)
    y = relu_count(x, counts, inclusive=inclusive, backend="cpp")
    assert torch.equal(y, torch.relu(x))
    assert torch.equal(counts, expected(x, False, inclusive))


def test_streamed_16_bit_counts_pass_65535_rows(cpu_isa_level):
    """The row-streaming path counts 16-bit data in 16-bit counters, widened every 65535 rows: a batch past that
    with every element on must still count exactly."""
    x = torch.ones(65_600, 8192, dtype=torch.bfloat16)
    counts = torch.zeros(8192, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread takes every row
    try:
        relu_count(x, counts, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert bool((counts == 65_600).all())


class AtenOps(TorchDispatchMode):
    """The aten ops run inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def relu_backward(relu, x, grad):
    leaf = x.clone().requires_grad_()
    y = relu(leaf)
    with AtenOps() as ops:
        y.backward(grad)
    return leaf.grad, ops.names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_counting_relu_gradient_is_torch_relus_in_one_kernel(dtype, channels_last):
    """The same gradient as torch.relu, bit for bit (zero inputs, inf and NaN upstream gradients included), from
    the same single threshold_backward that torch.relu's backward runs."""
    x = activation((4, 3, 5, 5), dtype, seed=2)
    x.view(-1)[:4] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0], dtype=dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grad.view(-1)[:8] = torch.tensor([float("nan"), 1.0, float("inf"), float("nan"), float("inf"), float("nan"),
                                      float("-inf"), 2.0], dtype=dtype)
    if channels_last:
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    counting = CountingReLU()
    counting.counting = True
    ours, our_ops = relu_backward(counting, x, grad)
    want, torch_ops = relu_backward(torch.relu, x, grad)
    torch.testing.assert_close(ours, want, rtol=0, atol=0, equal_nan=True)
    assert our_ops.count("threshold_backward") == 1
    assert not {"gt", "mul", "_to_copy"} & set(our_ops)  # no mask built, cast and multiplied
    # the C++ forward returns a channels_last input's ReLU as NCHW, so autograd then copies the gradient into the
    # leaf's layout (a copy torch.relu does not make); otherwise both backward passes run the very same ops
    if not channels_last:
        assert our_ops == torch_ops
