"""A pruned level as a compressed model to ship: `dsd2-engine export RUN_DIR[:LEVEL] --out FILE.safetensors` and
`dsd2.load_compressed(FILE)`.

The file is safetensors. Each pruned layer's weight is stored as its kept values (fp32, in the weight's logical
order) and their positions, as a bitmask (one bit per weight) or as CSR (row pointers and column indices of the
[out, in * kh * kw] matrix, int16 where a row is shorter than 32,768), whichever is smaller; every other tensor
(biases, BatchNorm, the first and last dense layers a run does not prune) is stored as it is. The metadata holds
the architecture (the run's model options, input shape and classes), the input preprocessing (mean and std per
channel, in pixel units, of the run's training split) and where the model came from (run hash, level,
sparsity, dsd2 version). Loading never executes code.

`load_compressed` returns a `CompressedModel`: uint8 (or pixel-unit float) images in, logits out, each masked
layer on the sparse path where this machine's crossover for its shape and batch says it is faster
(`sparse_kernels="auto"`, fp32 on the CPU; set "on" to force it), else dense on W⊙M.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsd2.ops.bitmask import pack_bits, unpack_bits

FORMAT = "dsd2-compressed-1"


class ExportError(ValueError):
    """Bad input to export or load_compressed: one sentence naming the value and what is allowed."""


def parse_target(target: str) -> tuple[Path, int | None]:
    """RUN_DIR[:LEVEL] -> (run folder, level or None for the run's last saved level)."""
    path, sep, level = target.rpartition(":")
    if sep and level.isdigit() and path:
        return Path(path), int(level)
    return Path(target), None


def _encode(weight: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A pruned weight's kept values and positions, as a bitmask or CSR, whichever takes fewer bytes."""
    w = weight.detach().float().cpu().contiguous()
    m = mask.detach().bool().cpu().contiguous()
    rows = w.shape[0]
    cols = w.numel() // rows if rows else 0
    flat_m = m.reshape(rows, cols)
    values = w.reshape(rows, cols)[flat_m].contiguous()
    nnz = values.numel()
    index_dtype = torch.int16 if cols <= 2**15 else torch.int32
    csr_bytes = 4 * (rows + 1) + nnz * index_dtype.itemsize
    bitmask_bytes = math.ceil(m.numel() / 8)
    info = {"shape": list(w.shape), "kept": nnz}
    if csr_bytes < bitmask_bytes:
        counts = flat_m.sum(1, dtype=torch.int32)
        rowptr = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0, dtype=torch.int32)])
        cols_of = flat_m.nonzero()[:, 1].to(index_dtype)
        return {"values": values, "rowptr": rowptr, "cols": cols_of}, {**info, "encoding": "csr"}
    # bit j of byte i: weight 8i+j, the masked ops' own packing
    return {"values": values, "bitmask": pack_bits(m)}, {**info, "encoding": "bitmask"}


