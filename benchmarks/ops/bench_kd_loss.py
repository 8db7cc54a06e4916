"""KD loss forward + backward: ours against `kd_loss_eager` (the KD loss as pruning code usually writes it) run eagerly
and through torch.compile,
and `exp floor`: torch.exp over the 3 x B x C exponentials the loss needs (the cost of the exponentials alone)."""

import functools

import pytest
import torch

from dsd2.ops import kd_loss, kd_loss_eager

SIZES = [(b, c) for b in (1024, 8192) for c in (10, 100, 1000)]


def kd_eager(s, t, y):
    return kd_loss_eager(s, t, y)


def forward_backward(fn, b, c):
    """One warmed-up forward + backward of `fn` on random [b, c] logits."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, c, generator=g).requires_grad_()
    t, y = torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g)

    def step():
        s.grad = None
        fn(s, t, y).backward()

    step()
    return step


def kd_label(label, b, c, variant):
    label(f"kd_loss B={b} C={c}", "kd_loss fwd+bwd", f"B={b} C={c}", variant, 3 * b * c * 4)


@pytest.mark.parametrize("b, c", SIZES)
def test_kd_loss(benchmark, label, ours, b, c):
    kd_label(label, b, c, ours)
    benchmark(forward_backward(kd_loss, b, c))


@pytest.mark.parametrize("variant", ["eager", "compile", "exp floor"])
@pytest.mark.parametrize("b, c", SIZES)
def test_kd_loss_baselines(benchmark, label, compiled, b, c, variant):
    kd_label(label, b, c, variant)
    if variant == "exp floor":
        x = torch.randn(3 * b * c, generator=torch.Generator().manual_seed(0))
        benchmark(functools.partial(torch.exp, x, out=torch.empty_like(x)))
        return
    benchmark(forward_backward(compiled(kd_eager) if variant == "compile" else kd_eager, b, c))
