"""Global unstructured pruning: masks over every Conv/Linear weight, scoring criteria, perturbation."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Masks = dict[str, torch.Tensor]  # qualified parameter name -> bool tensor, True = kept

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights global pruning acts on: every Conv/Linear weight (not biases, not BatchNorm), or those that
    `select_prunable` chose."""
    out = {}
    chosen = getattr(model, PRUNABLE_ATTRIBUTE, None)
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            name = f"{mod_name}.weight" if mod_name else "weight"
            if chosen is None or name in chosen:
                out[name] = module.weight
    return out


PRUNABLE_ATTRIBUTE = "dsd2_prunable"  # the names `select_prunable` chose, kept on the model itself


def select_prunable(model: nn.Module, include: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = ()) -> list[str]:
    """Choose which Conv/Linear weights are pruned, by name patterns (fnmatch), e.g. keep the first conv and the
    classifier dense with `exclude=("conv1.weight", "fc.weight")`. The choice is kept on the model (every
    function of this package that takes a model honours it) and returned; a pattern that matches nothing, or a
    choice of nothing, is refused."""
    from fnmatch import fnmatch

    if hasattr(model, PRUNABLE_ATTRIBUTE):
        delattr(model, PRUNABLE_ATTRIBUTE)
    names = list(prunable_weights(model))
    for pattern in (*include, *exclude):
        if not any(fnmatch(n, pattern) for n in names):
            raise ValueError(f"prunable-weight pattern '{pattern}' matches none of the Conv/Linear weights "
                             f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    chosen = [n for n in names if any(fnmatch(n, p) for p in include) and not any(fnmatch(n, p) for p in exclude)]
    if not chosen:
        raise ValueError(f"the patterns include {list(include)} exclude {list(exclude)} leave no weight to prune")
    if len(chosen) < len(names):
        setattr(model, PRUNABLE_ATTRIBUTE, frozenset(chosen))
    return chosen


def full_masks(model: nn.Module) -> Masks:
    return {name: torch.ones_like(w, dtype=torch.bool) for name, w in prunable_weights(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    weights = prunable_weights(model)
    for name, mask in masks.items():
        weights[name].mul_(mask)


def count_sparsity(model: nn.Module) -> tuple[int, int]:
    """(zeros, total) counted in the prunable tensors themselves, not taken from the schedule."""
    zeros = total = 0
    for w in prunable_weights(model).values():
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros, total


def magnitude_scores(model: nn.Module, **_: object) -> dict[str, torch.Tensor]:
    return {name: w.detach().abs().float() for name, w in prunable_weights(model).items()}


def random_scores(model: nn.Module, *, generator: torch.Generator, **_: object) -> dict[str, torch.Tensor]:
    return {
        name: torch.rand(w.shape, generator=generator).to(w.device)
        for name, w in prunable_weights(model).items()
    }


def gradient_scores(model: nn.Module, *, loss_batches: Iterable[Callable[[], torch.Tensor]],
                    **_: object) -> dict[str, torch.Tensor]:
    """|w * dL/dw| accumulated over a few batches (first-order Taylor saliency)."""
    weights = prunable_weights(model)
    grads = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    for make_loss in loss_batches:
        model.zero_grad(set_to_none=True)
        make_loss().backward()
        for name, w in weights.items():
            if w.grad is not None:
                grads[name] += w.grad.float()
    model.zero_grad(set_to_none=True)
    return {name: (weights[name].detach().float() * grads[name]).abs() for name in weights}


CRITERIA = {"magnitude": magnitude_scores, "random": random_scores, "gradient": gradient_scores}


def global_prune(scores: dict[str, torch.Tensor], masks: Masks, fraction: float) -> Masks:
    """Remove round(fraction * remaining) of the still-kept weights with the lowest scores, globally.

    Ties are broken by position (stable sort) so the result is deterministic.
    """
    names = list(masks)
    flat_mask = torch.cat([masks[n].flatten() for n in names])
    flat_scores = torch.cat([scores[n].flatten().to(flat_mask.device) for n in names])
    remaining = int(flat_mask.sum())
    k = round(fraction * remaining)
    if k == 0:
        return {n: m.clone() for n, m in masks.items()}
    flat_scores = torch.where(flat_mask, flat_scores, torch.full_like(flat_scores, float("inf")))
    order = torch.argsort(flat_scores, stable=True)
    new_flat = flat_mask.clone()
    new_flat[order[:k]] = False
    out, offset = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = new_flat[offset:offset + size].view_as(masks[n])
        offset += size
    return out


def remaining_after(total: int, fraction: float, levels: int) -> list[int]:
    """Kept-weight counts after each level, exactly as `global_prune` computes them."""
    counts, remaining = [], total
    for _ in range(levels):
        remaining -= round(fraction * remaining)
        counts.append(remaining)
    return counts


@torch.no_grad()
def perturb(model: nn.Module, kind: str, masks: Masks, init_state: dict[str, torch.Tensor] | None,
            reinit_seed: int) -> None:
    """After a prune: keep weights ('none'), rewind to saved ones ('rewind'), or re-draw them ('reinit')."""
    if kind == "rewind":
        if init_state is None:
            raise ValueError("rewind needs the saved initial weights")
        model.load_state_dict(init_state)
    elif kind == "reinit":
        devices = [p.device for p in model.parameters()][:1]
        with torch.random.fork_rng(devices=[] if not devices or devices[0].type == "cpu" else devices):
            torch.manual_seed(reinit_seed)
            for module in model.modules():
                if hasattr(module, "reset_parameters") and module is not model:
                    module.reset_parameters()
    elif kind != "none":
        raise ValueError(f"perturbation '{kind}' is not known; allowed: none, rewind, reinit")
    apply_masks(model, masks)


# ---- interop with torch.nn.utils.prune ---------------------------------------------------------
# A torch.nn.utils.prune reparametrisation of `weight`: a parameter `weight_orig`, a float buffer `weight_mask`, a
# forward pre-hook (a BasePruningMethod, or a PruningContainer of several) that sets `weight = weight_orig *
# weight_mask` as a plain attribute before every call. The helpers below read, strip and install it; the masked
# layers' bridge (dsd2.ops.fuse_torch_prune / unfuse_torch_prune) is built on them.

def torch_prune_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The bool mask torch.nn.utils.prune holds for `module.<name>`, or None when it is not pruned that way."""
    mask = module._buffers.get(f"{name}_mask")
    return None if mask is None or f"{name}_orig" not in module._parameters else mask != 0


def layer_mask(module: nn.Module) -> torch.Tensor | None:
    """The bool mask of a layer's weight: torch.nn.utils.prune's, else a masked layer's own `mask` buffer (True =
    kept), else None (a dense layer)."""
    mask = torch_prune_mask(module)
    if mask is None:
        own = module._buffers.get("mask")
        mask = own if own is not None and own.dtype == torch.bool else None
    return mask


def strip_torch_prune(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Take torch.nn.utils.prune's reparametrisation of `module.<name>` off `module` in place, without folding the
    mask in: `<name>` becomes the `<name>_orig` parameter itself (the same tensor, pruned entries as they were).
    Returns the bool mask."""
    from torch.nn.utils.prune import BasePruningMethod

    mask = torch_prune_mask(module, name)
    if mask is None:
        raise ValueError(f"{type(module).__name__}.{name} has no torch.nn.utils.prune reparametrisation")
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, BasePruningMethod) and hook._tensor_name == name:
            del module._forward_pre_hooks[key]
    del module._buffers[f"{name}_mask"]
    module.__dict__.pop(name, None)  # the hook's last `orig * mask`, a plain attribute
    # `<name>` first again, as the layer registered it before pruning moved it behind the bias
    orig = module._parameters.pop(f"{name}_orig")
    rest = dict(module._parameters)
    module._parameters.clear()
    module._parameters.update({name: orig, **rest})
    return mask


def install_torch_prune(module: nn.Module, mask: torch.Tensor) -> None:
    """Reparametrise `module.weight` by torch.nn.utils.prune with `mask` (replacing a pruning it already has);
    `weight_orig` is the weight parameter itself."""
    import torch.nn.utils.prune as tprune

    if tprune.is_pruned(module):
        tprune.remove(module, "weight")
    tprune.custom_from_mask(module, "weight", mask.to(module.weight.device))


def masks_from_torch_prune(model: nn.Module) -> Masks:
    """Our mask dictionary from a model's layers: torch.nn.utils.prune's `weight_mask` buffers, or a masked layer's
    own mask (a model fused by `dsd2.ops.fuse_torch_prune`); all True for a dense layer."""
    masks = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            key = f"{mod_name}.weight" if mod_name else "weight"
            mask = layer_mask(module)
            masks[key] = mask.clone() if mask is not None else torch.ones_like(module.weight, dtype=torch.bool)
    return masks


def to_torch_prune(model: nn.Module, masks: Masks) -> None:
    """Install masks as torch.nn.utils.prune reparametrisations (weight_orig * weight_mask)."""
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        install_torch_prune(modules[key.rsplit(".", 1)[0]] if "." in key else model, mask)


def remove_torch_prune(model: nn.Module) -> Masks:
    """Fold torch.nn.utils.prune reparametrisations into plain weights; return the masks."""
    import torch.nn.utils.prune as tprune

    masks = masks_from_torch_prune(model)
    for module in model.modules():
        if isinstance(module, PRUNABLE_TYPES) and tprune.is_pruned(module):
            tprune.remove(module, "weight")
    return masks
