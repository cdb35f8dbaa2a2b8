"""Deterministic, resumable batch loaders.

Contract of a training :class:`Loader` (``train=True``):

- the sample order of epoch ``e`` is ``randperm(N)`` from a generator seeded by ``(seed, e)``;
- batch ``b`` holds order positions ``b*B .. (b+1)*B - 1`` (the last incomplete batch is dropped);
- its augmentation draws come from generators seeded by ``(seed, e, b, view)``, one per view.

So batch ``(e, b)`` is a pure function of ``(seed, e, b)``: :meth:`Loader.iter_from` resumes mid-epoch with
exactly the batches an uninterrupted run would produce, the number of worker processes does not matter,
and the global RNG is never touched. A validation loader (``train=False``) walks the split in order,
keeps the last incomplete batch and applies the deterministic evaluation transform.

Batches are ``(x, y)``: ``x`` float32 ``(B, C, S, S)`` normalised images, ``y`` int64 ``(B,)`` labels; with
``two_views=True`` a training batch is ``((x1, x2), y)``, two independent augmentations of the same images.
A file split that skips unreadable files (``skip_bad_files``) serves a batch without the images that fail to
decode (``B`` smaller by as many); :attr:`Loader.skipped_files` lists them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .augment import Augmentation, normalize, to_float
from .errors import DatasetError
from .folders import decode_image
from .seeding import AUGMENT_STREAM, ORDER_STREAM, make_generator
from .splits import FileSplit, TensorSplit

__all__ = ["DatasetInfo", "TensorBatches", "FileBatches", "Loader", "Batch"]

Batch = tuple[Union[Tensor, tuple[Tensor, Tensor]], Tensor]


@dataclass
class DatasetInfo:
    """What a model needs to know about the served data.

    ``image_size``: side ``S`` of the served ``S x S`` images (pixels); ``mean``/``std``: float32 ``(C,)``
    used for normalisation, in [0, 1] pixel units.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: Tensor
    std: Tensor
    classes: list[str] = field(default_factory=list)


class TensorBatches:
    """Batches of an in-memory split: one tensor gather plus batched augmentation and normalisation.

    ``device`` (optional) holds the images there, so augmentation runs on that device; random parameters
    are still drawn on the CPU, so batches do not depend on the device.
    """

    parallel = False  # tensor indexing is faster in-process than shipping batches from workers

    def __init__(self, split: TensorSplit, augment: Augmentation, image_size: int, mean: Tensor, std: Tensor,
                 device: torch.device | str | None = None) -> None:
        self.images = split.images if device is None else split.images.to(device)
        self.labels = split.labels if device is None else split.labels.to(device)
        self.augment = augment
        self.image_size = image_size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __call__(self, indices: Tensor, generators: Sequence[torch.Generator | None]) -> tuple[list[Tensor], Tensor]:
        """Views (one per generator) ``(B, C, S, S)`` and labels ``(B,)`` of the samples ``indices``."""
        indices = indices.to(self.labels.device)
        x = to_float(self.images[indices])
        views = [normalize(self.augment(x, self.image_size, gen), self.mean, self.std) for gen in generators]
        return views, self.labels[indices]


class FileBatches:
    """Batches of a file split: decode each image with PIL, then augment (per image where sizes vary).

    ``skipped``: the split's unreadable files left out so far, in the order found (an ordered set: a dict
    with None values) -- at listing, and (``split.skip_unreadable``) when a batch failed to decode them."""

    parallel = True  # decoding dominates, so worker processes help

    def __init__(self, split: FileSplit, augment: Augmentation, image_size: int, mean: Tensor, std: Tensor) -> None:
        self.files = list(split.files)
        self.labels = split.labels
        self.augment = augment
        self.image_size = image_size
        self.mean, self.std = mean, std
        self.skip_unreadable = split.skip_unreadable
        self.skipped: dict[str, None] = dict.fromkeys(split.skipped)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __call__(self, indices: Tensor, generators: Sequence[torch.Generator | None]) -> tuple[list[Tensor], Tensor]:
        """Views (one per generator) ``(B, 3, S, S)`` and labels ``(B,)`` of the samples ``indices`` (without
        the images that fail to decode, when skipping them)."""
        images, kept = [], []
        for position, i in enumerate(indices.tolist()):
            try:
                images.append(decode_image(self.files[i]))
            except DatasetError as err:
                if not self.skip_unreadable:
                    raise
                if self.files[i] not in self.skipped:
                    self.skipped[self.files[i]] = None
                    warnings.warn(f"left out: {err}", RuntimeWarning, stacklevel=2)
                continue
            kept.append(position)
        if not images:
            raise DatasetError(f"{self.files[int(indices[0])]}: no image of this batch of {len(indices)} is "
                               "readable; check the dataset folder")
        views = [normalize(self.augment.apply_images(images, self.image_size, gen), self.mean, self.std)
                 for gen in generators]
        return views, self.labels[indices[kept]]


BatchSource = Union[TensorBatches, FileBatches]


