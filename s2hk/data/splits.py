"""Containers for a loaded dataset: in-memory tensors or lists of image files, plus their statistics; a
deterministic held-out part of a split (:func:`holdout_split`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .seeding import HOLDOUT_STREAM, make_generator

__all__ = ["TensorSplit", "FileSplit", "Split", "DatasetBundle", "channel_stats", "holdout_count", "holdout_split",
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


def holdout_count(n: int, holdout: Union[int, float], cap: Optional[int] = None) -> int:
    """How many of ``n`` images a held-out part of ``holdout`` takes: ``holdout`` images (an int >= 0) or that
    fraction of ``n`` rounded up (a float in (0, 1)), at most ``cap`` images; it must leave an image out of it.

    Raises:
        ValueError: ``holdout`` is neither, or the held-out part would take every image.
    """
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or holdout < 0 or \
            (isinstance(holdout, float) and holdout >= 1):
        raise ValueError(f"holdout must be a number of images (an integer >= 0) or a fraction in (0, 1), "
                         f"got {holdout!r}")
    if cap is not None and cap < 0:
        raise ValueError(f"holdout cap must be >= 0 images, got {cap}")
    count = holdout if isinstance(holdout, int) else math.ceil(holdout * n)
    count = min(count, cap) if cap is not None else count
    if count >= n:
        raise ValueError(f"holdout of {count} images leaves none of the {n} training images to train on")
    return count


def holdout_split(split: Split, count: int, seed: int) -> tuple[Split, Split]:
    """``split`` cut into ``(rest, held out)``, the held-out part ``count`` images drawn uniformly at random by a
    generator of its own seeded with ``seed``: a pure function of the split, ``count`` and ``seed``. Both parts
    keep the split's order; unreadable files left out at listing (``FileSplit.skipped``) stay with the rest."""
    n = len(split)
    if not 0 <= count < n:
        raise ValueError(f"holdout of {count} images must be in 0..{n - 1} for a split of {n} images")
    held = torch.randperm(n, generator=make_generator(HOLDOUT_STREAM, seed))[:count].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    rest = keep.nonzero().flatten()
    if isinstance(split, TensorSplit):
        return (TensorSplit(split.images[rest], split.labels[rest]),
                TensorSplit(split.images[held], split.labels[held]))
    files = list(split.files)
    return (FileSplit([files[i] for i in rest.tolist()], split.labels[rest], list(split.skipped),
                      split.skip_unreadable),
            FileSplit([files[i] for i in held.tolist()], split.labels[held], [], split.skip_unreadable))


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
