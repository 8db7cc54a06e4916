"""Inference of a pruned convolution stack on padded grids, with no map written twice.

The sparse layers (dsd2.ops.sparse_layers) compute one convolution on its input's padded grid [C, N * Hp * Wp] and
copy the result back to NCHW or channels_last, where ReLU, BatchNorm and pooling run as separate ops and the next
convolution copies its input onto a grid again. At batch 1 those copies, allocations and calls cost more than the
products of a 99 %-sparse network. `SparseStack` runs a stack of stages

    MaskedConv2d (stride 1, odd square kernel, 'same' zero padding, groups 1) [ReLU] [BatchNorm2d] [MaxPool2d(2)]

on grids only, the whole stack in one C++ call (`dsd2._C.SparseStackPlan.run`): each convolution (over its kept
weights, the sums of `sparse_rows_`) writes its output rows straight into the next convolution's grid at the offset
of its padding, each value finished by ReLU and the eval-mode BatchNorm (a scale and a shift per channel) as it is
stored, then the padding's zeros; a 2x2 max pool reads one grid into the next (from the row's own buffer where a
row is one task). The plan is built (and every entry checked) once, and again only when the input width changes or
a weight or statistic does (its version counter: a write through `.data` is not seen, as autograd does not see it
either). No autograd, no layout change between layers. Inference only: under `torch.no_grad()`, fp32 CPU tensors,
every BatchNorm in eval mode.

Results equal the layer-by-layer path within fp32 reduction order (the BatchNorm folded into one multiply-add
rounds differently from torch's (x - mean) * invstd * weight + bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsd2.ops._backend import cpp_extension
from dsd2.ops.batch_norm import BatchNorm2d
from dsd2.ops.masked_layers import MaskedConv2d
from dsd2.ops.sparse_layers import SparsePlan


class _Kept:
    """A masked layer's kept entries (its `SparsePlan`), their current values and its fp32 bias, taken again only
    when the weight, mask or bias changed or was replaced. Read from the module's own dicts: a check costs about a
    microsecond, where attribute access through nn.Module took six."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.plan: SparsePlan | None = None
        self.values: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.key: tuple = ()

    def refresh(self) -> bool:
        params, buffers = self.layer._parameters, self.layer._buffers
        w, mask, b = params["weight"], buffers["mask"], params.get("bias")
        key = tuple((id(t), t._version) for t in (w, mask, b) if t is not None)
        if key == self.key:
            return False
        if self.plan is None or not self.plan.valid_for(mask):
            self.plan = SparsePlan(mask)
        self.values, self.key = self.plan.values(w), key
        self.bias = None if b is None else b.detach().float().contiguous()
        return True


@dataclass
class _Stage:
    conv: MaskedConv2d
    relu: bool
    norm: nn.BatchNorm2d | None
    pool: bool
    kept: _Kept | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    norm_key: tuple = ()

    def refresh(self) -> bool:
        """The conv's kept values and bias, and the BatchNorm's scale and shift, again only where a tensor they come
        from changed or was replaced (whether one was)."""
        if self.kept is None:
            self.kept = _Kept(self.conv)
        changed = self.kept.refresh()
        if self.norm is not None:
            params, buffers = self.norm._parameters, self.norm._buffers
            tensors = (buffers["running_mean"], buffers["running_var"], params.get("weight"), params.get("bias"))
            norm_key = tuple((id(t), t._version) for t in tensors if t is not None)
            if norm_key != self.norm_key:
                mean, var, gamma, beta = tensors
                scale = torch.rsqrt(var.float() + self.norm.eps)
                if gamma is not None:
                    scale = scale * gamma.detach().float()
                shift = -mean.float() * scale
                if beta is not None:
                    shift = shift + beta.detach().float()
                self.scale, self.shift, self.norm_key = scale.contiguous(), shift.contiguous(), norm_key
                changed = True
        return changed


