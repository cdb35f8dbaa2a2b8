"""WideResNet-28-10 (Zagoruyko & Komodakis, 2016) with pre-activation blocks.

The forward is traceable by ``torch.fx.symbolic_trace``: branches test Python attributes only, activations
are never modified in place, and residual sums are ``out = out + shortcut``.

FLOPs below are ``2 x MACs`` of the convolutions and linear layers for one ``3x32x32`` image with
``num_classes=10`` (what ``torch.utils.flop_counter.FlopCounterMode`` reports).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .resnet import init_weights

__all__ = ["WideBasicBlock", "WideResNet", "wrn28_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-Conv3x3 (stride) - BN-ReLU-Dropout-Conv3x3, plus a shortcut.

    When ``in_planes == planes`` (and so ``stride == 1``) the shortcut is the raw input. Otherwise it is a
    bias-free 1x1 conv applied to the pre-activated input ``relu1(bn1(x))``, as in the reference
    implementation, so both paths start from the same normalised tensor.

    Shapes: (N, in_planes, H, W) -> (N, planes, H / stride, W / stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if in_planes == planes and stride != 1:
            raise ValueError("a strided block must change width so that its shortcut is a projection")
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(p=dropout, inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False) if in_planes != planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = out + shortcut
        return out


class WideResNet(nn.Module):
    """WRN-depth-k: a 3x3 stem of 16 channels, three stages of ``(depth - 4) / 6`` pre-activation blocks with
    widths 16k/32k/64k (the last two halving the resolution), then BN-ReLU, global average pooling and a
    linear classifier.

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        for i, width in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(WideBasicBlock(in_planes, width, stride if j == 0 else 1, dropout))
                in_planes = width
            self.add_module(f"block{i + 1}", nn.Sequential(*stage))
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, num_classes)."""
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.relu(self.bn1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def wrn28_10(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WideResNet-28-10: 3 stages of 4 pre-activation blocks, widths 16/160/320/640, 36.5 M parameters.

    ``dropout`` is applied between the two convolutions of every block (the paper uses 0.3 on CIFAR; the
    default 0.0 keeps the layer as a no-op).

    Dense cost at 1x3x32x32, 10 classes: 10,486,657,536 FLOPs (10.49 GFLOPs, 5.243 G MACs).

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """
    return WideResNet(depth=28, widen_factor=10, num_classes=num_classes, dropout=dropout)
