"""CUDA graphs: the whole training step, and evaluation / the ReLU-state counting pass, captured once and replayed.

Training (`GraphedTrainStep`): gather + augment + normalise, forward (teacher included), loss, backward and the
masked optimizer step, replayed for every full batch of an epoch. Evaluation (`GraphedPredictor`): normalise +
forward in eval mode, one graph with counting off and one with it on, replayed for every full batch of a split.

Rules of capture followed here: static shapes and addresses (one graph per batch size; training inputs reach
the graph by a device-side copy of sample indices into a static buffer, evaluation inputs by a copy of the
split's slice into a static image buffer); no host sync inside the capture (metrics accumulate into static
device tensors, the learning rate is a device tensor the optimizer reads, so schedules change without
recapture; Python-side counters such as a ReLU's number of observations are advanced by the replaying code,
not by the captured one); warm-up on a side stream before capture, so lazily created state (momentum buffers,
the optimizer's pointer tables, ReLU counters, cuDNN plans) exists; autocast's weight-cast cache off. The last
partial batch runs eagerly with the same code, so an epoch sees every sample exactly as the eager loop does.

Where graphs are made is one small object (`CudaGraphs`): `graph()`, `warmup()` and `capture(graph)`. The test
suite swaps in an emulator that records the dispatched tensor operations of the capture and replays them, so
the capturing and replaying code here is exercised on the CPU too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time

import torch
from torch import nn

from dsd2.data import DeviceDataset
from dsd2.data.batching import crop_flip
from dsd2.training.inputs import InputFormat, TrainFeed, forward_loss, predict


class CudaGraphs:
    """Graph capture on a CUDA device, which must be the current one (`torch.cuda.set_device`): captures and
    replays run on the current device's streams."""

    name = "cuda"

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cuda")

    def _check(self) -> None:
        current = torch.cuda.current_device()
        if self.device.index is not None and self.device.index != current:
            raise ValueError(f"CUDA graphs run on the current device (cuda:{current}) but the model is on "
                             f"{self.device}; call torch.cuda.set_device({self.device.index}) first")

    def graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def warmup(self):
        """Warm-up work runs on a side stream (as torch.cuda.graph requires of work that precedes a capture)."""
        self._check()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, graph: torch.cuda.CUDAGraph):
        self._check()
        return torch.cuda.graph(graph)


class _HostCounters:
    """Python-side counters that captured code advances: a `CountingReLU`'s `observations` (an objective's sums
    are device tensors, which the graph advances itself). A replay runs no Python, so they are advanced here by
    what one captured step added; the capture itself, which computes nothing, leaves them as they were."""

    def __init__(self, items: list[tuple[object, str]]):
        self.items = items
        self.seen = [getattr(obj, attr) for obj, attr in items]
        self.per_step: list[int] = []

    def captured(self) -> None:
        self.per_step = [getattr(obj, attr) - seen for (obj, attr), seen in zip(self.items, self.seen)]
        for (obj, attr), seen in zip(self.items, self.seen):
            setattr(obj, attr, seen)

    def advance(self, steps: int = 1) -> None:
        for (obj, attr), per_step in zip(self.items, self.per_step):
            setattr(obj, attr, getattr(obj, attr) + per_step * steps)


def _bind_counters(relus: dict, captured: dict[str, torch.Tensor]) -> None:
    """A graph adds into the counter tensors it captured. A reset (`counts = None`) or a restored checkpoint
    rebinds a ReLU's counter: give the captured tensor back to it, carrying whatever the ReLU holds."""
    for name, counts in captured.items():
        relu = relus[name]
        if relu.counts is counts:
            continue
        if relu.counts is None:
            counts.zero_()
        else:
            counts.copy_(relu.counts)
        relu.counts = counts


def _counting(relus: dict | None) -> dict:
    return {name: r for name, r in (relus or {}).items() if r.counting}