class _EpochBatches(Dataset):
    """Batches ``start..`` of one epoch as a map-style dataset, so DataLoader workers can build them; each item
    is ``(batch, files newly skipped while building it)``, so the main process learns what workers skipped."""

    def __init__(self, loader: "Loader", epoch: int, start: int) -> None:
        self.loader, self.epoch, self.start = loader, epoch, start

    def __len__(self) -> int:
        return len(self.loader) - self.start

    def __getitem__(self, i: int) -> tuple[Batch, list[str]]:
        skipped = getattr(self.loader.source, "skipped", {})
        known = len(skipped)
        batch = self.loader.batch(self.epoch, self.start + i)
        return batch, list(skipped)[known:]


class Loader:
    """Deterministic batch iterator over one split (see the module docstring for the contract).

    Args:
        source: builds a batch from sample indices and per-view generators.
        info: dataset facts exposed as ``loader.info`` (and ``num_classes``, ``image_size`` shortcuts).
        batch_size: samples per batch ``B``.
        train: shuffle each epoch, drop the last incomplete batch, random augmentation.
        seed: the run seed; order and augmentation are pure functions of ``(seed, epoch, batch index)``.
        two_views: yield ``((x1, x2), y)`` with two independent augmentations (training only).
        num_workers: worker processes for decoding file datasets (in-memory ones build batches in-process).
        pin_memory: pin batches fetched through workers (for fast host-to-GPU copies).
    """

    def __init__(self, source: BatchSource, info: DatasetInfo, *, batch_size: int, train: bool, seed: int = 0,
                 two_views: bool = False, num_workers: int = 0, pin_memory: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if two_views and not train:
            raise ValueError("two_views applies to training loaders only")
        self.source = source
        self.info = info
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.two_views = bool(two_views)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.epoch = 0
        self._order_cache: tuple[int, Tensor] | None = None
        if self.train and len(self) == 0:
            raise ValueError(f"{info.name}: batch_size {batch_size} exceeds the {len(source)} training images; "
                             "with the last incomplete batch dropped no batch would be produced")

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def skipped_files(self) -> list[str]:
        """Unreadable image files left out (``skip_bad_files``): at listing, and by the batches built so far
        (in this process or its workers); sorted paths."""
        return sorted(getattr(self.source, "skipped", {}))

    @property
    def num_samples(self) -> int:
        """Images in the split (``N``)."""
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def __len__(self) -> int:
        """Batches per epoch: ``N // B`` for training, ``ceil(N / B)`` for validation."""
        n, b = self.num_samples, self.batch_size
        return n // b if self.train else -(-n // b)

    def __repr__(self) -> str:
        kind = "train" if self.train else "val"
        return (f"Loader({self.info.name}/{kind}, samples={self.num_samples}, batch_size={self.batch_size}, "
                f"batches={len(self)}, seed={self.seed}, two_views={self.two_views})")

    # -- determinism -------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that plain iteration (``for x, y in loader``) produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def order(self, epoch: int) -> Tensor:
        """Sample order of ``epoch``: int64 ``(N,)`` (a permutation for training, ``arange`` otherwise)."""
        if not self.train:
            return torch.arange(self.num_samples)
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = torch.randperm(self.num_samples, generator=make_generator(ORDER_STREAM, self.seed, epoch))
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def batch_indices(self, epoch: int, index: int) -> Tensor:
        """Sample indices int64 ``(B,)`` of batch ``index`` of ``epoch``."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} outside 0..{len(self) - 1}")
        start = index * self.batch_size
        return self.order(epoch)[start:start + self.batch_size]

    def generators(self, epoch: int, index: int) -> list[torch.Generator | None]:
        """One augmentation generator per view of batch ``index`` of ``epoch`` (``[None]`` when evaluating)."""
        if not self.train:
            return [None]
        return [make_generator(AUGMENT_STREAM, self.seed, epoch, index, view)
                for view in range(2 if self.two_views else 1)]

    def batch(self, epoch: int, index: int) -> Batch:
        """Batch ``index`` of ``epoch``: ``(x, y)`` or ``((x1, x2), y)``; a pure function of its arguments."""
        views, labels = self.source(self.batch_indices(epoch, index), self.generators(epoch, index))
        return (tuple(views) if self.two_views else views[0]), labels

    # -- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, batch_index: int = 0) -> Iterator[Batch]:
        """Batches ``batch_index, batch_index + 1, ...`` of ``epoch``: the tail of an uninterrupted epoch.

        Does not change :attr:`epoch`.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= batch_index <= len(self):
            raise ValueError(f"batch_index {batch_index} outside 0..{len(self)}")
        if self.num_workers > 0 and self.source.parallel and batch_index < len(self):
            return self._iter_workers(epoch, batch_index)
        return (self.batch(epoch, i) for i in range(batch_index, len(self)))

    def _iter_workers(self, epoch: int, start: int) -> Iterator[Batch]:
        # batch_size=None: every dataset item already is a whole batch. The DataLoader gets its own
        # generator because it otherwise draws its worker base seed from the global RNG.
        loader = DataLoader(_EpochBatches(self, epoch, start), batch_size=None, shuffle=False,
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            collate_fn=_as_is, generator=make_generator(ORDER_STREAM, self.seed, epoch, start))
        for (x, y), skipped in loader:
            if skipped:
                self.source.skipped.update(dict.fromkeys(skipped))
            # pin_memory turns tuples into lists; restore the documented structure.
            yield (tuple(x) if self.two_views else x), y


def _as_is(batch: Batch) -> Batch:
    # Module-level (picklable) identity: the default conversion would turn tuples into lists.
    return batch
