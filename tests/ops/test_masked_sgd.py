"""MaskedSGD: every backend against torch.optim.SGD with re-masking, pruned weights exactly zero; the C++ kernel at
every CPU level; the forms the masks take; Triton's pointer tables and alignment."""

import pytest
import torch
from conftest import triton_device
from hypothesis import given, settings
from hypothesis import strategies as st
from isa_levels import per_level

from dsd2.ops import MaskedSGD, masked_sgd_reference
from dsd2.training import MaskedAdam


def make_problem(seed=0, shapes=((7, 5), (3, 4, 3, 3), (11,)), density=0.4):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    masks = [torch.rand(s, generator=g) < density for s in shapes[:-1]] + [None]  # last: unmasked bias
    for p, m in zip(params, masks):
        if m is not None:
            p.mul_(m)
    return params, masks


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "foreach", "reference", "triton"))
@pytest.mark.parametrize("momentum, nesterov, wd", [(0.9, False, 1e-4), (0.9, True, 5e-4), (0.0, False, 1e-3)])
def test_100_random_steps_pruned_exactly_zero_and_kept_equal_to_sgd(momentum, nesterov, wd, backend, cpu_isa_level):
    params, masks = make_problem()
    if backend == "triton":
        params = [p.to(triton_device()) for p in params]
        masks = [m.to(triton_device()) if m is not None else None for m in masks]
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = MaskedSGD(ours, {p: m for p, m in zip(ours, masks) if m is not None}, lr=0.05,
                    momentum=momentum, weight_decay=wd, nesterov=nesterov, backend=backend)
    sgd = torch.optim.SGD(ref, lr=0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g).to(a.device)
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


def test_reference_equals_dispatched_path(cpu_isa_level):
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


def test_channels_last_parameters_take_the_same_step(cpu_isa_level):
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


@pytest.mark.parametrize("shapes", [((7, 5), (3, 4, 3, 3), (11,)), ((64, 70), (3, 4, 3, 3), (4100,))],
                         ids=["partial-blocks", "full-blocks"])  # full 2048-element blocks run unmasked
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 3e-2)])
def test_triton_multi_tensor_matches_reference_per_dtype(dtype, tol, shapes):
    """bf16's tolerance is wide: the Triton interpreter truncates fp32 -> bf16 where a GPU rounds."""
    params, masks = make_problem(seed=5, shapes=shapes)
    dev = triton_device()
    ref = [p.to(dtype).clone() for p in params]
    ours = [p.to(dtype).to(dev).clone().requires_grad_() for p in params]
    dmasks = [m.to(dev) if m is not None else None for m in masks]
    opt = MaskedSGD(ours, {p: m for p, m in zip(ours, dmasks) if m is not None}, lr=torch.tensor(0.05, device=dev),
                    momentum=0.9, weight_decay=1e-4, nesterov=True, backend="triton")
    bufs = [torch.zeros_like(p) for p in ref]
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in ref]
        for p, gr in zip(ours, grads):
            p.grad = gr.to(dev)
        opt.step()
        masked_sgd_reference(ref, grads, bufs, masks, lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True,
                             first=False)
    for a, b, m in zip(ours, ref, masks):
        scale = b.float().abs().max().clamp_min(1e-6)
        assert float((a.detach().cpu().float() - b.float()).abs().max() / scale) <= tol
        if m is not None:
            assert bool((a.detach().cpu()[~m] == 0).all())


def test_unknown_backend_is_an_error():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="backend 'cuda-magic'"):
        MaskedSGD([p], backend="cuda-magic")


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300), density=st.floats(0, 1), lr=st.floats(1e-4, 1.0),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), wd=st.floats(0, 1e-2), nesterov=st.booleans(),
       seed=st.integers(0, 10_000))
