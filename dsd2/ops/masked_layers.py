"""Masked layers: `MaskedLinear` and `MaskedConv2d`, and the bridge from and to torch.nn.utils.prune.

A masked layer is its dense layer (a subclass: same parameters, `isinstance` checks and pruning code still see an
`nn.Linear` / `nn.Conv2d`) plus a bool buffer `mask` (True = kept), and computes with W⊙M through
`masked_linear` / `masked_conv2d`: the gradient of the weight comes back masked where it is made, so a pruned
weight that is 0.0 stays 0.0 under any optimizer (SGD, Adam, weight decay) and nothing recomputes
`weight_orig * weight_mask` per call. Its state dict is `weight`, `bias`, `mask`; `copy.deepcopy` and `pickle`
work (no hooks).

A masked layer's `sparse_kernels` ("off" by default, "on", "auto"; `set_sparse_kernels(model, mode)`) lets it
compute over its kept weights only (`dsd2.ops.sparse_layers` on the CPU, `dsd2.ops.sparse_csr` on CUDA): "on"
wherever a sparse path applies (fp32, outside autocast and tracing, and on CUDA outside a graph's capture),
"auto" where the layer is at least as sparse as the crossover measured for its shape on this machine
(`dsd2.ops.sparse_tune`). The kept entries are listed once per mask, when the mask
changes, never per call. `sparse_path` says which path the last call took.

`fuse_torch_prune(model)` turns every torch.nn.utils.prune reparametrisation of a Linear or Conv2d weight into a
masked layer whose `weight` is `weight_orig` itself (the same tensor: an optimizer built on the hooked model keeps
working); `unfuse_torch_prune(model)` turns the masked layers back. Outputs are the same both ways.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from dsd2.ops.masked_conv2d import conv_padding, masked_conv2d
from dsd2.ops.masked_linear import cpp_linear_for, masked_linear
from dsd2.ops.sparse_csr import csr_conv2d, csr_linear
from dsd2.ops.sparse_layers import SparsePlan, is_channels_last, sparse_conv2d, sparse_linear
from dsd2.pruning import install_torch_prune, prunable_weights, strip_torch_prune, torch_prune_mask

DENSE_TYPE = "_dense_type"  # the class a masked layer was made from, when it is not plain nn.Linear / nn.Conv2d


def _transplant(module: nn.Module, cls: type) -> nn.Module:
    """A module of class `cls` holding what `module` holds (the same parameters, buffers, hooks and attributes),
    in containers of its own, so changing one's parameters or hooks leaves the other as it was."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
                         for k, v in module.__dict__.items()})
    if isinstance(new, fx.GraphModule):
        new.recompile()  # an fx module's forward lives on a class of its own per instance: generate this one's
    return new


def _to_masked(layer: nn.Module, cls: type, mask: torch.Tensor | None) -> nn.Module:
    base = nn.Linear if cls is MaskedLinear else nn.Conv2d
    new = _transplant(layer, cls)
    new.__dict__.pop(DENSE_TYPE, None)
    if type(layer) is not base:
        new.__dict__[DENSE_TYPE] = type(layer)
    if mask is None:
        mask = torch.ones_like(new.weight, dtype=torch.bool)
    elif mask.shape != new.weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"the mask must be bool with the weight's shape {tuple(new.weight.shape)}, not "
                         f"{mask.dtype} {tuple(mask.shape)}")
    # in the weight's memory layout (a channels_last conv keeps a channels_last mask), on its device
    new.register_buffer("mask", torch.empty_like(new.weight, dtype=torch.bool).copy_(mask))
    return new


def _to_dense(layer: nn.Module) -> nn.Module:
    base = nn.Linear if isinstance(layer, MaskedLinear) else nn.Conv2d
    new = _transplant(layer, layer.__dict__.get(DENSE_TYPE, base))
    new.__dict__.pop(DENSE_TYPE, None)
    del new._buffers["mask"]
    return new


SPARSE_MODES = ("auto", "on", "off")


def _batch_bucket(shape: torch.Size) -> tuple[int, ...]:
    """The input shape with its batch rounded up to a power of two: the shape a crossover is measured at (a
    level's last, partial batch shares its full batches' decision)."""
    return (1 << max(int(shape[0]) - 1, 0).bit_length(), *shape[1:])


