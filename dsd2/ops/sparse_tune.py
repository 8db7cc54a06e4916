"""The crossover: from which sparsity on a masked layer's sparse path (`dsd2.ops.sparse_layers` on the CPU,
`dsd2.ops.sparse_csr` on CUDA) is faster than its dense masked path, measured on this machine (this GPU, for a CUDA
layer) for one layer shape, input shape, dtype and thread count.

`crossover(layer, x, training)` times the dense masked call and the sparse call at falling sparsities (99.8 %
down to 50 %), forward and backward when training, forward only for inference, until the sparse call is no longer
at least 10 % faster (MARGIN). Each time is the best of three calls after a warm-up one (a neighbour's burst of
work only adds time), and a sparsity that seems to lose is timed again beside the dense call before the search
stops there: one unlucky measurement would otherwise hold a layer on its dense path on this machine for good
(the cache keeps it). The crossover is the lowest sparsity measured at which the sparse call won, and never
below 50 %:
`auto` takes the sparse path on a layer at least that sparse, so a level below the crossover runs dense. Results
are cached in `$DSD2_CACHE_DIR/sparse_crossover.json` (default `~/.cache/dsd2`; `DSD2_CACHE_DIR=off` keeps them
in memory only), keyed by the CPU, the kernel level, torch's version and the thread count as well, under a file
lock: runs side by side share the measurements.

A sparse call that fails while it is measured (a torch.sparse / cuSPARSE build without one of its products, a GPU
out of memory) does not end the run: `auto` keeps that layer dense for this process, with one warning naming the
error, and caches nothing, so the next process measures again. `--sparse-kernels on` raises it as it is.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from pathlib import Path

import torch

from dsd2.ops.sparse_layers import is_channels_last

SPARSITIES = (0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.65, 0.5)  # measured from the sparsest down
FLOOR = 0.5  # auto never takes the sparse path below this sparsity
MARGIN = 0.9  # the sparse call must take at most this fraction of the dense call's time: within a whole epoch the
# layer's neighbours (caches, memory traffic) shift a narrow win to a loss
NEVER = 1.0  # a crossover that no layer reaches: the sparse path was slower even at 99.8 %
KERNELS_VERSION = 8  # bump when the sparse kernels or this measurement change: older ones are measured again
CACHE_FILE = "sparse_crossover.json"

_memory: dict[str, float] = {}


def _cache_path() -> Path | None:
    from dsd2.data.folder import cache_dir

    folder = cache_dir()
    return None if folder is None else folder / CACHE_FILE


def layer_key(layer: torch.nn.Module, x: torch.Tensor, training: bool) -> str:
    """What a crossover depends on: the machine, the layer's shape and arguments, the input's shape and layout."""
    from dsd2.ops._backend import cpp_extension, cpu_model

    ext = cpp_extension()
    if x.device.type == "cuda":
        where = [torch.cuda.get_device_name(x.device), "cuda"]
    else:
        where = [cpu_model(), ext.cpu_isa() if ext is not None else "none"]
    parts = [*where, f"torch {torch.__version__}",
             f"kernels {KERNELS_VERSION}", f"threads {torch.get_num_threads()}", type(layer).__name__,
             str(tuple(layer.weight.shape)), str(x.dtype), str(tuple(x.shape)),
             "channels_last" if is_channels_last(x) else "contiguous", "train" if training else "infer"]
    if isinstance(layer, torch.nn.Conv2d):
        parts += [f"stride {layer.stride}", f"padding {layer.padding}", f"dilation {layer.dilation}",
                  f"groups {layer.groups}"]
    return " | ".join(parts)


def _time(fn, device: torch.device, repeats: int = 3) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: plans, allocations, oneDNN primitives (cuSPARSE's and cuDNN's on CUDA)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure(layer: torch.nn.Module, x: torch.Tensor, training: bool) -> float:
    """Time the dense and the sparse call of `layer`'s shape on random data shaped like `x`; the crossover."""
    from dsd2.ops.masked_layers import MaskedConv2d, MaskedLinear

    gen = torch.Generator().manual_seed(0)
    bias = layer.bias is not None
    if isinstance(layer, MaskedConv2d):
        probe = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, layer.groups, bias, layer.padding_mode)
    elif isinstance(layer, MaskedLinear):
        probe = MaskedLinear(layer.in_features, layer.out_features, bias)
    else:
        raise TypeError(f"a crossover is measured for MaskedLinear and MaskedConv2d, not {type(layer).__name__}")
    if layer.weight.dim() == 4 and is_channels_last(layer.weight):
        probe = probe.to(memory_format=torch.channels_last)
    device = layer.weight.device
    probe = probe.to(device)
    inputs = torch.randn(x.shape, generator=gen).to(device)
    if is_channels_last(x):
        inputs = inputs.to(memory_format=torch.channels_last)
    inputs.requires_grad_(training)

    def call():
        if training:
            out = probe(inputs)
            out.backward(torch.ones_like(out))
            probe.weight.grad = inputs.grad = None
        else:
            with torch.no_grad():
                probe(inputs)

    def dense_time() -> float:
        probe.sparse_kernels = "off"
        try:
            return _time(call, device)
        finally:
            probe.sparse_kernels = "on"

    def sparse_time() -> float:
        try:
            return _time(call, device)
        except RuntimeError as exc:
            raise SparseCallFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc

    dense = dense_time()
    found = NEVER
    for sparsity in SPARSITIES:
        probe.mask.copy_(torch.rand(layer.weight.shape, generator=gen) >= sparsity)
        sparse = sparse_time()
        if sparse > MARGIN * dense:  # a loss, or noise in either time: both timed again, side by side
            dense = min(dense, dense_time())
            sparse = min(sparse, sparse_time())
            if sparse > MARGIN * dense:
                break
        found = sparsity
    return max(found, FLOOR) if found < NEVER else NEVER


class SparseCallFailed(RuntimeError):
    """The sparse call of a layer being measured raised; `crossover` keeps that layer dense."""


def crossover(layer: torch.nn.Module, x: torch.Tensor, training: bool) -> float:
    """The sparsity from which `layer` runs sparse under `auto`, measured once per key and cached on disk."""
    key = layer_key(layer, x, training)
    if key in _memory:
        return _memory[key]
    try:
        _memory[key] = _measured(key, layer, x, training)
    except SparseCallFailed as failed:
        warnings.warn(f"the sparse path of a {type(layer).__name__} {tuple(layer.weight.shape)} on "
                      f"{layer.weight.device} failed while its crossover was measured ({failed}); --sparse-kernels "
                      "auto keeps it dense in this process", RuntimeWarning, stacklevel=2)
        _memory[key] = NEVER
    return _memory[key]


def _measured(key: str, layer: torch.nn.Module, x: torch.Tensor, training: bool) -> float:
    path = _cache_path()
    if path is None:
        return measure(layer, x, training)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one measurement per key, even with runs side by side
        table = _read(path)
        if key not in table:
            table[key] = measure(layer, x, training)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, path)
    return table[key]


def _read(path: Path) -> dict[str, float]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measured again
    return {k: float(v) for k, v in table.items() if isinstance(v, (int, float))} if isinstance(table, dict) else {}
