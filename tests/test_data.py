"""s2hk.data: datasets in their real on-disk formats, errors, augmentation, deterministic resumable loaders."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s2hk.data import (DATASETS, DatasetError, FileSplit, canonical_name, get_augmentation, holdout_split,
                       load_dataset, load_digits, make_loaders, stratified_split)
from s2hk.data.augment import (augment_two_views, crop_padded, resize_center_crop, resized_crop,
                               sample_resized_crop_boxes)
from s2hk.data.digits import read_digits


def _batches_equal(a, b) -> bool:
    (xa, ya), (xb, yb) = a, b
    if isinstance(xa, tuple):
        return all(torch.equal(u, v) for u, v in zip(xa, xb)) and torch.equal(ya, yb)
    return torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: tiny datasets in the real formats
# ---------------------------------------------------------------------------------------------------------

def _pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(rng, n, num_classes, label_key):
    return {b"batch_label": b"synthetic", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, n).tolist(), b"filenames": [b"x.png"] * n}


@pytest.fixture
def cifar10_root(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", _cifar_batch(rng, 12, 10, b"labels"))
    _pickle(folder / "test_batch", _cifar_batch(rng, 10, 10, b"labels"))
    _pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                      b"num_cases_per_batch": 12, b"num_vis": 3072})
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 40), ("test", 15)):
        batch = _cifar_batch(rng, n, 100, b"fine_labels")
        batch[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
        _pickle(folder / name, batch)
    _pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
    return tmp_path


def _save_image(path, rng, size, mode="RGB") -> None:
    h, w = size
    array = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def tiny_root(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(4):
            _save_image(images / f"{wnid}_{k}.JPEG", rng, (64, 64))
    lines = []
    for k in range(6):
        _save_image(root / "val" / "images" / f"val_{k}.JPEG", rng, (64, 64))
        lines.append(f"val_{k}.JPEG\t{wnids[k % 3]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def folder_root(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "imagenet"
    sizes = [(40, 56), (50, 50), (64, 36), (45, 70), (48, 48)]
    for split, per_class in (("train", 5), ("val", 2)):
        for c, cls in enumerate(("cat", "dog", "eel")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(per_class):
                ext = ("JPEG", "jpg", "png")[(k + c) % 3]
                mode = "L" if k == 1 else "RGB"  # a grayscale file must come out as RGB
                _save_image(folder / f"{cls}_{k}.{ext}", rng, sizes[(k + c) % len(sizes)], mode)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------------------

def test_digits_loads_without_sklearn():
    code = ("import sys; from s2hk.data import make_loaders; tr, va = make_loaders('digits'); "
            "x, y = next(iter(tr)); assert x.shape == (64, 3, 32, 32); "
            "assert not any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules), 'sklearn imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_digits_archive_contents():
    images, labels = read_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert sorted(torch.unique(labels).tolist()) == list(range(10))


def test_digits_split_stratified_and_disjoint():
    _, labels = read_digits()
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(1797))
    for cls in range(10):
        n_cls = int((labels == cls).sum())
        assert int((labels[val] == cls).sum()) == round(0.2 * n_cls)
    again_train, again_val = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    bundle = load_digits()
    assert len(bundle.train) == 1438 and len(bundle.val) == 359


def test_digits_shapes_labels_normalisation():
    train, val = make_loaders("digits", batch_size=32, augment="none", val_batch_size=100)
    assert train.num_classes == 10 and train.image_size == 32
    assert len(train) == 1438 // 32 and len(val) == 4  # drop_last for training only
    xs, ys = zip(*val)
    assert [x.shape[0] for x in xs] == [100, 100, 100, 59]
    x, y = next(iter(train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray replicated
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    # Normalised with the training statistics: the training pixels have mean 0 and std 1.
    bundle = load_digits()
    norm = (bundle.train.images - bundle.mean.view(1, -1, 1, 1)) / bundle.std.view(1, -1, 1, 1)
    assert abs(float(norm.mean())) < 1e-4 and abs(float(norm.std()) - 1) < 1e-3
    allx = torch.cat([x for x, _ in train])
    assert abs(float(allx.mean())) < 0.05 and abs(float(allx.std()) - 1) < 0.05
    small, _ = make_loaders("digits", image_size=16, batch_size=8)
    assert next(iter(small))[0].shape == (8, 3, 16, 16)


def test_digits_bad_archive(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DatasetError, match=str(missing)):
        load_digits(path=str(missing))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError, match=str(corrupt)):
        load_digits(path=str(corrupt))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 8, 8), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(DatasetError, match=str(wrong)):
        load_digits(path=str(wrong))


# ---------------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------------

def test_cifar10_loads_from_parent_or_folder(cifar10_root):
    for root in (cifar10_root, cifar10_root / "cifar-10-batches-py"):
        bundle = load_dataset("cifar10", str(root))
        assert bundle.train.images.shape == (60, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
        assert bundle.val.images.shape == (10, 3, 32, 32)
        assert bundle.num_classes == 10 and bundle.classes[3] == "c3"
    # Pixel layout: row r of a batch is 1024 R, 1024 G, 1024 B values in row-major 32x32 order.
    with open(cifar10_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(bundle.train.images[0, 1], torch.from_numpy(raw[b"data"][0, 1024:2048].reshape(32, 32)))
    assert bundle.train.labels[:12].tolist() == raw[b"labels"]
    train, val = make_loaders("CIFAR-10", root=str(cifar10_root), batch_size=8)
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and len(train) == 7 and len(val) == 2


def test_cifar100_loads(cifar100_root):
    train, val = make_loaders("cifar100", root=str(cifar100_root), batch_size=16, two_views=True)
    (x1, x2), y = next(iter(train))
    assert x1.shape == x2.shape == (16, 3, 32, 32) and train.num_classes == 100
    assert train.info.classes[99] == "f99"
    assert sum(yb.numel() for _, yb in val) == 15


def test_cifar_missing_and_malformed(cifar10_root, cifar100_root, tmp_path):
    folder = cifar10_root / "cifar-10-batches-py"
    with pytest.raises(DatasetError, match="root is required"):
        make_loaders("cifar10")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=str(empty / "cifar-10-batches-py")):
        load_dataset("cifar10", str(empty))
    with pytest.raises(DatasetError, match=str(tmp_path / "absent")):
        load_dataset("cifar10", str(tmp_path / "absent"))
    os.remove(folder / "data_batch_3")
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", str(cifar10_root))
    message = str(info.value)
    assert str(folder / "data_batch_3") in message and "missing" in message
    assert "data_batch_1..5" in message and "cifar-10-python.tar.gz" in message
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage, not a pickle")
    with pytest.raises(DatasetError, match=str(folder / "data_batch_3")):
        load_dataset("cifar10", str(cifar10_root))
    _pickle(folder / "data_batch_3", {b"data": np.zeros((4, 3072), np.uint8)})  # no b"labels"
    with pytest.raises(DatasetError, match=r"data_batch_3: malformed.*labels"):
        load_dataset("cifar10", str(cifar10_root))
    _pickle(folder / "data_batch_3", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(DatasetError, match=r"data_batch_3: malformed"):
        load_dataset("cifar10", str(cifar10_root))
    _pickle(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DatasetError, match=r"data_batch_3: malformed.*labels outside 0..9"):
        load_dataset("cifar10", str(cifar10_root))
    os.remove(cifar100_root / "cifar-100-python" / "test")
    with pytest.raises(DatasetError, match=str(cifar100_root / "cifar-100-python" / "test") + ": missing"):
        load_dataset("cifar100", str(cifar100_root))


# ---------------------------------------------------------------------------------------------------------
# Tiny-ImageNet and class folders
# ---------------------------------------------------------------------------------------------------------

def test_tiny_imagenet_loads(tiny_root):
    bundle = load_dataset("tiny-imagenet", str(tiny_root))
    assert len(bundle.train) == 12 and len(bundle.val) == 6 and bundle.num_classes == 3
    assert bundle.val.labels.tolist() == [0, 1, 2, 0, 1, 2]
    train, val = make_loaders("tinyimagenet", root=str(tiny_root / "tiny-imagenet-200"), batch_size=4)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 64, 64) and train.image_size == 64
    xs = [xb for xb, _ in val]
    assert [xb.shape for xb in xs] == [(4, 3, 64, 64), (2, 3, 64, 64)]


def test_tiny_imagenet_missing_and_malformed(tiny_root):
    root = tiny_root / "tiny-imagenet-200"
    ann = root / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text(text + "val_99.JPEG\tn01443537\t0\t0\t63\t63\n")
    with pytest.raises(DatasetError, match=str(root / "val" / "images" / "val_99.JPEG") + ": missing"):
        load_dataset("tinyimagenet", str(tiny_root))
    ann.write_text(text + "just-one-field\n")
    with pytest.raises(DatasetError, match=str(ann) + ":7: malformed"):
        load_dataset("tinyimagenet", str(tiny_root))
    ann.unlink()
    with pytest.raises(DatasetError, match=str(ann) + ": missing"):
        load_dataset("tinyimagenet", str(tiny_root))
    ann.write_text(text)
    bad = root / "train" / "n01629819" / "images" / "n01629819_2.JPEG"
    bad.write_bytes(b"\xff\xd8\xff truncated jpeg")
    with pytest.raises(DatasetError, match=str(bad) + ": unreadable image"):  # refused before any batch
        make_loaders("tinyimagenet", root=str(tiny_root), batch_size=12)
    train, _ = make_loaders("tinyimagenet", root=str(tiny_root), batch_size=11, skip_bad_files=True)
    assert train.skipped_files == [str(bad)] and train.num_samples == 11
    images = root / "train" / "n01641577" / "images"
    for f in images.iterdir():
        f.unlink()
    images.rmdir()
    with pytest.raises(DatasetError, match=str(images) + ": missing"):
        load_dataset("tinyimagenet", str(tiny_root))


def test_class_folders_load(folder_root):
    bundle = load_dataset("imagefolder", str(folder_root))
    assert bundle.classes == ["cat", "dog", "eel"] and len(bundle.train) == 15 and len(bundle.val) == 6
    assert all(not f.endswith(".txt") for f in bundle.train.files)
    train, val = make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=32)
    assert train.num_classes == 3 and len(train) == 3 and len(val) == 2
    for x, y in train:
        assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    x, y = next(iter(val))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]


def test_class_folders_missing_and_malformed(folder_root, tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        load_dataset("imagefolder", str(tmp_path / "nowhere"))
    empty_class = folder_root / "train" / "fox"
    empty_class.mkdir()
    with pytest.raises(DatasetError, match=str(empty_class) + ": no images"):
        load_dataset("imagefolder", str(folder_root))
    empty_class.rmdir()
    stray = folder_root / "val" / "yak"
    stray.mkdir()
    _save_image(stray / "y.png", np.random.default_rng(0), (8, 8))
    with pytest.raises(DatasetError, match=str(stray)):
        load_dataset("imagefolder", str(folder_root))
    (stray / "y.png").unlink()
    stray.rmdir()
    bad = folder_root / "val" / "dog" / "dog_0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match=str(bad) + ": unreadable image"):
        make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=32)
    val_dir = folder_root / "val"
    os.rename(val_dir, tmp_path / "moved")
    with pytest.raises(DatasetError, match=str(val_dir) + ": missing"):
        load_dataset("imagefolder", str(folder_root))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_unreadable_files_are_refused_up_front_or_skipped(folder_root):
    """A truncated PNG in val/ is refused when the loaders are made (before any training), naming it and how
    many others fail; skip_bad_files leaves such files out of both splits and lists them."""
    bad_val = folder_root / "val" / "eel" / "eel_0.png"
    bad_train = folder_root / "train" / "cat" / "cat_2.png"
    bad_train2 = folder_root / "train" / "dog" / "dog_1.png"
    for path in (bad_val, bad_train, bad_train2):
        assert path.is_file()
        _truncate(path)
    with pytest.raises(DatasetError, match=re.escape(str(bad_train)) + r": unreadable image .*1 more of the 15"):
        make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=32)
    train, val = make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=32,
                              skip_bad_files=True)
    assert train.skipped_files == sorted([str(bad_train), str(bad_train2)]) and train.num_samples == 13
    assert val.skipped_files == [str(bad_val)] and val.num_samples == 5
    assert sum(int(y.numel()) for _, y in val) == 5


def _jpeg_with_bad_data(path: Path) -> None:
    """A JPEG whose header passes the load-time check but whose pixel data cannot be decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("workers", [0, 2])