class _SparseDispatch:
    """What MaskedLinear and MaskedConv2d share: which path a call takes, and the plan of the kept weights."""

    sparse_kernels = "off"
    sparse_path = "dense"

    def _sparse_plan(self, x) -> SparsePlan | None:
        if self.sparse_kernels == "off":  # the default, every call of a small layer: nothing but this test
            if self.sparse_path != "dense":
                self.__dict__["sparse_path"] = "dense"
            return None
        if not _sparse_applies(x, self.weight) or (isinstance(self, nn.Conv2d) and x.dim() != 4):
            self.sparse_path = "dense"
            return None
        version = (self.mask._version, self.mask.data_ptr())
        if self.__dict__.get("_mask_version") != version:  # a new mask (a new level): decide and list again
            self.__dict__.update(_mask_version=version, _plan=None, _choices={},
                                 _sparsity=1.0 - int(self.mask.count_nonzero()) / max(self.mask.numel(), 1))
        if self.sparse_kernels == "auto":
            training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
            key = (_batch_bucket(x.shape), training, x.is_contiguous())
            choices = self.__dict__["_choices"]
            if key not in choices:
                from dsd2.ops.sparse_tune import FLOOR, crossover

                choices[key] = self._sparsity >= FLOOR and self._sparsity >= crossover(self, _probe(x, key[0]),
                                                                                      training)
            if not choices[key]:
                self.sparse_path = "dense"
                return None
        plan = self.__dict__["_plan"]
        if plan is None:  # listed only for a layer that takes the sparse path
            plan = self.__dict__["_plan"] = SparsePlan(self.mask, getattr(self, "groups", 1))
        self.sparse_path = "sparse"
        return plan

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_plan", "_choices", "_mask_version", "_sparsity"):  # decided again on the first call
            state.pop(key, None)
        return state