def _optimizer_tables() -> list:
    """The Triton optimizer kernel reads its pointer tables by address from a bounded cache: hold them for as
    long as the graph that captured them lives. Without Triton there is no such kernel and nothing to hold; with
    it, a failing import of the kernels is a broken install or checkout and is raised, not hidden."""
    if importlib.util.find_spec("triton") is None:
        return []
    from dsd2.kernels import masked_sgd

    return masked_sgd.pointer_tables()


class GraphedTrainStep:
    """One captured training step for the full batches of `feed`.

    `graphs` makes the graph (default: `CudaGraphs`, which needs `data` and the model on a CUDA device).
    `relus`: the model's `CountingReLU`s; those counting when the step is captured count in every replay
    (online entropy). Their Python-side `observations` are advanced here, once per replay (the objective's
    sums are device tensors). `capture_s` is how long the warm-up and capture took."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, objective, feed: TrainFeed, *,
                 warmup_indices: list[torch.Tensor], lr: float, graphs=None, relus: dict | None = None):
        data, batch_size = feed.data, feed.batch_size
        if graphs is None:
            if data.images.device.type != "cuda":
                raise ValueError("CUDA graphs need the dataset and the model on a CUDA device")
            graphs = CudaGraphs(data.images.device)
        started = time.perf_counter()
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.feed = feed
        dev = data.images.device
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), dtype=torch.long, device=dev)
        # the optimizer reads its learning rate from this tensor on every replay
        self.lr = torch.full((), float(lr), device=dev)
        self._lr_value = float(lr)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        # an eager epoch before this one (e.g. the online-counting epoch) leaves gradients behind: the warm-up
        # steps, like every replay, must start from zero
        optimizer.zero_grad(set_to_none=False)
        with graphs.warmup():
            for idx in warmup_indices:  # real training steps: they also build every lazy buffer
                self._step(idx)
        self.graph = graphs.graph()
        # gradients stay allocated (zeroed in the graph after each step): their addresses, and with them the
        # optimizer kernel's cached pointer tables, are the same in warm-up and in every replay
        optimizer.zero_grad(set_to_none=False)
        self.relus = _counting(relus)
        self.counters = {n: r.counts for n, r in self.relus.items()}  # allocated by the warm-up steps
        self.host = _HostCounters([(r, "observations") for r in self.relus.values()])
        with graphs.capture(self.graph):
            self._step(self.idx)
        self.host.captured()
        self._keep_alive = _optimizer_tables()
        self.capture_s = time.perf_counter() - started

    def _step(self, idx: torch.Tensor) -> None:
        self.model.train()  # evaluation between epochs leaves the model in eval mode (a Python-only switch)
        x = self.feed.data.images[idx]
        if self.feed.augment:
            x = crop_flip(x)  # the device's default generator: its philox offset advances per replay
        labels = self.feed.data.labels[idx]
        logits, loss = forward_loss(self.model, self.objective, x, labels, idx, self.feed.fmt)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.loss_sum.add_(loss.detach() * labels.numel())
        self.correct.add_((logits.detach().argmax(1) == labels).sum())

    def _set_lr(self, lr: float) -> None:
        if lr != self._lr_value:  # a schedule changes it once per epoch at most: no fill kernel per step
            self.lr.fill_(lr)
            self._lr_value = lr

    def replay(self, idx: torch.Tensor, lr: float) -> None:
        self._set_lr(lr)
        self.idx.copy_(idx, non_blocking=True)
        _bind_counters(self.relus, self.counters)
        self.graph.replay()
        self.host.advance()

    def run_eager(self, idx: torch.Tensor, lr: float) -> None:
        """The same step, uncaptured, for a batch of another size (the last partial batch)."""
        self._set_lr(lr)
        _bind_counters(self.relus, self.counters)
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


class _Capture:
    """One captured evaluation forward: a static image buffer in, static float32 logits out."""

    def __init__(self, graph, images: torch.Tensor, logits: torch.Tensor, host: _HostCounters,
                 counts: dict[str, torch.Tensor], addresses: tuple[int, ...]):
        self.graph, self.images, self.logits = graph, images, logits
        self.host, self.counts, self.addresses = host, counts, addresses


class GraphedPredictor:
    """Evaluation, and the counting pass, as graph replays; logits equal `dsd2.training.predict`'s.

    One graph per set of counting ReLUs (in practice: none, or all): the `CountingReLU`s of `relus` that are
    counting add their counts inside the graph, and their Python-side `observations` are advanced here, once
    per replay. Each split's full batches are copied into the graph's static image buffer and replayed; its
    last partial batch runs eagerly. A graph is recaptured when a parameter or buffer of the model has moved
    to another address since it was captured, so the model can be modified in place (pruned, rewound, loaded)
    between passes; counters reset or restored between passes are handed back to the graph's.
    `graphs` makes the graphs (default: `CudaGraphs`, which needs the model on a CUDA device); `capture_s`
    sums the time spent warming up and capturing, `replays` counts the replays."""

    WARMUP_FORWARDS = 2

    def __init__(self, model: nn.Module, batch_size: int, fmt: InputFormat, *, relus: dict | None = None,
                 graphs=None):
        if graphs is None:
            if fmt.mean.device.type != "cuda":
                raise ValueError("CUDA graphs need the model and its inputs on a CUDA device")
            graphs = CudaGraphs(fmt.mean.device)
        self.model, self.batch_size, self.fmt = model, batch_size, fmt
        self.relus = dict(relus or {})
        self.graphs = graphs
        self.captures: dict[frozenset, _Capture] = {}
        self.capture_s = 0.0
        self.replays = 0

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.fmt.prepare(images)
        with self.fmt.autocast(images.device):
            return self.model(x).float()

    def _addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    def _capture(self, batch: torch.Tensor) -> _Capture:
        started = time.perf_counter()
        relus = _counting(self.relus)
        # warm-up and capture must leave the counts as they were: remember them (None = nothing counted yet)
        before = {n: (None if r.counts is None else r.counts.clone(), r.observations) for n, r in relus.items()}
        images = batch.clone()
        with self.graphs.warmup():
            for _ in range(self.WARMUP_FORWARDS):  # builds the counters and every lazy buffer
                self._forward(images)
        graph = self.graphs.graph()
        host = _HostCounters([(r, "observations") for r in relus.values()])
        with self.graphs.capture(graph):
            logits = self._forward(images)
        host.captured()
        for n, r in relus.items():
            counts, r.observations = before[n]
            if counts is None:
                r.counts.zero_()
            else:
                r.counts.copy_(counts)
        capture = _Capture(graph, images, logits, host, {n: r.counts for n, r in relus.items()},
                           self._addresses())
        self.capture_s += time.perf_counter() - started
        return capture

    def _ready(self, batch: torch.Tensor) -> _Capture:
        key = frozenset(_counting(self.relus))
        capture = self.captures.get(key)
        if capture is not None:
            _bind_counters(self.relus, capture.counts)
        if capture is None or capture.addresses != self._addresses():
            capture = self.captures[key] = self._capture(batch)
        return capture

    @torch.no_grad()
    def predict(self, data: DeviceDataset) -> torch.Tensor:
        self.model.eval()
        n, b = len(data), self.batch_size
        full = n - n % b
        if full == 0:
            return predict(self.model, data, b, self.fmt)
        capture = self._ready(data.images[:b])
        out = torch.empty((n, *capture.logits.shape[1:]), dtype=capture.logits.dtype, device=data.images.device)
        for start in range(0, full, b):
            capture.images.copy_(data.images[start:start + b], non_blocking=True)
            capture.graph.replay()
            out[start:start + b].copy_(capture.logits)
        self.replays += full // b
        capture.host.advance(full // b)
        if full < n:
            out[full:] = self._forward(data.images[full:])
        return out
