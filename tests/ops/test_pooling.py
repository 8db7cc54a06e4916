"""dsd2's max_pool2d / MaxPool2d (the cpp kernel for 2x2, stride-2 pooling in CPU training) against torch's: outputs
and input gradients the same bits at every CPU level, with ties, NaNs and odd sizes; every other case torch's own
call; the module a drop-in for nn.MaxPool2d."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsd2.ops import MaxPool2d, max_pool2d, swap_in_max_pools
from dsd2.ops._backend import cpp_extension

needs_cpp = pytest.mark.skipif(cpp_extension() is None, reason="dsd2._C is not built")

SHAPES = [(4, 32, 8, 8), (3, 5, 7, 9), (1, 70, 2, 2), (2, 17, 5, 4), (2, 3, 4, 11), (128, 8, 32, 32)]


def make_input(shape, seed=0, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # a ReLU's output: many windows all zeros, some with a repeated max
        x = torch.randint(-2, 3, shape, generator=g).float().clamp_min(0)
    elif kind == "nan":
        x = torch.randn(shape, generator=g)
        x[torch.rand(shape, generator=g) < 0.1] = float("nan")
    elif kind == "signed_zeros":  # -0.0 and 0.0 compare equal: the first one stays, as torch keeps it
        x = torch.where(torch.rand(shape, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    else:
        x = torch.randn(shape, generator=g)
    return x.contiguous(memory_format=torch.channels_last)


def pool_and_grad(fn, x, grad):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y, x.grad


def same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@needs_cpp
@pytest.mark.parametrize("kind", ["randn", "ties", "nan", "signed_zeros"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_matches_torch_bit_for_bit(shape, kind, cpu_isa_level):
    x = make_input(shape, kind=kind)
    ho, wo = shape[2] // 2, shape[3] // 2
    grad = torch.randn(shape[0], shape[1], ho, wo, generator=torch.Generator().manual_seed(3))
    y, dx = pool_and_grad(lambda t: max_pool2d(t, 2, backend="cpp"), x, grad)
    y_ref, dx_ref = pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad)
    same_bits(y, y_ref)
    same_bits(dx, dx_ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)


@needs_cpp
def test_cpp_path_is_taken_and_the_other_cases_are_torch(monkeypatch):
    calls = []
    ext = cpp_extension()

    class Spy:
        def __getattr__(self, name):
            if name.startswith("max_pool2"):
                calls.append(name)
            return getattr(ext, name)

    monkeypatch.setattr("dsd2.ops.pooling.cpp_extension", lambda: Spy())
    x = make_input((2, 4, 6, 6)).requires_grad_()
    max_pool2d(x, 2).sum().backward()
    assert calls == ["max_pool2_forward", "max_pool2_backward"]
    calls.clear()
    contiguous = torch.randn(2, 4, 6, 6, requires_grad=True)
    others = [
        (contiguous, dict(kernel_size=2)),  # not channels_last
        (x, dict(kernel_size=3, stride=2)), (x, dict(kernel_size=2, stride=1)), (x, dict(kernel_size=2, padding=1)),
        (x, dict(kernel_size=2, dilation=2)), (x, dict(kernel_size=2, ceil_mode=True)),
        (x.detach().double().contiguous(memory_format=torch.channels_last).requires_grad_(), dict(kernel_size=2)),
        (x.detach(), dict(kernel_size=2)),  # no gradient to compute
    ]
    for t, kwargs in others:
        y = max_pool2d(t, **kwargs)
        ref = F.max_pool2d(t, **kwargs)
        same_bits(y.float(), ref.float())
    with torch.no_grad():
        same_bits(max_pool2d(x, 2), F.max_pool2d(x, 2))
    y, i = max_pool2d(x, 2, return_indices=True)
    y_ref, i_ref = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(i, i_ref)
    same_bits(y, y_ref)
    assert calls == []


@needs_cpp
def test_double_backward_is_torch_s():
    x = make_input((2, 3, 4, 4)).double().contiguous(memory_format=torch.channels_last)
    x32 = x.float().requires_grad_()
    y = max_pool2d(x32, 2, backend="cpp")
    (g,) = torch.autograd.grad(y.pow(2).sum(), x32, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x32)
    x_ref = x.float().requires_grad_()
    y_ref = F.max_pool2d(x_ref, 2)
    (g_ref,) = torch.autograd.grad(y_ref.pow(2).sum(), x_ref, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), x_ref)
    same_bits(g, g_ref)
    same_bits(gg, gg_ref)


def test_unknown_backend_is_one_sentence():
    with pytest.raises(ValueError, match="backend 'triton' is not known for max_pool2d; allowed: cpp, reference"):
        max_pool2d(torch.zeros(1, 1, 2, 2), 2, backend="triton")


@needs_cpp
def test_the_extension_rejects_a_map_smaller_than_the_window():
    with pytest.raises(RuntimeError, match="smaller than the 2x2 window"):
        cpp_extension().max_pool2_forward(torch.zeros(1, 2, 1, 4).contiguous(memory_format=torch.channels_last))


def test_module_is_a_drop_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 4))
    ours = swap_in_max_pools(model)
    assert type(model[2]) is nn.MaxPool2d, "the given model is left as it was"
    assert type(ours[2]) is MaxPool2d and ours[0] is model[0], "weights are shared, not copied"
    assert repr(ours[2]) == repr(model[2])
    x = torch.randn(5, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    ours_cl = ours.to(memory_format=torch.channels_last)
    y, dx = pool_and_grad(ours_cl, x, torch.ones(5, 4))
    y_ref, dx_ref = pool_and_grad(model.to(memory_format=torch.channels_last), x, torch.ones(5, 4))
    same_bits(y, y_ref)
    same_bits(dx, dx_ref)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone[2]) is MaxPool2d
        same_bits(clone(x), ours(x))
