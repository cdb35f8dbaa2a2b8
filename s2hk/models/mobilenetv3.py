"""MobileNetV3-Small and -Large (Howard et al., 2019) in torchvision's configurations.

Built only from standard layers (no ``nn.Sequential`` subclasses), with ``inplace=False`` activations, so that
``torch.fx.symbolic_trace`` sees every convolution, norm and activation as its own leaf module.

``stem_stride=1`` (the default) is a CIFAR adaptation: the 3x3 stem keeps the resolution of a 32x32 input, so
the network ends at 2x2 instead of 1x1. Pass ``stem_stride=2`` for ImageNet-size inputs (torchvision's stem).

FLOPs below are ``2 x MACs`` of the convolutions and linear layers for one ``3x32x32`` image with
``num_classes=10`` and default arguments (what ``torch.utils.flop_counter.FlopCounterMode`` reports; the
Squeeze-Excitation products, norms and activations are not counted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Type

import torch
from torch import Tensor, nn

from .resnet import init_weights

__all__ = [
    "make_divisible",
    "SqueezeExcitation",
    "InvertedResidualConfig",
    "InvertedResidual",
    "MobileNetV3",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
]

# torchvision's MobileNetV3 norm settings (TF defaults), kept so that training recipes transfer.
_BN_EPS = 0.001
_BN_MOMENTUM = 0.01


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``), never dropping below
    90% of ``value`` -- the channel rounding of the MobileNet papers."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: Optional[Type[nn.Module]] = None,
) -> nn.Sequential:
    """Bias-free conv + BN (+ activation): (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM),
    ]
    if activation is not None:
        layers.append(activation(inplace=False))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention: ``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))``, fc1/fc2 being 1x1 convs with bias.

    Shapes: (N, C, H, W) -> (N, C, H, W); the gate is (N, C, 1, 1) through a (N, squeeze_channels, 1, 1)
    bottleneck.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, kernel_size=1, bias=True)
        self.scale_activation = nn.Hardsigmoid(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale


@dataclass(frozen=True)
class InvertedResidualConfig:
    """One bottleneck row of the MobileNetV3 tables, channel counts before ``width_mult``.

    ``activation`` is ``"RE"`` (ReLU) or ``"HS"`` (hard-swish).
    """

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    activation: str
    stride: int

    def scaled(self, width_mult: float) -> "InvertedResidualConfig":
        """The same row with every channel count scaled by ``width_mult`` and rounded to a multiple of 8."""
        return InvertedResidualConfig(
            make_divisible(self.in_channels * width_mult),
            self.kernel,
            make_divisible(self.expanded * width_mult),
            make_divisible(self.out_channels * width_mult),
            self.use_se,
            self.activation,
            self.stride,
        )


_ACTIVATIONS: dict[str, Type[nn.Module]] = {"RE": nn.ReLU, "HS": nn.Hardswish}


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck: [1x1 expand-BN-act] -> kxk depthwise-BN-act -> [SE] -> 1x1 project-BN.

    The expansion conv is omitted when ``expanded == in_channels``. The residual is added when
    ``stride == 1`` and ``in_channels == out_channels``.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(self, cfg: InvertedResidualConfig) -> None:
        super().__init__()
        if cfg.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {cfg.stride}")
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg.activation!r}; expected one of {list(_ACTIVATIONS)}")
        act = _ACTIVATIONS[cfg.activation]
        self.use_res_connect = cfg.stride == 1 and cfg.in_channels == cfg.out_channels

        layers: list[nn.Module] = []
        if cfg.expanded != cfg.in_channels:
            layers.append(_conv_bn_act(cfg.in_channels, cfg.expanded, 1, activation=act))
        layers.append(
            _conv_bn_act(cfg.expanded, cfg.expanded, cfg.kernel, stride=cfg.stride, groups=cfg.expanded, activation=act)
        )
        if cfg.use_se:
            layers.append(SqueezeExcitation(cfg.expanded, make_divisible(cfg.expanded // 4, 8)))
        layers.append(_conv_bn_act(cfg.expanded, cfg.out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


class MobileNetV3(nn.Module):
    """Stem (3x3 conv, 16 ch, hard-swish) -> inverted residuals -> 1x1 conv to 6x the last width (hard-swish)
    -> global average pooling -> Linear -> Hardswish -> Dropout -> Linear.

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """

    def __init__(
        self,
        setting: Sequence[InvertedResidualConfig],
        last_channel: int,
        num_classes: int = 10,
        stem_stride: int = 1,
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 (32x32 inputs) or 2 (ImageNet-size inputs), got {stem_stride}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if not setting:
            raise ValueError("a MobileNetV3 needs at least one inverted residual")
        cfgs = [c.scaled(width_mult) for c in setting]

        stem_channels = cfgs[0].in_channels
        layers: list[nn.Module] = [_conv_bn_act(3, stem_channels, 3, stride=stem_stride, activation=nn.Hardswish)]
        layers.extend(InvertedResidual(c) for c in cfgs)
        last_in = cfgs[-1].out_channels
        last_conv = 6 * last_in
        layers.append(_conv_bn_act(last_in, last_conv, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_channel = make_divisible(last_channel * width_mult)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel),
            nn.Hardswish(inplace=False),
            nn.Dropout(p=dropout, inplace=False),
            nn.Linear(last_channel, num_classes),
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, num_classes)."""
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


_C = InvertedResidualConfig

# torchvision's tables: (in, kernel, expanded, out, SE, activation, stride).
SMALL_SETTING: tuple[InvertedResidualConfig, ...] = (
    _C(16, 3, 16, 16, True, "RE", 2),
    _C(16, 3, 72, 24, False, "RE", 2),
    _C(24, 3, 88, 24, False, "RE", 1),
    _C(24, 5, 96, 40, True, "HS", 2),
    _C(40, 5, 240, 40, True, "HS", 1),
    _C(40, 5, 240, 40, True, "HS", 1),
    _C(40, 5, 120, 48, True, "HS", 1),
    _C(48, 5, 144, 48, True, "HS", 1),
    _C(48, 5, 288, 96, True, "HS", 2),
    _C(96, 5, 576, 96, True, "HS", 1),
    _C(96, 5, 576, 96, True, "HS", 1),
)
SMALL_LAST_CHANNEL = 1024

LARGE_SETTING: tuple[InvertedResidualConfig, ...] = (
    _C(16, 3, 16, 16, False, "RE", 1),
    _C(16, 3, 64, 24, False, "RE", 2),
    _C(24, 3, 72, 24, False, "RE", 1),
    _C(24, 5, 72, 40, True, "RE", 2),
    _C(40, 5, 120, 40, True, "RE", 1),
    _C(40, 5, 120, 40, True, "RE", 1),
    _C(40, 3, 240, 80, False, "HS", 2),
    _C(80, 3, 200, 80, False, "HS", 1),
    _C(80, 3, 184, 80, False, "HS", 1),
    _C(80, 3, 184, 80, False, "HS", 1),
    _C(80, 3, 480, 112, True, "HS", 1),
    _C(112, 3, 672, 112, True, "HS", 1),
    _C(112, 5, 672, 160, True, "HS", 2),
    _C(160, 5, 960, 160, True, "HS", 1),
    _C(160, 5, 960, 160, True, "HS", 1),
)
LARGE_LAST_CHANNEL = 1280


def mobilenet_v3_small(
    num_classes: int = 10, stem_stride: int = 1, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV3:
    """MobileNetV3-Small: 11 inverted residuals (9 with SE), 576-channel last conv, 1024-unit classifier,
    1.53 M parameters (10 classes).

    ``stem_stride=1`` (default) adapts the stem to 32x32 inputs; use 2 for ImageNet-size inputs.

    Dense cost at 1x3x32x32, 10 classes, defaults: 11,005,440 FLOPs (11.0 MFLOPs, 5.5 M MACs).

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """
    return MobileNetV3(SMALL_SETTING, SMALL_LAST_CHANNEL, num_classes, stem_stride, width_mult, dropout)


def mobilenet_v3_large(
    num_classes: int = 10, stem_stride: int = 1, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV3:
    """MobileNetV3-Large: 15 inverted residuals (8 with SE), 960-channel last conv, 1280-unit classifier,
    4.21 M parameters (10 classes).

    ``stem_stride=1`` (default) adapts the stem to 32x32 inputs; use 2 for ImageNet-size inputs.

    Dense cost at 1x3x32x32, 10 classes, defaults: 40,203,520 FLOPs (40.2 MFLOPs, 20.1 M MACs).

    Shapes: (N, 3, H, W) -> (N, num_classes).
    """
    return MobileNetV3(LARGE_SETTING, LARGE_LAST_CHANNEL, num_classes, stem_stride, width_mult, dropout)
