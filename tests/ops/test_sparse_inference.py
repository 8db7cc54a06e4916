"""SparseStack: a pruned VGG-like feature stack run on padded grids in inference equals the layer-by-layer path
(within fp32 reduction order) over layouts, batch sizes, odd map sizes and sparsities from 0 % to 100 %; the grid
epilogue and the grid max pool against hand-computed and torch results; what the stack refuses to compile or run;
kept values and BatchNorm statistics taken again after they change."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsd2.ops import MaskedConv2d, cpp_extension
from dsd2.ops.sparse_inference import SparseStack

pytestmark = pytest.mark.skipif(cpp_extension() is None, reason="needs dsd2._C")


def stack(channels=(3, 8, 8, 16), pools=(False, True, True), kernel=3, density=0.3, seed=0, bias=True):
    """conv [ReLU, BN] [pool] stages, random masks, BatchNorms with random statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    for cin, cout, pool in zip(channels, channels[1:], pools):
        conv = MaskedConv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            conv.mask.copy_(torch.rand(conv.weight.shape, generator=g) < density)
            conv.weight.mul_(conv.mask)
            if bias:
                conv.bias.copy_(torch.randn(cout, generator=g))
        bn = nn.BatchNorm2d(cout)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(cout, generator=g))
            bn.running_var.copy_(torch.rand(cout, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(cout, generator=g))
            bn.bias.copy_(torch.randn(cout, generator=g))
        mods += [conv, nn.ReLU(), bn] + ([nn.MaxPool2d(2)] if pool else [])
    return nn.Sequential(*mods).eval()


def assert_matches_layers(seq, x):
    compiled = SparseStack.compile(seq)
    assert compiled is not None
    with torch.no_grad():
        assert compiled.applies(x)
        got, want = compiled(x), seq(x)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last) == \
        (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    # as the export's logits against the dense masked model (tests/test_export.py): fp32 sums in another order
    # and the BatchNorm folded into one multiply-add, through three stages
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))
    return got


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("density", [1.0, 0.3, 0.02])
def test_the_stack_gives_the_layer_by_layer_results(layout, batch, density):
    seq = stack(density=density)
    x = torch.randn(batch, 3, 12, 10)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert_matches_layers(seq, x)


def test_odd_maps_a_5x5_kernel_no_bias_and_a_stack_ending_without_a_pool():
    assert_matches_layers(stack(kernel=5, bias=False), torch.randn(2, 3, 11, 9))  # 11x9 -> 5x4 -> 2x2
    assert_matches_layers(stack(pools=(True, False, False)), torch.randn(1, 3, 7, 7))


def test_an_all_pruned_stack_gives_the_batchnorms_of_relu_of_the_biases():
    seq = stack(density=0.0)
    got = assert_matches_layers(seq, torch.randn(1, 3, 8, 8))
    assert got.std(dim=(2, 3)).max() == 0  # every map constant: nothing of the input gets through


def test_the_grid_epilogue_by_hand():
    ext = cpp_extension()
    grid = torch.arange(-6.0, 12.0).view(1, 18)  # one image of 3 x 4 grid positions, then 6 columns of room
    ext.grid_epilogue_(grid, 1, 3, 4, 1, 1, 2, 2, True, torch.tensor([2.0]), torch.tensor([0.5]))
    # the map is rows 1-2, columns 1-2 of the 3x4 grid: grid indices 5, 6, 9, 10 (values -1, 0, 3, 4)
    want = torch.zeros(18)
    want[[5, 6, 9, 10]] = torch.tensor([0.5, 0.5, 6.5, 8.5])
    assert torch.equal(grid[0], want)
    grid = torch.tensor([[-1.0, 2.0, float("nan"), 7.0]])
    ext.grid_epilogue_(grid, 1, 2, 2, 0, 0, 2, 2, False)
    assert torch.equal(grid[0, [0, 1, 3]], torch.tensor([-1.0, 2.0, 7.0])) and grid[0, 2].isnan()


@pytest.mark.parametrize("size", [(1, 3, 32, 32), (2, 3, 32, 32), (1, 3, 9, 13), (3, 3, 17, 6)],
                         ids=["one-task-rows", "tiled-rows", "odd", "narrow"])
def test_the_stack_at_every_level_on_whole_and_tiled_rows(size, cpu_isa_level):
    # 32x32 at batch 1: each row one task (the pool read from the task's buffer); at batch 2 a row is 2,312
    # columns, split into tiles, pooled in a pass of its own; odd and narrow maps end rows in part of a vector
    seq = stack(channels=(3, 8, 16, 16), pools=(True, False, True), density=0.4)
    assert_matches_layers(seq, torch.randn(*size).contiguous(memory_format=torch.channels_last))


def test_a_nan_in_the_input_reaches_the_outputs_it_would_reach_layer_by_layer():
    seq = stack(channels=(3, 8, 8), pools=(True, True), density=1.0)
    x = torch.randn(1, 3, 16, 16)
    x[0, 1, 5, 9] = float("nan")
    compiled = SparseStack.compile(seq)
    with torch.no_grad():
        got, want = compiled(x), seq(x)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any())


