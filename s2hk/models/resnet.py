"""ResNets: torchvision-style ResNet-18/50 and the CIFAR ResNet-56 of He et al.

All three share one :class:`ResNet` body built from :class:`BasicBlock` or :class:`Bottleneck`. Every
forward is traceable by ``torch.fx.symbolic_trace``: the only branches test Python attributes fixed at
construction, activations are never modified in place, and residual sums are ``out = out + identity``.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``downsample``, ``fc``), except
that each block owns one ReLU per call site (``relu1``, ``relu2``, ...) so that every node of a traced graph
points at its own module.

FLOPs below are ``2 x MACs`` of the convolutions and linear layers for one ``3x32x32`` image with
``num_classes=10`` (what ``torch.utils.flop_counter.FlopCounterMode`` reports).
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import Tensor, nn

__all__ = [
    "init_weights",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "resnet56",
]

STEMS = ("cifar", "imagenet")


def init_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place as torchvision does.

    Convolutions: Kaiming normal (fan_out, relu), zero bias; BatchNorm: weight 1, bias 0;
    Linear: normal(0, 0.01), zero bias.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """1x1 conv + BN shortcut: (N, in_planes, H, W) -> (N, out_planes, H / stride, W / stride)."""
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection.

    Shapes: (N, in_planes, H, W) -> (N, planes, H / stride, W / stride). The shortcut is a 1x1 conv + BN
    projection when the shape changes, otherwise the identity.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        out_planes = planes * self.expansion
        self.downsample = (
            _projection(in_planes, out_planes, stride) if stride != 1 or in_planes != out_planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's "ResNet v1.5"), 1x1 expand by 4.

    Shapes: (N, in_planes, H, W) -> (N, 4 * planes, H / stride, W / stride). The shortcut is a 1x1 conv +
    BN projection when the shape changes, otherwise the identity.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu3 = nn.ReLU(inplace=False)
        self.downsample = (
            _projection(in_planes, out_planes, stride) if stride != 1 or in_planes != out_planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu3(out)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """A stem, ``len(layers)`` stages of residual blocks, global average pooling and a linear classifier.

    Stage ``i`` holds ``layers[i]`` blocks of width ``widths[i]``; every stage after the first halves the
    resolution in its first block.

    Stems:
        ``"cifar"``: 3x3 stride-1 conv, no max-pool; (N, 3, H, W) -> (N, stem_width, H, W).
        ``"imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max-pool; (N, 3, H, W) -> (N, stem_width, H/4, W/4).

    Shapes: (N, 3, H, W) -> logits (N, num_classes).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        stem: str = "cifar",
        stem_width: int = 64,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {list(STEMS)}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} must be non-empty and equally long")
        if stem == "cifar":
            self.conv1 = _conv3x3(3, stem_width)
            self.maxpool = None
        else:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=False)

        in_planes = stem_width
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(block(in_planes, width, stride if j == 0 else 1))
                in_planes = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, num_classes)."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, stem: str = "cifar") -> ResNet:
    """ResNet-18: BasicBlocks [2, 2, 2, 2], widths 64/128/256/512, 11.2 M parameters (10 classes).

    ``stem="cifar"`` (default) keeps full resolution in the stem, for 32x32 inputs; ``stem="imagenet"`` is
    torchvision's 7x7 stride-2 conv + max-pool.

    Dense cost at 1x3x32x32, 10 classes, cifar stem: 1,110,845,440 FLOPs (1110.8 MFLOPs, 555.4 M MACs).

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, stem=stem)


def resnet50(num_classes: int = 10, stem: str = "cifar") -> ResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3], widths 64/128/256/512 (x4 out), 23.5 M parameters (10 classes).

    ``stem="cifar"`` (default) keeps full resolution in the stem, for 32x32 inputs; ``stem="imagenet"`` is
    torchvision's 7x7 stride-2 conv + max-pool.

    Dense cost at 1x3x32x32, 10 classes, cifar stem: 2,595,659,776 FLOPs (2595.7 MFLOPs, 1297.8 M MACs).

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, stem=stem)


def resnet56(num_classes: int = 10) -> ResNet:
    """The CIFAR ResNet-56 of He et al. (2016): a 3x3 stride-1 stem of 16 channels, then 3 stages of 9
    BasicBlocks with 16/32/64 channels, global average pooling and a linear classifier (0.86 M parameters).

    Where the shape changes (the first block of stages 2 and 3) the shortcut is a 1x1 conv + BN projection
    (the paper's option B). The paper's option A, zero-padding the identity along channels, is avoided:
    padded channels are not produced by any layer, so they cannot be pruned structurally.

    Dense cost at 1x3x32x32, 10 classes: 251,495,680 FLOPs (251.5 MFLOPs, 125.7 M MACs).

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """
    return ResNet(BasicBlock, [9, 9, 9], widths=(16, 32, 64), num_classes=num_classes, stem="cifar", stem_width=16)
