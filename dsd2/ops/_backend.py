"""Backend discovery for the fused ops: the C++ extension (CPU), Triton (CUDA), or the reference."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

ISA_ENV = "DSD2_CPU_ISA"


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
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpp = cpp_extension()
    levels = ", ".join(cpp.cpu_isa_levels()) if cpp is not None else "none"
    return {
        "cpp_extension": "loaded" if cpp is not None else "missing (reference fallback)",
        "cpu_isa": f"{cpp.cpu_isa()} (this CPU runs: {levels}; choose with {ISA_ENV})" if cpp is not None else "n/a",
        "cpu": cpu_model(),
        "triton": "importable" if triton_available() else "missing",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
    }


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (for figures that must name their machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
