"""The paper's models (ResNet-18 CIFAR variant, VGG-like(delta, gamma), MLPs), LeNet-300-100 and LeNet-5, and a
registry by name.

Every ReLU is its own `nn.Module` (never `F.relu` or a shared instance) so the engine can find
each activation layer, count its states, or swap it for a counting drop-in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsd2.config import ModelConfig
from dsd2.ops.masked_conv2d import SMALL_MAP, SmallMapConv


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, state dict and pruning behaviour) that, when training on the CPU with
    small output maps, takes its weight gradient from one matrix product (`dsd2.ops.masked_conv2d.SmallMapConv`,
    which the masked layers take there too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.dim() == 4 and x.shape[-1] * x.shape[-2] <= SMALL_MAP
        if (small and self.training and x.device.type == "cpu" and torch.is_grad_enabled() and self.groups == 1
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
            return SmallMapConv.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return super().forward(x)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 with ReLUs and max-pooling: conv 5x5 6 -> ReLU -> pool 2 -> conv 5x5 16 -> ReLU -> pool 2 -> fc 120
    -> ReLU -> fc 84 -> ReLU -> fc. The convolutions are unpadded, so the first linear layer takes what the input
    leaves: 16x5x5 from 32x32 (LeCun's), 16x4x4 from Fashion-MNIST's 28x28."""

    MIN_SIDE = 16  # the second pooling needs a 2x2 map: (16 - 4) / 2 - 4 = 2

    def __init__(self, in_channels: int = 1, image_hw: tuple[int, int] = (28, 28), num_classes: int = 10):
        super().__init__()
        if min(image_hw) < self.MIN_SIDE:
            raise ValueError(f"LeNet-5 needs images of {self.MIN_SIDE}x{self.MIN_SIDE} or more, not "
                             f"{image_hw[0]}x{image_hw[1]}: two 5x5 convolutions and two halvings")
        h, w = (((s - 4) // 2 - 4) // 2 for s in image_hw)
        self.features = nn.Sequential(Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * h * w, 120), nn.ReLU(), nn.Linear(120, 84),
                                        nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGGLike(nn.Module):
    """delta blocks; block k = 2 x [conv3x3 -> ReLU -> BatchNorm] with 2**(gamma+k-1) filters, max-pool 2."""

    def __init__(self, depth: int, width: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for k in range(1, depth + 1):
            filters = 2 ** (width + k - 1)
            for _ in range(2):
                layers += [Conv2d(channels, filters, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(filters)]
                channels = filters
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = AdaptiveAvgPool2d(7)
        self.classifier = nn.Linear(channels * 49, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """`nn.AdaptiveAvgPool2d` that pools a 1x1 map (32x32 inputs after 5 VGG blocks) by `expand`: the same
    copies of the value, without the slow generic pooling backward. The shape test lives in this layer, not in
    the model's forward, so the model stays traceable by torch.fx (ReLU call sites)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):
            size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size,) * 2
            return x.expand(*x.shape[:-2], *(1 if s is None else s for s in size))
        return super().forward(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR variant: 3x3 stride-1 stem, no max-pool, stages 64-128-256-512."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        stages, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]

REGISTRY: dict[str, ModelBuilder] = {
    "mlp": lambda c, shape, k: MLP(_numel(shape), tuple(c.hidden), k),
    "lenet300": lambda c, shape, k: MLP(_numel(shape), (300, 100), k),
    "lenet5": lambda c, shape, k: LeNet5(shape[0], (shape[1], shape[2]), k),
    "vgg": lambda c, shape, k: VGGLike(c.depth, c.width, shape[0], k),
    "resnet18": lambda c, shape, k: ResNet18(shape[0], k),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def module_fingerprint(module: nn.Module, weights: bool = False) -> str:
    """A short hash naming a module: its class, and the names, shapes and dtypes of its parameters and buffers
    (and, with `weights`, their values): two runs of the same architecture from the same initial weights share it."""
    import hashlib

    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if weights:
            h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else
                     t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name not in REGISTRY:
        raise ValueError(f"model '{cfg.name}' is not known; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[cfg.name](cfg, tuple(input_shape), num_classes)


def relu_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ReLU activation layer by qualified name, in forward order of registration."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