def test_files_failing_to_decode_are_left_out_of_their_batch(folder_root, workers):
    bad = folder_root / "val" / "cat" / "cat_0.JPEG"
    _jpeg_with_bad_data(bad)
    _, val = make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=32, num_workers=workers)
    assert val.skipped_files == []  # the header is intact: the check passes it
    with pytest.raises(DatasetError, match=str(bad)):
        list(val)
    _, val = make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=32, num_workers=workers,
                          skip_bad_files=True)
    with pytest.warns(RuntimeWarning, match="left out") if workers == 0 else contextlib.nullcontext():
        batches = list(val)
    assert [int(y.numel()) for _, y in batches] == [3, 2]
    assert [y.tolist() for _, y in batches] == [[0, 1, 1], [2, 2]]
    assert val.skipped_files == [str(bad)]


def test_class_folders_workers_keep_determinism(folder_root):
    serial, _ = make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=24, seed=5,
                             two_views=True)
    parallel, _ = make_loaders("imagefolder", root=str(folder_root), batch_size=4, image_size=24, seed=5,
                               two_views=True, num_workers=2)
    expected = list(serial.iter_from(1, 0))
    rng_state = torch.get_rng_state()
    got = list(parallel.iter_from(1, 1))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert len(got) == len(expected) - 1
    assert all(_batches_equal(a, b) for a, b in zip(got, expected[1:]))


