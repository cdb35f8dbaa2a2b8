"""Image-file datasets decoded lazily with PIL: Tiny-ImageNet and ImageNet-style class folders.

Only the file list is built at load time (sorted, so indices are stable across machines); pixels are
decoded when a batch asks for them. Images are converted to RGB, so grayscale or CMYK files are fine.

Every listed file is checked when the dataset is loaded, before any training (:func:`check_images`: PIL reads
its header, and the chunk checksums of a PNG), so an unreadable file is refused up front, naming it; with
``skip_bad_files=True`` such files are left out instead (``FileSplit.skipped`` lists them), as are files that
pass the check but fail to decode later (a truncated JPEG), batch by batch.

- Tiny-ImageNet (``tiny-imagenet-200/``): ``train/<wnid>/images/*.JPEG``; ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt`` (tab-separated ``file wnid x y w h``); the class order is ``wnids.txt`` when
  present, else the sorted training folders. ``root`` may be that folder or its parent.
- Class folders (ImageNet layout): ``<root>/train/<class>/**/*.{JPEG,jpg,jpeg,png}`` and
  ``<root>/val/<class>/...``; classes are the sorted training folder names, and validation folders must
  use the same names.

Mean/std are the usual ImageNet statistics (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from .errors import DatasetError
from .splits import IMAGENET_MEAN, IMAGENET_STD, DatasetBundle, FileSplit

__all__ = ["IMAGE_EXTENSIONS", "decode_image", "check_images", "list_class_folder", "load_tiny_imagenet",
           "load_image_folder"]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def decode_image(path: str) -> Tensor:
    """Decode one image file to uint8 RGB ``(3, H, W)``; an unreadable file raises :class:`DatasetError`."""
    from PIL import Image  # imported here so that in-memory datasets do not need PIL

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/profile warnings say nothing about the pixels
            with Image.open(path) as img:
                array = np.array(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing; the image was listed when the dataset was loaded") from None
    except Exception as err:  # PIL raises many types for truncated or foreign files
        raise DatasetError(f"{path}: unreadable image ({type(err).__name__}: {err}); expected a JPEG or "
                           "PNG file") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _probe(path: str) -> str | None:
    """Why ``path`` is not a readable image (PIL's header parse and ``verify``), or None when it is."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.verify()
    except Exception as err:  # PIL raises many types for truncated or foreign files
        return f"{type(err).__name__}: {err}"
    return None


def check_images(files: list[str], labels: list[int], skip_bad_files: bool = False) -> FileSplit:
    """The split of ``files`` / ``labels`` after checking that every file opens as an image.

    The check reads each file's header with PIL and runs ``Image.verify`` (for PNG: every chunk's checksum, so
    a truncated PNG is caught; for JPEG: the header only), in threads; it costs a small read per file, not a
    decode. An unreadable file raises :class:`DatasetError` naming it (and how many others fail) unless
    ``skip_bad_files``, which leaves such files out (listed in ``FileSplit.skipped``) and makes the batches
    leave out files that fail to decode later.
    """
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        problems = list(pool.map(_probe, files))
    bad = [i for i, p in enumerate(problems) if p is not None]
    if bad and not skip_bad_files:
        others = f"; {len(bad) - 1} more of the {len(files)} files are unreadable too" if len(bad) > 1 else ""
        raise DatasetError(f"{files[bad[0]]}: unreadable image ({problems[bad[0]]}){others}; replace or remove "
                           "it, or leave unreadable files out with skip_bad_files=True (s2hk prune "
                           "--skip-bad-files)")
    if len(bad) == len(files) and files:
        raise DatasetError(f"{os.path.dirname(files[0])}: none of the {len(files)} images is readable "
                           f"(first: {files[0]}: {problems[0]})")
    dropped = set(bad)
    return FileSplit([f for i, f in enumerate(files) if i not in dropped],
                     torch.tensor([c for i, c in enumerate(labels) if i not in dropped], dtype=torch.int64),
                     skipped=[files[i] for i in bad], skip_unreadable=skip_bad_files)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # os.walk order is filesystem order; sort for machine-independent indices
        found.extend(os.path.join(dirpath, name) for name in sorted(filenames) if _is_image(name))
    return found


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def list_class_folder(folder: str, classes: list[str] | None = None,
                      what: str = "class folders") -> tuple[list[str], list[int], list[str]]:
    """Files, integer labels and class names of ``folder/<class>/**/image``.

    With ``classes`` given, every subfolder must be one of them (labels index into ``classes``);
    otherwise the sorted subfolders define the classes. An empty class folder is an error.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: missing; expected {what} <class>/*.JPEG|jpg|png")
    found = _subfolders(folder)
    if not found:
        raise DatasetError(f"{folder}: no class folders; expected {what} <class>/*.JPEG|jpg|png")
    if classes is None:
        classes = found
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for name in found:
        if name not in index:
            raise DatasetError(f"{os.path.join(folder, name)}: class {name!r} is not among the "
                               f"{len(classes)} training classes; expected the same class folders as train/")
        images = _images_under(os.path.join(folder, name))
        if not images:
            raise DatasetError(f"{os.path.join(folder, name)}: no images; expected *.JPEG, *.jpg or *.png files")
        files.extend(images)
        labels.extend([index[name]] * len(images))
    return files, labels, classes


def _bundle(name: str, train: FileSplit, val: FileSplit, classes: list[str], image_size: int | None) -> DatasetBundle:
    return DatasetBundle(name=name, train=train, val=val, num_classes=len(classes), channels=3,
                         mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD),
                         image_size=image_size, classes=classes)


# ---------------------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ---------------------------------------------------------------------------------------------------------

_TINY_HINT = "the Tiny-ImageNet layout train/<wnid>/images/*.JPEG, val/images/*.JPEG and " \
             "val/val_annotations.txt (extract tiny-imagenet-200.zip here)"


def _find_tiny_root(root: str) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: missing; expected the folder tiny-imagenet-200 or its parent, with {_TINY_HINT}")
    if os.path.isdir(os.path.join(root, "train")) or os.path.basename(root) == "tiny-imagenet-200":
        return root
    nested = os.path.join(root, "tiny-imagenet-200")
    if os.path.isdir(nested):
        return nested
    raise DatasetError(f"{os.path.join(root, 'train')}: missing; expected {_TINY_HINT}")


def _tiny_classes(root: str, train_dir: str) -> list[str]:
    wnids_path = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_path):
        with open(wnids_path, encoding="utf-8") as f:
            wnids = [line.strip() for line in f if line.strip()]
        if not wnids:
            raise DatasetError(f"{wnids_path}: empty; expected one WordNet id per line")
        return wnids
    return _subfolders(train_dir)


def _tiny_val(root: str, index: dict[str, int], skip_bad_files: bool) -> FileSplit:
    val_dir = os.path.join(root, "val")
    images_dir = os.path.join(val_dir, "images")
    ann_path = os.path.join(val_dir, "val_annotations.txt")
    if not os.path.isdir(images_dir):
        raise DatasetError(f"{images_dir}: missing; expected {_TINY_HINT}")
    if not os.path.isfile(ann_path):
        raise DatasetError(f"{ann_path}: missing; expected {_TINY_HINT}")
    present = set(os.listdir(images_dir))
    files, labels = [], []
    with open(ann_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                raise DatasetError(f"{ann_path}:{lineno}: malformed line {line.strip()!r}; expected "
                                   "tab-separated 'file wnid x y w h'")
            name, wnid = fields[0], fields[1]
            if wnid not in index:
                raise DatasetError(f"{ann_path}:{lineno}: class {wnid!r} is not a training class; expected a "
                                   "wnid from train/ (or wnids.txt)")
            if name not in present:
                raise DatasetError(f"{os.path.join(images_dir, name)}: missing; listed in {ann_path}:{lineno}")
            files.append(os.path.join(images_dir, name))
            labels.append(index[wnid])
    if not files:
        raise DatasetError(f"{ann_path}: no annotations; expected one line per validation image")
    order = sorted(range(len(files)), key=files.__getitem__)
    return check_images([files[i] for i in order], [labels[i] for i in order], skip_bad_files)


def load_tiny_imagenet(root: str, skip_bad_files: bool = False) -> DatasetBundle:
    """Tiny-ImageNet (200 classes of 64x64 images) from ``root`` as lazily decoded file lists, every file
    checked (:func:`check_images`)."""
    root = _find_tiny_root(root)
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DatasetError(f"{train_dir}: missing; expected {_TINY_HINT}")
    classes = _tiny_classes(root, train_dir)
    files, labels = [], []
    for label, wnid in enumerate(classes):
        images_dir = os.path.join(train_dir, wnid, "images")
        if not os.path.isdir(images_dir):
            raise DatasetError(f"{images_dir}: missing; expected {_TINY_HINT}")
        images = sorted(os.path.join(images_dir, n) for n in os.listdir(images_dir) if _is_image(n))
        if not images:
            raise DatasetError(f"{images_dir}: no images; expected {wnid}_<k>.JPEG files")
        files.extend(images)
        labels.extend([label] * len(images))
    if not files:
        raise DatasetError(f"{train_dir}: no class folders; expected {_TINY_HINT}")
    val = _tiny_val(root, {wnid: i for i, wnid in enumerate(classes)}, skip_bad_files)
    return _bundle("tinyimagenet", check_images(files, labels, skip_bad_files), val, classes, image_size=64)


# ---------------------------------------------------------------------------------------------------------
# ImageNet-style class folders
# ---------------------------------------------------------------------------------------------------------

def load_image_folder(root: str, skip_bad_files: bool = False) -> DatasetBundle:
    """Class folders ``root/train/<class>/...`` and ``root/val/<class>/...`` as lazily decoded file lists, every
    file checked (:func:`check_images`)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: missing; expected a folder with train/<class>/*.JPEG|jpg|png and "
                           "val/<class>/*.JPEG|jpg|png")
    train_files, train_labels, classes = list_class_folder(os.path.join(root, "train"),
                                                           what="training class folders")
    val_files, val_labels, _ = list_class_folder(os.path.join(root, "val"), classes,
                                                 what="validation class folders")
    return _bundle("imagefolder", check_images(train_files, train_labels, skip_bad_files),
                   check_images(val_files, val_labels, skip_bad_files), classes, image_size=None)