def _decode(tensors: dict[str, torch.Tensor], info: dict[str, Any], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tuple(info["shape"])
    numel = math.prod(shape)
    rows = shape[0]
    cols = numel // rows if rows else 0
    values = tensors[f"{name}.values"].float()
    if info["encoding"] == "csr":
        rowptr, col = tensors[f"{name}.rowptr"].long(), tensors[f"{name}.cols"].long()
        if rowptr.numel() != rows + 1 or int(rowptr[-1]) != values.numel() or col.numel() != values.numel():
            raise ExportError(f"layer '{name}' in the file is damaged: its CSR lists do not match its values")
        row_of = torch.repeat_interleave(torch.arange(rows), rowptr.diff())
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        mask[row_of, col] = True
    elif info["encoding"] == "bitmask":
        packed = tensors[f"{name}.bitmask"]
        if packed.dtype != torch.uint8 or packed.numel() != math.ceil(numel / 8):
            raise ExportError(f"layer '{name}' in the file is damaged: its bitmask does not match its shape")
        mask = unpack_bits(packed, (rows, cols))
    else:
        raise ExportError(f"layer '{name}' has encoding '{info['encoding']}'; allowed: csr, bitmask")
    if int(mask.sum()) != values.numel():
        raise ExportError(f"layer '{name}' in the file is damaged: {int(mask.sum())} positions for "
                          f"{values.numel()} values")
    weight = torch.zeros(rows, cols)
    weight[mask] = values
    return weight.reshape(shape), mask.reshape(shape)


class CompressedModel(nn.Module):
    """An exported model: normalises uint8 (or pixel-unit float) images [N, C, H, W] as its run did, then runs
    the network, whose pruned layers compute over their kept weights only. `meta`: the file's metadata.

    In inference (no gradient) the network can also run as one C++ call: a VGG-like's feature stack as one
    `SparseStack` on padded grids (no map copied between layers, ReLU and BatchNorm applied in place), a Linear/ReLU
    chain (the MLPs) as one `SparseChain` over the kept weights, the batch as the vector axis. `stack` chooses: "auto"
    (default) times both ways once per batch size (rounded up to a power of two) and keeps the faster, "on" and
    "off" force it; `inference_path` says which way the last call went ("stack", "chain" or "layers")."""

    STACK_MODES = ("auto", "on", "off")

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor, channels_last: bool,
                 meta: dict[str, Any]):
        super().__init__()
        from dsd2.models import VGGLike
        from dsd2.ops.sparse_inference import SparseStack

        self.net = net
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.channels_last = channels_last
        self.meta = meta
        self.stack = "auto"
        self.inference_path = "layers"
        self._stack = SparseStack.compile(net.features) if isinstance(net, VGGLike) else None
        self._chain = None
        if self._stack is None:
            from dsd2.ops.masked_layers import MaskedLinear
            from dsd2.ops.sparse_inference import SparseChain
            from dsd2.training.fused_step import linear_relu_chain

            self._chain = linear_relu_chain(net, tuple(meta["input_shape"]))[0]
            if self._chain is not None and all(isinstance(m, MaskedLinear) for m in self._chain.layers):
                self._sparse_chain = SparseChain(list(self._chain.layers), list(self._chain.relu_after))
            else:
                self._chain = None
        self._stack_choice: dict[tuple, bool] = {}

    def _one_call(self, x: torch.Tensor) -> torch.Tensor:
        if self._stack is not None:
            return self._features_by_stack(x)
        return self._sparse_chain(x)

    def _one_call_applies(self, x: torch.Tensor) -> bool:
        if self._stack is not None:
            return self._stack.applies(x)
        if self._chain is None or not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not x.is_cpu:
            return False
        from dsd2.ops import cpp_extension

        needs_graph = torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for m in self._chain.layers for p in m.parameters()))
        return not needs_graph and cpp_extension() is not None and not torch.jit.is_tracing()

    def _features_by_stack(self, x: torch.Tensor) -> torch.Tensor:
        feats = self._stack(x)
        if feats.shape[-2:] != (1, 1):
            return self.net.classifier(torch.flatten(self.net.pool(feats), 1))
        # a 1x1 map pooled to k x k is k * k copies of each value: the classifier's k * k columns of a channel
        # summed once, in place of the copies and a product k * k times as long
        folded, bias = self._folded_classifier()
        flat = feats.reshape(feats.shape[0], -1)
        return torch.addmm(bias, flat, folded.t()) if bias is not None else flat @ folded.t()

    def _folded_classifier(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        params, buffers = self.net.classifier._parameters, self.net.classifier._buffers  # the dicts: fast
        w, mask, b = params["weight"], buffers.get("mask"), params.get("bias")
        key = tuple((id(t), t._version) for t in (w, mask, b) if t is not None)
        if self.__dict__.get("_fold_key") != key:
            wm = w.detach() if mask is None else torch.where(mask, w.detach(), 0.0)
            copies = wm.shape[1] // self._stack.stages[-1].conv.out_channels
            self.__dict__.update(_fold_key=key, _folded=wm.reshape(wm.shape[0], -1, copies).sum(2).contiguous(),
                                 _fold_bias=None if b is None else b.detach())
        return self.__dict__["_folded"], self.__dict__["_fold_bias"]

    def _take_stack(self, x: torch.Tensor) -> bool:
        if self.stack not in self.STACK_MODES:
            raise ValueError(f"stack '{self.stack}' is not known; allowed: {', '.join(self.STACK_MODES)}")
        if self.stack == "off" or not self._one_call_applies(x):
            return False
        if self.stack == "on":
            return True
        key = (1 << max(x.shape[0] - 1, 0).bit_length(), *x.shape[1:])
        if key not in self._stack_choice:
            self._stack_choice[key] = self._stack_measures_faster(x)
        return self._stack_choice[key]

    def _stack_measures_faster(self, x: torch.Tensor) -> bool:
        """Both ways on x, alternately, three times each after a warm-up (which also settles the layers' own
        crossovers): the stack when its best time is the lower."""
        import time

        ways, best = (self._one_call, self.net), [float("inf"), float("inf")]
        for way in ways:
            way(x)
        for _ in range(3):
            for i, way in enumerate(ways):
                start = time.perf_counter()
                way(x)
                best[i] = min(best[i], time.perf_counter() - start)
        return best[0] < best[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from dsd2.data.batching import normalize

        x = normalize(images, self.mean, self.std)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._take_stack(x):
            self.inference_path = "stack" if self._stack is not None else "chain"
            return self._one_call(x)
        self.inference_path = "layers"
        return self.net(x)


def export_level(target: str, out: str | Path, data_root: str | None = None) -> dict[str, Any]:
    """Write the compressed file of RUN_DIR[:LEVEL]; returns what was written (sizes in bytes, level,
    sparsity) for the command to print."""
    from safetensors.torch import save

    from dsd2.config import from_dict
    from dsd2.data import build_splits
    from dsd2.run.cores import computing_threads
    from dsd2.run.loop import build_run_model
    from dsd2.run.state import Checkpointer, saved_levels
    from dsd2.runs import RunError, atomic_write_bytes, resolve_run
    from dsd2.training.precision import is_conv_net

    path, level = parse_target(target)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out '{out}' must name a .safetensors file")
    run = resolve_run(path, "levels")
    stored = run.stored_config()
    levels = saved_levels(run)
    if not levels:
        raise RunError(f"'{run.root}' has no level checkpoints yet")
    if level is None:
        level = max(levels)
    if level not in levels:
        raise ExportError(f"level {level} of '{run.root}' was not saved; saved levels: "
                          f"{', '.join(map(str, sorted(levels)))}")
    cfg = from_dict(stored["config"])
    if cfg.model.name == "custom":
        raise ExportError(f"'{run.root}' trained a model given to the Python API, whose code the file cannot "
                          "carry; export the built-in models (mlp, lenet300, lenet5, vgg, resnet18)")
    cfg.data.data_root = data_root or cfg.data.data_root
    device = torch.device("cpu")
    cfg.device = "cpu"
    with computing_threads(cfg):
        splits = build_splits(cfg.data, cfg.seed, device)
        model, relus = build_run_model(cfg, splits, device, counting=False)
        Checkpointer(stored["run_hash"], model, relus, device).load(levels[level])
    channels_last = bool(cfg.channels_last and is_conv_net(model))
    origin = {"run_hash": stored["run_hash"], "level": level, "dataset": cfg.data.dataset}
    data, meta = compressed_bytes(model, cfg.model, splits.input_shape, splits.num_classes, splits.mean, splits.std,
                                  channels_last, origin)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    full = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.endswith(".mask")}
    return {"path": out, "bytes": len(data), "dense_bytes": len(save(full)), "checkpoint_bytes":
            levels[level].stat().st_size, "level": level, "sparsity": meta["sparsity"], "run": run.root}


def compressed_bytes(model: nn.Module, model_cfg, input_shape, num_classes: int, mean: torch.Tensor,
                     std: torch.Tensor, channels_last: bool, origin: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The file of a built-in model (`model_cfg`: its ModelConfig) whose prunable layers are masked layers:
    (its bytes, its metadata). `origin`: where it came from, kept in the metadata."""
    from safetensors.torch import save

    from dsd2 import __version__
    from dsd2.ops import masked_layers

    layers = masked_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, Any] = {}
    kept = total = 0
    for name, layer in layers.items():
        parts, info = _encode(layer.weight, layer.mask)
        tensors.update({f"sparse.{name}.{k}": v for k, v in parts.items()})
        encodings[name] = info
        kept, total = kept + info["kept"], total + layer.mask.numel()
    skip = {f"{name[:-len('weight')]}{suffix}" for name in layers for suffix in ("weight", "mask")}
    dense_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    tensors.update({f"dense.{k}": v for k, v in dense_state.items()})
    meta = {"model": {"name": model_cfg.name, "hidden": list(model_cfg.hidden), "depth": model_cfg.depth,
                      "width": model_cfg.width},
            "input_shape": list(input_shape), "num_classes": num_classes,
            "mean": mean.cpu().tolist(), "std": std.cpu().tolist(), "channels_last": channels_last,
            "layers": encodings, **origin, "sparsity": 1 - kept / total if total else 0.0, "dsd2": __version__}
    return save(tensors, metadata={"format": FORMAT, "meta": json.dumps(meta, sort_keys=True)}), meta


def load_compressed(path: str | Path) -> CompressedModel:
    """The model a `dsd2-engine export` file holds, on the CPU, in eval mode, its pruned layers sparse where that
    measures faster (`sparse_kernels="auto"`)."""
    from safetensors import safe_open

    from dsd2.config import ModelConfig
    from dsd2.models import Conv2d, build_model
    from dsd2.ops import masked_layers, set_sparse_kernels, swap_in_masked_layers

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for files that are not its own
        raise ExportError(f"'{path}' is not a safetensors file ({exc.__class__.__name__}); give a file written by "
                          "dsd2-engine export") from None
    if header.get("format") != FORMAT:
        raise ExportError(f"'{path}' is not a dsd2 export (format {header.get('format')!r}, expected {FORMAT!r}); "
                          "give a file written by dsd2-engine export")
    meta = json.loads(header["meta"])
    m = meta["model"]
    try:
        cfg = ModelConfig(name=m["name"], hidden=tuple(m["hidden"]), depth=m["depth"], width=m["width"])
        net = build_model(cfg, tuple(meta["input_shape"]), meta["num_classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"'{path}' names an architecture this dsd2 cannot build ({exc})") from None
    net, _ = swap_in_masked_layers(net, meta["layers"], same_as=(Conv2d,))
    layers = masked_layers(net)
    if set(layers) != set(meta["layers"]):
        raise ExportError(f"'{path}' holds pruned layers {sorted(meta['layers'])}, but its architecture "
                          f"{m['name']} has {sorted(layers)}")
    state = {k[len("dense."):]: v for k, v in tensors.items() if k.startswith("dense.")}
    for name, info in meta["layers"].items():
        weight, mask = _decode(tensors, info, f"sparse.{name}")
        if tuple(weight.shape) != tuple(layers[name].weight.shape):
            raise ExportError(f"layer '{name}' in '{path}' has shape {tuple(weight.shape)}, the architecture's "
                              f"{tuple(layers[name].weight.shape)}")
        state[name] = weight
        state[f"{name[:-len('weight')]}mask"] = mask
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ExportError(f"'{path}' does not match its architecture {m['name']}: {first}") from None
    if meta["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    set_sparse_kernels(net, "auto")
    model = CompressedModel(net, torch.tensor(meta["mean"]), torch.tensor(meta["std"]), meta["channels_last"], meta)
    return model.eval()
