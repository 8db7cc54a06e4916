"""Copy bandwidth: the yardstick of the ops table's achieved-bandwidth column."""

import torch


def test_copy_bandwidth(benchmark, label):
    x = torch.randn(64 * 1024 * 1024 // 4)  # 64 MiB
    out = torch.empty_like(x)
    label("copy", "copy", "64 MiB", "copy", 2 * x.numel() * 4)
    benchmark(out.copy_, x)
