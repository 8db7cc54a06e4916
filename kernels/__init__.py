"""Triton GPU kernels behind dsd2's fused ops: distillation loss, ReLU activity counting, masked SGD."""
