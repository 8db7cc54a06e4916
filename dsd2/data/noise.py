"""Label noise on the training split: symmetric, asymmetric (CIFAR-10 class map) and pair-flip."""

from __future__ import annotations

import torch

# The standard CIFAR-10 asymmetric map: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def symmetric_noise(labels: torch.Tensor, fraction: float, num_classes: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly round(fraction * N) samples get a different class drawn uniformly.

    Returns (noisy labels, sorted indices of the corrupted samples).
    """
    n = labels.numel()
    k = round(fraction * n)
    idx = torch.randperm(n, generator=generator)[:k].sort().values
    # An offset in 1..C-1 added modulo C is a uniform draw among the other classes.
    offset = torch.randint(1, num_classes, (k,), generator=generator)
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + offset) % num_classes
    return noisy, idx


def pairflip_noise(labels: torch.Tensor, fraction: float, num_classes: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly round(fraction * N) samples move from class c to c + 1 (mod C)."""
    n = labels.numel()
    k = round(fraction * n)
    idx = torch.randperm(n, generator=generator)[:k].sort().values
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + 1) % num_classes
    return noisy, idx


def asymmetric_noise(labels: torch.Tensor, fraction: float, num_classes: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """In each source class of the CIFAR-10 map, round(fraction * n_c) samples take the mapped class."""
    if num_classes != 10:
        raise ValueError(f"asymmetric noise is defined for 10 classes, got {num_classes}")
    noisy = labels.clone()
    chosen = []
    for src, dst in sorted(CIFAR10_ASYMMETRIC.items()):
        members = (labels == src).nonzero().flatten()
        k = round(fraction * members.numel())
        pick = members[torch.randperm(members.numel(), generator=generator)[:k]]
        noisy[pick] = dst
        chosen.append(pick)
    idx = torch.cat(chosen).sort().values if chosen else torch.empty(0, dtype=torch.long)
    return noisy, idx


NOISE_FUNCTIONS = {
    "symmetric": symmetric_noise,
    "asymmetric": asymmetric_noise,
    "pairflip": pairflip_noise,
}


def apply_noise(labels: torch.Tensor, fraction: float, kind: str, num_classes: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if fraction == 0:
        return labels.clone(), torch.empty(0, dtype=torch.long)
    return NOISE_FUNCTIONS[kind](labels, fraction, num_classes, generator)
