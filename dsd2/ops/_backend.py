"""Backends of the fused ops: what each op has, the one picker every op asks, and discovery of the C++ extension
(CPU) and Triton (CUDA)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

ISA_ENV = "DSD2_CPU_ISA"

# The backends of each op, in the picker's order of preference: a fused backend is taken on its device when it is
# usable there; the first portable one (any device) is the fallback, and the ones after it run only when asked for.
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "kd_loss": ("triton", "cpp", "reference"),
    "relu_count": ("triton", "cpp", "reference"),
    "masked_sgd": ("triton", "cpp", "foreach", "reference"),
    "masked_linear": ("triton", "cpp", "reference"),
    "masked_conv2d": ("triton", "cpp", "reference"),
}
FUSED_DEVICE = {"triton": "cuda", "cpp": "cpu"}  # the device type each fused backend runs on
# the input dtypes of the fused kernels that do not take every dtype the op does: (op, backend) -> dtypes
KERNEL_DTYPES = {("relu_count", "cpp"): (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                 ("masked_linear", "triton"): (torch.float32, torch.float16, torch.bfloat16),
                 ("masked_conv2d", "triton"): (torch.float32, torch.float16, torch.bfloat16),
                 ("masked_linear", "cpp"): (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                 ("masked_conv2d", "cpp"): (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def pick(op: str, where: torch.Tensor | torch.device | str, backend: str | None = None, *,
         extension: Callable[[], ModuleType | None] | None = None, triton: bool | None = None) -> str:
    """The backend that `op` runs on for the tensor (or device) `where`.

    `backend`, when given, is the caller's choice: returned as it is once checked against the op's backends.
    Otherwise the op's fused backend for the device (Triton for CUDA, the C++ extension for the CPU, and for a
    tensor only if that kernel takes its dtype) where it is usable, else the op's portable path: "reference", or
    "foreach" for masked_sgd. `extension` loads dsd2._C or returns None (default: `cpp_extension`; an op passes
    the loader it then calls, so the choice and the call agree); `triton` says whether Triton is usable (default:
    whether it imports). Each is asked only when its backend is in question.
    """
    if op not in OP_BACKENDS:
        raise ValueError(f"op '{op}' is not known; allowed: {', '.join(OP_BACKENDS)}")
    if backend is not None:
        if backend not in OP_BACKENDS[op]:
            raise ValueError(f"backend '{backend}' is not known for {op}; allowed: {', '.join(OP_BACKENDS[op])}")
        return backend
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    dtype = where.dtype if isinstance(where, torch.Tensor) else None
    usable = {"cpp": lambda: (extension or cpp_extension)() is not None,
              "triton": lambda: triton_available() if triton is None else triton}
    for name in OP_BACKENDS[op]:
        if name not in FUSED_DEVICE:
            return name
        takes = dtype is None or dtype in KERNEL_DTYPES.get((op, name), (dtype,))
        if FUSED_DEVICE[name] == device.type and takes and usable[name]():
            return name
    raise AssertionError(f"{op} has no portable backend")  # every row of OP_BACKENDS ends with one


@functools.cache
def cpp_extension() -> ModuleType | None:
    """dsd2._C if it was built (at the level DSD2_CPU_ISA names, if set); otherwise None after one warning."""
    try:
        ext = importlib.import_module("dsd2._C")
    except ImportError as exc:
        warnings.warn(
            f"dsd2._C is not built ({exc}); CPU ops fall back to the plain-PyTorch reference. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    level = os.environ.get(ISA_ENV, "").strip()
    if level:
        try:
            ext.set_cpu_isa(level)
        except ValueError as exc:
            raise ValueError(f"{ISA_ENV}={level}: {exc}") from None
    return ext


def cpu_isa_levels() -> list[str]:
    """Instruction-set levels of the C++ kernels that this CPU runs, lowest first (empty without dsd2._C)."""
    ext = cpp_extension()
    return list(ext.cpu_isa_levels()) if ext is not None else []


def cpu_isa() -> str | None:
    """The level the C++ kernels run at now: the best one, unless DSD2_CPU_ISA or set_cpu_isa chose another."""
    ext = cpp_extension()
    return ext.cpu_isa() if ext is not None else None


def set_cpu_isa(level: str) -> None:
    """Run the C++ kernels at `level` (default, avx2, avx512) from now on, in every thread of the process;
    ValueError naming the allowed ones otherwise."""
    ext = cpp_extension()
    if ext is None:
        raise ValueError(f"CPU ISA level '{level}' cannot be chosen: dsd2._C is not built")
    ext.set_cpu_isa(level)


@contextlib.contextmanager
def use_cpu_isa(level: str) -> Iterator[None]:
    """Run the C++ kernels at `level` inside the block (tests and benchmarks of the lower levels). The level is
    one setting for the whole process, not per thread: do not switch it while other threads run ops."""
    before = cpu_isa()
    set_cpu_isa(level)
    try:
        yield
    finally:
        set_cpu_isa(before)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def describe() -> dict[str, str]:
    """What `dsd2-engine info` reports: the extension, the CPU level, Triton, CUDA, and each op's backend for a
    CPU and for a CUDA tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpp = cpp_extension()
    levels = ", ".join(cpp.cpu_isa_levels()) if cpp is not None else "none"
    ops = "; ".join(f"{op} cpu={pick(op, 'cpu')} cuda={pick(op, 'cuda')}" for op in OP_BACKENDS)
    return {
        "cpp_extension": "loaded" if cpp is not None else "missing (reference fallback)",
        "cpu_isa": f"{cpp.cpu_isa()} (this CPU runs: {levels}; choose with {ISA_ENV})" if cpp is not None else "n/a",
        "cpu": cpu_model(),
        "triton": "importable" if triton_available() else "missing",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "ops": ops,
    }


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it, with its family and model numbers (for figures that must
    name their machine: a virtual machine's name may be as bare as "AMD EPYC", whose Zen 3 and Zen 4 differ)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor's block
    except OSError:
        pass
    if "model name" in fields:
        family, model = fields.get("cpu family"), fields.get("model")
        return fields["model name"] + (f" (family {family}, model {model})" if family and model else "")
    import platform

    return platform.processor() or platform.machine()