def _probe(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An input of `shape` in x's dtype and memory format: what a crossover is measured on."""
    probe = torch.empty(shape, dtype=x.dtype, device=x.device)
    return probe.to(memory_format=torch.channels_last) if is_channels_last(x) else probe


def _sparse_applies(x, weight: torch.Tensor) -> bool:
    """Whether a sparse path can compute this call: fp32 tensors outside autocast, the TorchScript tracer (fvcore's
    FLOP count) and torch.compile; on the CPU with dsd2._C built (its C++ kernels), on CUDA outside a CUDA graph's
    capture (torch.sparse CSR, `dsd2.ops.sparse_csr`)."""
    if not isinstance(x, torch.Tensor) or x.device != weight.device or x.device.type not in ("cpu", "cuda"):
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if x.device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    from dsd2.ops._backend import cpp_extension

    ext = cpp_extension()
    return ext is not None and hasattr(ext, "sparse_rows_")


def set_sparse_kernels(model: nn.Module, mode: str) -> dict[str, nn.Module]:
    """Set `sparse_kernels` ("auto", "on" or "off") on every masked layer of `model`; the layers by weight name."""
    if mode not in SPARSE_MODES:
        raise ValueError(f"sparse kernels '{mode}' is not known; allowed: {', '.join(SPARSE_MODES)}")
    layers = masked_layers(model)
    for layer in layers.values():
        layer.sparse_kernels = mode
    return layers


def sparse_paths(model: nn.Module) -> dict[str, str]:
    """The path ("sparse" or "dense") each masked layer's last call took, by weight name."""
    return {name: layer.sparse_path for name, layer in masked_layers(model).items()}


class MaskedLinear(_SparseDispatch, nn.Linear):
    """`nn.Linear` that computes with weight⊙mask (`masked_linear`); `mask` is a bool buffer, True = kept."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor | None = None) -> MaskedLinear:
        """The masked layer over `layer`'s own parameters (shared, not copied) with `mask` (default: all kept)."""
        return _to_masked(layer, cls, mask)

    def to_dense(self) -> nn.Linear:
        """The dense layer over the same parameters (the weight as it is, pruned entries included)."""
        return _to_dense(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse_kernels == "off":
            ext = cpp_linear_for(x)
            if ext is not None:  # the CPU's dense path in one call: what masked_linear would run, minus its checks
                if self.sparse_path != "dense":
                    self.__dict__["sparse_path"] = "dense"
                # the tensors from the module's own dicts, a fraction of nn.Module.__getattr__'s cost (about
                # 1.5 us of a small layer's call); a weight or bias that lives elsewhere (a parametrization's
                # property, a plain attribute) is not there and is looked up the usual way
                params, weight = self._parameters, self._parameters.get("weight")
                bias = params.get("bias", params) if weight is not None else params
                mask = self._buffers.get("mask")
                if bias is params or mask is None:
                    weight, bias, mask = self.weight, self.bias, self.mask
                return ext.masked_linear(x, weight, mask, bias)
        plan = self._sparse_plan(x)
        if plan is not None:
            if x.device.type == "cuda":
                return csr_linear(x, self.weight, plan, self.bias)
            return sparse_linear(x, self.weight, plan, self.bias)
        return masked_linear(x, self.weight, self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept={int(self.mask.sum())}/{self.mask.numel()}"


class MaskedConv2d(_SparseDispatch, nn.Conv2d):
    """`nn.Conv2d` that computes with weight⊙mask (`masked_conv2d`); `mask` is a bool buffer, True = kept. Every
    padding mode of nn.Conv2d works (non-zero modes pad the input first, as nn.Conv2d does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, mask: torch.Tensor | None = None) -> MaskedConv2d:
        """The masked layer over `layer`'s own parameters (shared, not copied) with `mask` (default: all kept)."""
        return _to_masked(layer, cls, mask)

    def to_dense(self) -> nn.Conv2d:
        """The dense layer over the same parameters (the weight as it is, pruned entries included)."""
        return _to_dense(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._sparse_plan(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if plan is not None:
            x, pair = conv_padding(x, self.kernel_size, padding, self.stride, self.dilation)
            if x.device.type == "cuda":
                return csr_conv2d(x, self.weight, plan, self.bias, self.stride, pair, self.dilation)
            return sparse_conv2d(x, self.weight, plan, self.bias, self.stride, pair, self.dilation)
        return masked_conv2d(x, self.weight, self.mask, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept={int(self.mask.sum())}/{self.mask.numel()}"


MASKED_TYPES = (MaskedLinear, MaskedConv2d)


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The masked layers of `model`, keyed by the qualified name of their weight (the keys of our mask dicts)."""
    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()
            if isinstance(m, MASKED_TYPES)}


@torch.no_grad()
def set_layer_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Copy `masks` (weight name -> bool tensor) into the model's masked layers, in place (their buffers keep
    their addresses, so captured CUDA graphs and optimizer tables stay valid); names without a masked layer are
    left to whoever masks them (the masked optimizer step)."""
    for name, layer in masked_layers(model).items():
        if name in masks:
            if masks[name].shape != layer.mask.shape:
                raise ValueError(f"the mask for {name} has shape {tuple(masks[name].shape)}, the layer's weight "
                                 f"{tuple(layer.mask.shape)}")
            layer.mask.copy_(masks[name])


def _replace(root: nn.Module, path: str, new: nn.Module, copied: dict[str, nn.Module]) -> nn.Module:
    """Put `new` at `path` under `root`, shallow-copying every container on the way (once, recorded in `copied`)
    so the modules `root` was made from keep their children. Returns the (possibly copied) root."""
    parts = path.split(".")
    if "" not in copied:
        copied[""] = _transplant(root, type(root))
    parent, prefix = copied[""], ""
    for part in parts[:-1]:
        prefix = f"{prefix}.{part}" if prefix else part
        if prefix not in copied:
            copied[prefix] = _transplant(parent._modules[part], type(parent._modules[part]))
            parent._modules[part] = copied[prefix]
        parent = copied[prefix]
    parent._modules[parts[-1]] = new
    return copied[""]


def _swap_exact(model: nn.Module, old: type, new_cls: type) -> nn.Module:
    """The model with a `new_cls` (a subclass of `old` that adds no state) in place of every module of class `old`
    exactly, over the module's own parameters, buffers and attributes; the containers on the way shallow copies."""
    copied: dict[str, nn.Module] = {}
    root = model
    for path, module in list(model.named_modules()):
        if type(module) is old:
            new = _transplant(module, new_cls)
            if not path:
                return new  # the model is the layer
            root = _replace(model, path, new, copied)
    return root


def swap_in_masked_layers(model: nn.Module, names: Iterable[str] | None = None, *,
                          same_as: tuple[type, ...] = ()) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The model with masked layers in place of the dense ones whose weights are `names` (default: every prunable
    weight, `dsd2.pruning.prunable_weights`), each over the dense layer's own parameters and all kept.

    Returns (model, the masked layers by weight name). The returned model shares every parameter, buffer and
    untouched submodule with `model`; the containers on the way to a swapped layer are shallow copies, so `model`
    itself keeps its layers (a module given by a user is trained in place, not restructured). Swapped: layers of
    type nn.Linear or nn.Conv2d exactly, or of a type in `same_as` (subclasses known to compute what their base
    does); any other layer (a subclass with its own forward, Conv1d, a torch.nn.utils.prune reparametrisation) is
    left as it is."""
    names = list(prunable_weights(model)) if names is None else list(names)
    modules = dict(model.named_modules())
    copied: dict[str, nn.Module] = {}
    swapped: dict[str, nn.Module] = {}
    root = model
    for name in names:
        path = name.rsplit(".", 1)[0] if "." in name else ""
        layer = modules.get(path)
        if isinstance(layer, MASKED_TYPES):
            swapped[name] = layer
            continue
        if layer is None or not name.endswith("weight") or torch_prune_mask(layer) is not None:
            continue
        if type(layer) in (nn.Linear, *same_as) and isinstance(layer, nn.Linear):
            new = MaskedLinear.from_dense(layer)
        elif type(layer) in (nn.Conv2d, *same_as) and isinstance(layer, nn.Conv2d):
            new = MaskedConv2d.from_dense(layer)
        else:
            continue
        if not path:
            return new, {name: new}  # the model is the layer
        root = _replace(model, path, new, copied)
        swapped[name] = new
    return root, swapped


def _refuse_unfusable(model: nn.Module) -> None:
    """One sentence naming a pruning reparametrisation the masked layers cannot take over."""
    for name, module in model.named_modules():
        where = f"'{name}'" if name else "the model"
        for tensor in ("bias", *(p[:-5] for p in module._parameters if p.endswith("_orig"))):
            if tensor != "weight" and torch_prune_mask(module, tensor) is not None:
                raise ValueError(f"{where} ({type(module).__name__}) has its {tensor} pruned by torch.nn.utils.prune; "
                                 "masked layers mask weights only: remove that pruning first (prune.remove)")
        if torch_prune_mask(module) is not None and not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{where} ({type(module).__name__}) is pruned by torch.nn.utils.prune but only Linear and "
                             "Conv2d have masked layers; remove its pruning first (prune.remove) or keep the model "
                             "hooked")


def fuse_torch_prune(model: nn.Module) -> nn.Module:
    """Turn every torch.nn.utils.prune reparametrisation of a Linear or Conv2d weight in `model` into a
    `MaskedLinear` / `MaskedConv2d` in place. The masked layer's weight is `weight_orig` itself (the same
    parameter, pruned entries as they were) and its mask is `weight_mask`; no hook remains. Returns `model` (or the
    masked layer, when `model` itself is the pruned layer). A pruned bias, or a pruned layer of another type, is
    refused in one sentence before anything changes."""
    _refuse_unfusable(model)
    for name, module in list(model.named_modules()):
        if torch_prune_mask(module) is None:
            continue
        cls = MaskedLinear if isinstance(module, nn.Linear) else MaskedConv2d
        new = _transplant(module, type(module))
        mask = strip_torch_prune(new)
        new = _to_masked(new, cls, mask)
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent)._modules[child] = new
    return model


def unfuse_torch_prune(model: nn.Module) -> nn.Module:
    """Turn every masked layer of `model` back into its dense layer (the class it was fused from) reparametrised
    by torch.nn.utils.prune with its mask (`weight_orig` is the weight parameter itself), in place. Returns `model`
    (or the hooked layer, when `model` itself is a masked layer)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, MASKED_TYPES):
            continue
        mask = module.mask
        new = _to_dense(module)
        install_torch_prune(new, mask)
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent)._modules[child] = new
    return model
