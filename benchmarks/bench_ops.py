"""pytest-benchmark suite for the fused ops: ours against eager PyTorch and torch.compile of the same eager code.

    pytest benchmarks/bench_ops.py --benchmark-enable --benchmark-json=benchmarks/ops.json
    python benchmarks/results_table.py benchmarks/ops.json      # regenerates the table in RESULTS.md

Our C++ kernels run once per CPU instruction-set level this machine has (variants `ours@default`, `ours@avx2`,
`ours@avx512`), so one AVX-512 machine also measures what an AVX2-only or a baseline x86-64 CPU gets from them;
eager and torch.compile run at ATen's own level (`ATEN_CPU_CAPABILITY` sets it). Each benchmark sets
`extra_info["bytes"]`: the least memory traffic the operation needs (inputs read once, outputs written once), so
the table can show achieved bandwidth next to a measured copy bandwidth. The KD sizes also time `torch.exp` over
the 3 x B x C exponentials the loss needs (`exp floor`): the cost of the exponentials alone.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from dsd2.config import ModelConfig
from dsd2.models import build_model
from dsd2.ops import MaskedSGD, count_positive_, kd_loss, relu_count
from dsd2.ops._backend import cpu_isa_levels, use_cpu_isa
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.selftest import kd_eager

torch.set_flush_denormal(True)


@functools.cache
def compiled(fn):
    return torch.compile(fn, dynamic=False)


LEVELS = ("default", "avx2", "avx512")
OURS = [f"ours@{level}" for level in LEVELS]


def run_ours(benchmark, variant, fn):
    """Time `fn` at the CPU level the variant names (skipped where this CPU lacks it), else as it is."""
    if not variant.startswith("ours@"):
        benchmark(fn)
        return
    level = variant.partition("@")[2]
    if level not in cpu_isa_levels():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    with use_cpu_isa(level):
        fn()
        benchmark(fn)


# ---- copy bandwidth (the yardstick) ------------------------------------------------------------------

def test_copy_bandwidth(benchmark):
    x = torch.randn(64 * 1024 * 1024 // 4)  # 64 MiB
    out = torch.empty_like(x)
    benchmark.group = "copy"
    benchmark.extra_info.update(op="copy", size="64 MiB", variant="copy", bytes=2 * x.numel() * 4)
    benchmark(out.copy_, x)


# ---- KD loss forward + backward ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", [*OURS, "eager", "compile", "exp floor"])
@pytest.mark.parametrize("c", [10, 100, 1000])
@pytest.mark.parametrize("b", [1024, 8192])
def test_kd_loss(benchmark, b, c, variant):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, c, generator=g).requires_grad_()
    t, y = torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g)
    fn = {"eager": kd_eager, "compile": compiled(kd_eager)}.get(variant, kd_loss)

    def step():
        s.grad = None
        fn(s, t, y).backward()

    benchmark.group = f"kd_loss B={b} C={c}"
    benchmark.extra_info.update(op="kd_loss fwd+bwd", size=f"B={b} C={c}", variant=variant, bytes=3 * b * c * 4)
    if variant == "exp floor":
        x = torch.randn(3 * b * c, generator=g)
        out = torch.empty_like(x)
        benchmark(functools.partial(torch.exp, x, out=out))
        return
    step()
    run_ours(benchmark, variant, step)


# ---- ReLU-state counting -----------------------------------------------------------------------------

def hook_eager(x, freq):
    freq += (x > 0).float().mean(0)  # what the usual forward hook does per batch


COUNT_SHAPE = (128, 64, 32, 32)


@pytest.mark.parametrize("variant", [*OURS, "eager", "compile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_count_states(benchmark, dtype, variant):
    x = torch.randn(COUNT_SHAPE).to(dtype)
    n = x[0].numel()
    if variant.startswith("ours"):
        counts = torch.zeros(n, dtype=torch.long)
        fn = functools.partial(count_positive_, x, counts)
    else:
        freq = torch.zeros(x.shape[1:])
        fn = functools.partial(compiled(hook_eager) if variant == "compile" else hook_eager, x, freq)
    fn()
    benchmark.group = f"count states {tuple(COUNT_SHAPE)} {str(dtype)[6:]}"
    benchmark.extra_info.update(op="count states", size=f"{COUNT_SHAPE} {str(dtype)[6:]}", variant=variant,
                                bytes=x.numel() * x.element_size())
    run_ours(benchmark, variant, fn)


def relu_eager(x):
    return torch.relu(x)


@pytest.mark.parametrize("variant", [*OURS, "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_relu_with_counting(benchmark, dtype, variant):
    """Fused ReLU + counting (ours) against a plain ReLU that counts nothing (eager): the cost of counting."""
    x = torch.randn(COUNT_SHAPE).to(dtype)
    counts = torch.zeros(x[0].numel(), dtype=torch.long)
    fn = functools.partial(relu_count, x, counts) if variant.startswith("ours") else functools.partial(relu_eager, x)
    fn()
    benchmark.group = f"relu+count {tuple(COUNT_SHAPE)} {str(dtype)[6:]}"
    benchmark.extra_info.update(op="relu (+count)", size=f"{COUNT_SHAPE} {str(dtype)[6:]}", variant=variant,
                                bytes=2 * x.numel() * x.element_size())
    run_ours(benchmark, variant, fn)


# ---- MaskedSGD: optimizer step and whole training step ----------------------------------------------

MODELS = {
    "mlp-digits": (ModelConfig(name="mlp"), (1, 8, 8), 64),
    "vgg-d5g5": (ModelConfig(name="vgg", depth=5, width=5), (3, 32, 32), 128),
    "resnet18": (ModelConfig(name="resnet18"), (3, 32, 32), 32),
}


def masked_model(name):
    cfg, shape, batch = MODELS[name]
    torch.manual_seed(0)
    model = build_model(cfg, shape, 10)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.8)
    with torch.no_grad():
        for k, w in prunable_weights(model).items():
            w.mul_(masks[k])
    return model, masks, shape, batch


def sgd_then_remask(opt, pairs):
    opt.step()
    with torch.no_grad():
        torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])


@pytest.mark.parametrize("variant", [*OURS, "dense-sgd", "eager", "compile"])
@pytest.mark.parametrize("model_name", ["vgg-d5g5", "resnet18"])
def test_masked_sgd_step(benchmark, model_name, variant):
    """Optimizer step only. dense-sgd = torch.optim.SGD with no masks (the floor); eager = SGD + re-mask."""
    model, masks, _, _ = masked_model(model_name)
    weights = prunable_weights(model)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    hp = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
    if variant.startswith("ours"):
        opt = MaskedSGD(params, {weights[k]: m for k, m in masks.items()}, **hp)
        fn = opt.step
    else:
        opt = torch.optim.SGD(params, **hp)
        pairs = [(weights[k], m) for k, m in masks.items()]
        if variant == "dense-sgd":
            fn = opt.step
        elif variant == "eager":
            fn = functools.partial(sgd_then_remask, opt, pairs)
        else:
            fn = functools.partial(compiled(sgd_then_remask), opt, pairs)
    fn()
    n = sum(p.numel() for p in params)
    benchmark.group = f"optimizer step {model_name}"
    # read p, g, buf (+ mask bytes), write p, buf
    benchmark.extra_info.update(op="masked SGD step", size=model_name, variant=variant, bytes=5 * n * 4)
    run_ours(benchmark, variant, fn)


@pytest.mark.parametrize("variant", ["ours", "prune-hooks"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_training_step(benchmark, model_name, variant):
    """Forward + backward + step at 80 % sparsity: dense weights + MaskedSGD against torch.nn.utils.prune hooks."""
    model, masks, shape, batch = masked_model(model_name)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    hp = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
    if variant == "ours":
        weights = prunable_weights(model)
        opt = MaskedSGD(model.parameters(), {weights[k]: m for k, m in masks.items()}, **hp)
    else:
        modules = dict(model.named_modules())
        for k, m in masks.items():
            tprune.custom_from_mask(modules[k.rsplit(".", 1)[0]], "weight", m)
        opt = torch.optim.SGD(model.parameters(), **hp)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    benchmark.group = f"training step {model_name}"
    benchmark.extra_info.update(op="training step", size=f"{model_name} batch {batch}", variant=variant, bytes=0)
    benchmark(step)
