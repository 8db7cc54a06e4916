"""2x2, stride-2 max pooling in training, forward + backward: ours (dsd2.ops.MaxPool2d, the cpp kernel) against
nn.MaxPool2d, eager and compiled, on the VGG-like's pooled shapes (CIFAR size, batch 128, channels_last as the loop
feeds conv nets)."""

import copy

import pytest
import torch
from torch import nn

from dsd2.ops import MaxPool2d

SHAPES = [(128, 32, 32, 32), (128, 64, 16, 16), (128, 128, 8, 8), (128, 256, 4, 4)]
SHAPE_IDS = [f"{c}x{h}x{w}" for _, c, h, w in SHAPES]


def training_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None
        module(x).backward(grad)

    step()
    return step


def problem(shape):
    g = torch.Generator().manual_seed(0)
    # a ReLU's output, as the loop pools it: about half the values are 0
    x = torch.randn(shape, generator=g).clamp_min(0).contiguous(memory_format=torch.channels_last).requires_grad_()
    n, c, h, w = shape
    grad = torch.randn(n, c, h // 2, w // 2, generator=g).contiguous(memory_format=torch.channels_last)
    return x, grad


def step_label(label, shape, variant):
    n, c, h, w = shape
    size = f"{n}x{c}x{h}x{w}"
    # the least traffic: forward reads x and writes y, backward reads dy and writes dx
    nbytes = (2 * h * w + h * w // 2) * n * c * 4
    label(f"maxpool2d 2x2/2 fwd+bwd {size}", "maxpool2d train step", size, variant, nbytes)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_max_pool_step(benchmark, label, ours, shape):
    x, grad = problem(shape)
    step_label(label, shape, ours)
    benchmark(training_step(MaxPool2d(2), x, grad))


@pytest.mark.parametrize("variant", ["eager", "compile"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_max_pool_step_baselines(benchmark, label, shape, variant):
    x, grad = problem(shape)
    step_label(label, shape, variant)
    pool = nn.MaxPool2d(2)
    module = torch.compile(copy.deepcopy(pool), dynamic=False) if variant == "compile" else pool
    benchmark(training_step(module, x, grad))