def test_fuzz_cpp_against_reference(cpu_isa_level, n, density, lr, momentum, wd, nesterov, seed):
    if nesterov and momentum == 0:
        nesterov = False
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    m = torch.rand(n, generator=g) < density
    grads = [torch.randn(n, generator=g) for _ in range(3)]
    a = (w * m).requires_grad_()
    opt = MaskedSGD([a], {a: m}, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov, backend="cpp")
    ref, buf = [(w * m).clone()], [torch.zeros(n)]
    for gr in grads:
        a.grad = gr.clone()
        opt.step()
        masked_sgd_reference(ref, [gr], buf if momentum else [None], [m], lr=lr, momentum=momentum,
                             weight_decay=wd, nesterov=nesterov, first=False)
    torch.testing.assert_close(a.detach(), ref[0], rtol=1e-5, atol=1e-6)
    assert bool((a.detach()[~m] == 0).all())


def test_tensor_learning_rate_steps_like_a_float_one():
    """A learning rate held in a tensor (changed in place, as CUDA-graph replays do) is never read on the host."""
    params, masks = make_problem()
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    lr = torch.tensor(0.05)
    by_param = lambda ps: {p: m for p, m in zip(ps, masks) if m is not None}  # noqa: E731
    opt = MaskedSGD(ours, by_param(ours), lr=lr, momentum=0.9, weight_decay=1e-4)
    float_opt = MaskedSGD(ref, by_param(ref), lr=0.05, momentum=0.9, weight_decay=1e-4, backend="reference")
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        if step == 15:
            lr.fill_(0.005)
            float_opt.param_groups[0]["lr"] = 0.005
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        float_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_tensor_learning_rate_on_a_float_only_backend_is_an_error(backend):
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=f"backend '{backend}' takes a float learning rate"):
        MaskedSGD([p], lr=torch.tensor(0.1), backend=backend).step()


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.9, False, 1e-4), (0.9, True, 5e-4), (0.0, False, 1e-3)])
def test_every_cpu_path_takes_the_same_step_bit_for_bit(cpu_isa_level, momentum, nesterov, wd):
    """One update formula everywhere: the C++ kernel (at this test's CPU level), the multi-tensor path with a float
    and with a tensor learning rate (the CUDA-graph step), and the reference give identical bits."""
    paths = {"cpp": ("cpp", 0.05), "foreach": ("foreach", 0.05), "foreach, tensor lr": ("auto", torch.tensor(0.05)),
             "reference": ("reference", 0.05)}
    results = {}
    for name, (backend, lr) in paths.items():
        params, masks = make_problem(seed=7)
        ours = [p.clone().requires_grad_() for p in params]
        opt = MaskedSGD(ours, {p: m for p, m in zip(ours, masks) if m is not None}, lr=lr, momentum=momentum,
                        weight_decay=wd, nesterov=nesterov, backend=backend)
        g = torch.Generator().manual_seed(8)
        for _ in range(20):
            for p in ours:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results[name] = [p.detach() for p in ours]
    for name, got in results.items():
        for a, b in zip(got, results["reference"]):
            assert torch.equal(a, b), f"{name} differs from the reference"


# ---- the forms `masks` takes: a dict by parameter or position, or a list parallel to the parameters ------------


