"""Training objectives: cross-entropy, and distillation from a frozen teacher.

An objective is called as `objective(logits, labels, inputs, sample_indices) -> loss` and exposes the parts
it logs through one interface: `reset()` at the start of an epoch, `accumulators()` (device tensors that
data-parallel ranks sum) and `parts()` (the epoch's logged values). A plain function works too: `as_objective`
gives it the interface, with nothing to log.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsd2.training.inputs import autocast


class Objective:
    """Base class: the loss, and nothing logged."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor,
                 indices: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Start an epoch's logged parts afresh."""

    def accumulators(self) -> list[torch.Tensor]:
        """Device tensors that hold the epoch's sums (added to in place, so captured graphs keep adding)."""
        return []

    def parts(self) -> dict[str, float]:
        """The epoch's logged parts, read once per epoch."""
        return {}


class CrossEntropy(Objective):
    def __call__(self, logits, labels, inputs, indices=None):
        return F.cross_entropy(logits.float(), labels)


cross_entropy = CrossEntropy()


class _FunctionObjective(Objective):
    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    def __call__(self, logits, labels, inputs, indices=None):
        return self.fn(logits, labels, inputs, indices)


def as_objective(objective: Objective | Callable[..., torch.Tensor]) -> Objective:
    return objective if isinstance(objective, Objective) else _FunctionObjective(objective)


class DistillationObjective(Objective):
    """(1 - alpha) CE + alpha tau^2 KL to a frozen teacher, via the fused `dsd2.ops.kd_loss`.

    The teacher runs in eval mode under no_grad on the same (augmented) batch as the student; without
    augmentation its logits are computed once for the whole training split and looked up by sample index.
    The CE and KL parts and the sample count accumulate in device tensors (read once per epoch, no sync per
    step). With alpha = 0 the objective is plain cross-entropy, bit for bit.
    """

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float,
                 cached_logits: torch.Tensor | None = None, precision: str = "fp32"):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.cached = cached_logits
        self.precision = precision
        self.sums: torch.Tensor | None = None  # [ce * n, kl * n, n], created on the first call's device
        self.one: torch.Tensor | None = None

    def reset(self) -> None:
        if self.sums is not None:
            self.sums.zero_()

    def accumulators(self) -> list[torch.Tensor]:
        return [] if self.sums is None else [self.sums]

    def teacher_logits(self, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[indices]
        with torch.no_grad(), autocast(inputs.device, self.precision):
            # the teacher's own dtype (bf16 under autocast): the fused loss reads it as it is
            return self.teacher(inputs)

    def __call__(self, logits, labels, inputs, indices=None):
        if self.alpha == 0.0:
            return F.cross_entropy(logits.float(), labels)
        from dsd2.ops import kd_loss

        t = self.teacher_logits(inputs, indices)
        # fp32, bf16 or fp16 logits go to the fused op as they are (it computes in fp32); the gradient comes back in
        # the logits' dtype
        loss, ce, kl = kd_loss(logits, t, labels, alpha=self.alpha, temperature=self.temperature,
                               return_parts=True)
        if self.sums is None:
            self.sums = torch.zeros(3, device=logits.device)  # float32: exact counts up to 2^24 per epoch
            self.one = torch.ones((), device=logits.device)
        # [ce, kl, 1] * n added in two kernels (a stack and an add), not five
        self.sums.add_(torch.stack((ce, kl, self.one)), alpha=labels.numel())
        return loss

    def parts(self) -> dict[str, float]:
        if self.sums is None or not float(self.sums[2]):
            return {}
        ce, kl, n = self.sums.tolist()
        return {"kd_ce": ce / n, "kd_kl": kl / n}
