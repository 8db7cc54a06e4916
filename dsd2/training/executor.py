"""How epochs run: eagerly, as one C++ call (a Linear/ReLU chain on the CPU), as CUDA-graph replays, or data
parallel. Chosen once per run (`make_executor`).

Every executor has one interface: `train_epoch` (one epoch of masked training, with the ReLUs counting when
asked), `predict` (logits of a whole split), `count` (the counting pass: logits of a split with the ReLUs
counting) and `reduce` (sum what data-parallel ranks counted). The level loop never asks which one it has.
Metrics accumulate in device tensors and are read once per epoch, so no executor waits on the device inside
an epoch.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

import torch
from torch import nn

from dsd2 import rng
from dsd2.config import ConfigError
from dsd2.data import DeviceDataset
from dsd2.data.batching import train_batches
from dsd2.training.distributed import DistContext
from dsd2.training.inputs import TrainFeed, forward_loss, predict
from dsd2.training.objectives import Objective

EVAL_BATCH = 512  # evaluation batches are at least this large: no gradients, so memory allows it


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, feed: TrainFeed, objective: Objective,
                perm: torch.Tensor, augment: torch.Generator | None = None,
                dist_ctx: DistContext | None = None) -> dict[str, float]:
    """One epoch in the order `perm`. Under data parallelism (`dist_ctx` enabled) `model` is the DDP wrapper
    and each rank trains on its share of every global batch; the epoch's loss and accuracy are summed over
    ranks. Gradients are zeroed in place, so their addresses (and the optimizer's pointer tables) stay put."""
    model.train()
    data, batch_size = feed.data, feed.batch_size
    device = data.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    sharded = dist_ctx is not None and dist_ctx.enabled
    world = dist_ctx.world if sharded else 1
    batches = train_batches(data, batch_size, perm, augment, shard=dist_ctx.shard if sharded else None, world=world)
    n = len(data)
    # DDP averages the ranks' mean losses; shards of one batch may differ by a sample, so each rank's loss is
    # weighted by its share to give exactly the global batch mean
    global_sizes = iter([g for g in (min(batch_size, n - s) for s in range(0, n, batch_size)) if g >= world])
    for images, labels, idx in batches:
        logits, loss = forward_loss(model, objective, images, labels, idx, feed.fmt)
        optimizer.zero_grad(set_to_none=False)
        (loss * (labels.numel() * world / next(global_sizes)) if sharded else loss).backward()
        optimizer.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
    if sharded:
        dist_ctx.all_reduce_sum(loss_sum)
        dist_ctx.all_reduce_sum(correct)
    return {"train_loss": float(loss_sum) / n, "train_acc": float(correct) / n}


def set_counting(relus: dict, on: bool, reset: bool = False) -> None:
    for r in relus.values():
        if reset:
            r.reset_counts()
        r.counting = on


class EagerExecutor:
    """Plain PyTorch epochs in one process."""

    mode = "eager"

    def __init__(self, model: nn.Module, feed: TrainFeed, objective: Objective, relus: dict, seed: int,
                 num_classes: int, dist_ctx: DistContext | None = None):
        self.model, self.feed, self.objective, self.relus, self.seed = model, feed, objective, relus, seed
        self.num_classes = num_classes
        self.ctx = dist_ctx or DistContext()
        self.eval_batch = max(feed.batch_size, EVAL_BATCH)

    def epoch_order(self, level: int, epoch: int) -> torch.Tensor:
        n = len(self.feed.data)
        perm = torch.randperm(n, generator=rng.generator("shuffle", self.seed, level, epoch))
        return perm.to(self.feed.data.images.device)

    def augment_generator(self, level: int, epoch: int) -> torch.Generator | None:
        if not self.feed.augment:
            return None
        return rng.generator("augment", self.seed, level, epoch, device=self.feed.data.images.device)

    def train_epoch(self, optimizer: torch.optim.Optimizer, level: int, epoch: int, lr: float,
                    counting: bool = False) -> dict[str, Any]:
        """One epoch at learning rate `lr`; with `counting`, the ReLUs count their states in it (online
        entropy). Returns the loss, accuracy and the objective's logged parts."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.objective.reset()
        set_counting(self.relus, counting, reset=counting)
        stats = self._epoch(optimizer, level, epoch, lr, counting)
        set_counting(self.relus, False)
        self.reduce(counts=counting)
        return {**stats, **self.objective.parts()}

    def _epoch(self, optimizer, level: int, epoch: int, lr: float, counting: bool) -> dict[str, Any]:
        return train_epoch(self.model, optimizer, self.feed, self.objective, self.epoch_order(level, epoch),
                           self.augment_generator(level, epoch))

    def predict(self, data: DeviceDataset) -> torch.Tensor:
        return predict(self.model, data, self.eval_batch, self.feed.fmt)

    def count(self, data: DeviceDataset) -> torch.Tensor:
        """The counting pass: the split's logits, with every ReLU counting its states from zero."""
        set_counting(self.relus, True, reset=True)
        logits = self.predict(data)
        set_counting(self.relus, False)
        self.reduce(counts=True, objective=False)
        return logits

    def reduce(self, counts: bool = False, objective: bool = True) -> None:
        """Sum what the ranks counted and accumulated (nothing to do in one process)."""


class GraphedExecutor(EagerExecutor):
    """Epochs, evaluation and the counting pass as CUDA-graph replays (`graphs` makes the graphs; the test
    suite passes an emulator). A level's first epoch captures the step, since its optimizer is new; the online
    counting epoch has a graph of its own, captured with the ReLUs counting."""

    mode = "graphed"

    def __init__(self, *args, graphs=None, **kwargs):
        from dsd2.training.graphs import CudaGraphs, GraphedPredictor

        super().__init__(*args, **kwargs)
        self.graphs = graphs if graphs is not None else CudaGraphs(self.feed.data.images.device)
        self.steps: dict[bool, Any] = {}
        self.step_optimizer: torch.optim.Optimizer | None = None
        self.predictor = GraphedPredictor(self.model, self.eval_batch, self.feed.fmt, relus=self.relus,
                                          graphs=self.graphs)

    def _epoch(self, optimizer, level: int, epoch: int, lr: float, counting: bool) -> dict[str, Any]:
        from dsd2.training.graphs import GraphedTrainStep, graphed_epoch

        if self.step_optimizer is not optimizer:
            self.steps, self.step_optimizer = {}, optimizer

        def make_step(warmup, first_lr):
            return GraphedTrainStep(self.model, optimizer, self.objective, self.feed, warmup_indices=warmup,
                                    lr=first_lr, graphs=self.graphs, relus=self.relus)

        captured = self.steps.get(counting)
        step, loss_sum, correct = graphed_epoch(captured, make_step, self.epoch_order(level, epoch),
                                                self.feed.batch_size, lr)
        self.steps[counting] = step
        n = len(self.feed.data)
        stats: dict[str, Any] = {"train_loss": float(loss_sum) / n, "train_acc": float(correct) / n}
        if captured is None:
            stats["graph_capture_s"] = step.capture_s
        return stats

    def predict(self, data: DeviceDataset) -> torch.Tensor:
        return self.predictor.predict(data)


class FusedCpuExecutor(EagerExecutor):
    """Epochs of a Linear/ReLU chain on the CPU as one C++ call each (`dsd2.training.fused_step`), the eager
    epochs bit for bit; evaluation likewise. The training split is normalised and flattened once. An epoch the
    C++ call does not run (counting ReLUs, another optimizer or objective) is the eager one, unless `required`."""

    mode = "fused-cpu"

    def __init__(self, *args, chain, required: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.chain, self.required = chain, required
        self.flat: dict[int, tuple[DeviceDataset, torch.Tensor]] = {}
        self.inputs = self.flat_inputs(self.feed.data)

    def flat_inputs(self, data: DeviceDataset) -> torch.Tensor:
        """A split's images normalised as each batch would be, flattened: [N, features], kept per split."""
        held = self.flat.get(id(data))
        if held is None or held[0] is not data:
            held = self.flat[id(data)] = (data, self.feed.fmt.prepare(data.images).flatten(1).contiguous())
        return held[1]

    def _counting(self) -> bool:
        return any(r.counting for r in self.relus.values())

    def _epoch(self, optimizer, level: int, epoch: int, lr: float, counting: bool) -> dict[str, Any]:
        from dsd2.training.fused_step import fused_epoch

        if not counting:
            self.model.train()
            out = fused_epoch(self.chain, self.inputs, self.feed.data.labels, self.epoch_order(level, epoch),
                              self.feed.batch_size, optimizer, self.objective)
            if out is not None:
                n = len(self.feed.data)
                return {"train_loss": float(out[0]) / n, "train_acc": float(out[1]) / n}
            if self.required:
                raise ConfigError(f"--cpu-step fused runs MaskedAdam or MaskedSGD (C++ backend) with cross-entropy "
                                  f"or KD to cached teacher logits, not {type(optimizer).__name__} with "
                                  f"{type(self.objective).__name__}; use --cpu-step auto or eager")
        return super()._epoch(optimizer, level, epoch, lr, counting)

    def predict(self, data: DeviceDataset) -> torch.Tensor:
        from dsd2.training.fused_step import fused_predict

        if self._counting():
            return super().predict(data)
        self.model.eval()
        return fused_predict(self.chain, self.flat_inputs(data), self.eval_batch)


def fused_cpu_chain(model: nn.Module, feed: TrainFeed):
    """The Linear/ReLU chain the fused CPU epoch can run for this model and feed, or None and why not."""
    from dsd2.ops import cpp_extension
    from dsd2.training.fused_step import linear_relu_chain

    data = feed.data
    if data.images.device.type != "cpu":
        return None, f"the device is {data.images.device.type}"
    if feed.fmt.precision != "fp32" or feed.augment:
        return None, "it trains in bf16 or with augmentation"
    ext = cpp_extension()
    if ext is None or not hasattr(ext, "mlp_epoch"):
        return None, "dsd2._C is not built"
    if data.labels.dtype != torch.long:
        return None, "the labels are not int64"
    return linear_relu_chain(model, tuple(data.images.shape[1:]))


class DataParallelExecutor(EagerExecutor):
    """One process per device under torchrun: each rank trains on its share of every global batch through
    DistributedDataParallel, predicts its shard of a split, and the ranks sum their counts."""

    mode = "data-parallel"

    def __init__(self, *args, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(*args, **kwargs)
        device = self.feed.data.images.device
        self.train_model = DistributedDataParallel(self.model,
                                                   device_ids=[device.index] if device.type == "cuda" else None)

    def _epoch(self, optimizer, level: int, epoch: int, lr: float, counting: bool) -> dict[str, Any]:
        return train_epoch(self.train_model, optimizer, self.feed, self.objective, self.epoch_order(level, epoch),
                           self.augment_generator(level, epoch), dist_ctx=self.ctx)

    def predict(self, data: DeviceDataset) -> torch.Tensor:
        part = self.ctx.shard(len(data))
        local = predict(self.model, DeviceDataset(data.images[part], data.labels[part]), self.eval_batch,
                        self.feed.fmt)
        if local.numel() == 0:  # fewer samples than ranks: this rank's shard is empty
            local = torch.zeros(0, self.num_classes, device=data.images.device)
        return self.ctx.gather_rows(local, len(data))

    def reduce(self, counts: bool = False, objective: bool = True) -> None:
        device = self.feed.data.images.device
        if counts:
            for r in self.relus.values():
                if r.counts is None:
                    r.counts = torch.zeros(0, dtype=torch.int64, device=device)
                obs = torch.tensor([r.observations], dtype=torch.int64, device=device)
                self.ctx.all_reduce_sum(r.counts)
                self.ctx.all_reduce_sum(obs)
                r.observations = int(obs)
        if objective:
            for t in self.objective.accumulators():
                self.ctx.all_reduce_sum(t)


# glibc's malloc options (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_FROM = 32 << 20  # the largest threshold glibc takes on 64-bit
_TRIM_FROM = 1 << 30
_kept_freed: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation rather than hand it back to the kernel: a CPU
    training step frees and allocates the same activation-sized tensors (a 128x32x32x32 map is 16 MB) every step,
    and by default each of them is a fresh mmap whose every page the kernel zeroes on first touch. The VGG-like's
    epoch spent ~9 % of its time in that (perf, on a 2-core Xeon). Blocks under 32 MB come from the heap from
    then on, which is only trimmed above 1 GB free, so the process keeps its peak (what a training process holds
    anyway). Done once per process, on glibc only, and not where the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ (theirs stand); whether the options took."""
    global _kept_freed
    if _kept_freed is None:
        _kept_freed = False
        chosen = any(os.environ.get(v) for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not chosen:
            mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
            if mallopt is not None:
                _kept_freed = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)) and bool(
                    mallopt(_M_TRIM_THRESHOLD, _TRIM_FROM))
    return _kept_freed


def make_executor(model: nn.Module, feed: TrainFeed, objective: Objective, relus: dict, seed: int,
                  num_classes: int, *, dist_ctx: DistContext, graphs=None,
                  cuda_graphs: bool | None = None, cpu_step: str = "auto") -> EagerExecutor:
    """The executor of a run: data parallel under torchrun; graphed where graphs can be made (a CUDA device, or
    a graph maker passed in), are not turned off, and an epoch has more full batches than warm-up steps; the
    fused CPU epoch for a Linear/ReLU chain on the CPU unless `cpu_step` is eager (`fused` refuses a model it
    cannot take); eager otherwise. On the CPU, freed memory is kept for reuse first (`keep_freed_memory`)."""
    from dsd2.training.graphs import WARMUP_STEPS

    args = (model, feed, objective, relus, seed, num_classes)
    if feed.data.images.device.type == "cpu":
        keep_freed_memory()
    if dist_ctx.enabled:
        return DataParallelExecutor(*args, dist_ctx=dist_ctx)
    capturable = feed.data.images.device.type == "cuda" or graphs is not None
    enough = len(feed.data) // feed.batch_size > WARMUP_STEPS
    if cuda_graphs is not False and capturable and enough:
        return GraphedExecutor(*args, dist_ctx=dist_ctx, graphs=graphs)
    if cpu_step != "eager":
        chain, why = fused_cpu_chain(model, feed)
        if chain is not None:
            return FusedCpuExecutor(*args, dist_ctx=dist_ctx, chain=chain, required=cpu_step == "fused")
        if cpu_step == "fused":
            raise ConfigError(f"--cpu-step fused needs a chain of Flatten, Linear and ReLU modules trained on the "
                              f"CPU in fp32 without augmentation, but {why}; use --cpu-step auto or eager")
    return EagerExecutor(*args, dist_ctx=dist_ctx)
