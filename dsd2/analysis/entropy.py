"""Entropy of ReLU on/off states (DSD² eq. 1), from exact per-neuron counts.

For neuron i of layer l with on-state frequency p_i = counts_i / observations over the training set,
H_i = -p_i log2 p_i - (1 - p_i) log2 (1 - p_i) (0 log 0 = 0), and H_l = mean_i H_i, in bits.

Gated activations (GELU, SiLU, Hardswish, LeakyReLU) have the same two states, the sign of their input. ReLU6
and Hardtanh have three regimes, split at their bounds lo < hi: off (x <= lo), linear (lo < x <= hi) and
saturated (x > hi). Their counts are `[2, neurons]`, how many observations lay above lo and above hi, and
H_i = -sum_k p_ik log2 p_ik over the three regimes: at most log2 3 = 1.585 bits, 1 bit when a neuron is
never saturated and off half the time, exactly the ReLU's value for a neuron that never saturates.

The estimator uses dataset-level frequencies. A mean of per-batch entropies is a different, biased number:
entropy is concave, so the entropy of the pooled frequency is at least the mean of per-batch entropies
(Jensen), and small batches push per-batch frequencies toward 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def neuron_entropy_bits(counts: torch.Tensor, observations: int) -> torch.Tensor:
    """Entropy (bits) of every neuron's state frequencies; float64. `counts`: `[neurons]`, the on-states of a
    two-state activation, or `[thresholds, neurons]`, how many observations lay above each of its increasing
    thresholds (regime k holds those above threshold k but not above k + 1)."""
    if observations <= 0:
        raise ValueError(f"observations must be positive, got {observations}")
    if counts.dim() == 2:
        above = counts.double()
        outside = torch.full_like(above[:1], float(observations))
        regimes = torch.cat([outside, above]) - torch.cat([above, torch.zeros_like(outside)])
        p = regimes / observations
        return -torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p)).sum(0)
    p = counts.double() / observations
    q = 1.0 - p
    h = -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))
          + torch.where(q > 0, q * torch.log2(q), torch.zeros_like(q)))
    return h


def layer_entropy_bits(counts: torch.Tensor, observations: int) -> float:
    return float(neuron_entropy_bits(counts, observations).mean())


@dataclass
class EntropySummary:
    per_layer: dict[str, float]
    mean_over_layers: float  # the paper's figure
    neuron_weighted: float  # every neuron of the network counts once
    neurons: int


def summarize(layers: dict[str, tuple[torch.Tensor, int]]) -> EntropySummary:
    """From {layer name: (counts, observations)} to per-layer means and the two network averages."""
    if not layers:
        raise ValueError("no ReLU layers were counted")
    per_layer, total_h, total_n = {}, 0.0, 0
    for name, (counts, obs) in layers.items():
        h = neuron_entropy_bits(counts, obs)
        per_layer[name] = float(h.mean())
        total_h += float(h.sum())
        total_n += h.numel()
    return EntropySummary(per_layer, sum(per_layer.values()) / len(per_layer), total_h / total_n, total_n)
