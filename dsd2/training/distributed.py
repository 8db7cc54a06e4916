"""Data-parallel training under torchrun: process group from the environment, sharded batches, reductions.

One run, many processes: every rank holds the whole (small, uint8) dataset on its device and takes its
share of every global batch of the shared seeded permutation; DistributedDataParallel averages gradients, so
the weights, and therefore the masks computed from them, stay identical on every rank. Evaluation and the
ReLU-state counting pass are sharded by sample and reduced. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def shard(self, n: int) -> slice:
        """Contiguous share of n items for this rank (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's contiguous shard (see `shard`) of an n-row tensor, on every rank."""
        if not self.enabled:
            return local
        base, extra = divmod(n, self.world)
        width = base + (1 if extra else 0)
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        sizes = [base + (1 if r < extra else 0) for r in range(self.world)]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])


_CONTEXT = DistContext()


def context() -> DistContext:
    return _CONTEXT


def init_from_env() -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op for a single process."""
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # gloo for CPU tensors and NCCL for CUDA ones, so `--device cpu` works on a GPU host too
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    _CONTEXT = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    return _CONTEXT


def shutdown() -> None:
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = DistContext()
