"""Small models with the structural patterns of the classic CIFAR and torchvision classification zoos.

Each is written for these tests (no third-party code): the same kinds of blocks -- basic and bottleneck
residuals, pre-activation, plain stacks, inception concats, dense concats, inverted residuals with depthwise
convs, squeeze-excite, grouped convs, channel split and shuffle, dual paths, stochastic depth, LayerNorm over
channels, attention -- at a few channels, for 16x16 inputs and 10 classes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, stride=stride), conv_bn(cout, cout)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, block: Callable[..., nn.Module] = Basic, widths=(8, 16), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers += [block(cin, w, 1 if i == 0 else 2), block(w, w)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.layers(F.relu(self.stem(x))).mean((2, 3)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, inner: int = 0) -> None:
        super().__init__()
        inner = inner or cout // 2
        self.a = conv_bn(cin, inner, 1)
        self.b = conv_bn(inner, inner, 3, stride, groups)
        self.c = conv_bn(inner, cout, 1)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))) + self.short(x))


def resnext(num_classes: int = 10) -> nn.Module:
    return ResNet(lambda cin, cout, stride=1: Bottleneck(cin, cout, stride, groups=4, inner=cout), (8, 16),
                  num_classes)


def regnet(num_classes: int = 10) -> nn.Module:
    """RegNet-X style: bottleneck ratio 1, group width 4."""
    return ResNet(lambda cin, cout, stride=1: Bottleneck(cin, cout, stride, groups=cout // 4, inner=cout),
                  (8, 16), num_classes)


class PreAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.c2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.short(out) if self.short is not None else x
        return self.c2(F.relu(self.bn2(self.c1(out)))) + short


def vgg(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(conv_bn(3, 8), nn.ReLU(), conv_bn(8, 16), nn.ReLU(), nn.MaxPool2d(2), conv_bn(16, 16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(32, num_classes))


def lenet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, num_classes))


class Inception(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 4, 1)
        self.b2 = nn.Sequential(conv_bn(cin, 4, 1), nn.ReLU(), conv_bn(4, 6))
        self.b3 = nn.Sequential(conv_bn(cin, 2, 1), nn.ReLU(), conv_bn(2, 4), nn.ReLU(), conv_bn(4, 4))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 4, 1))

    def forward(self, x):
        return F.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


def googlenet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(conv_bn(3, 8), nn.ReLU(), Inception(8), Inception(18), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(18, num_classes))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 4) -> None:
        super().__init__()
        self.bn1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.bn2, self.c2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.c2(F.relu(self.bn2(self.c1(F.relu(self.bn1(x))))))], 1)


def densenet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), DenseLayer(8), DenseLayer(12),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2),
                         DenseLayer(8), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(12, num_classes))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int = 4, gate: Callable = torch.sigmoid) -> None:
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1), gate

    def forward(self, x):
        return x * self.gate(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 / EfficientNet block: expand, depthwise, optional squeeze-excite, project; stochastic depth
    on the residual branch during training."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 3, se: bool = False,
                 drop: float = 0.0) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(conv_bn(cin, hidden, 1), nn.Hardswish() if se else nn.ReLU6())
        self.dw = nn.Sequential(conv_bn(hidden, hidden, 3, stride, hidden), nn.SiLU() if se else nn.ReLU6())
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1)
        self.residual, self.drop = stride == 1 and cin == cout, drop

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        if not self.residual:
            return out
        if self.training and self.drop > 0:  # stochastic depth, per sample
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop
            out = out * keep / (1 - self.drop)
        return x + out


def mobilenet_v2(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(conv_bn(3, 8), nn.ReLU6(), InvertedResidual(8, 8), InvertedResidual(8, 12, 2),
                         InvertedResidual(12, 12), conv_bn(12, 24, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(24, num_classes))


def efficientnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(conv_bn(3, 8), nn.SiLU(), InvertedResidual(8, 8, se=True, drop=0.2),
                         InvertedResidual(8, 12, 2, se=True), InvertedResidual(12, 12, se=True, drop=0.2),
                         conv_bn(12, 24, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(24, num_classes))


class SEBasic(Basic):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, stride)
        self.se = SqueezeExcite(cout)

    def forward(self, x):
        return F.relu(self.se(self.b(F.relu(self.a(x)))) + self.short(x))


def senet(num_classes: int = 10) -> nn.Module:
    return ResNet(SEBasic, (8, 16), num_classes)


def preact_resnet(num_classes: int = 10) -> nn.Module:
    class Net(ResNet):
        def __init__(self) -> None:
            super().__init__(PreAct, (8, 16), num_classes)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.layers(self.stem(x)))).mean((2, 3)))
    return Net()


class Aggregation(nn.Module):
    """DLA's root: a 1x1 conv over the concat of its children."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv_bn(cin, cout, 1)

    def forward(self, *xs):
        return F.relu(self.conv(torch.cat(xs, 1)))


class DLA(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.left, self.right = Basic(8, 8), Basic(8, 8)
        self.root = Aggregation(16, 8)
        self.down = Basic(8, 16, 2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = self.left(x)
        b = self.right(a)
        return self.fc(self.down(self.root(a, b)).mean((2, 3)))


class SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.pw = conv_bn(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class PNASCell(nn.Module):
    """PNASNet's cell: separable convs and a max-pool branch, summed."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.sep1, self.sep2 = SeparableConv(c, c), SeparableConv(c, c)

    def forward(self, x):
        return F.relu(self.sep1(x) + F.max_pool2d(x, 3, 1, 1) + self.sep2(x))


def pnasnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(conv_bn(3, 8), nn.ReLU(), PNASCell(8), PNASCell(8), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, drop: float = 0.1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 1e-1))
        self.drop = drop

    def forward(self, x):
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        y = y.permute(0, 3, 1, 2)
        if self.training and self.drop > 0 and torch.rand(()) < self.drop:
            return x
        return x + y


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.norm0 = nn.Conv2d(3, 8, 2, 2), LayerNorm2d(8)
        self.blocks = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.down = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 16, 2, 2))
        self.block3 = ConvNeXtBlock(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block3(self.down(self.blocks(self.norm0(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MHAViT(nn.Module):
    """torchvision's VisionTransformer form: conv patch embedding, class token, position embedding,
    nn.MultiheadAttention encoder blocks."""

    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(EncoderBlock(dim, 4), EncoderBlock(dim, 4))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: ResNet(Basic),
    "resnet_bottleneck": lambda: ResNet(Bottleneck),
    "preact_resnet": preact_resnet,
    "resnext": resnext,
    "regnet": regnet,
    "senet": senet,
    "vgg": vgg,
    "lenet": lenet,
    "googlenet": googlenet,
    "densenet": densenet,
    "dla": DLA,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet": efficientnet,
    "pnasnet": pnasnet,
    "convnext": ConvNeXt,
    "vit_mha": MHAViT,
}
