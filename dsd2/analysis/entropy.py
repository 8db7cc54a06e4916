"""Entropy of ReLU on/off states (DSD² eq. 1), from exact per-neuron counts.

For neuron i of layer l with on-state frequency p_i = counts_i / observations over the training set,
H_i = -p_i log2 p_i - (1 - p_i) log2 (1 - p_i) (0 log 0 = 0), and H_l = mean_i H_i, in bits.

The estimator uses dataset-level frequencies. A mean of per-batch entropies is a different, biased number:
entropy is concave, so the entropy of the pooled frequency is at least the mean of per-batch entropies
(Jensen), and small batches push per-batch frequencies toward 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def neuron_entropy_bits(counts: torch.Tensor, observations: int) -> torch.Tensor:
    """Binary entropy (bits) of every neuron's on-state frequency; float64."""
    if observations <= 0:
        raise ValueError(f"observations must be positive, got {observations}")
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