# ---------------------------------------------------------------------------------------------------------
# Loader determinism
# ---------------------------------------------------------------------------------------------------------

def test_same_seed_same_batches_and_global_rng_untouched():
    rng_state = torch.get_rng_state()
    a, _ = make_loaders("synthetic", batch_size=50, seed=3, train_size=300)
    b, _ = make_loaders("synthetic", batch_size=50, seed=3, train_size=300)
    first = list(a)
    assert all(_batches_equal(p, q) for p, q in zip(first, b))
    assert torch.equal(torch.get_rng_state(), rng_state)
    c, _ = make_loaders("synthetic", batch_size=50, seed=4, train_size=300)
    assert not torch.equal(next(iter(c))[1], first[0][1])


def test_epochs_reshuffle_and_cover_disjoint_samples():
    train, _ = make_loaders("synthetic", batch_size=32, seed=0, train_size=200)
    assert len(train) == 6  # 200 // 32, last 8 dropped
    epoch0 = torch.cat([train.batch_indices(0, b) for b in range(len(train))])
    epoch1 = torch.cat([train.batch_indices(1, b) for b in range(len(train))])
    assert epoch0.unique().numel() == 192 and not torch.equal(epoch0, epoch1)
    y0 = torch.cat([y for _, y in train])
    train.set_epoch(1)
    y1 = torch.cat([y for _, y in train])
    assert not torch.equal(y0, y1)
    train.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in train]), y0)


