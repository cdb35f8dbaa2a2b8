"""Checkpoint files: atomic writes, exact round trips, refusal of damaged or foreign files, folder rotation."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from s2hk import checkpoint as ck
from s2hk.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)


def _training_state(step: int = 7) -> dict:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model": model.state_dict(),
        "masks": {"group0": torch.tensor([1.0, 0.0, 1.0, 1.0]), "logits": [torch.randn(3), torch.randn(2)]},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "epoch": 2,
        "rng": capture_rng_state(),
        "config": {"name": "resnet", "widths": [16, 32], "target": 0.5, "tau": None, "pair": (1, 2)},
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------------ round trip

def test_round_trip_nested_state(tmp_path):
    state = _training_state()
    path = tmp_path / "run" / "ckpt.pt"  # parent folder does not exist yet
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    # state_dict version metadata survives, so BatchNorm & co. load with their usual upgrade logic
    assert loaded["model"]._metadata == state["model"]._metadata
    # the optimizer state is usable, not just equal
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    model.load_state_dict(loaded["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.state_dict()["param_groups"] == state["optimizer"]["param_groups"]
    header = verify_checkpoint(path)
    assert header["format"] == FORMAT and header["version"] == FORMAT_VERSION
    assert path.read_bytes().startswith(b"s2hk-checkpoint\n")
    assert oct(path.stat().st_mode & 0o777) == oct(0o644) or os.name == "nt"


def test_rng_restore_repeats_draws_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave numpy with a cached gaussian, part of its state
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng_state()})
    expected = (torch.rand(5), torch.randn(3), random.random(), random.gauss(0, 1), np.random.rand(4),
                np.random.randn(2))

    # scramble every generator, then resume from the file
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    torch.rand(10)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(5), torch.randn(3), random.random(), random.gauss(0, 1), np.random.rand(4),
             np.random.randn(2))
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2] == again[2] and expected[3] == again[3]
    assert np.array_equal(expected[4], again[4]) and np.array_equal(expected[5], again[5])


def test_save_rejects_values_that_cannot_be_loaded_safely(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"state\['config'\]\['lr'\].*numpy.*\.item\(\)"):
        save_checkpoint(path, {"config": {"lr": np.float64(0.1)}})
    with pytest.raises(TypeError, match="function"):
        save_checkpoint(path, {"sched": {"fn": lambda e: e}})
    with pytest.raises(TypeError, match="defaultdict"):
        save_checkpoint(path, {"d": collections.defaultdict(int)})
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint(path, [1, 2])
    assert not path.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ atomicity

def test_failed_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(ck.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # temporary file cleaned up


def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, {"step": 1, "w": torch.ones(4)})
    # The child stops for good right after writing the new bytes (at fsync, before the rename) and is
    # killed there: the moment a real crash would do the most damage.
    script = textwrap.dedent(f"""
        import time, torch
        from s2hk import checkpoint as ck
        def stall(fd):
            print("writing", flush=True)
            time.sleep(60)
        ck.os.fsync = stall
        ck.save_checkpoint({str(path)!r}, {{"step": 2, "w": torch.zeros(1 << 16)}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(4))
    # The abandoned temporary file stays hidden under its own name and is never taken for a checkpoint.
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{path.name}.") and leftovers[0].endswith(".tmp")
    assert latest_checkpoint(tmp_path) == path


# ------------------------------------------------------------------------------------------ refusal

@pytest.fixture
def saved(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 3, "w": torch.arange(1000, dtype=torch.float32), "name": "x"})
    return path, path.read_bytes()


def _refused(path: Path, match: str | None = None) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, RuntimeError) and info.value.path == path
    return info.value


def test_truncated_files_are_refused(saved):
    path, data = saved
    header_end = data.index(b"\n", len(b"s2hk-checkpoint\n")) + 1
    cuts = [0, 1, 8, len(b"s2hk-checkpoint\n"), len(b"s2hk-checkpoint\n") + 5, header_end - 1, header_end,
            header_end + 1, (header_end + len(data)) // 2, len(data) - 1]
    for cut in cuts:
        path.write_bytes(data[:cut])
        error = _refused(path)
        assert any(word in error.reason for word in ("truncated", "empty")), (cut, error.reason)


def test_flipped_bytes_are_refused(saved):
    path, data = saved
    header_end = data.index(b"\n", len(b"s2hk-checkpoint\n")) + 1
    for position in [header_end, header_end + 200, len(data) // 2, len(data) - 1]:
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        _refused(path, "checksum mismatch")
    # Every single-bit error in the marker and header is caught too, not only those in the payload.
    for position in range(header_end):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(CheckpointError):
                load_checkpoint(path)


def test_trailing_bytes_are_refused(saved):
    path, data = saved
    path.write_bytes(data + b"\0")
    _refused(path, "after the payload")


def test_foreign_and_random_files_are_refused(tmp_path):
    foreign = tmp_path / "model.pt"
    torch.save({"step": 3, "weight": torch.ones(2)}, foreign)
    _refused(foreign, "not an s2hk-checkpoint file")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _refused(noise, "not an s2hk-checkpoint file")
    text = tmp_path / "notes.pt"
    text.write_text("s2hk-checkpoint\nnot json at all\n")
    _refused(text, "not valid JSON")


def test_missing_file_and_folder_are_refused(tmp_path):
    _refused(tmp_path / "nowhere.pt", "no such file")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def _hand_made(path: Path, payload: bytes, **header) -> None:
    fields = {"format": FORMAT, "version": FORMAT_VERSION, "payload_bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(), **header}
    path.write_bytes(b"s2hk-checkpoint\n" + json.dumps(fields).encode() + b"\n" + payload)


def test_newer_format_version_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"step": 1}, buffer)
    path = tmp_path / "future.pt"
    _hand_made(path, buffer.getvalue(), version=FORMAT_VERSION + 1)
    _refused(path, f"format version {FORMAT_VERSION + 1} is newer")


def test_payload_with_arbitrary_objects_is_refused(tmp_path):
    # A correct checksum does not make a pickle safe: only plain data may come back.
    buffer = io.BytesIO()
    torch.save({"d": collections.defaultdict(int)}, buffer)
    path = tmp_path / "pickle.pt"
    _hand_made(path, buffer.getvalue())
    _refused(path, "cannot be unpickled as plain data")
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    _hand_made(path, buffer.getvalue())
    _refused(path, "not a dict")


# ------------------------------------------------------------------------------------------ folders

def test_latest_and_rotation(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 100, 10):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / ".checkpoint-000000200.pt.abc.tmp").write_bytes(b"partial")
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [5, 10, 100]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)

    checkpoint_path(tmp_path, 100).write_bytes(b"s2hk-checkpoint\n{")  # damaged newest
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)
    assert latest_checkpoint(tmp_path, verify=True) == checkpoint_path(tmp_path, 10)

    removed = rotate_checkpoints(tmp_path, keep_last=2)
    assert removed == [checkpoint_path(tmp_path, 5)]
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 10), checkpoint_path(tmp_path, 100)]
    assert (tmp_path / "notes.txt").exists()
    assert rotate_checkpoints(tmp_path, keep_last=5) == []
    with pytest.raises(ValueError):
        rotate_checkpoints(tmp_path, keep_last=0)
    with pytest.raises(ValueError):
        checkpoint_path(tmp_path, -1)
