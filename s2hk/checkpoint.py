"""Resumable, verifiable training checkpoints.

File layout (format version 1)::

    s2hk-checkpoint\\n                   <- magic line: a foreign file is recognised from its first bytes
    {"format": ..., "version": 1,        <- one JSON line: what the payload is and how to check it
     "payload_bytes": N, "sha256": ...}\\n
    <N bytes written by torch.save>      <- the state itself

The header is plain text so ``head -2 ckpt.pt`` tells what a file is. The SHA-256 covers the payload
bytes exactly, so a truncated or bit-flipped file is refused before unpickling starts, and the payload is
read with ``torch.load(weights_only=True)``: only tensors and plain containers come back, never arbitrary
objects.

Writes are atomic: the file is written to a temporary name in the same folder, flushed and fsynced, then
renamed over the target with :func:`os.replace`. A crash at any moment leaves either the previous file or
the new one at ``path``, never a mixture.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .atomic import atomic_write

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "rotate_checkpoints",
]

FORMAT = "s2hk-checkpoint"
FORMAT_VERSION = 1

_MAGIC = (FORMAT + "\n").encode("ascii")
# A real header is ~200 bytes; the cap keeps random bytes without a newline from being read as one line.
_MAX_HEADER_BYTES = 64 * 1024
_NAME_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: missing, damaged, foreign, or from a newer format."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load checkpoint {str(self.path)!r}: {reason}")


# ----------------------------------------------------------------------------------------------- writing

# Exactly the types torch.load(weights_only=True) rebuilds. Checking them at save time turns a checkpoint
# that could never be loaded back into an immediate error that names the offending entry.
_LEAF_TYPES = (
    type(None), bool, int, float, complex, str, bytes, bytearray,
    torch.dtype, torch.device, torch.Size, torch.Tensor, torch.nn.Parameter,
)
_MAPPING_TYPES = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCE_TYPES = (list, tuple, set)


def _check_plain(obj: Any, where: str, active: set[int]) -> None:
    kind = type(obj)
    if kind in _LEAF_TYPES:
        return
    if kind in _MAPPING_TYPES or kind in _SEQUENCE_TYPES:
        if id(obj) in active:
            raise TypeError(f"checkpoint state is self-referential at {where}")
        active.add(id(obj))
        if kind in _MAPPING_TYPES:
            for key, value in obj.items():
                _check_plain(key, f"{where} key {key!r}", active)
                _check_plain(value, f"{where}[{key!r}]", active)
        else:
            for i, value in enumerate(obj):
                _check_plain(value, f"{where}[{i}]", active)
        active.discard(id(obj))
        return
    hint = " (convert numpy values with .item() or torch.as_tensor)" if kind.__module__.startswith("numpy") else ""
    raise TypeError(
        f"checkpoint state holds a {kind.__module__}.{kind.__qualname__} at {where}; only tensors, numbers, "
        f"strings, bytes, None and dict/list/tuple/set of them can be loaded back safely{hint}"
    )


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; folders cannot be opened this way on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: os.PathLike | str, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically.

    ``state`` is a (nested) mapping of tensors, numbers, strings, lists, tuples and dicts, e.g. model and
    optimizer ``state_dict()`` results, step counters and :func:`capture_rng_state`. Anything else raises
    :class:`TypeError` before the file system is touched. Missing parent folders are created.
    """
    path = Path(path)
    if type(state) not in _MAPPING_TYPES:
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__qualname__}")
    _check_plain(state, "state", set())

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    # Compact and free of informational fields: every byte of the header matters, so any damage to it
    # makes the file unreadable rather than silently accepted.
    header_line = (json.dumps(header, sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")

    def write(f) -> None:
        f.write(_MAGIC)
        f.write(header_line)
        f.write(payload)

    try:
        atomic_write(path, write, durable=True)
    finally:
        payload.release()
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------- reading

def _read_verified(path: Path) -> tuple[dict, bytes]:
    """Return (header, payload) of ``path`` after checking marker, version, length and checksum."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a file") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot open file ({e.strerror or e})") from e
    with f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            if not magic:
                raise CheckpointError(path, "file is empty (truncated write?)")
            if _MAGIC.startswith(magic):
                raise CheckpointError(path, "file is truncated inside the format marker")
            if magic.startswith(b"PK"):
                raise CheckpointError(path, f"not an {FORMAT} file (a plain torch.save file or another zip archive)")
            raise CheckpointError(path, f"not an {FORMAT} file (unknown format marker)")
        header_line = f.readline(_MAX_HEADER_BYTES)
        if not header_line.endswith(b"\n"):
            raise CheckpointError(path, "header is truncated or damaged")
        try:
            header = json.loads(header_line.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise CheckpointError(path, "header is damaged (not valid JSON)") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(path, "header is damaged (format field missing or wrong)")
        version = header.get("version")
        if type(version) is not int or version < 1:
            raise CheckpointError(path, f"header is damaged (bad version {version!r})")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                path, f"format version {version} is newer than this s2hk understands "
                f"(up to {FORMAT_VERSION}); upgrade s2hk to load it")
        size, digest = header.get("payload_bytes"), header.get("sha256")
        if type(size) is not int or size < 0 or not isinstance(digest, str):
            raise CheckpointError(path, "header is damaged (payload size or checksum missing)")
        payload = f.read(size + 1)  # one byte more than announced reveals trailing garbage
    if len(payload) < size:
        raise CheckpointError(path, f"file is truncated ({len(payload)} of {size} payload bytes present)")
    if len(payload) > size:
        raise CheckpointError(path, "file has unexpected bytes after the payload")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(path, "checksum mismatch (file is corrupt)")
    return header, payload


def verify_checkpoint(path: os.PathLike | str) -> dict:
    """Check marker, version and checksum of ``path`` without unpickling; return its header.

    Raises :class:`CheckpointError` exactly where :func:`load_checkpoint` would before unpickling.
    """
    header, _ = _read_verified(Path(path))
    return header


def load_checkpoint(path: os.PathLike | str, map_location: Any = "cpu") -> dict:
    """Load a state written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` (naming the file and the reason) for a missing, truncated, corrupt or
    foreign file and for a newer format version; a partially read state is never returned.
    ``map_location`` is passed to :func:`torch.load` (default: everything on the CPU).
    """
    path = Path(path)
    _, payload = _read_verified(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:
        # The checksum matched, so the bytes are what was written; they just cannot be rebuilt safely
        # (e.g. written by a different tool that reused the format marker).
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"payload cannot be unpickled as plain data ({first_line})") from e
    if not isinstance(state, dict):
        raise CheckpointError(path, f"payload is a {type(state).__qualname__}, not a dict")
    return state


# ----------------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Snapshot python ``random``, numpy's global generator, torch's CPU generator and every CUDA generator.

    CUDA generators are included once CUDA is initialised in this process (as it is in any GPU run by the
    time a checkpoint is taken). The result holds only plain data (lists, ints, tensors), so it can go into
    :func:`save_checkpoint`.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    # Only read CUDA generators when CUDA is already in use: asking would otherwise initialise a context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`, so the next draws repeat exactly.

    Parts absent from ``state`` are left alone. CUDA states are restored for the devices present on both
    sides (a run resumed on fewer GPUs keeps the first ones).
    """
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"]), py["gauss_next"]))
    if "numpy" in state:
        nps = state["numpy"]
        keys = torch.as_tensor(nps["keys"]).cpu().numpy().astype(np.uint32)
        np.random.set_state((nps["kind"], keys, int(nps["pos"]), int(nps["has_gauss"]),
                             float(nps["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), index)


# ----------------------------------------------------------------------------------------------- folders

def checkpoint_path(folder: os.PathLike | str, step: int) -> Path:
    """The conventional file name for the checkpoint taken at ``step``: ``folder/checkpoint-<step>.pt``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(folder) / f"checkpoint-{step:09d}.pt"


def list_checkpoints(folder: os.PathLike | str) -> list[Path]:
    """Checkpoints named by :func:`checkpoint_path` in ``folder``, oldest step first (missing folder: [])."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: os.PathLike | str, verify: bool = False) -> Path | None:
    """The checkpoint with the highest step in ``folder``, or None if there is none.

    With ``verify=True`` files that fail :func:`verify_checkpoint` (damaged, foreign) are passed over, so
    a run resumes from the newest usable one; this reads and hashes each candidate.
    """
    for candidate in reversed(list_checkpoints(folder)):
        if not verify:
            return candidate
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        return candidate
    return None


def rotate_checkpoints(folder: os.PathLike | str, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` highest-step checkpoints in ``folder``; return the deleted paths.

    Only files named by :func:`checkpoint_path` are touched, so other files in the folder are safe.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    removed = []
    for old in list_checkpoints(folder)[:-keep_last]:
        try:
            old.unlink()
        except FileNotFoundError:  # removed concurrently: the goal is met either way
            continue
        removed.append(old)
    return removed