@pytest.mark.parametrize("two_views", [False, True])
def test_iter_from_equals_tail_of_full_epoch(two_views):
    train, _ = make_loaders("digits", batch_size=64, seed=7, two_views=two_views)
    train.set_epoch(2)
    full = list(train)
    for start in (0, 5, len(train) - 1, len(train)):
        tail = list(train.iter_from(2, start))
        assert len(tail) == len(full) - start
        assert all(_batches_equal(a, b) for a, b in zip(tail, full[start:]))
    assert train.epoch == 2
    with pytest.raises(ValueError):
        train.iter_from(2, len(train) + 1)


def test_two_views_differ_with_same_labels():
    train, _ = make_loaders("synthetic", batch_size=64, two_views=True)
    (x1, x2), y = next(iter(train))
    single, _ = make_loaders("synthetic", batch_size=64)
    x, y_single = next(iter(single))
    assert torch.equal(y, y_single)  # the view count does not change the sample order
    assert x1.shape == x2.shape == x.shape and not torch.equal(x1, x2)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    images = torch.rand(8, 3, 32, 32)
    v1, v2 = augment_two_views(images, get_augmentation("crop_flip"), 32, (gen_a, gen_b))
    assert v1.shape == v2.shape == images.shape and not torch.equal(v1, v2)