def _stage_conv(m: nn.Module) -> bool:
    if not isinstance(m, MaskedConv2d) or m.groups != 1 or m.padding_mode != "zeros":
        return False
    k = m.kernel_size
    return (k[0] == k[1] and k[0] % 2 == 1 and tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1)
            and tuple(m.padding) == (k[0] // 2, k[0] // 2))


def _pool2(m: nn.Module) -> bool:
    pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    return (type(m) is nn.MaxPool2d and pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


class SparseStack:
    """A compiled stack of conv stages (the module docstring); `SparseStack.compile(seq)` gives one for an
    nn.Sequential of such stages (all of one kernel size), or None. Call it on x [N, C, H, W] (fp32, CPU, any
    layout): the stack's output map, in x's memory format."""

    def __init__(self, stages: list[_Stage]):
        self.stages = stages
        self.kernel = stages[0].conv.kernel_size[0]
        self._plan = None  # the C++ plan (every entry checked once), made again when a stage or the width changes

    @classmethod
    def compile(cls, seq: nn.Module) -> SparseStack | None:
        if not isinstance(seq, nn.Sequential) or len(seq) == 0:
            return None
        stages, mods, i = [], list(seq), 0
        while i < len(mods):
            if not _stage_conv(mods[i]):
                return None
            stage = _Stage(mods[i], False, None, False)
            i += 1
            if i < len(mods) and type(mods[i]) is nn.ReLU:
                stage.relu, i = True, i + 1
            if i < len(mods) and type(mods[i]) in (nn.BatchNorm2d, BatchNorm2d) and mods[i].track_running_stats \
                    and mods[i].running_mean is not None:
                stage.norm, i = mods[i], i + 1
            if i < len(mods) and _pool2(mods[i]):
                stage.pool, i = True, i + 1
            stages.append(stage)
        if len({s.conv.kernel_size for s in stages}) != 1:
            return None
        return cls(stages)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether a call can run here: inference on an fp32 CPU map, every BatchNorm in eval mode, dsd2._C built."""
        if torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32 \
                or x.device.type != "cpu" or torch.jit.is_tracing():
            return False
        if any(s.norm is not None and s.norm.training for s in self.stages):
            return False
        weights = [s.conv._parameters["weight"] for s in self.stages]  # the dict: nn.Module's attribute lookup is slow
        if any(w.dtype != torch.float32 or not w.is_cpu for w in weights):
            return False
        ext = cpp_extension()
        return ext is not None and hasattr(ext, "SparseStackPlan") and x.shape[1] == self.stages[0].conv.in_channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        changed = [stage.refresh() for stage in self.stages]
        width = x.shape[3]
        if any(changed) or self._plan is None or self._plan.width != width:
            widths, w = [], width
            for stage in self.stages:  # each stage's grid width for this input: its map's, plus the padding
                widths.append(w + self.kernel - 1)
                w = w // 2 if stage.pool else w
            per = [(s.kept.plan.rowptr, s.kept.plan.channel, s.kept.plan.shifts(wp, (1, 1))[0], s.kept.values,
                    s.kept.bias, s.relu, s.scale, s.shift, s.pool, s.conv.out_channels)
                   for s, wp in zip(self.stages, widths)]
            self._plan = cpp_extension().SparseStackPlan(self.kernel, self.stages[0].conv.in_channels, width,
                                                         *[list(column) for column in zip(*per)])
        layout = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return self._plan.run(x, layout)


class SparseChain:
    """A Linear/ReLU chain (the MLPs) in inference over its layers' kept weights only: x [N, ...] flattened and
    transposed once to [features, N], each layer one `sparse_rows_` call (the batch the vector axis, the bias
    added in the kernel) and its ReLU in place, logits transposed back. Kept values are taken once per weight
    version, as in `SparseStack`; fp32 CPU tensors, no gradient."""

    def __init__(self, layers: list[nn.Linear], relu_after: list[bool]):
        self.layers, self.relu_after = layers, relu_after
        self._kept = [_Kept(layer) for layer in layers]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ext = cpp_extension()
        n = x.shape[0]
        h = x.reshape(n, -1).t().contiguous()
        for i, (layer, kept) in enumerate(zip(self.layers, self._kept)):
            kept.refresh()
            out = torch.empty(layer.out_features, n)
            ext.sparse_rows_(out, n, h, kept.plan.rowptr, kept.plan.unfold_row, kept.plan.zero, kept.values,
                             kept.bias)
            h = out.clamp_min_(0.0) if self.relu_after[i] else out
        return h.t()
