"""Public fused ops: drop-ins for other pruning and distillation code. Each asks `pick` for its backend by device
(CUDA -> Triton, CPU -> the C++ extension, else its plain-PyTorch path); `OP_BACKENDS` lists what each op has."""

from dsd2.ops._backend import (
    OP_BACKENDS,
    cpp_extension,
    cpu_isa,
    cpu_isa_levels,
    cpu_model,
    pick,
    set_cpu_isa,
    use_cpu_isa,
)
from dsd2.ops._backend import describe as backends
from dsd2.ops.batch_norm import BatchNorm2d, FusedReLU, batch_norm, fuse_relu_batch_norms, swap_in_batch_norms
from dsd2.ops.bitmask import PackedMask, pack_mask
from dsd2.ops.kd_loss import kd_loss, kd_loss_eager, kd_loss_reference
from dsd2.ops.masked_conv2d import masked_conv2d, masked_conv2d_reference
from dsd2.ops.masked_layers import (
    MaskedConv2d,
    MaskedLinear,
    fuse_torch_prune,
    masked_layers,
    set_layer_masks,
    set_sparse_kernels,
    sparse_paths,
    swap_in_masked_layers,
    unfuse_torch_prune,
)
from dsd2.ops.masked_linear import masked_linear, masked_linear_reference
from dsd2.ops.masked_sgd import MaskedSGD, masked_sgd_reference
from dsd2.ops.pooling import MaxPool2d, max_pool2d, swap_in_max_pools
from dsd2.ops.relu_count import (
    CountingReLU,
    StateCounter,
    count_positive_,
    count_positive_reference,
    relu_count,
    swap_in_counting_relus,
)
from dsd2.ops.relu_sites import SUPPORTED as SUPPORTED_ACTIVATIONS
from dsd2.ops.relu_sites import ReLUSiteError, ReLUSiteModule, count_relu_call_sites
from dsd2.ops.sparse_csr import csr_conv2d, csr_linear
from dsd2.ops.sparse_inference import SparseStack
from dsd2.ops.sparse_layers import SparsePlan, sparse_conv2d, sparse_linear
from dsd2.pruning import masks_from_torch_prune, to_torch_prune

__all__ = [
    "OP_BACKENDS", "BatchNorm2d", "CountingReLU", "MaskedConv2d", "MaskedLinear", "MaskedSGD", "MaxPool2d",
    "PackedMask", "FusedReLU", "ReLUSiteError", "ReLUSiteModule",
    "SUPPORTED_ACTIVATIONS", "SparsePlan", "SparseStack", "StateCounter",
    "backends", "batch_norm", "count_positive_", "count_positive_reference", "count_relu_call_sites",
    "cpp_extension", "cpu_isa", "csr_conv2d", "csr_linear", "cpu_isa_levels", "cpu_model", "fuse_relu_batch_norms",
    "fuse_torch_prune", "kd_loss",
    "kd_loss_eager", "kd_loss_reference", "masked_conv2d", "masked_conv2d_reference", "masked_layers", "masked_linear",
    "masked_linear_reference", "masked_sgd_reference", "max_pool2d",
    "masks_from_torch_prune", "pack_mask", "pick", "relu_count", "set_cpu_isa", "set_layer_masks", "set_sparse_kernels",
    "sparse_conv2d", "sparse_linear", "sparse_paths", "swap_in_batch_norms", "swap_in_counting_relus",
    "swap_in_masked_layers", "swap_in_max_pools", "to_torch_prune", "unfuse_torch_prune", "use_cpu_isa",
]