def test_registry_and_options():
    assert {"digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder", "synthetic"} <= set(DATASETS)
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["digits"].augment == "translate"
    assert DATASETS["imagefolder"].eval_transform == "resize_center_crop"
    assert canonical_name("Tiny_ImageNet") == "tinyimagenet"
    with pytest.raises(ValueError, match="unknown dataset"):
        make_loaders("mnist")
    with pytest.raises(TypeError, match="bogus"):
        make_loaders("digits", bogus=1)
    with pytest.raises(ValueError, match="exceeds"):
        make_loaders("synthetic", train_size=10, batch_size=64)
    train, val = make_loaders("synthetic", batch_size=16, num_classes=5, channels=1, image_size=12,
                              train_size=64, val_size=20)
    x, y = next(iter(train))
    assert x.shape == (16, 1, 12, 12) and int(y.max()) < 5 and train.num_classes == 5
    on_cpu, _ = make_loaders("synthetic", batch_size=16, num_classes=5, channels=1, image_size=12,
                             train_size=64, val_size=20, device="cpu")
    assert _batches_equal(next(iter(on_cpu)), (x, y))



def _image_keys(loader) -> list[bytes]:
    """Every image of an in-memory loader's split, as bytes (in split order)."""
    return [image.numpy().tobytes() for image in loader.source.images]


def test_holdout_leaves_the_training_loader_as_a_pure_function_of_the_seed():
    """holdout takes training images (not validation ones) out of the training loader into a third, evaluation-
    transformed loader: disjoint, together the whole training split, the same for the same seed."""
    full, val = make_loaders("synthetic", batch_size=16, seed=3, train_size=200, val_size=40)
    train, val_h, held = make_loaders("synthetic", batch_size=16, seed=3, train_size=200, val_size=40, holdout=0.1)
    assert (train.num_samples, held.num_samples, val_h.num_samples) == (180, 20, 40)
    assert len(train) == 180 // 16 and len(held) == 2 and not held.train  # 16 + 4: the last batch is kept
    kept, out = _image_keys(train), _image_keys(held)
    assert not set(kept) & set(out) and sorted(kept + out) == sorted(_image_keys(full))
    assert _image_keys(val_h) == _image_keys(val)
    batches = list(held)
    assert [y.shape[0] for _, y in batches] == [16, 4]
    assert all(_batches_equal(a, b) for a, b in zip(batches, held))  # no augmentation: every pass the same
    _, _, again = make_loaders("synthetic", batch_size=16, seed=3, train_size=200, val_size=40, holdout=0.1)
    assert _image_keys(again) == out
    _, _, other = make_loaders("synthetic", batch_size=16, seed=4, train_size=200, val_size=40, holdout=0.1)
    assert _image_keys(other) != out
    _, _, counted = make_loaders("synthetic", batch_size=16, seed=3, train_size=200, holdout=24)
    _, _, capped = make_loaders("synthetic", batch_size=16, seed=3, train_size=200, holdout=0.5, holdout_max=10)
    assert (counted.num_samples, capped.num_samples) == (24, 10)


@pytest.mark.parametrize("holdout, message", [(1.5, "fraction in \\(0, 1\\)"), (-1, "integer >= 0"),
                                              (True, "got True"), (200, "leaves none of the 200")])
def test_bad_holdout_is_refused(holdout, message):
    with pytest.raises(ValueError, match=message):
        make_loaders("synthetic", batch_size=16, train_size=200, holdout=holdout)


