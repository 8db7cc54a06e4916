"""Named random streams: every draw of the loop comes from a generator named by what it is for.

A stream's seed is a hash of (name, seed, level, epoch), so streams never collide: seed 0 at level 7 and
seed 1 at level 0 draw different numbers, and the shuffle of an epoch is independent of its augmentation.
Everything derives from the run's seed and position, so a resumed run draws exactly what the uninterrupted
one drew. One draw is outside them: augmentation inside a captured CUDA graph uses the device's default
generator (a graph replays its own random offsets), which the `init` stream seeds at the start of a run.
"""

from __future__ import annotations

import hashlib

import torch

# what each stream draws; a new stream gets a new name here
STREAMS = {
    "init": "the model's initial weights",
    "noise": "which training labels are corrupted, and their new classes",
    "split": "the validation hold-out",
    "subset": "the training subset (--train-size) drawn from what the validation hold-out leaves",
    "shuffle": "the order of an epoch's samples",
    "augment": "an epoch's crops and flips",
    "prune": "random pruning scores",
    "gradient": "the batches that score weights by gradient",
    "reinit": "re-drawn weights after a prune",
}


def stream_seed(name: str, seed: int, level: int = 0, epoch: int = 0) -> int:
    """A 63-bit seed for the stream `name` at (seed, level, epoch)."""
    if name not in STREAMS:
        raise ValueError(f"random stream '{name}' is not known; allowed: {', '.join(STREAMS)}")
    key = f"dsd2/{name}/{int(seed)}/{int(level)}/{int(epoch)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def generator(name: str, seed: int, level: int = 0, epoch: int = 0,
              device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` for the stream `name` at (seed, level, epoch)."""
    return torch.Generator(device=device).manual_seed(stream_seed(name, seed, level, epoch))
