"""A CPU stand-in for CUDA graphs, faithful to what capture-and-replay code may rely on.

Capture records every tensor operation that reaches the dispatcher (forward, autograd's backward, optimizer
kernels written with torch ops) with the very tensors it read and wrote, and then restores the memory that
existed before it and that the capture touched: like a CUDA capture, capturing computes nothing that stays.
A replay re-runs the recorded operations on the recorded tensors, writing each result into the memory the
capture produced, so only what the graph holds by address is seen: Python code, Python counters and tensors
rebound after capture are not replayed, exactly as on a GPU. A host read of a device value inside the capture
(`.item()`, `float()`, `nonzero`) raises, as CUDA's capture does.

Work that bypasses the dispatcher (the C++ extension's pybind functions, Triton kernels) is invisible to it:
tests that capture through the emulator run the fused ops' plain-PyTorch paths (`reference_ops` fixture).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default}


class HostSyncInCapture(RuntimeError):
    pass


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class EmulatedGraph:
    def __init__(self):
        self.ops: list[tuple] = []
        self.replays = 0

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                fresh = func(*args, **kwargs)
                for old, new in zip(_tensors(out), _tensors(fresh)):
                    if new is old or (new.data_ptr() == old.data_ptr() and new.stride() == old.stride()):
                        continue  # an in-place result or a view of the same memory
                    old.copy_(new)
        self.replays += 1


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: EmulatedGraph):
        super().__init__()
        self.graph = graph
        self.internal: set[int] = set()  # storages allocated by the capture itself
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise HostSyncInCapture(f"{func} reads a device value on the host inside a graph capture")
        # every pre-existing memory the capture touches is kept, not only what the schema marks as written:
        # some kernels (native_batch_norm's running statistics) write arguments their schema does not mark
        inputs = set()
        for t in _tensors((args, kwargs)):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            inputs.add(key)
            if key not in self.internal and key not in self.saved:
                self.saved[key] = (storage, storage.clone())
        out = func(*args, **kwargs)
        for t in _tensors(out):
            key = t.untyped_storage().data_ptr()
            if key not in inputs:
                self.internal.add(key)
        self.graph.ops.append((func, args, kwargs, out))
        return out

    def undo(self) -> None:
        for storage, copy in self.saved.values():
            storage.copy_(copy)


class EmulatedGraphs:
    """Drop-in for `dsd2.training.graphs.CudaGraphs` on any device."""

    name = "emulated"

    def __init__(self):
        self.captured: list[EmulatedGraph] = []

    def graph(self) -> EmulatedGraph:
        return EmulatedGraph()

    def warmup(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def capture(self, graph: EmulatedGraph):
        recorder = _Recorder(graph)
        with recorder:
            yield
        recorder.undo()
        self.captured.append(graph)
