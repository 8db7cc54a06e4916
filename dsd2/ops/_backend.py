"""Backend discovery for the fused ops: the C++ extension (CPU), Triton (CUDA), or the reference."""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType


@functools.cache
def cpp_extension() -> ModuleType | None:
    """dsd2._C if it was built; otherwise None after one warning naming the fallback."""
    try:
        return importlib.import_module("dsd2._C")
    except ImportError as exc:
        warnings.warn(
            f"dsd2._C is not built ({exc}); CPU ops fall back to the plain-PyTorch reference. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


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
    return {
        "cpp_extension": "loaded" if cpp is not None else "missing (reference fallback)",
        "triton": "importable" if triton_available() else "missing",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
    }
