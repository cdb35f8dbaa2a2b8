"""The dataset registry and :func:`make_loaders`, the one entry point for training code."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .augment import Augmentation, get_augmentation
from .cifar import load_cifar
from .digits import load_digits
from .errors import DatasetError
from .folders import load_image_folder, load_tiny_imagenet
from .loader import DatasetInfo, FileBatches, Loader, TensorBatches
from .splits import DatasetBundle, TensorSplit, holdout_count, holdout_split
from .synthetic import load_synthetic

__all__ = ["DatasetSpec", "DATASETS", "canonical_name", "load_dataset", "make_loaders"]


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset.

    ``num_classes``: class count (``None`` when the folders decide it; the synthetic set's is only the
    default of its ``num_classes`` option); ``image_size``:
    default served side length in pixels; ``augment``/``eval_transform``: names in
    :data:`s2hk.data.augment.AUGMENTATIONS`; ``needs_root``: whether ``make_loaders`` requires ``root``;
    ``load``: builds the :class:`DatasetBundle` (``root`` first when ``needs_root``; ``image_size`` is
    passed when ``sized``, i.e. when the images are stored at the served size); ``image_files``: the images
    are files decoded lazily, checked at load and skippable when unreadable (``skip_bad_files``).
    """

    name: str
    num_classes: int | None
    image_size: int
    augment: str
    eval_transform: str
    needs_root: bool
    sized: bool
    load: Callable[..., DatasetBundle]
    description: str
    image_files: bool = False


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (
        DatasetSpec("digits", 10, 32, "translate", "none", False, True, load_digits,
                    "1797 8x8 handwritten digits embedded in s2hk, upsampled; stratified 80/20 split"),
        DatasetSpec("cifar10", 10, 32, "crop_flip", "none", True, False, lambda root: load_cifar(root, 10),
                    "CIFAR-10 python pickles (cifar-10-batches-py)"),
        DatasetSpec("cifar100", 100, 32, "crop_flip", "none", True, False, lambda root: load_cifar(root, 100),
                    "CIFAR-100 python pickles (cifar-100-python)"),
        DatasetSpec("tinyimagenet", 200, 64, "crop_flip", "none", True, False, load_tiny_imagenet,
                    "Tiny-ImageNet 64x64 JPEG folders (tiny-imagenet-200)", image_files=True),
        DatasetSpec("imagefolder", None, 224, "resized_crop_flip", "resize_center_crop", True, False,
                    load_image_folder, "ImageNet-style train/<class>/ and val/<class>/ image folders",
                    image_files=True),
        DatasetSpec("synthetic", 10, 32, "crop_flip", "none", False, True, load_synthetic,
                    "deterministic random class-prototype images for benchmarks"),
    )
}

_ALIASES = {"cifar": "cifar10", "tiny": "tinyimagenet", "imagenet": "imagefolder", "folder": "imagefolder"}


def canonical_name(name: str) -> str:
    """Registry key for ``name``: case, ``-`` and ``_`` are ignored (``"CIFAR-10"`` -> ``"cifar10"``)."""
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


def _loader_kwargs(load: Callable[..., Any]) -> set[str]:
    return {p.name for p in inspect.signature(load).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"root", "image_size"}


def load_dataset(name: str, root: str | None = None, image_size: int | None = None, **kwargs: Any) -> DatasetBundle:
    """The :class:`DatasetBundle` of dataset ``name`` (dataset-specific options in ``kwargs``, e.g.
    ``val_fraction``/``split_seed`` for digits, ``train_size``/``num_classes``/``channels``/``data_seed``
    for synthetic)."""
    spec = DATASETS[canonical_name(name)]
    accepted = _loader_kwargs(spec.load)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"{spec.name}: unexpected option(s) {', '.join(unknown)}; accepted: "
                        f"{', '.join(sorted(accepted)) or 'none'}")
    args: list[Any] = []
    if spec.needs_root:
        if root is None:
            raise DatasetError(f"{spec.name}: root is required; pass the folder holding the data "
                               f"({spec.description})")
        args.append(str(root))
    if spec.sized:
        kwargs["image_size"] = image_size or spec.image_size
    return spec.load(*args, **kwargs)


