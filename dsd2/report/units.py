"""Readable numbers for tables and logs: FLOP counts in one SI unit per number (kFLOPs ... EFLOPs), a few
significant digits; a dip in accuracy points with its interval. The exact numbers stay in CSV and JSON; this is
only how they are shown."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Context

PREFIXES = ("", "k", "M", "G", "T", "P", "E")


def format_flops(flops: float, digits: int = 3) -> str:
    """`flops` with the SI prefix that leaves 1 to 999 before the point, to `digits` significant digits:
    3.14266e11 -> '314 GFLOPs', 7.79e5 -> '779 kFLOPs', 4.884e16 -> '48.8 PFLOPs', 0 -> '0 FLOPs'. A value that
    rounds up to 1000 moves to the next unit (999.7e9 -> '1.00 TFLOPs'); beyond EFLOPs the number grows;
    below one FLOP it is written as it is (0.5 -> '0.5 FLOPs'); NaN is 'n/a'."""
    if digits < 1:
        raise ValueError(f"digits {digits} must be at least 1")
    if math.isnan(flops):
        return "n/a"
    sign = "-" if flops < 0 else ""
    size = abs(flops)
    if math.isinf(size):
        return f"{sign}inf FLOPs"
    if size == 0:
        return "0 FLOPs"
    if size < 1:
        return f"{sign}{size:.{digits}g} FLOPs"
    # round first (halves up, as people do: 67.45 M -> 67.5 M), so 999.7 becomes 1000 and takes the next unit
    rounded = float(Context(prec=digits, rounding=ROUND_HALF_UP).create_decimal(size))
    power = min(int(math.floor(math.log10(rounded))) // 3, len(PREFIXES) - 1)
    value = rounded / 1000**power
    decimals = max(digits - 1 - int(math.floor(math.log10(value))), 0)
    return f"{sign}{value:.{decimals}f} {PREFIXES[power]}FLOPs"


def format_pflops(pflops: float, digits: int = 3) -> str:
    """`format_flops` of a count held in PFLOPs (how summary.json and the CSV tables store costs)."""
    return format_flops(pflops * 1e15, digits)


def format_dip(dip: float | None, lower: float | None, upper: float | None) -> str:
    """'6.4 [0.1, 13.0]': a dip and its 95 % interval (accuracy fractions) in points; 'n/a' without a verdict."""
    if dip is None:
        return "n/a"
    return f"{dip * 100:.1f} [{lower * 100:.1f}, {upper * 100:.1f}]"
