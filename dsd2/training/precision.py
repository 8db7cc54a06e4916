"""Training precision: fp32, bf16 autocast, or `auto`, which takes bf16 only where it pays.

bf16 autocast pays where the hardware computes bf16 natively: GPUs from compute capability 8.0 (Ampere) on, and
CPUs with AVX-512 BF16 or AMX (x86-64) or the BF16 extension (aarch64), where oneDNN runs bf16 convolutions and
matrix products. Elsewhere a CPU emulates bf16 through fp32 conversions: a VGG-like epoch took 14.1 s in bf16
against 1.13 s in fp32 on an AMD EPYC with AVX2 only. Small MLPs lose in both cases (autocast's casts cost more
than bf16 matrix products save), so `auto` keeps them in fp32.
"""

from __future__ import annotations

import functools
import platform

import torch

NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86-64 (/proc/cpuinfo flags), aarch64 (Features)
EMULATED_BF16_WARNING = ("bf16 on this CPU is emulated (no AVX-512 BF16 or AMX): expect training about 10x "
                         "slower than fp32; --precision auto or fp32 avoids it")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products and convolutions natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            return False
        return any(flag in cpu_flags() for flag in NATIVE_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device, conv_net: bool) -> str:
    """The precision a run trains in: `auto` becomes bf16 for a conv net on a native-bf16 device, else fp32."""
    if precision == "auto":
        return "bf16" if conv_net and native_bf16(device) else "fp32"
    return precision


def precision_note(precision: str, device: torch.device, conv_net: bool) -> tuple[str, str | None]:
    """(the log line naming the precision in use and why, a warning line or None)."""
    used = resolve_precision(precision, device, conv_net)
    native = native_bf16(device)
    if precision == "auto":
        why = ("native bf16 on this device, conv net" if used == "bf16" else
               "not a conv net" if native else f"no native bf16 on this {device.type}")
        line = f"precision: {used} (auto: {why})"
    else:
        line = f"precision: {used}"
    warning = EMULATED_BF16_WARNING if used == "bf16" and device.type == "cpu" and not native else None
    return line, warning
