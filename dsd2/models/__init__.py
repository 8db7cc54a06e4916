"""The paper's models (ResNet-18 CIFAR variant, VGG-like(delta, gamma), MLPs) and a registry by name.

Every ReLU is its own `nn.Module` (never `F.relu` or a shared instance) so the engine can find
each activation layer, count its states, or swap it for a counting drop-in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsd2.config import ModelConfig


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


class VGGLike(nn.Module):
    """delta blocks; block k = 2 x [conv3x3 -> ReLU -> BatchNorm] with 2**(gamma+k-1) filters, max-pool 2."""

    def __init__(self, depth: int, width: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for k in range(1, depth + 1):
            filters = 2 ** (width + k - 1)
            for _ in range(2):
                layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(filters)]
                channels = filters
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Linear(channels * 49, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-2:] == (1, 1):
            # Adaptive average pooling of a 1x1 map to 7x7 copies the value; expand does the same without
            # the slow generic pooling backward (32x32 inputs after 5 blocks end at 1x1).
            x = x.expand(-1, -1, 7, 7)
        else:
            x = self.pool(x)
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
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
    "vgg": lambda c, shape, k: VGGLike(c.depth, c.width, shape[0], k),
    "resnet18": lambda c, shape, k: ResNet18(shape[0], k),
}

CONV_MODELS = ("vgg", "resnet18")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name not in REGISTRY:
        raise ValueError(f"model '{cfg.name}' is not known; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[cfg.name](cfg, tuple(input_shape), num_classes)


def relu_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ReLU activation layer by qualified name, in forward order of registration."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
