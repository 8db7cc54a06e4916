"""Train and evaluation epochs, objectives, masked optimizers and learning-rate schedules.

The whole training step fits on one screen: `train_epoch`. Metrics accumulate in device tensors
and are read once per epoch, so the loop never waits on the device inside an epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsd2.config import OptimConfig
from dsd2.data import DeviceDataset
from dsd2.data.batching import eval_batches, normalize, train_batches
from dsd2.ops import MaskedSGD
from dsd2.pruning import Masks, prunable_weights
from dsd2.training.schedule import epochs_for, level_lr, schedule_lr  # noqa: F401

# objective(logits, labels, inputs, sample indices) -> scalar loss
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor,
                  indices: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


class DistillationObjective:
    """(1 - alpha) CE + alpha tau^2 KL to a frozen teacher, via the fused `dsd2.ops.kd_loss`.

    The teacher runs in eval mode under no_grad on the same (augmented) batch as the student; without
    augmentation its logits are computed once for the whole training split and looked up by sample index.
    The CE and KL parts accumulate in device tensors (read once per epoch, no sync per step).
    With alpha = 0 the objective is plain cross-entropy, bit for bit.
    """

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float,
                 cached_logits: torch.Tensor | None = None, precision: str = "fp32"):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.cached = cached_logits
        self.precision = precision
        self.reset()

    def reset(self) -> None:
        # accumulators live on the device and are added to in place: no sync per step, and a captured
        # CUDA graph keeps adding into the same memory on every replay
        if getattr(self, "ce_sum", None) is not None:
            self.ce_sum.zero_()
            self.kl_sum.zero_()
        else:
            self.ce_sum = self.kl_sum = None
        self.samples = 0

    def teacher_logits(self, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[indices]
        with torch.no_grad(), autocast(inputs.device, self.precision):
            return self.teacher(inputs).float()

    def __call__(self, logits, labels, inputs, indices=None):
        if self.alpha == 0.0:
            return F.cross_entropy(logits.float(), labels)
        from dsd2.ops import kd_loss

        t = self.teacher_logits(inputs, indices)
        loss, ce, kl = kd_loss(logits.float(), t, labels, alpha=self.alpha, temperature=self.temperature,
                               return_parts=True)
        if self.ce_sum is None:
            self.ce_sum = torch.zeros((), device=logits.device)
            self.kl_sum = torch.zeros((), device=logits.device)
        n = labels.numel()
        self.ce_sum.add_(ce * n)
        self.kl_sum.add_(kl * n)
        self.samples += n
        return loss

    def parts(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {"kd_ce": float(self.ce_sum) / self.samples, "kd_kl": float(self.kl_sum) / self.samples}


class MaskedAdam(torch.optim.Adam):
    """Adam whose pruned entries take no gradient and stay exactly 0.0 after every step."""

    def __init__(self, params, masks: dict[torch.Tensor, torch.Tensor], **kwargs):
        super().__init__(params, **kwargs)
        self.masks = {id(p): m for p, m in masks.items()}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        pairs = [(p, self.masks[id(p)]) for g in self.param_groups for p in g["params"]
                 if id(p) in self.masks and p.grad is not None]
        if pairs:
            torch._foreach_mul_([p.grad for p, _ in pairs], [m for _, m in pairs])
        loss = super().step(closure)
        if pairs:
            torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])
        return loss


def build_optimizer(model: nn.Module, masks: Masks, cfg: OptimConfig) -> torch.optim.Optimizer:
    weights = prunable_weights(model)
    by_param = {weights[name]: mask for name, mask in masks.items()}
    if cfg.optimizer == "sgd":
        return MaskedSGD(model.parameters(), by_param, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    # capturable keeps Adam's step counters on the GPU: no host read per step, and CUDA-graph safe
    cuda = next(model.parameters()).device.type == "cuda"
    return MaskedAdam(model.parameters(), by_param, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=cuda)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_inputs(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   channels_last: bool) -> torch.Tensor:
    x = normalize(images, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: DeviceDataset, *,
                batch_size: int, generator: torch.Generator, augment: bool, mean: torch.Tensor,
                std: torch.Tensor, objective: Objective = cross_entropy, precision: str = "fp32",
                channels_last: bool = False, dist_ctx=None) -> dict[str, float]:
    """One epoch. Under data parallelism (`dist_ctx` enabled) `model` is the DDP wrapper and each rank
    trains on its share of every global batch; the epoch's loss and accuracy are summed over ranks."""
    model.train()
    device = data.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    sharded = dist_ctx is not None and dist_ctx.enabled
    batches = train_batches(data, batch_size, generator, augment, shard=dist_ctx.shard if sharded else None,
                            world=dist_ctx.world if sharded else 1)
    n = len(data)
    if sharded:
        # DDP averages the ranks' mean losses; shards of one batch may differ by a sample, so each rank's
        # loss is weighted by its share to give exactly the global batch mean
        global_sizes = iter([g for g in (min(batch_size, n - s) for s in range(0, n, batch_size))
                             if g >= dist_ctx.world])
    for images, labels, idx in batches:
        x = prepare_inputs(images, mean, std, channels_last)
        with autocast(device, precision):
            logits = model(x)
            loss = objective(logits, labels, x, idx)
        optimizer.zero_grad(set_to_none=True)
        if sharded:
            (loss * (labels.numel() * dist_ctx.world / next(global_sizes))).backward()
        else:
            loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
    if sharded:
        dist_ctx.all_reduce_sum(loss_sum)
        dist_ctx.all_reduce_sum(correct)
    return {"train_loss": float(loss_sum) / n, "train_acc": float(correct) / n}


@torch.no_grad()
def predict(model: nn.Module, data: DeviceDataset, *, batch_size: int, mean: torch.Tensor,
            std: torch.Tensor, precision: str = "fp32", channels_last: bool = False) -> torch.Tensor:
    """Float32 logits for a whole split in eval mode."""
    model.eval()
    device = data.images.device
    out = []
    for images, _ in eval_batches(data, batch_size):
        with autocast(device, precision):
            out.append(model(prepare_inputs(images, mean, std, channels_last)).float())
    return torch.cat(out) if out else torch.empty(0, device=device)


def evaluate(model: nn.Module, data: DeviceDataset, **kwargs) -> dict[str, float]:
    logits = predict(model, data, **kwargs)
    if len(data) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    loss = F.cross_entropy(logits, data.labels)
    acc = (logits.argmax(1) == data.labels).float().mean()
    return {"loss": float(loss), "acc": float(acc)}
