"""What a training or evaluation step reads: uint8 images made into the model's input, in its precision."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dsd2.data import DeviceDataset
from dsd2.data.batching import normalize


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast, or nothing. The weight-cast cache is off: a captured CUDA graph must not hold casts of
    weights that change in place, and a forward uses each weight once anyway."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class InputFormat:
    """Normalisation statistics, precision and memory format of a model's input."""

    mean: torch.Tensor
    std: torch.Tensor
    precision: str = "fp32"
    channels_last: bool = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast(device, self.precision)


@dataclass(frozen=True)
class TrainFeed:
    """The training split and how its batches are drawn and prepared."""

    data: DeviceDataset
    batch_size: int
    fmt: InputFormat
    augment: bool = False


def forward_loss(model: torch.nn.Module, objective, images: torch.Tensor, labels: torch.Tensor,
                 indices: torch.Tensor, fmt: InputFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and loss of one batch of uint8 images (already augmented): the forward half of every step."""
    x = fmt.prepare(images)
    with fmt.autocast(images.device):
        logits = model(x)
        loss = objective(logits, labels, x, indices)
    return logits, loss


@torch.no_grad()
def predict(model: torch.nn.Module, data: DeviceDataset, batch_size: int, fmt: InputFormat) -> torch.Tensor:
    """Float32 logits for a whole split in eval mode."""
    model.eval()
    device = data.images.device
    out = []
    for start in range(0, len(data), batch_size):
        x = fmt.prepare(data.images[start:start + batch_size])
        with fmt.autocast(device):
            out.append(model(x).float())
    return torch.cat(out) if out else torch.empty(0, device=device)
