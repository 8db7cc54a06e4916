"""Readable FLOP counts: one SI unit per number, three significant digits, exact numbers left to CSV/JSON."""

import pytest

from dsd2.report.units import format_flops, format_pflops


@pytest.mark.parametrize("flops, text", [
    (0, "0 FLOPs"),
    (0.0, "0 FLOPs"),
    (0.5, "0.5 FLOPs"),  # below one FLOP: as it is
    (1e-3, "0.001 FLOPs"),
    (1, "1.00 FLOPs"),
    (999, "999 FLOPs"),
    (999.4, "999 FLOPs"),
    (998.5, "999 FLOPs"),  # halves round up
    (999.5, "1.00 kFLOPs"),  # rounds up to 1000: the next unit, never "1000 FLOPs"
    (1000, "1.00 kFLOPs"),
    (12_345, "12.3 kFLOPs"),
    (7.79e5, "779 kFLOPs"),  # the digits teacher's inference cost, 7.79e-10 PFLOPs
    (67.45e6, "67.5 MFLOPs"),
    (3.14266e11, "314 GFLOPs"),  # the digits training cost, 0.000314266 PFLOPs
    (999.7e9, "1.00 TFLOPs"),
    (99.95e12, "100 TFLOPs"),
    (1e15, "1.00 PFLOPs"),
    (1.63e15, "1.63 PFLOPs"),  # the paper's Table 1
    (48.84e15, "48.8 PFLOPs"),
    (2e18, "2.00 EFLOPs"),
    (1.23e21, "1230 EFLOPs"),  # beyond the last unit the number grows
    (-2.5e9, "-2.50 GFLOPs"),
    (float("nan"), "n/a"),
    (float("inf"), "inf FLOPs"),
])
def test_format_flops(flops, text):
    assert format_flops(flops) == text


def test_digits_and_pflops():
    assert format_flops(3.14266e11, digits=5) == "314.27 GFLOPs"
    assert format_flops(3.14266e11, digits=1) == "300 GFLOPs"
    assert format_pflops(0.000314266) == "314 GFLOPs"
    assert format_pflops(7.79e-10) == "779 kFLOPs"
    assert format_pflops(0.0) == "0 FLOPs"
    with pytest.raises(ValueError, match="digits 0"):
        format_flops(1.0, digits=0)
