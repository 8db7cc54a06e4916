"""What is measured after each level: pure functions of logits, labels, weights and counters."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dsd2.analysis.entropy import summarize
from dsd2.analysis.flops import ForwardFlops, densities_of, training_flops
from dsd2.analysis.stats import pack_outcomes
from dsd2.data import Splits


def split_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a split's logits (NaN for an empty split)."""
    if labels.numel() == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": float(F.cross_entropy(logits, labels)), "acc": float((logits.argmax(1) == labels).float().mean())}


def test_outcomes(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Which test images the model gets right, packed (`dsd2.analysis.stats.pack_outcomes`), and how many there
    are: the per-sample record the dip's confidence interval resamples."""
    return {"test_outcomes": pack_outcomes(logits.argmax(1) == labels), "test_images": labels.numel()}


def train_metrics(logits: torch.Tensor, splits: Splits) -> dict[str, Any]:
    """Accuracy and loss on the noisy training labels, accuracy on the clean ones, and memorisation: the
    fraction of corrupted samples predicted with their noisy label (None without noise)."""
    pred = logits.argmax(1)
    labels, noisy = splits.train.labels, splits.noisy_mask
    n_noisy = int(noisy.sum())
    return {
        "train_acc": float((pred == labels).float().mean()),
        "train_clean_acc": float((pred == splits.train_clean_labels).float().mean()),
        "memorized_noisy": float((pred[noisy] == labels[noisy]).float().mean()) if n_noisy else None,
        "train_loss": float(F.cross_entropy(logits, labels)),
    }


def entropy_metrics(relus: dict) -> dict[str, Any]:
    """Entropy of ReLU states over the layers that counted (empty when none did)."""
    layers = {n: (r.counts, r.observations) for n, r in relus.items() if r.counts is not None}
    if not layers:
        return {}
    e = summarize(layers)
    return {"entropy_mean": e.mean_over_layers, "entropy_weighted": e.neuron_weighted,
            "entropy_layers": [round(v, 6) for v in e.per_layer.values()]}


def l2_distance(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                masks: dict[str, torch.Tensor]) -> float:
    """l2 distance of the retained weights from `reference`, in float64."""
    total = torch.zeros((), dtype=torch.float64, device=next(iter(weights.values())).device)
    for name, w in weights.items():
        diff = (w.detach().double() - reference[name].double()) * masks[name]
        total += (diff * diff).sum()
    return float(total.sqrt())


def learning_distances(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                       level_start: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, float]:
    """He et al.'s learning distance: from the level's start and from the initial weights."""
    refs = {"dist_from_level_start": level_start, "dist_from_init": init}
    return {key: l2_distance(weights, ref, masks) for key, ref in refs.items() if ref}


def flop_metrics(flops: ForwardFlops, weights: dict[str, torch.Tensor], images: int,
                 train_time: float) -> dict[str, float]:
    """Forward FLOPs (dense, and effective at the weights' densities), training FLOPs of `images` images, and
    the throughput of `train_time` seconds of training."""
    dens = densities_of({n: w.detach() for n, w in weights.items()})
    eff, eff2 = flops.effective(dens, "fvcore"), flops.effective(dens, "2mac")
    dense = flops.dense("fvcore")
    train_eff, train_dense = training_flops(images, eff), training_flops(images, dense)
    return {"forward_flops_dense": dense, "forward_flops_effective": eff,
            "forward_flops_effective_2mac": eff2, "train_flops_effective": train_eff,
            "train_flops_dense": train_dense, "train_time_s": train_time,
            "images_per_s": images / max(train_time, 1e-9),
            "achieved_flop_per_s": train_dense / max(train_time, 1e-9)}
