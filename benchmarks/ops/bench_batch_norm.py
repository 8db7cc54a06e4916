"""BatchNorm2d in training, forward + backward, alone and with the ReLU before it fused in: ours
(dsd2.ops.BatchNorm2d, the cpp kernel) against nn.BatchNorm2d (after nn.ReLU), eager and compiled, on the
VGG-like's BatchNorm shapes (CIFAR size, batch 128, channels_last as the loop feeds conv nets)."""

import copy

import pytest
import torch
from torch import nn

from dsd2.ops import fuse_relu_batch_norms, swap_in_batch_norms

SHAPES = [(128, 32, 32, 32), (128, 64, 16, 16), (128, 128, 8, 8), (128, 256, 4, 4)]
SHAPE_IDS = [f"{c}x{h}x{w}" for _, c, h, w in SHAPES]


def training_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    step()
    return step


def problem(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    return nn.BatchNorm2d(shape[1]), x, grad


def step_label(label, shape, variant, op="batchnorm2d"):
    n, c, h, w = shape
    size = f"{n}x{c}x{h}x{w}"
    # the least traffic: forward reads x and writes y, backward reads x and dy and writes dx
    label(f"{op} fwd+bwd {size}", f"{op} train step", size, variant, 5 * n * c * h * w * 4)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_norm_step(benchmark, label, ours, shape):
    norm, x, grad = problem(shape)
    step_label(label, shape, ours)
    benchmark(training_step(swap_in_batch_norms(norm), x, grad))


@pytest.mark.parametrize("variant", ["eager", "compile"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_norm_step_baselines(benchmark, label, shape, variant):
    norm, x, grad = problem(shape)
    step_label(label, shape, variant)
    module = torch.compile(copy.deepcopy(norm), dynamic=False) if variant == "compile" else norm
    benchmark(training_step(module, x, grad))


def relu_norm_problem(shape):
    norm, x, grad = problem(shape)
    return nn.Sequential(nn.ReLU(), norm), x, grad


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_relu_batch_norm_step(benchmark, label, ours, shape):
    """The ReLU fused into our BatchNorm (`fuse_relu_batch_norms`), as the loop's conv -> ReLU -> BatchNorm runs."""
    pair, x, grad = relu_norm_problem(shape)
    step_label(label, shape, ours, "relu+batchnorm2d")
    fused = fuse_relu_batch_norms(swap_in_batch_norms(pair))
    assert fused[1].relu_before is not None
    benchmark(training_step(fused, x, grad))


@pytest.mark.parametrize("variant", ["eager", "compile"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_relu_batch_norm_step_baselines(benchmark, label, shape, variant):
    pair, x, grad = relu_norm_problem(shape)
    step_label(label, shape, variant, "relu+batchnorm2d")
    module = torch.compile(copy.deepcopy(pair), dynamic=False) if variant == "compile" else pair
    benchmark(training_step(module, x, grad))
