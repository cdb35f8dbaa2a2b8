"""Containers for a loaded dataset: in-memory tensors or lists of image files, plus their statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["TensorSplit", "FileSplit", "Split", "DatasetBundle", "channel_stats",
           "IMAGENET_MEAN", "IMAGENET_STD"]

# The usual ImageNet statistics (RGB, pixel values in [0, 1]); used for the lazily decoded folders, where
# a pass over every image just to measure them would cost as much as an epoch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TensorSplit:
    """Images held in memory.

    ``images``: ``(N, C, H, W)``, uint8 pixels 0..255 or float32 in [0, 1]; ``labels``: int64 ``(N,)``.
    """

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class FileSplit:
    """Images decoded lazily: ``files[i]`` is an image path with class ``labels[i]`` (int64 ``(N,)``).

    ``skipped``: unreadable files left out when the split was listed; ``skip_unreadable``: a file that fails to
    decode when a batch is built is left out of that batch (and counted) instead of raising.
    """

    files: Sequence[str]
    labels: Tensor
    skipped: list[str] = field(default_factory=list)
    skip_unreadable: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])


Split = Union[TensorSplit, FileSplit]


@dataclass
class DatasetBundle:
    """A train/val pair with what the loaders need to serve it.

    ``mean``/``std``: float32 ``(C,)`` per-channel statistics of the training pixels in [0, 1];
    ``image_size``: the native (or stored) side length in pixels, ``None`` when images vary in size.
    """

    name: str
    train: Split
    val: Split
    num_classes: int
    channels: int
    mean: Tensor
    std: Tensor
    image_size: int | None
    classes: list[str] = field(default_factory=list)


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``images`` ``(N, C, H, W)`` (uint8 0..255 or float 0..1) in [0, 1]
    units, as float32 ``(C,)`` each. Accumulates in float64 over chunks of ``chunk`` images, so a 50k
    CIFAR training set never exists as one float copy."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start:start + chunk].to(torch.float64).div_(scale)
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    # A constant channel would divide by zero when normalising; treat it as unit spread.
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    return mean.float(), std.float()
