"""Activation call sites: one counter per place the forward pass applies a ReLU or another supported activation,
found by tracing with torch.fx.

`swap_in_counting_relus` swaps ReLU *modules*: a module called twice (torchvision's BasicBlock calls its one
`self.relu` twice) would merge two layers into one counter (it refuses that), and functional ReLUs are not seen.
Here the forward is traced once with `torch.fx.symbolic_trace` rules and every execution site becomes its own
counter. ReLU sites: each call of an `nn.ReLU` module (inplace or not), `F.relu`, `F.relu_`, `torch.relu`,
`torch.relu_`, `x.relu()`, `x.relu_()`, and `clamp_min` / `clamp` / `clip` (function, method or in-place method)
with a lower bound of exactly 0 and no upper bound; each becomes a `CountingReLU`, which applies the ReLU and
counts in one read. Other activations get a `StateCounter` in front of them, which counts the states of their
input with the same exact kernels: GELU, SiLU, Hardswish and LeakyReLU (`nn` modules or `F.gelu`, `F.silu`,
`F.hardswish`, `F.leaky_relu`, `F.leaky_relu_`) have two states, the sign of their input, as ReLU does; ReLU6 and
Hardtanh (`nn.ReLU6`, `nn.Hardtanh`, `F.relu6`, `F.hardtanh`, `F.hardtanh_`) have three: below the lower bound,
between the bounds, above the upper one.

What is traced: the model's own code and `nn.Sequential` containers. torch.nn layers (Conv2d, BatchNorm, ...)
and subclasses of them are called whole, unless a subclass's own code names an activation (then it is traced
too). A torch.nn layer that applies an activation inside torch code (an RNN with nonlinearity="relu", a
Transformer layer's feed-forward) is refused, as is any code torch.fx cannot trace: never a silent merge or miss.
"""

from __future__ import annotations

import copy
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from dsd2.config import GRANULARITIES
from dsd2.ops.relu_count import CountingReLU, ReLUSiteError, StateCounter

SITES = "relu_sites"  # the returned module's ModuleList of counters, in execution order

# torch functions and Tensor methods that are a ReLU; True: in place
RELU_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: True}
RELU_METHODS = {"relu": False, "relu_": True}
CLAMP_FUNCTIONS = {torch.clamp: False, torch.clip: False, torch.clamp_min: False, torch.clamp_: True,
                   torch.clip_: True, torch.clamp_min_: True}
CLAMP_METHODS = {"clamp": False, "clip": False, "clamp_min": False, "clamp_": True, "clip_": True,
                 "clamp_min_": True}
# activations counted by a StateCounter in front of them: on/off by the sign of their input...
SIGN_MODULES = (nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU)
SIGN_FUNCTIONS = (F.gelu, F.silu, F.hardswish, F.leaky_relu, F.leaky_relu_)
# ...or three regimes split at their two bounds (nn.ReLU6 is an nn.Hardtanh from 0 to 6)
BAND_FUNCTIONS = {F.hardtanh: None, F.hardtanh_: None, F.relu6: (0.0, 6.0)}  # None: the bounds are arguments
HARDTANH_DEFAULTS = (-1.0, 1.0)
SUPPORTED = "ReLU, ReLU6, Hardtanh, GELU, SiLU, Hardswish, LeakyReLU"
# names whose presence in a torch.nn subclass's own code means it may apply an activation: trace into it
RELU_NAMES = {"relu", "relu_", "ReLU", *CLAMP_METHODS, "gelu", "silu", "hardswish", "leaky_relu", "leaky_relu_",
              "relu6", "hardtanh", "hardtanh_", "GELU", "SiLU", "Hardswish", "LeakyReLU", "ReLU6", "Hardtanh"}
TORCH_NN = ("torch.nn.", "torch.ao.nn.")
TORCH_DIR = str(Path(torch.__file__).parent)


class ReLUSiteModule(fx.GraphModule):
    """The traced model: the original module tree (shared, not copied) plus `relu_sites`, run by its graph.
    `copy.deepcopy` keeps the whole tree (fx's own deepcopy keeps only the modules the graph calls)."""

    def __deepcopy__(self, memo: dict) -> ReLUSiteModule:
        res = super().__deepcopy__(memo)
        for field in ("_modules", "_parameters", "_buffers"):  # copied already, with self.__dict__: reuse them
            res.__dict__[field] = copy.deepcopy(self.__dict__[field], memo)
        res._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        return res


