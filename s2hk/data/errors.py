"""The one exception every dataset reader raises for missing or malformed input."""
from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable or not in the expected format.

    The message always starts with the offending path and says what was expected there, so that the fix
    (download, extract, move) is obvious without reading the source.
    """
