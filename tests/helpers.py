"""Helpers shared by several test files."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


Range = tuple[float, float]


def randomise_norms(model: nn.Module, weight: Range = (0.5, 1.5), bias: Range = (-0.5, 0.5),
                    mean: Range = (-0.3, 0.3), var: Range = (0.5, 2.0)) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics and LayerNorm affine parameters (uniform in the
    given ranges), so that slicing mistakes show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(*weight)
                m.bias.uniform_(*bias)
                m.running_mean.uniform_(*mean)
                m.running_var.uniform_(*var)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(*weight)
                m.bias.uniform_(*bias)
    return model


class TwoConvNet(nn.Module):
    """conv(3->c1) -> BN -> ReLU -> conv(c1->c2) -> BN -> ReLU -> global mean -> linear(c2->num_classes)."""

    def __init__(self, c1: int = 8, c2: int = 12, num_classes: int = 5) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.c2, self.b2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class ResidualNet(nn.Module):
    """stem -> bn0 -> relu -> [conv1 -> bn1 -> relu -> conv2 -> bn2] + identity -> relu -> mean -> fc:
    3 -> ``width`` channels, an inner width of ``inner``, ``num_classes`` outputs."""

    def __init__(self, width: int, inner: int, num_classes: int) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.relu(out + x).mean((2, 3)))
