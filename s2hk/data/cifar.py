"""CIFAR-10 / CIFAR-100 from the standard python-pickle folders, held in memory as uint8.

Layouts (as extracted from the official tarballs):

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train, 50000), ``test_batch`` (val,
  10000), ``batches.meta``; labels under ``b"labels"``, class names under ``b"label_names"``;
- ``cifar-100-python/``: ``train`` (50000), ``test`` (10000), ``meta``; labels under ``b"fine_labels"``,
  class names under ``b"fine_label_names"``.

Every batch is a pickled dict with ``b"data"``: uint8 ``(n, 3072)`` rows of 1024 R, 1024 G, 1024 B values
in row-major 32x32 order. The meta file is optional (only class names come from it). ``root`` may be the
extracted folder itself or the folder holding it.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DatasetError
from .splits import DatasetBundle, TensorSplit, channel_stats

__all__ = ["CifarLayout", "CIFAR_LAYOUTS", "find_cifar_folder", "read_cifar_batch", "load_cifar"]


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and labels."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    tarball: str
    num_classes: int

    def describe(self) -> str:
        """What the folder must contain, for error messages."""
        return (f"the CIFAR-{self.num_classes} python pickle batches "
                f"{_span(self.train_files)} and {', '.join(self.test_files)} (extract {self.tarball} here)")


def _span(names: tuple[str, ...]) -> str:
    if len(names) > 2 and names[0].endswith("_1"):
        return f"{names[0]}..{names[-1][-1]}"
    return ", ".join(names)


CIFAR_LAYOUTS: dict[int, CifarLayout] = {
    10: CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                    "batches.meta", b"labels", b"label_names", "cifar-10-python.tar.gz", 10),
    100: CifarLayout("cifar-100-python", ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names",
                     "cifar-100-python.tar.gz", 100),
}


def find_cifar_folder(root: str, layout: CifarLayout) -> str:
    """The extracted folder: ``root`` itself if it holds the first batch file or is named like the folder,
    else ``root/<folder>``; raises :class:`DatasetError` naming ``root`` when neither exists."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: missing; expected a folder holding {layout.folder}/ or that folder "
                           f"itself, with {layout.describe()}")
    if os.path.basename(root.rstrip(os.sep)) == layout.folder or \
            os.path.exists(os.path.join(root, layout.train_files[0])):
        return root
    nested = os.path.join(root, layout.folder)
    if os.path.isdir(nested):
        return nested
    raise DatasetError(f"{nested}: missing; expected {layout.describe()}")


def _get(batch: dict, key: bytes):
    # Re-pickled copies sometimes carry str keys; accept both spellings.
    if key in batch:
        return batch[key]
    return batch.get(key.decode())


def read_cifar_batch(path: str, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: uint8 images ``(n, 3, 32, 32)`` and int64 labels ``(n,)``."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing; expected {layout.describe()}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # any unpickling failure means the file is not a CIFAR batch
        raise DatasetError(f"{path}: not a readable CIFAR python pickle ({type(err).__name__}: {err}); "
                           f"expected {layout.describe()}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: malformed CIFAR batch (a pickled {type(batch).__name__}); expected a "
                           f"dict with keys b'data' and {layout.label_key!r}")
    data, labels = _get(batch, b"data"), _get(batch, layout.label_key)
    for key, value in ((b"data", data), (layout.label_key, labels)):
        if value is None:
            raise DatasetError(f"{path}: malformed CIFAR batch, key {key!r} missing (keys: "
                               f"{sorted(batch)!r}); expected keys b'data' and {layout.label_key!r}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    n = labels.shape[0] if labels.ndim == 1 else -1
    if n < 0 or data.shape[0] != n or data.size != n * 3072:
        raise DatasetError(f"{path}: malformed CIFAR batch (data shape {data.shape}, labels shape "
                           f"{labels.shape}); expected b'data' (n, 3072) uint8 and n labels")
    if not np.issubdtype(data.dtype, np.integer) or (n and (data.min() < 0 or data.max() > 255)):
        raise DatasetError(f"{path}: malformed CIFAR batch (data dtype {data.dtype}); expected uint8 pixels")
    if not np.issubdtype(labels.dtype, np.integer) or \
            (n and (labels.min() < 0 or labels.max() >= layout.num_classes)):
        raise DatasetError(f"{path}: malformed CIFAR batch, labels outside 0..{layout.num_classes - 1}")
    return data.astype(np.uint8).reshape(n, 3, 32, 32), labels.astype(np.int64)


def _read_names(path: str, layout: CifarLayout) -> list[str]:
    if not os.path.isfile(path):
        return [str(i) for i in range(layout.num_classes)]
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, layout.names_key)]
    except Exception as err:
        raise DatasetError(f"{path}: not a readable CIFAR meta pickle ({type(err).__name__}: {err}); "
                           f"expected a dict with {layout.names_key!r}") from None
    if len(names) != layout.num_classes:
        raise DatasetError(f"{path}: malformed CIFAR meta, {len(names)} class names; expected "
                           f"{layout.num_classes}")
    return names


def _read_files(folder: str, names: tuple[str, ...], layout: CifarLayout) -> TensorSplit:
    parts = [read_cifar_batch(os.path.join(folder, name), layout) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return TensorSplit(torch.from_numpy(images), torch.from_numpy(labels))


def load_cifar(root: str, num_classes: int = 10) -> DatasetBundle:
    """CIFAR-``num_classes`` (10 or 100) from ``root``: train = the training batches, val = the test batch;
    images uint8 ``(N, 3, 32, 32)``, mean/std measured on the training images."""
    layout = CIFAR_LAYOUTS[num_classes]
    folder = find_cifar_folder(root, layout)
    # Check every file exists before reading any, so the first error names the first missing file fast.
    for name in layout.train_files + layout.test_files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: missing; expected {layout.describe()}")
    train = _read_files(folder, layout.train_files, layout)
    val = _read_files(folder, layout.test_files, layout)
    mean, std = channel_stats(train.images)
    return DatasetBundle(name=f"cifar{num_classes}", train=train, val=val, num_classes=num_classes, channels=3,
                         mean=mean, std=std, image_size=32,
                         classes=_read_names(os.path.join(folder, layout.meta_file), layout))
