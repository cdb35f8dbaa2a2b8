"""Write-then-rename file output: a reader never sees a half-written file, and a failed or interrupted write
leaves the previous file as it was."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], durable: bool = False) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it into place.

    Args:
        path: the destination; missing parent folders are created.
        write: fills the open binary file.
        durable: flush and fsync the data before the rename (for files a crash must not lose).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; outputs should be as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        # KeyboardInterrupt included: the temporary file must not outlive a failed write
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
