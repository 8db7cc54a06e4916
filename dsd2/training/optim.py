"""Masked optimizers: pruned entries take no gradient and stay exactly 0.0 after every step."""

from __future__ import annotations

import torch
from torch import nn

from dsd2.config import OptimConfig
from dsd2.ops import MaskedSGD
from dsd2.pruning import Masks, prunable_weights


class MaskedAdam(torch.optim.Adam):
    """Adam whose pruned entries take no gradient and stay exactly 0.0 after every step."""

    def __init__(self, params, masks: dict[torch.Tensor, torch.Tensor], **kwargs):
        super().__init__(params, **kwargs)
        self.masks = {id(p): m for p, m in masks.items()}

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