def small_model_steps(make_optimizer, steps=5):
    """Weights of a small masked MLP after `steps` training steps with the optimizer `make_optimizer(model, masks)`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    masks = {model[0].weight: torch.rand(8, 6) < 0.5, model[2].weight: torch.rand(3, 8) < 0.5}
    with torch.no_grad():
        for p, m in masks.items():
            p.mul_(m)
    opt = make_optimizer(model, masks)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def as_list(model, masks):
    return [masks.get(p) for p in model.parameters()]


def as_positions(model, masks):
    by_id = {id(p): m for p, m in masks.items()}
    return {i: by_id[id(p)] for i, p in enumerate(model.parameters()) if id(p) in by_id}


OPTIMIZERS = {"sgd": lambda params, masks: MaskedSGD(params, masks, lr=0.1, momentum=0.9),
              "adam": lambda params, masks: MaskedAdam(params, masks, lr=1e-2)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("form", [as_list, as_positions])
def test_masks_as_a_list_or_by_position_take_the_same_steps_as_the_dict(form, optimizer):
    """MaskedSGD and MaskedAdam take the masks in the same forms."""
    def make(convert):
        return lambda model, masks: OPTIMIZERS[optimizer](model.parameters(), convert(model, masks))

    by_dict = small_model_steps(make(lambda model, masks: masks))
    other = small_model_steps(make(form))
    assert all(torch.equal(a, b) for a, b in zip(by_dict, other))
    assert (by_dict[0] == 0).any()  # the masks did prune


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.count(". ") == 0


def test_a_mask_list_of_the_wrong_length_is_refused_in_one_sentence():
    params = [torch.zeros(3, 2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="got 1 masks for 2 parameters") as info:
        MaskedSGD(params, [torch.ones(3, 2, dtype=torch.bool)])
    assert one_sentence(str(info.value))
    with pytest.raises(ValueError, match=r"mask shape \(2, 3\) of parameter 0 differs from its shape \(3, 2\)"):
        MaskedSGD(params, [torch.ones(2, 3, dtype=torch.bool), None])
    with pytest.raises(ValueError, match="not one of the optimizer's 2 parameters"):
        MaskedSGD(params, {torch.zeros(3, 2): torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="position 5"):
        MaskedSGD(params, {5: torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="not Tensor"):
        MaskedSGD(params, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="got 2 masks for 1 parameters"):
        MaskedAdam([params[1]], [torch.ones(3, dtype=torch.bool), None])


def test_eager_epoch_steps_reuse_one_pointer_table():
    """The engine's eager epoch zeroes gradients in place, so every step hands the Triton kernel the same
    addresses and finds its pointer table cached: one table for the epoch, no rebuild (no host-to-device copy)
    per step. Each step's gradients are kept alive here, so gradients set to None and reallocated would land at
    new addresses and show up as new tables."""
    from dsd2.kernels.masked_sgd import pointer_tables

    from dsd2.config import DataConfig, ModelConfig
    from dsd2.data import DeviceDataset, build_splits
    from dsd2.models import build_model
    from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
    from dsd2.training import InputFormat, TrainFeed, cross_entropy, train_epoch

    splits = build_splits(DataConfig(noise=0.5), 0, torch.device("cpu"))
    data = DeviceDataset(splits.train.images[:48], splits.train.labels[:48])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=(16,)), (1, 8, 8), 10)
    weights = prunable_weights(model)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.5)
    opt = MaskedSGD(model.parameters(), {weights[k]: m for k, m in masks.items()}, lr=0.01, backend="triton")
    kept, used = [], []

    def after_step(optimizer, args, kwargs):
        kept.append([p.grad for p in model.parameters()])
        used.append(pointer_tables()[-1][0])  # the table a step used is the cache's most recent

    opt.register_step_post_hook(after_step)
    before = {id(t[0]) for t in pointer_tables()}
    train_epoch(model, opt, TrainFeed(data, 16, InputFormat(splits.mean, splits.std)), cross_entropy,
                torch.arange(len(data)))
    assert len(used) == 3
    assert all(t is used[0] for t in used)
    assert [id(t[0]) for t in pointer_tables() if id(t[0]) not in before] == [id(used[0])]


def test_triton_step_promises_alignment_only_when_every_address_has_it(monkeypatch):
    """The kernel is told that its addresses are 16-byte aligned (vector accesses) only when each one is: a
    parameter viewed one element into its storage takes the scalar path, and both take the same step."""
    import dsd2.kernels.masked_sgd as kernel

    promised = []
    plan = kernel.plan_sgd
    monkeypatch.setattr(kernel, "plan_sgd", lambda *args: promised.append(args[7]) or plan(*args))
    steps = []
    for offset in (0, 1):
        storage = torch.arange(4100, dtype=torch.float32) / 4100
        p = storage[offset:offset + 4099]
        grad, buf, mask = torch.ones_like(p), torch.zeros_like(p), torch.arange(4099) % 3 != 0
        kernel.masked_sgd_step_([p], [grad], [buf], [mask], 0.1, 0.9, 1e-4, False)
        steps.append(p.clone())
    assert promised == [True, False]
    keep = torch.arange(4099) % 3 != 0
    for offset, p in enumerate(steps):
        p0 = torch.arange(offset, offset + 4099, dtype=torch.float32) / 4100
        torch.testing.assert_close(p, (p0 - 0.1 * (1 + 1e-4 * p0)) * keep)  # first step: buf = d = g + wd * p