def _source(split, augment: Augmentation, size: int, bundle: DatasetBundle, device):
    if isinstance(split, TensorSplit):
        return TensorBatches(split, augment, size, bundle.mean, bundle.std, device)
    return FileBatches(split, augment, size, bundle.mean, bundle.std)


def make_loaders(name: str, root: str | None = None, batch_size: int = 64, image_size: int | None = None,
                 seed: int = 0, num_workers: int = 0, two_views: bool = False, holdout: int | float = 0,
                 holdout_max: int | None = None, **kwargs: Any) -> tuple[Loader, ...]:
    """Deterministic ``(train, val)`` loaders for a registered dataset, and ``(train, val, held_out)`` with a
    held-out part of the training split.

    Args:
        name: a key of :data:`DATASETS` (``digits``, ``cifar10``, ``cifar100``, ``tinyimagenet``,
            ``imagefolder``, ``synthetic``); case, ``-`` and ``_`` are ignored.
        root: data folder (ignored by ``digits`` and ``synthetic``).
        batch_size: training batch size; validation uses ``val_batch_size`` (default: the same).
        image_size: served side length ``S`` in pixels (default: the dataset's).
        seed: order and augmentation of training batch ``(epoch, b)`` are a pure function of
            ``(seed, epoch, b)``.
        num_workers: DataLoader worker processes for file datasets; in-memory datasets ignore it.
        two_views: training batches become ``((x1, x2), y)``, two independent augmentations.
        holdout: training images set aside for model selection on data the weights are not trained on (STP's
            search: :meth:`s2hk.stp.STPruner.set_search_batches`), not the validation split: a number of images
            (int) or a fraction in (0, 1) of the training split (rounded up); 0: none. They are drawn at random,
            a pure function of ``seed`` (:func:`s2hk.data.splits.holdout_split`), leave the training loader and
            are served by a third loader, in order, with the evaluation transform, in batches of ``batch_size``.
        holdout_max: at most this many held-out images (None: no cap).
        **kwargs: ``augment`` / ``eval_transform`` (augmentation names or instances overriding the
            dataset defaults), ``val_batch_size``, ``device`` (keep in-memory images there and augment on
            it), ``pin_memory``, and dataset options (see :func:`load_dataset`; for image-file datasets
            ``skip_bad_files=True`` leaves unreadable files out instead of refusing them, see
            :func:`s2hk.data.folders.check_images` and ``Loader.skipped_files``).

    Returns:
        ``(train_loader, val_loader)``, or ``(train_loader, val_loader, held_out_loader)`` when ``holdout`` sets
        images aside; all yield normalised float32 ``(B, C, S, S)`` images and int64 labels. Missing or
        malformed data raises :class:`DatasetError` naming the path; a bad ``holdout`` a ValueError.
    """
    spec = DATASETS[canonical_name(name)]
    augment = get_augmentation(kwargs.pop("augment", None) or spec.augment)
    eval_transform = get_augmentation(kwargs.pop("eval_transform", None) or spec.eval_transform)
    val_batch_size = int(kwargs.pop("val_batch_size", None) or batch_size)
    device = kwargs.pop("device", None)
    pin_memory = bool(kwargs.pop("pin_memory", False))
    size = int(image_size or spec.image_size)
    bundle = load_dataset(spec.name, root, size, **kwargs)
    info = DatasetInfo(name=spec.name, num_classes=bundle.num_classes, channels=bundle.channels, image_size=size,
                       mean=bundle.mean, std=bundle.std, classes=list(bundle.classes))
    device = torch.device(device) if device is not None else None
    train_split, held_split = bundle.train, None
    count = holdout_count(len(bundle.train), holdout, holdout_max)
    if count:
        train_split, held_split = holdout_split(bundle.train, count, seed)
    train = Loader(_source(train_split, augment, size, bundle, device), info, batch_size=batch_size, train=True,
                   seed=seed, two_views=two_views, num_workers=num_workers, pin_memory=pin_memory)
    val = Loader(_source(bundle.val, eval_transform, size, bundle, device), info, batch_size=val_batch_size,
                 train=False, seed=seed, num_workers=num_workers, pin_memory=pin_memory)
    if held_split is None:
        return train, val
    held_out = Loader(_source(held_split, eval_transform, size, bundle, device), info, batch_size=batch_size,
                      train=False, seed=seed, num_workers=num_workers, pin_memory=pin_memory)
    return train, val, held_out