def count_relu_call_sites(model: nn.Module, *, granularity: str = "element",
                          inclusive: bool = False) -> tuple[nn.Module, dict[str, CountingReLU | StateCounter]]:
    """Trace `model` and give every activation call site its own counter: a `CountingReLU` for a ReLU, a
    `StateCounter` in front of the other supported activations (`SUPPORTED`, see the module's docstring).

    Returns the traced module, which computes what `model` computes and shares its submodules, parameters and
    buffers (same `state_dict()` keys and tensors), and the counters by layer name in execution order:
    a module's qualified name for its first call, `name#2`, `name#3`... for later calls of the same module;
    `owner.relu()` (or `relu_()`, `clamp_min()`, `gelu()`, `hardtanh()`, ...; `relu()` at the top) for a
    functional call in the forward of submodule `owner`, `#2`, `#3`... for later ones of the same owner and
    function. In-place sites stay in place. Empty when the model applies none of them. Raises `ReLUSiteError`,
    naming the submodule and code, when the forward cannot be traced or applies an activation that cannot be
    separated.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity '{granularity}' is not known; allowed: {', '.join(GRANULARITIES)}")
    tracer = _SiteTracer()
    try:
        graph = tracer.trace(model)
    except ReLUSiteError:
        raise
    except Exception as exc:
        raise ReLUSiteError(_trace_failure(model, "", exc)) from exc
    traced = ReLUSiteModule(model, graph, class_name=type(model).__name__)
    _share_module_tree(traced, model)
    sites_name = SITES
    while hasattr(model, sites_name):
        sites_name = f"_{sites_name}"
    sites = nn.ModuleList()
    traced.add_module(sites_name, sites)
    graph = traced.graph
    counters: dict[str, CountingReLU | StateCounter] = {}
    for node, name, site in _relu_sites(traced, graph):
        x = _relu_input(node)
        if isinstance(site, bool):  # a ReLU, in place or not: replaced by a counting one
            counter = CountingReLU(inplace=site, granularity=granularity, inclusive=inclusive)
        else:  # another activation: counted in front of it, which then runs as before
            activation, thresholds = site
            counter = StateCounter(thresholds, granularity=granularity, inclusive=inclusive, activation=activation)
        counter.call_site = name
        sites.append(counter)
        with graph.inserting_before(node):
            call = graph.call_module(f"{sites_name}.{len(sites) - 1}", (x,))
        call.meta = dict(node.meta)
        if isinstance(counter, CountingReLU):
            node.replace_all_uses_with(call)
            graph.erase_node(node)
        else:
            node.replace_input_with(x, call)
        counters[name] = counter
    graph.lint()
    traced.recompile()
    traced.training = model.training
    return traced, counters


class _SiteTracer(fx.Tracer):
    """fx tracing that records, on every node, the submodule whose forward made the call, turns a failure into
    one sentence naming the submodule, and keeps torch.nn layers whole only where no ReLU can hide in them."""

    def __init__(self):
        super().__init__()
        self.owners: list[str] = [""]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_relu_module(m) or _activation_site(m) is not None:
            return True
        if isinstance(m, nn.Sequential):
            return False
        base = _torch_layer_class(type(m))
        if base is None:  # the model's own code: trace it
            return False
        if type(m) is not base and _own_code_names_relu(type(m), base):
            return False
        hidden = _hidden_relu(m)
        if hidden:
            raise ReLUSiteError(f"submodule '{module_qualified_name}' ({type(m).__name__}) {hidden} inside torch "
                                f"code that is called whole, so that activation call site cannot be counted on "
                                f"its own")
        return True

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.owners.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except ReLUSiteError:
            raise
        except Exception as exc:
            raise ReLUSiteError(_trace_failure(m, path, exc)) from exc
        finally:
            self.owners.pop()

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["relu_site_owner"] = self.owners[-1]
        return node


def _is_relu_module(m: nn.Module) -> bool:
    """An `nn.ReLU` (or a subclass that keeps its forward, such as `CountingReLU`): one call, one site."""
    return isinstance(m, nn.ReLU) and type(m).forward in (nn.ReLU.forward, CountingReLU.forward)


def _activation_site(m: nn.Module) -> tuple[str, tuple[float, ...]] | None:
    """(activation, thresholds) when `m` is a supported activation module other than ReLU that runs torch's own
    forward, else None."""
    if isinstance(m, SIGN_MODULES) and type(m).forward is _torch_layer_class(type(m)).forward:
        return type(m).__name__, (0.0,)
    if isinstance(m, nn.Hardtanh) and type(m).forward is nn.Hardtanh.forward:
        return type(m).__name__, (float(m.min_val), float(m.max_val))
    return None


def _torch_layer_class(cls: type) -> type | None:
    """The torch.nn layer class `cls` is or derives from (not `nn.Module` itself), else None."""
    for klass in cls.__mro__:
        if klass is nn.Module:
            return None
        if klass.__module__.startswith(TORCH_NN):
            return klass
    return None


def _own_code_names_relu(cls: type, base: type) -> bool:
    """Whether the code a subclass adds to torch.nn layer `base` names a ReLU function, method or module."""
    for klass in cls.__mro__[:cls.__mro__.index(base)]:
        for value in vars(klass).values():
            fn = getattr(value, "__func__", value)
            if isinstance(fn, types.FunctionType) and RELU_NAMES & _code_names(fn.__code__):
                return True
    return False


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _hidden_relu(m: nn.Module) -> str | None:
    """How a torch.nn layer called whole applies a ReLU inside torch code, if it does."""
    for name, sub in m.named_modules():
        where = f"holds '{name}', which " if name else ""
        if isinstance(sub, nn.ReLU) or _activation_site(sub):  # not m itself: an activation module is a site
            return f"holds an activation module ('{name}', {type(sub).__name__})"
        if isinstance(sub, (nn.RNNBase, nn.RNNCellBase)) and getattr(sub, "nonlinearity", None) == "relu":
            return f"{where}applies a ReLU in its recurrence (nonlinearity='relu')"
        if isinstance(sub, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and (
                sub.activation in (F.relu, *SIGN_FUNCTIONS, *BAND_FUNCTIONS)):
            name = "a ReLU" if sub.activation is F.relu else sub.activation.__name__
            return f"{where}applies {name} in its feed-forward block"
    return None


def _trace_failure(m: nn.Module, path: str, exc: Exception) -> str:
    """One sentence: which part of the model torch.fx could not trace, at which line of code, and why."""
    part = f"submodule '{path}' ({type(m).__name__})" if path else f"the forward of {type(m).__name__}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(TORCH_DIR) and f.filename != __file__]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" at {Path(frame.filename).name}:{frame.lineno}" + (f" `{frame.line.strip()}`" if frame.line else "")
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    return f"torch.fx cannot trace {part}{where} ({reason}), so its ReLU call sites cannot be found"


def _share_module_tree(traced: fx.GraphModule, model: nn.Module) -> None:
    """Make the traced module's children, parameters and buffers those of `model`, in `model`'s order: fx
    copies only what the graph uses, flattening containers; a checkpoint must see the same state dict."""
    traced._modules.clear()
    traced._parameters.clear()
    traced._buffers.clear()
    traced._modules.update(model._modules)
    traced._parameters.update(model._parameters)
    traced._buffers.update(model._buffers)
    traced._non_persistent_buffers_set = set(model._non_persistent_buffers_set)


def _relu_sites(traced: fx.GraphModule, graph: fx.Graph) -> Iterator[tuple[fx.Node, str, Any]]:
    """Every activation node in execution order, with its layer name and, for a ReLU, whether it is in place,
    for another activation, (its name, its state thresholds)."""
    seen: dict[str, int] = {}
    for node in list(graph.nodes):
        site = _site_kind(traced, node)
        if site is None:
            continue
        base, inplace = site
        seen[base] = seen.get(base, 0) + 1
        yield node, base if seen[base] == 1 else f"{base}#{seen[base]}", inplace


def _site_kind(traced: fx.GraphModule, node: fx.Node) -> tuple[str, Any] | None:
    """(base layer name, in place) when `node` applies a ReLU, (base layer name, (activation, thresholds)) when
    it applies another supported activation, else None."""
    owner = node.meta.get("relu_site_owner", "")
    prefix = f"{owner}." if owner else ""
    if node.op == "call_module":
        m = traced.get_submodule(node.target)
        if _is_relu_module(m):
            return node.target, m.inplace
        other = _activation_site(m)
        return (node.target, other) if other else None
    if node.op == "call_function" and node.target in SIGN_FUNCTIONS:
        return f"{prefix}{node.target.__name__}()", (node.target.__name__, (0.0,))
    if node.op == "call_function" and node.target in BAND_FUNCTIONS:
        bounds = BAND_FUNCTIONS[node.target] or (_argument(node, 1, "min_val", HARDTANH_DEFAULTS[0]),
                                                 _argument(node, 2, "max_val", HARDTANH_DEFAULTS[1]))
        if not all(type(b) in (int, float) for b in bounds):
            raise ReLUSiteError(f"{prefix}{node.target.__name__}() in '{owner or type(traced).__name__}' takes "
                                f"bounds computed in the forward, so its three regimes cannot be counted")
        return f"{prefix}{node.target.__name__}()", (node.target.__name__, tuple(float(b) for b in bounds))
    if node.op == "call_function" and node.target in RELU_FUNCTIONS:
        inplace = RELU_FUNCTIONS[node.target] or bool(_argument(node, 1, "inplace", False))
        return f"{prefix}{node.target.__name__}()", inplace
    if node.op == "call_method" and node.target in RELU_METHODS:
        return f"{prefix}{node.target}()", RELU_METHODS[node.target]
    clamps = CLAMP_FUNCTIONS if node.op == "call_function" else CLAMP_METHODS if node.op == "call_method" else {}
    if node.target in clamps and _zero_lower_bound_only(node):
        name = node.target if isinstance(node.target, str) else node.target.__name__
        return f"{prefix}{name}()", clamps[node.target]
    return None


def _argument(node: fx.Node, index: int, keyword: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(keyword, default)


def _zero_lower_bound_only(node: fx.Node) -> bool:
    """clamp(x, 0) / clamp(x, min=0) / clamp_min(x, 0): a lower bound of exactly 0 and no upper bound."""
    low = _argument(node, 1, "min")
    high = None if str(getattr(node.target, "__name__", node.target)).startswith("clamp_min") else \
        _argument(node, 2, "max")
    return type(low) in (int, float) and low == 0 and high is None


def _relu_input(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
