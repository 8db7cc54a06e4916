"""FLOP accounting: measured forward FLOPs (fvcore and torch.utils.flop_counter), dense and effective, and the
training cost of a level.

Conventions, named wherever a number is reported:
  * "fvcore": one fused multiply-add = 1 FLOP (fvcore's convention; the DSD² paper's Table 1 uses it);
  * "2mac": one multiply-add = 2 FLOPs (torch.utils.flop_counter's convention).
Effective FLOPs count only the multiply-adds that touch a nonzero weight: every weight of a conv or linear
layer takes part in the same number of multiply-adds per sample, so a layer's effective count is its dense
count times its weight density. Operations without prunable weights (BatchNorm, pooling) stay dense.
Training cost of a level = images seen x (forward + backward ~ 3 x forward), plus the teacher's forward per
image when distilling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dsd2.pruning import PRUNABLE_TYPES


def layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Analytic multiply-adds per sample of every Conv/Linear layer (keyed by its weight's name)."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Linear):
                per = module.in_features * module.out_features * (output[0].numel() // module.out_features)
            else:
                k = module.weight[0].numel()  # in_channels / groups x kernel elements
                per = output[0].numel() * k
            macs[f"{name}.weight" if name else "weight"] = int(per)
        return record

    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


@dataclass
class ForwardFlops:
    """Per-sample forward FLOPs of the dense architecture."""

    fvcore: int  # whole model, 1 per multiply-add
    fvcore_prunable: int  # fvcore's count of the conv/linear operators alone
    torch_2mac: int  # whole model, torch.utils.flop_counter (2 per multiply-add)
    layers: dict[str, int]  # analytic conv/linear multiply-adds per prunable weight

    def effective(self, densities: dict[str, float], convention: str = "fvcore") -> float:
        """Forward FLOPs per sample counting only multiply-adds with a nonzero weight."""
        removed = sum(macs * (1.0 - densities.get(name, 1.0)) for name, macs in self.layers.items())
        if convention == "fvcore":
            return self.fvcore - removed
        return self.torch_2mac - 2 * removed

    def dense(self, convention: str = "fvcore") -> int:
        return self.fvcore if convention == "fvcore" else self.torch_2mac


def fvcore_counts(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(total, conv+linear part) from fvcore, 1 FLOP per multiply-add."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and trace warn about torch.jit deprecations
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, example)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        total = int(analysis.total())
        by_op = analysis.by_operator()
    prunable = sum(int(v) for k, v in by_op.items() if k in ("conv", "linear", "addmm", "matmul", "mm"))
    return total, prunable


def torch_counts(model: nn.Module, example: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return int(counter.get_total_flops())


def measure_forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> ForwardFlops:
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        example = torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype)
        total, prunable = fvcore_counts(model, example)
        two_mac = torch_counts(model, example)
    finally:
        model.train(was_training)
    return ForwardFlops(total, prunable, two_mac, layer_macs(model, input_shape))


def densities_of(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((w != 0).sum()) / w.numel() for name, w in weights.items()}


def training_flops(images: int, forward_per_sample: float, teacher_forward_per_sample: float = 0.0) -> float:
    """images x (3 x student forward + teacher forward)."""
    return images * (3.0 * forward_per_sample + teacher_forward_per_sample)
