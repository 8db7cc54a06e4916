"""Public fused ops: drop-ins for other pruning and distillation code. Each picks its backend by device."""

from dsd2.ops._backend import describe as backends
from dsd2.ops.masked_sgd import MaskedSGD, masked_sgd_reference
from dsd2.pruning import masks_from_torch_prune, to_torch_prune

__all__ = ["MaskedSGD", "backends", "masked_sgd_reference", "masks_from_torch_prune", "to_torch_prune"]
