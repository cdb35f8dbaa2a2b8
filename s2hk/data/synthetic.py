"""A deterministic synthetic image-classification dataset for benchmarks and smoke tests.

Every class has a smooth random prototype (a 4x4 random pattern upsampled to ``image_size``); each image
is its class prototype plus per-pixel noise, quantised to uint8. Classes are therefore learnable (a loss
that goes down is a meaningful check) while costing nothing to download. Images and labels are a pure
function of ``data_seed`` and the sizes; labels are balanced (``i % num_classes``, shuffled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .seeding import DATA_STREAM, make_generator
from .splits import DatasetBundle, TensorSplit, channel_stats

__all__ = ["make_synthetic_split", "load_synthetic"]


def make_synthetic_split(num_images: int, num_classes: int, channels: int, image_size: int,
                         prototypes: torch.Tensor, gen: torch.Generator, noise: float = 0.15) -> TensorSplit:
    """``num_images`` uint8 images ``(N, channels, image_size, image_size)`` around ``prototypes``
    ``(num_classes, channels, image_size, image_size)`` (float, [0, 1])."""
    labels = (torch.arange(num_images) % num_classes)[torch.randperm(num_images, generator=gen)]
    images = torch.empty(num_images, channels, image_size, image_size, dtype=torch.uint8)
    chunk = 4096  # bounded float temporaries for large benchmark sets
    for start in range(0, num_images, chunk):
        lab = labels[start:start + chunk]
        pixels = prototypes[lab] + noise * torch.randn(lab.numel(), channels, image_size, image_size, generator=gen)
        images[start:start + chunk] = pixels.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return TensorSplit(images, labels)


def load_synthetic(image_size: int = 32, train_size: int = 2048, val_size: int = 512, num_classes: int = 10,
                   channels: int = 3, data_seed: int = 0, noise: float = 0.15) -> DatasetBundle:
    """The synthetic dataset: ``train_size`` training and ``val_size`` validation images of
    ``channels x image_size x image_size`` pixels in ``num_classes`` classes."""
    for name, value in (("train_size", train_size), ("num_classes", num_classes), ("channels", channels),
                        ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"synthetic: {name} must be positive, got {value}")
    if val_size < 0:
        raise ValueError(f"synthetic: val_size must be >= 0, got {val_size}")
    gen = make_generator(DATA_STREAM, data_seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    prototypes = 0.2 + 0.6 * F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                           align_corners=False)
    train = make_synthetic_split(train_size, num_classes, channels, image_size, prototypes, gen, noise)
    val = make_synthetic_split(val_size, num_classes, channels, image_size, prototypes, gen, noise)
    mean, std = channel_stats(train.images)
    return DatasetBundle(name="synthetic", train=train, val=val, num_classes=num_classes, channels=channels,
                         mean=mean, std=std, image_size=image_size,
                         classes=[f"class{i}" for i in range(num_classes)])
