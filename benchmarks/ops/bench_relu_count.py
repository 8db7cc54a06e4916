"""ReLU-state counting: ours against the usual forward hook (a float copy of the on-states per batch), eager and
compiled; and the fused ReLU + counting against a plain ReLU that counts nothing (the cost of counting)."""

import functools

import pytest
import torch

from dsd2.ops import count_positive_, relu_count

SHAPE = (128, 64, 32, 32)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def hook_eager(x, freq):
    freq += (x > 0).float().mean(0)  # what the usual forward hook does per batch


def warmed(fn):
    fn()
    return fn


def activation(dtype):
    return torch.randn(SHAPE).to(dtype)


def count_label(label, x, variant):
    size = f"{SHAPE} {str(x.dtype)[6:]}"
    label(f"count states {size}", "count states", size, variant, x.numel() * x.element_size())


def relu_label(label, x, variant):
    size = f"{SHAPE} {str(x.dtype)[6:]}"
    label(f"relu+count {size}", "relu (+count)", size, variant, 2 * x.numel() * x.element_size())


@DTYPES
def test_count_states(benchmark, label, ours, dtype):
    x = activation(dtype)
    count_label(label, x, ours)
    benchmark(warmed(functools.partial(count_positive_, x, torch.zeros(x[0].numel(), dtype=torch.long))))


@pytest.mark.parametrize("variant", ["eager", "compile"])
@DTYPES
def test_count_states_baselines(benchmark, label, compiled, dtype, variant):
    x = activation(dtype)
    count_label(label, x, variant)
    hook = compiled(hook_eager) if variant == "compile" else hook_eager
    benchmark(warmed(functools.partial(hook, x, torch.zeros(x.shape[1:]))))


@DTYPES
def test_relu_with_counting(benchmark, label, ours, dtype):
    x = activation(dtype)
    relu_label(label, x, ours)
    benchmark(warmed(functools.partial(relu_count, x, torch.zeros(x[0].numel(), dtype=torch.long))))


@DTYPES
def test_plain_relu(benchmark, label, dtype):
    x = activation(dtype)
    relu_label(label, x, "eager")
    benchmark(warmed(functools.partial(torch.relu, x)))
