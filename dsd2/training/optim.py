"""Masked optimizers: pruned entries take no gradient and stay exactly 0.0 after every step."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dsd2.config import OptimConfig
from dsd2.ops import MaskedSGD
from dsd2.ops.masked_sgd import pair_masks
from dsd2.pruning import Masks, prunable_weights


class MaskedAdam(torch.optim.Adam):
    """Adam whose pruned entries take no gradient and stay exactly 0.0 after every step.

    `masks` takes MaskedSGD's forms: a dict keyed by the parameter tensor or its position in `params`, or a list
    parallel to `params` (None for no mask). The masks are held, not copied: updating them in place takes effect
    at the next step."""

    def __init__(self, params,
                 masks: Mapping[torch.Tensor | int, torch.Tensor] | list[torch.Tensor | None] | None = None,
                 **kwargs):
        super().__init__(params, **kwargs)
        flat = [p for group in self.param_groups for p in group["params"]]
        self.masks = {id(p): m for p, m in pair_masks(flat, masks)}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        pairs = [(p, self.masks[id(p)]) for g in self.param_groups for p in g["params"]
                 if id(p) in self.masks and p.grad is not None]
        if pairs:
            torch._foreach_mul_([p.grad for p, _ in pairs], [m for _, m in pairs])
        loss = super().step(closure)
        if pairs:
            torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])
        return loss


def build_optimizer(model: nn.Module, masks: Masks, cfg: OptimConfig) -> torch.optim.Optimizer:
    weights = prunable_weights(model)
    by_param = {weights[name]: mask for name, mask in masks.items()}
    if cfg.optimizer == "sgd":
        return MaskedSGD(model.parameters(), by_param, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    # capturable keeps Adam's step counters on the GPU: no host read per step, and CUDA-graph safe
    cuda = next(model.parameters()).device.type == "cuda"
    return MaskedAdam(model.parameters(), by_param, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=cuda)
