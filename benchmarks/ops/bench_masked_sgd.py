"""MaskedSGD: the optimizer step alone, ours against torch.optim.SGD followed by a re-mask (eager and compiled) and
against dense SGD with no masks (the floor); and a whole training step at 80 % sparsity, dense weights + MaskedSGD
against torch.nn.utils.prune hooks."""

import functools

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from dsd2.config import ModelConfig
from dsd2.models import build_model
from dsd2.ops import MaskedSGD
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights

MODELS = {
    "mlp-digits": (ModelConfig(name="mlp"), (1, 8, 8), 64),
    "vgg-d5g5": (ModelConfig(name="vgg", depth=5, width=5), (3, 32, 32), 128),
    "resnet18": (ModelConfig(name="resnet18"), (3, 32, 32), 32),
}
HP = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
STEP_MODELS = pytest.mark.parametrize("model_name", ["vgg-d5g5", "resnet18"])


def masked_model(name):
    """The model pruned to 80 % sparsity by global magnitude, its masks, its input shape and batch size."""
    cfg, shape, batch = MODELS[name]
    torch.manual_seed(0)
    model = build_model(cfg, shape, 10)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.8)
    with torch.no_grad():
        for k, w in prunable_weights(model).items():
            w.mul_(masks[k])
    return model, masks, shape, batch


def with_gradients(model_name):
    """(model, masks, parameters) with a random gradient on every parameter."""
    model, masks, _, _ = masked_model(model_name)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return model, masks, params


def sgd_then_remask(opt, pairs):
    opt.step()
    with torch.no_grad():
        torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])


def step_label(label, model_name, params, variant):
    traffic = 5 * sum(p.numel() for p in params) * 4  # read p, g, buf (+ mask bytes), write p, buf
    label(f"optimizer step {model_name}", "masked SGD step", model_name, variant, traffic)


@STEP_MODELS
def test_masked_sgd_step(benchmark, label, ours, model_name):
    model, masks, params = with_gradients(model_name)
    weights = prunable_weights(model)
    opt = MaskedSGD(params, {weights[k]: m for k, m in masks.items()}, **HP)
    opt.step()
    step_label(label, model_name, params, ours)
    benchmark(opt.step)


@pytest.mark.parametrize("variant", ["dense-sgd", "eager", "compile"])
@STEP_MODELS
def test_masked_sgd_step_baselines(benchmark, label, compiled, model_name, variant):
    """dense-sgd = torch.optim.SGD with no masks (the floor); eager = SGD + re-mask."""
    model, masks, params = with_gradients(model_name)
    weights = prunable_weights(model)
    opt = torch.optim.SGD(params, **HP)
    pairs = [(weights[k], m) for k, m in masks.items()]
    if variant == "dense-sgd":
        fn = opt.step
    else:
        fn = functools.partial(compiled(sgd_then_remask) if variant == "compile" else sgd_then_remask, opt, pairs)
    fn()
    step_label(label, model_name, params, variant)
    benchmark(fn)


@pytest.mark.parametrize("variant", ["ours", "prune-hooks"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_training_step(benchmark, label, model_name, variant):
    """Forward + backward + step at 80 % sparsity: dense weights + MaskedSGD against torch.nn.utils.prune hooks."""
    model, masks, shape, batch = masked_model(model_name)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    if variant == "ours":
        weights = prunable_weights(model)
        opt = MaskedSGD(model.parameters(), {weights[k]: m for k, m in masks.items()}, **HP)
    else:
        modules = dict(model.named_modules())
        for k, m in masks.items():
            tprune.custom_from_mask(modules[k.rsplit(".", 1)[0]], "weight", m)
        opt = torch.optim.SGD(model.parameters(), **HP)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    label(f"training step {model_name}", "training step", f"{model_name} batch {batch}", variant, 0)
    benchmark(step)
