import pytest
import torch

from dsd2.ops import MaskedSGD, masked_sgd_reference


def make_problem(seed=0, shapes=((7, 5), (3, 4, 3, 3), (11,)), density=0.4):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < density for s in shapes[:-1]] + [None]  # last: unmasked bias
    for p, m in zip(params, masks):
        if m is not None:
            p.mul_(m)
    return params, masks


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.9, False, 1e-4), (0.9, True, 5e-4), (0.0, False, 1e-3)])
def test_100_random_steps_pruned_exactly_zero_and_kept_equal_to_sgd(momentum, nesterov, wd):
    params, masks = make_problem()
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = MaskedSGD(ours, {p: m for p, m in zip(ours, masks) if m is not None}, lr=0.05,
                    momentum=momentum, weight_decay=wd, nesterov=nesterov)
    sgd = torch.optim.SGD(ref, lr=0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        sgd.step()
        with torch.no_grad():
            for b, m in zip(ref, masks):
                if m is not None:
                    b.mul_(m)
        for a, m in zip(ours, masks):
            if m is not None:
                assert bool((a[~m] == 0).all())
    for a, b, m in zip(ours, ref, masks):
        keep = m if m is not None else torch.ones_like(a, dtype=torch.bool)
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-6)


def test_reference_equals_dispatched_path():
    params, masks = make_problem(seed=3)
    a = [p.clone() for p in params]
    b = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    bufs_a = [torch.zeros_like(p) for p in params]
    masked_sgd_reference(a, grads, bufs_a, masks, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False,
                         first=True)
    bb = [x.clone().requires_grad_() for x in b]
    opt = MaskedSGD(bb, {p: m for p, m in zip(bb, masks) if m is not None}, lr=0.1)
    for p, gr in zip(bb, grads):
        p.grad = gr.clone()
    opt.step()
    for x, y in zip(a, bb):
        torch.testing.assert_close(x, y.detach())


def test_mask_shape_mismatch_is_a_clear_error():
    p = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="mask shape"):
        MaskedSGD([p], {p: torch.ones(4, dtype=torch.bool)})


def test_channels_last_parameters_take_the_same_step():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 3, 3, 3, generator=g)
    mask = torch.rand(w.shape, generator=g) < 0.5
    grad = torch.randn(w.shape, generator=g)
    a = (w * mask).requires_grad_()
    b = (w * mask).contiguous(memory_format=torch.channels_last).requires_grad_()
    oa, ob = MaskedSGD([a], {a: mask}, lr=0.1), MaskedSGD([b], {b: mask}, lr=0.1)
    for _ in range(3):
        a.grad, b.grad = grad.clone(), grad.clone()  # b's gradient in the other layout on purpose
        oa.step()
        ob.step()
    assert b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a.detach(), b.detach())
    assert bool((b[~mask] == 0).all())
