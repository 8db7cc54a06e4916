"""A CPU stand-in for CUDA graphs, faithful to what capture-and-replay code may rely on.

Capture records every tensor operation that reaches the dispatcher (forward, autograd's backward, optimizer
kernels written with torch ops) with the very tensors it read and wrote, and then restores the memory that
existed before it and that the capture touched: like a CUDA capture, capturing computes nothing that stays.
A replay re-runs the recorded operations on the recorded tensors, writing each result into the memory the
capture produced, so only what the graph holds by address is seen: Python code, Python counters and tensors
rebound after capture are not replayed, exactly as on a GPU. A host read of a device value inside the capture
(`.item()`, `float()`, `torch.equal`, `nonzero`, boolean-mask indexing, `unique`...) raises, as CUDA's capture
does, and so does a replay after a tensor the capture used has been given new memory (`w.data = ...`).

Limits: on the CPU, `.tolist()`, `.numpy()` and copies to the host do not reach the dispatcher (the
`test_no_sync.py` counters catch those); the emulator keeps every tensor the capture used alive, so it cannot
show a graph reading memory freed after capture (a counter reset to None must be handed back to the graph:
the code under test does that, and the tests check the counts after such resets).

Work that bypasses the dispatcher (the C++ extension's pybind functions, Triton kernels) is invisible to it:
tests that capture through the emulator run the fused ops' plain-PyTorch paths (`reference_ops` fixture).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# operations whose result (a Python value, or an output shape) depends on device values: a host read
HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default,
              aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten._unique2.default,
              aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor}


class HostSyncInCapture(RuntimeError):
    pass


class MovedSinceCapture(RuntimeError):
    pass


def _host_read(func, args, kwargs) -> bool:
    if func in HOST_READS:
        return func is not aten.repeat_interleave.Tensor or kwargs.get("output_size") is None
    if func is aten.index.Tensor:  # boolean-mask indexing sizes its output by the mask's contents
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class EmulatedGraph:
    def __init__(self):
        self.ops: list[tuple] = []
        self.addresses: dict[int, tuple[torch.Tensor, int]] = {}  # pre-existing tensors the capture used
        self.replays = 0

    def replay(self) -> None:
        for t, ptr in self.addresses.values():
            if t.data_ptr() != ptr:
                raise MovedSinceCapture(f"a tensor of shape {tuple(t.shape)} captured at {ptr:#x} now lives at "
                                        f"{t.data_ptr():#x}: a CUDA graph would still read the old address")
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
        if _host_read(func, args, kwargs):
            raise HostSyncInCapture(f"{func} reads a device value on the host inside a graph capture")
        # every pre-existing memory the capture touches is kept, not only what the schema marks as written:
        # some kernels (native_batch_norm's running statistics) write arguments their schema does not mark
        inputs = set()
        for t in _tensors((args, kwargs)):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            inputs.add(key)
            if key not in self.internal:
                self.graph.addresses.setdefault(id(t), (t, t.data_ptr()))
                if key not in self.saved:
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
