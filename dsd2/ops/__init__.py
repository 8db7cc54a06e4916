"""Public fused ops: drop-ins for other pruning and distillation code. Each picks its backend by device
(CUDA -> Triton, CPU -> the C++ extension, else the plain-PyTorch reference)."""

from dsd2.ops._backend import cpu_isa, cpu_isa_levels, set_cpu_isa, use_cpu_isa
from dsd2.ops._backend import describe as backends
from dsd2.ops.kd_loss import kd_loss, kd_loss_reference
from dsd2.ops.masked_sgd import MaskedSGD, masked_sgd_reference
from dsd2.ops.relu_count import (
    CountingReLU,
    count_positive_,
    count_positive_reference,
    relu_count,
    swap_in_counting_relus,
)
from dsd2.pruning import masks_from_torch_prune, to_torch_prune

__all__ = [
    "CountingReLU", "MaskedSGD", "backends", "count_positive_", "cpu_isa", "cpu_isa_levels", "set_cpu_isa",
    "use_cpu_isa", "count_positive_reference", "kd_loss",
    "kd_loss_reference", "masked_sgd_reference", "masks_from_torch_prune", "relu_count", "swap_in_counting_relus",
    "to_torch_prune",
]
