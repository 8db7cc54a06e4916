"""The whole training step as one CUDA graph: gather + augment + normalise, forward (teacher included), loss,
backward and the masked optimizer step, replayed for every full batch of an epoch.

Rules of capture followed here: static shapes and addresses (one graph per batch size; inputs reach it by a
device-side copy of sample indices into a static buffer); no allocation visible to Python and no host sync
inside the capture (metrics accumulate into static device tensors, the learning rate is a device tensor the
optimizer kernel reads, so schedules change without recapture); warm-up steps on a side stream before
capture, so lazily created state (momentum buffers, the optimizer's pointer tables, cuDNN plans) exists;
autocast's weight-cast cache off. The last partial batch runs eagerly with the same ops, so an epoch sees
every sample exactly as the eager loop does. A level gets a new optimizer, hence a new capture.
"""

from __future__ import annotations

import torch
from torch import nn

from dsd2.data import DeviceDataset
from dsd2.data.batching import normalize


def _optimizer_tables() -> list:
    """The Triton optimizer kernel reads its pointer tables by address from a bounded cache: hold them for as
    long as the graph that captured them lives."""
    try:
        from dsd2.kernels import masked_sgd
    except ImportError:
        return []
    return list(masked_sgd._TABLE_CACHE.values())


def device_crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop + flip with the device's own generator (graph-safe: philox offsets advance per replay)."""
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=dev)
    flip = torch.rand(b, device=dev) < 0.5
    rows = oy[:, None] + torch.arange(h, device=dev)[None]
    cols = ox[:, None] + torch.arange(w, device=dev)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class GraphedTrainStep:
    """One captured training step for batches of `batch_size` samples of `data`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective, data: DeviceDataset,
                 batch_size: int, mean: torch.Tensor, std: torch.Tensor, *, augment: bool, precision: str,
                 channels_last: bool, warmup_indices: list[torch.Tensor], lr: float):
        if data.images.device.type != "cuda":
            raise ValueError("CUDA graphs need the dataset and the model on a CUDA device")
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.data, self.mean, self.std = data, mean, std
        self.augment, self.precision, self.channels_last = augment, precision, channels_last
        dev = data.images.device
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), dtype=torch.long, device=dev)
        # the optimizer reads its learning rate from this tensor on every replay
        self.lr = torch.full((), float(lr), device=dev)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        # an eager epoch before this one (e.g. the online-counting epoch) leaves gradients behind: the warm-up
        # steps, like every replay, must start from zero
        optimizer.zero_grad(set_to_none=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for idx in warmup_indices:  # real training steps: they also build every lazy buffer
                self._step(idx)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # gradients stay allocated (zeroed in the graph after each step): their addresses, and with them the
        # optimizer kernel's cached pointer tables, are the same in warm-up and in every replay
        optimizer.zero_grad(set_to_none=False)
        with torch.cuda.graph(self.graph):
            self._step(self.idx)
        self._keep_alive = _optimizer_tables()

    def _step(self, idx: torch.Tensor) -> None:
        self.model.train()  # evaluation between epochs leaves the model in eval mode (a Python-only switch)
        x = self.data.images[idx]
        if self.augment:
            x = device_crop_flip(x)
        labels = self.data.labels[idx]
        x = normalize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        enabled = self.precision == "bf16"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled, cache_enabled=False):
            logits = self.model(x)
            loss = self.objective(logits, labels, x, idx)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.loss_sum.add_(loss.detach() * labels.numel())
        self.correct.add_((logits.detach().argmax(1) == labels).sum())

    def replay(self, idx: torch.Tensor, lr: float) -> None:
        self.lr.fill_(lr)
        self.idx.copy_(idx, non_blocking=True)
        self.graph.replay()

    def run_eager(self, idx: torch.Tensor, lr: float) -> None:
        """The same step, uncaptured, for a batch of another size (the last partial batch)."""
        self.lr.fill_(lr)
        self._step(idx)


WARMUP_STEPS = 3


def graphed_epoch(step: GraphedTrainStep | None, make_step, perm: torch.Tensor, batch_size: int,
                  lr: float) -> tuple[GraphedTrainStep, torch.Tensor, torch.Tensor]:
    """One epoch: replay the graph over the full batches of `perm` (capturing it first, after warm-up steps
    that are this epoch's first batches, when `step` is None); the partial last batch runs eagerly.
    Returns the step and the epoch's summed loss and number of correct predictions (device tensors)."""
    full = perm.numel() - perm.numel() % batch_size
    batches = [perm[i:i + batch_size] for i in range(0, full, batch_size)]
    first = 0
    if step is None:
        first = min(WARMUP_STEPS, len(batches))
        step = make_step(batches[:first], lr)  # warm-up steps are this epoch's first real steps
    else:
        step.loss_sum.zero_()
        step.correct.zero_()
    for idx in batches[first:]:
        step.replay(idx, lr)
    if full < perm.numel():
        step.run_eager(perm[full:], lr)
    return step, step.loss_sum.clone(), step.correct.clone()
