"""batch_norm: `F.batch_norm` with a C++ kernel for training on the CPU, and `BatchNorm2d`, its drop-in module.

On the CPU torch's kernel is several times slower than the reads and writes a batch norm needs: on the VGG-like's
first block (128x32x32x32, channels_last) its forward + backward took 9.5 ms, nearly the 11 ms of the 99.5 %-sparse
convolution before it, where these kernels take 4.2 ms (`benchmarks/ops/bench_batch_norm.py`, a 2-core Xeon,
AVX-512). Backends:

- **cpp** (CPU, float32, training): two passes forward (per-channel sums about a shift, then the normalisation),
  two backward (the sums of dy and dy * (x - mean), then the input gradient), each at memory speed. Sums are fp32
  over at most 256 rows, then double, in a fixed order: the result does not depend on the thread count, and the
  running statistics are updated as torch updates them (unbiased variance, momentum or the cumulative average).
- **reference**: `torch.nn.functional.batch_norm` itself (cuDNN on CUDA; eval mode, other dtypes, tracing).

A ReLU right before the norm (the VGG-like's conv -> ReLU -> BatchNorm) fuses into it: `batch_norm(..., relu=True)`
is the norm of relu(x), read from x in the kernels' own passes, and its gradient is masked where x <= 0 in the
input gradient's pass, so the ReLU's pass over the map forward and its gradient's pass backward are gone.
`fuse_relu_batch_norms(model)` does that to a model's ReLU -> BatchNorm2d pairs (in `nn.Sequential`s and in an fx
graph such as the loop's traced model); a counting ReLU still counts, run on its own while it counts.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from dsd2.ops._backend import cpp_extension

BACKENDS = ("cpp", "reference")  # no Triton kernel: on CUDA the reference is cuDNN's


def _cpp_applies(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]) -> bool:
    return (x.dim() == 4 and x.numel() > 0 and x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.jit.is_tracing() and not torch.is_autocast_enabled("cpu")
            and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors))


class _CppBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, relu):
        y, _, invstd, shift, offset = cpp_extension().batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                                         factor, eps, relu)
        ctx.save_for_backward(x, weight, bias, invstd, shift, offset)
        ctx.eps, ctx.relu = eps, relu
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, invstd, shift, offset = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a double backward: torch's own gradient, which records its graph
            inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
            y = F.batch_norm(torch.relu(x) if ctx.relu else x, None, None, weight, bias, True, 0.0, ctx.eps)
            found = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            dx, dw, db = (next(found) if need else None for need in (need_x, need_w, need_b))
        else:
            dx, dw, db = cpp_extension().batch_norm_backward(grad, x, weight, invstd, shift, offset, need_x,
                                                             need_w and weight is not None,
                                                             need_b and bias is not None, ctx.relu)
        return dx, dw, db, None, None, None, None, None


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, relu: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """`torch.nn.functional.batch_norm`, the same arguments and results (within fp32 reduction-order tolerance),
    with dsd2's CPU kernel where it applies: training mode on a 4-D float32 CPU map (channels_last read as rows of
    channels, any other layout as contiguous planes), outside autocast and tracing. `relu`: the norm of
    `torch.relu(x)`, the ReLU fused into the kernel's passes (elsewhere applied first). `backend`: cpp or
    reference, else cpp on the CPU where dsd2._C is built and the reference elsewhere."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not known for batch_norm; allowed: {', '.join(BACKENDS)}")
    chosen = backend or ("cpp" if x.device.type == "cpu" and cpp_extension() is not None else "reference")
    if chosen == "cpp" and cpp_extension() is None:
        raise ValueError("the cpp batch_norm needs dsd2._C, which is not built; use backend='reference'")
    applies = training and _cpp_applies(x, (running_mean, running_var, weight, bias))
    if chosen == "cpp" and applies:
        if x.numel() // x.shape[1] <= 1:
            F._verify_batch_size(x.size())  # torch's sentence for one value per channel
        return _CppBatchNorm.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps),
                                   bool(relu))
    if chosen == "cpp" and backend == "cpp":
        raise ValueError(f"the cpp batch_norm trains on 4-D float32 CPU tensors outside autocast; this call has "
                         f"training={training} and a {x.dim()}-D {x.dtype} input on {x.device}")
    return F.batch_norm(torch.relu(x) if relu else x, running_mean, running_var, weight, bias, training, momentum,
                        eps)


class BatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (the same parameters, buffers, state dict and results within fp32 reduction-order
    tolerance) that trains on dsd2's CPU kernel (`batch_norm`).

    `relu_before`, set by `fuse_relu_batch_norms`: the ReLU module whose input this layer now takes; it computes
    the norm of that ReLU's output, the ReLU fused in (`batch_norm(..., relu=True)`), except while the ReLU counts
    its states (`counting`), when the ReLU runs first, counts, and the norm follows. It is an attribute, not a
    submodule: the ReLU keeps its place in the module tree, and the state dict is nn.BatchNorm2d's."""

    relu_before: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = self.relu_before
        fused = relu is not None and not getattr(relu, "counting", False)
        if relu is not None and not fused:
            x = relu(x)
        # nn.BatchNorm2d's own forward, with `batch_norm` for F.batch_norm
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm(x, self.running_mean if keep else None, self.running_var if keep else None, self.weight,
                          self.bias, training, factor, self.eps, relu=fused)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu_before=fused" if self.relu_before is not None else "")


