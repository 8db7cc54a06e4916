"""Training precision: fp32, bf16 autocast, or `auto`, which takes bf16 only where it pays.

bf16 autocast pays where the hardware computes bf16 natively: GPUs from compute capability 8.0 (Ampere) on, and
CPUs with AVX-512 BF16 or AMX (x86-64) or the BF16 extension (aarch64), where oneDNN runs bf16 convolutions and
matrix products. Elsewhere a CPU emulates bf16 through fp32 conversions: a VGG-like epoch took 14.1 s in bf16
against 1.13 s in fp32 on an AMD EPYC with AVX2 only. Small MLPs lose in both cases (autocast's casts cost more
than bf16 matrix products save), so `auto` keeps them in fp32.
"""

from __future__ import annotations

import torch

from dsd2.config import auto_precision, native_bf16

EMULATED_BF16_WARNING = ("bf16 on this CPU is emulated (no AVX-512 BF16 or AMX): expect training about 10x "
                         "slower than fp32; --precision auto or fp32 avoids it")


def resolve_precision(precision: str, device: torch.device, conv_net: bool) -> str:
    """The precision a run trains in (`build_config` has already made `auto` concrete; a Config built by hand
    may still say auto)."""
    return auto_precision(str(device), conv_net) if precision == "auto" else precision


def precision_note(precision: str, device: torch.device) -> tuple[str, str | None]:
    """(the log line naming the precision in use, a warning line where bf16 is emulated, or None)."""
    native = native_bf16(str(device))
    line = f"precision: {precision} (bf16 {'native' if native else 'emulated'} on this {device.type})"
    warning = EMULATED_BF16_WARNING if precision == "bf16" and device.type == "cpu" and not native else None
    return line, warning
