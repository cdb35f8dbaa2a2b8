"""Datasets and deterministic, resumable loaders: the embedded digits set, CIFAR-10/100 pickles,
Tiny-ImageNet and ImageNet-style class folders, and a synthetic set; batched augmentation in plain torch.

Typical use::

    from s2hk.data import make_loaders
    train, val = make_loaders("cifar10", root="~/data", batch_size=128, seed=0)
    for epoch in range(start_epoch, epochs):
        train.set_epoch(epoch)
        for x, y in train:          # x: float32 (B, 3, 32, 32) normalised, y: int64 (B,)
            ...
    # resume mid-epoch with exactly the batches an uninterrupted run would have produced:
    for x, y in train.iter_from(epoch, batch_index):
        ...
"""
from __future__ import annotations

from .augment import (AUGMENTATIONS, Augmentation, NoAugment, RandomCropFlip, RandomResizedCropFlip,
                      ResizeCenterCrop, augment_two_views, get_augmentation)
from .cifar import load_cifar
from .digits import load_digits, stratified_split
from .errors import DatasetError
from .folders import decode_image, load_image_folder, load_tiny_imagenet
from .loader import DatasetInfo, FileBatches, Loader, TensorBatches
from .registry import DATASETS, DatasetSpec, canonical_name, load_dataset, make_loaders
from .splits import DatasetBundle, FileSplit, TensorSplit, holdout_split
from .synthetic import load_synthetic

__all__ = [
    "DatasetError",
    "make_loaders",
    "load_dataset",
    "DATASETS",
    "DatasetSpec",
    "canonical_name",
    "Loader",
    "DatasetInfo",
    "TensorBatches",
    "FileBatches",
    "DatasetBundle",
    "TensorSplit",
    "FileSplit",
    "holdout_split",
    "load_digits",
    "stratified_split",
    "load_cifar",
    "load_tiny_imagenet",
    "load_image_folder",
    "load_synthetic",
    "decode_image",
    "AUGMENTATIONS",
    "Augmentation",
    "NoAugment",
    "RandomCropFlip",
    "RandomResizedCropFlip",
    "ResizeCenterCrop",
    "get_augmentation",
    "augment_two_views",
]
