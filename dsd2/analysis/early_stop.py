"""Early stopping of the pruning loop: by the entropy of ReLU states (DSD²), or by validation accuracy.

Entropy rule: the mean ReLU-state entropy stays flat while the model interpolates (light and critical
phases) and decreases once it enters the classical regime (sweet phase). Keep pruning while it is
stationary; once it has fallen more than `tolerance` (a fraction of its running maximum) below its running
maximum, stop as soon as the validation accuracy has not improved for `patience` levels since then.

Validation rule (the traditional one): stop when validation accuracy has not improved for `patience`
levels. Under label noise it stops in the critical phase, which is the paper's point.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsd2.config import EARLY_STOP_RULES


@dataclass
class StopDecision:
    stop: bool
    level: int  # the level just evaluated
    best_level: int  # the level whose model is returned: best validation accuracy so far
    entropy_drop_level: int | None  # where the entropy was first seen decreasing
    reason: str


def entropy_drop_level(entropies: list[float], tolerance: float) -> int | None:
    """First level whose entropy is below (1 - tolerance) x the running maximum of the earlier levels."""
    peak = None
    for i, h in enumerate(entropies):
        if peak is not None and h < (1.0 - tolerance) * peak:
            return i
        peak = h if peak is None else max(peak, h)
    return None


def _argmax(values: list[float], start: int = 0) -> int:
    """The last level with the highest value (w_best: at equal accuracy the sparser model)."""
    return max(range(start, len(values)), key=lambda i: (values[i], i))


def _levels_without_improvement(values: list[float], start: int = 0) -> int:
    """Levels since the highest value from `start` on was first reached: a level that only equals it is no
    improvement, so a flat curve runs out of patience."""
    first = max(range(start, len(values)), key=lambda i: (values[i], -i))
    return len(values) - 1 - first


def decide(rule: str, val_accs: list[float], entropies: list[float] | None = None, *, patience: int = 3,
           tolerance: float = 0.05) -> StopDecision:
    """Decision after the last level of `val_accs` (one value per completed level, level 0 first)."""
    if rule not in EARLY_STOP_RULES:
        raise ValueError(f"early-stop rule '{rule}' is not known; allowed: {', '.join(EARLY_STOP_RULES)}")
    level = len(val_accs) - 1
    best = _argmax(val_accs)
    if rule == "none":
        return StopDecision(False, level, best, None, "no early stop")
    if rule == "val":
        since = _levels_without_improvement(val_accs)
        stop = since >= patience
        return StopDecision(stop, level, best, None,
                            f"validation accuracy not improved for {since} levels" if stop else "improving")
    if entropies is None or len(entropies) != len(val_accs):
        raise ValueError("the entropy rule needs one entropy value per level")
    drop = entropy_drop_level(entropies, tolerance)
    if drop is None:
        return StopDecision(False, level, best, None, "entropy stationary")
    since = _levels_without_improvement(val_accs, drop)
    stop = since >= patience
    reason = (f"entropy decreasing since level {drop}; validation accuracy not improved for {since} levels"
              if stop else f"entropy decreasing since level {drop}")
    return StopDecision(stop, level, best, drop, reason)