class FusedReLU(nn.Identity):
    """The place of a ReLU that the `BatchNorm2d` right after it applies (`fuse_relu_batch_norms`, in an
    `nn.Sequential`): it passes its input on, and that BatchNorm2d takes the ReLU's input."""

    def __init__(self, relu: nn.Module):
        super().__init__()
        self.__dict__["fused_relu"] = relu  # an attribute, not a submodule: kept for `unfuse`, outside the tree

    def extra_repr(self) -> str:
        return f"{self.fused_relu!r} applied by the BatchNorm2d after it"


def swap_in_batch_norms(model: nn.Module) -> nn.Module:
    """The model with a `BatchNorm2d` in place of every `nn.BatchNorm2d` (that class exactly, not a subclass with a
    forward of its own), each over the layer's own parameters and buffers. As with `swap_in_masked_layers`, the
    containers on the way are shallow copies, so `model` itself keeps its layers."""
    from dsd2.ops.masked_layers import _swap_exact  # masked_layers imports dsd2.pruning, which imports ops

    return _swap_exact(model, nn.BatchNorm2d, BatchNorm2d)


def _fusable_relu(module: nn.Module | None) -> bool:
    from dsd2.ops.relu_count import CountingReLU

    return type(module) in (nn.ReLU, CountingReLU)


def _with_relu(bn: BatchNorm2d, relu: nn.Module) -> BatchNorm2d:
    from dsd2.ops.masked_layers import _transplant

    new = _transplant(bn, BatchNorm2d)
    new.__dict__["relu_before"] = relu
    return new


def fuse_relu_batch_norms(model: nn.Module) -> nn.Module:
    """The model with every ReLU -> dsd2 `BatchNorm2d` pair fused: the norm takes the ReLU's input and applies the
    ReLU in its own passes (`BatchNorm2d.relu_before`); same parameters, buffers, state dict and results (within
    fp32 reduction-order tolerance, as `batch_norm`). Pairs are found in two places:

    - an fx `GraphModule` (the loop's traced model, whose ReLUs count their states): a ReLU module call whose one
      user is a BatchNorm2d call, and whose input feeds nothing else when the ReLU is in place; the graph's ReLU
      call is removed;
    - elsewhere, an `nn.Sequential`'s consecutive ReLU and BatchNorm2d: the ReLU's place holds a `FusedReLU`.

    The ReLU is an `nn.ReLU` or a `CountingReLU` (which still counts: while it counts it runs first, on its own).
    Run it after `swap_in_batch_norms` (whose BatchNorm2d it fuses) and after `count_relu_call_sites` (which would
    no longer see the fused ReLUs). As with `swap_in_masked_layers`, the containers on the way are shallow copies
    and each fused BatchNorm2d a new module over the same parameters and buffers, so `model` keeps its layers."""
    from dsd2.ops.masked_layers import _replace

    copied: dict[str, nn.Module] = {}
    root = model
    if isinstance(model, fx.GraphModule):
        modules = dict(model.named_modules())
        graph = copy.deepcopy(model.graph)
        fused = []
        for node in graph.nodes:
            if node.op != "call_module" or type(modules.get(node.target)) is not BatchNorm2d or node.kwargs:
                continue
            src = node.args[0] if len(node.args) == 1 else None
            if not (isinstance(src, fx.Node) and src.op == "call_module" and _fusable_relu(modules.get(src.target))
                    and len(src.users) == 1 and len(src.args) == 1 and not src.kwargs
                    and isinstance(src.args[0], fx.Node)):
                continue
            relu = modules[src.target]
            if relu.inplace and len(src.args[0].users) > 1:  # others read the map the ReLU would have changed
                continue
            root = _replace(root, node.target, _with_relu(modules[node.target], relu), copied)
            node.replace_input_with(src, src.args[0])
            graph.erase_node(src)
            fused.append(node.target)
        if not fused:
            return model
        graph.lint()
        root.graph = graph  # recompiles the copied root's forward
        return root
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for i in range(len(names) - 1):
            relu, bn = module._modules[names[i]], module._modules[names[i + 1]]
            if _fusable_relu(relu) and type(bn) is BatchNorm2d:
                prefix = f"{path}." if path else ""
                root = _replace(root, prefix + names[i], FusedReLU(relu), copied)
                root = _replace(root, prefix + names[i + 1], _with_relu(bn, relu), copied)
    return root  # `model` itself when nothing was fused
