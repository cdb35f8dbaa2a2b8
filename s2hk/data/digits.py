"""The embedded 8x8 handwritten digits (1797 images, 10 classes) served at any image size.

``digits.npz`` (shipped with the package, made once by :mod:`s2hk.data.make_digits_npz`) holds uint8
``images`` (1797, 8, 8) in 0..255 and int64 ``labels`` (1797,). Reading it needs only numpy.

Split: stratified, 20% of every class to validation (``round(0.2 * n_class)`` images), chosen by a
generator seeded from ``split_seed`` (default 0, independent of the training seed so that every run
evaluates on the same images): 1438 train / 359 val with the defaults.

Served images: bilinear upsampling of the 8x8 grid to ``image_size`` (default 32), the gray channel
replicated to 3 channels, stored as float32 in [0, 1]; the loaders normalise with the training mean/std.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DatasetError
from .seeding import SPLIT_STREAM, make_generator
from .splits import DatasetBundle, TensorSplit, channel_stats

__all__ = ["DIGITS_PATH", "read_digits", "stratified_split", "load_digits"]

DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")


def read_digits(path: str = DIGITS_PATH) -> tuple[Tensor, Tensor]:
    """The raw archive: uint8 images ``(1797, 8, 8)`` and int64 labels ``(1797,)``."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing; expected the digits archive shipped with s2hk "
                           "(regenerate it with `python -m s2hk.data.make_digits_npz`)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = np.asarray(archive["images"])
            labels = np.asarray(archive["labels"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DatasetError(f"{path}: unreadable digits archive ({err}); expected an .npz with arrays "
                           "'images' (N, 8, 8) uint8 and 'labels' (N,) int64") from None
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise DatasetError(f"{path}: malformed digits archive (images {images.dtype}{images.shape}, labels "
                           f"{labels.shape}); expected images (N, 8, 8) uint8 and labels (N,)")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def stratified_split(labels: Tensor, val_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint sorted index tensors ``(train, val)``: ``round(val_fraction * n_c)`` random images of each
    class ``c`` go to validation, the rest to training."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    gen = make_generator(SPLIT_STREAM, seed)
    train_parts, val_parts = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        n_val = int(round(val_fraction * members.numel()))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def _upsample(images: Tensor, size: int) -> Tensor:
    # (N, 8, 8) uint8 -> (N, 3, size, size) float32 in [0, 1]; done once at load, not per batch.
    x = images.float().div_(255.0).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def load_digits(image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0,
                path: str = DIGITS_PATH) -> DatasetBundle:
    """The digits dataset as a :class:`DatasetBundle` of float images ``(N, 3, image_size, image_size)``."""
    images, labels = read_digits(path)
    train_idx, val_idx = stratified_split(labels, val_fraction, split_seed)
    train = TensorSplit(_upsample(images[train_idx], image_size), labels[train_idx])
    val = TensorSplit(_upsample(images[val_idx], image_size), labels[val_idx])
    mean, std = channel_stats(train.images)
    return DatasetBundle(name="digits", train=train, val=val, num_classes=10, channels=3, mean=mean, std=std,
                         image_size=image_size, classes=[str(d) for d in range(10)])