def test_holdout_of_a_file_split_keeps_the_skipped_files_with_the_rest():
    split = FileSplit([f"img{i}.png" for i in range(10)], torch.arange(10), ["bad.png"], True)
    rest, held = holdout_split(split, 3, seed=0)
    assert len(held) == 3 and sorted(rest.files + held.files) == sorted(split.files)
    assert [int(y) for y in held.labels] == [int(f[3:-4]) for f in held.files]
    assert rest.skipped == ["bad.png"] and held.skipped == [] and held.skip_unreadable


# ---------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------

def _find_shift(out: torch.Tensor, image: torch.Tensor, pad: int, allow_flip: bool):
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    h, w = image.shape[-2:]
    candidates = [out, out.flip(-1)] if allow_flip else [out]
    for flipped, view in enumerate(candidates):
        for top in range(2 * pad + 1):
            for left in range(2 * pad + 1):
                if torch.equal(view, padded[:, top:top + h, left:left + w]):
                    return top - pad, left - pad, bool(flipped)
    return None


def test_crop_flip_shifts_content_exactly():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(32, 3, 32, 32) + 0.01  # strictly positive, so zero padding is recognisable
    out = get_augmentation("crop_flip")(images, 32, gen)
    assert out.shape == images.shape
    shifts = [_find_shift(o, i, 4, allow_flip=True) for o, i in zip(out, images)]
    assert all(s is not None for s in shifts)
    assert len({s[:2] for s in shifts}) > 5 and {s[2] for s in shifts} == {False, True}
    offsets = torch.tensor([[0, 8], [4, 4]])
    cropped = crop_padded(images[:2], offsets, 4)
    # (top 0, left 8) in the padded frame: content moves 4 down and 4 left, the top 4 rows are padding.
    assert torch.equal(cropped[0, :, 4:, :28], images[0, :, :28, 4:])
    assert (cropped[0, :, :4] == 0).all() and (cropped[0, :, :, 28:] == 0).all()
    assert torch.equal(cropped[1], images[1])


def test_translate_never_flips():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(16, 3, 32, 32) + 0.01
    out = get_augmentation("translate")(images, 32, gen)
    shifts = [_find_shift(o, i, 2, allow_flip=False) for o, i in zip(out, images)]
    assert all(s is not None for s in shifts)


def test_resized_crop_geometry():
    images = torch.rand(4, 3, 20, 30)
    full = torch.tensor([[0, 0, 20, 30]] * 4)
    assert torch.allclose(resized_crop(images, full, 20)[..., :], torch.nn.functional.interpolate(
        images, size=(20, 20), mode="bilinear", align_corners=False), atol=1e-5)
    flipped = resized_crop(images, full, 20, torch.tensor([True, False, True, False]))
    plain = resized_crop(images, full, 20)
    assert torch.allclose(flipped[0], plain[0].flip(-1), atol=1e-5) and torch.equal(flipped[1], plain[1])
    same = torch.tensor([[2, 3, 10, 10]] * 4)
    assert torch.allclose(resized_crop(images, same, 10), images[:, :, 2:12, 3:13], atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    boxes = sample_resized_crop_boxes(torch.full((500,), 40), torch.full((500,), 60), gen)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 60).all()
    area = (h * w).float() / 2400
    assert area.min() >= 0.07 and area.max() <= 1.0 and area.std() > 0.1
    out = get_augmentation("resized_crop_flip")(images, 16, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16)


def test_eval_transforms_and_variable_sizes():
    image = torch.rand(1, 3, 60, 40)
    out = resize_center_crop(image, 28)
    assert out.shape == (1, 3, 28, 28)
    gen = torch.Generator().manual_seed(0)
    mixed = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((30, 50), (64, 64), (17, 23))]
    for name in ("none", "crop_flip", "resized_crop_flip", "resize_center_crop"):
        batch = get_augmentation(name).apply_images(mixed, 16, gen)
        assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.float32
        assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="Generator"):
        get_augmentation("crop_flip")(torch.rand(2, 3, 8, 8), 8, None)