def test_the_plan_refuses_entries_outside_its_grid_and_inputs_of_another_width():
    ext = cpp_extension()
    rowptr, channel, shift = torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0])
    args = lambda ch, sh: ([rowptr], [ch], [sh], [torch.ones(1)], [None], [True], [None], [None], [False], [1])  # noqa: E731
    plan = ext.SparseStackPlan(3, 2, 8, *args(channel, shift))
    assert plan.run(torch.randn(1, 2, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="reads channel 2 at shift 0; allowed: channels below 2"):
        ext.SparseStackPlan(3, 2, 8, *args(torch.tensor([2]), shift))
    with pytest.raises(RuntimeError, match="shifts up to 22"):  # (3 - 1) * (8 + 2 + 1)
        ext.SparseStackPlan(3, 2, 8, *args(channel, torch.tensor([23])))
    with pytest.raises(RuntimeError, match="built for 2 channels of width 8, given 2 of width 9"):
        plan.run(torch.randn(1, 2, 8, 9))


@pytest.mark.parametrize("w", [6, 12, 42, 64])
def test_the_grid_max_pool_is_torchs_with_nans(w, cpu_isa_level):
    # w // 2 outputs a row: 3 (scalar), 6 (part of a vector), 21 and 32 (whole vectors, and a part)
    ext = cpp_extension()
    g = torch.Generator().manual_seed(1)
    n, c, h, p = 2, 3, 7, 1
    x = torch.randn(n, c, h, w, generator=g)
    x[1, 2, 4, 3] = float("nan")
    x[0, 1, 1, w - 1] = float("nan")
    src = torch.full((c, n * h * w), 99.0)
    src.view(c, n, h, w).copy_(x.transpose(0, 1))
    hd, wd = h // 2 + 2 * p, w // 2 + 2 * p
    dst = torch.full((c, n * hd * wd + 5), 99.0)
    ext.grid_maxpool2_(src, n, h, w, h, w, dst, hd, wd, p, p)
    want = F.max_pool2d(x, 2)
    got = dst[:, :n * hd * wd].view(c, n, hd, wd)[:, :, p:-p, p:-p].transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    inside = torch.zeros(c, n, hd, wd, dtype=torch.bool)
    inside[:, :, p:-p, p:-p] = True
    assert bool((dst[:, :n * hd * wd].view(c, n, hd, wd)[~inside] == 0).all()) and bool((dst[:, -5:] == 0).all())
    scale, shift = torch.tensor([-2.0, 0.5, 1.0]), torch.tensor([1.0, -1.0, 0.0])  # a negative scale flips the max
    ext.grid_maxpool2_(src, n, h, w, h, w, dst, hd, wd, p, p, True, scale, shift)
    want = F.max_pool2d(torch.relu(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), 2)
    got = dst[:, :n * hd * wd].view(c, n, hd, wd)[:, :, p:-p, p:-p].transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_what_the_stack_does_not_compile():
    assert SparseStack.compile(nn.Sequential(MaskedConv2d(3, 4, 3, stride=2, padding=1))) is None
    assert SparseStack.compile(nn.Sequential(MaskedConv2d(3, 4, 3, padding=0))) is None
    assert SparseStack.compile(nn.Sequential(MaskedConv2d(4, 4, 3, padding=1, groups=2))) is None
    assert SparseStack.compile(nn.Sequential(MaskedConv2d(3, 4, 3, padding=1), MaskedConv2d(4, 4, 5, padding=2))) \
        is None
    assert SparseStack.compile(nn.Sequential(MaskedConv2d(3, 4, 3, padding=1), nn.GELU())) is None
    assert SparseStack.compile(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))) is None
    assert SparseStack.compile(nn.Sequential(MaskedConv2d(3, 4, 3, padding=1), nn.MaxPool2d(3))) is None


def test_the_stack_runs_in_inference_only():
    seq = stack()
    compiled = SparseStack.compile(seq)
    x = torch.randn(1, 3, 8, 8)
    assert not compiled.applies(x)  # gradients on
    with torch.no_grad():
        assert compiled.applies(x) and not compiled.applies(x.double()) and not compiled.applies(x[:, :2])
        seq.train()
        assert not compiled.applies(x)  # a BatchNorm in training mode normalises by the batch


def test_changed_weights_and_statistics_are_taken_again():
    seq = stack()
    compiled = SparseStack.compile(seq)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = compiled(x)
        seq[0].weight.mul_(2.0)   # an in-place change bumps the version counter
        seq[2].running_var.add_(1.0)
        after = compiled(x)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, seq(x), rtol=1e-4, atol=1e-4)
        seq[0].mask.zero_()       # a new mask: a new plan
        torch.testing.assert_close(compiled(x), seq(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 5, 128])
@pytest.mark.parametrize("density", [1.0, 0.1, 0.0])
def test_the_sparse_chain_gives_the_layer_by_layer_logits(batch, density):
    from dsd2.ops import MaskedLinear
    from dsd2.ops.sparse_inference import SparseChain

    g = torch.Generator().manual_seed(batch)
    layers = [MaskedLinear(64, 32), MaskedLinear(32, 16), MaskedLinear(16, 10)]
    with torch.no_grad():
        for m in layers:
            m.mask.copy_(torch.rand(m.weight.shape, generator=g) < density)
    seq = nn.Sequential(nn.Flatten(), layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    chain = SparseChain(layers, [True, True, False])
    x = torch.randn(batch, 1, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), seq(x), rtol=1e-5, atol=1e-6)
        layers[1].weight.mul_(-3.0)  # a changed weight is taken again
        torch.testing.assert_close(chain(x), seq(x), rtol=1e-5, atol=1e-6)
