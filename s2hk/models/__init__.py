"""The shipped CNNs and vision transformers, written with standard ``torch.nn`` layers only and traceable by
``torch.fx``.

Every constructor returns an ``nn.Module`` mapping images (N, 3, H, W) to logits (N, num_classes); the
defaults target 32x32 inputs (CIFAR) with 10 classes.

- :func:`resnet18`, :func:`resnet50`: torchvision-style ResNets, ``stem="cifar"`` or ``"imagenet"``;
- :func:`resnet56`: the CIFAR ResNet-56 of He et al., with projection shortcuts;
- :func:`wrn28_10`: WideResNet-28-10 with pre-activation blocks;
- :func:`mobilenet_v3_small`, :func:`mobilenet_v3_large`: torchvision's MobileNetV3 tables, stride-1 stem by
  default for 32x32 inputs;
- :func:`vit_tiny_cifar`, :func:`vit_small_cifar`: ViT-Ti/S widths on 4x4 patches (64 tokens + class token),
  plain fused-qkv attention;
- :func:`swin_tiny_cifar`: Swin-T widths on 2x2 patches with 4x4 (shifted) windows, 16x16 -> 2x2 tokens.

:data:`MODELS` maps each name to its constructor, :func:`get_model` builds one by name and
:data:`DENSE_FLOPS_32` holds each model's dense forward cost for one 3x32x32 image.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .mobilenetv3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from .resnet import ResNet, resnet18, resnet50, resnet56
from .swin import SwinTransformer, swin_tiny_cifar
from .vit import VisionTransformer, vit_small_cifar, vit_tiny_cifar
from .wrn import WideResNet, wrn28_10

__all__ = [
    "ResNet",
    "WideResNet",
    "MobileNetV3",
    "VisionTransformer",
    "SwinTransformer",
    "resnet18",
    "resnet50",
    "resnet56",
    "wrn28_10",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "vit_tiny_cifar",
    "vit_small_cifar",
    "swin_tiny_cifar",
    "MODELS",
    "DENSE_FLOPS_32",
    "get_model",
    "list_models",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet56": resnet56,
    "wrn28_10": wrn28_10,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    "vit_tiny_cifar": vit_tiny_cifar,
    "vit_small_cifar": vit_small_cifar,
    "swin_tiny_cifar": swin_tiny_cifar,
}

# Dense forward FLOPs (2 x MACs of every conv and linear layer and of attention's matrix products, i.e. the
# total reported by torch.utils.flop_counter.FlopCounterMode) for one 1x3x32x32 input, num_classes=10,
# default arguments. Written out rather than computed at import so that pruning ratios can be reported
# without building a model; tests/test_models.py re-measures them.
DENSE_FLOPS_32: dict[str, int] = {
    "resnet18": 1_110_845_440,
    "resnet50": 2_595_659_776,
    "resnet56": 251_495_680,
    "wrn28_10": 10_486_657_536,
    "mobilenet_v3_small": 11_005_440,
    "mobilenet_v3_large": 40_203_520,
    "vit_tiny_cifar": 730_215_168,
    "vit_small_cifar": 2_840_618_496,
    "swin_tiny_cifar": 715_570_176,
}


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``, passing ``kwargs`` to its constructor.

    Raises:
        ValueError: ``name`` is not registered; the message lists the available names.
    """
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}") from None
    return constructor(**kwargs)
