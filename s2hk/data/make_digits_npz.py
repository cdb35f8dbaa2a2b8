"""Regenerate ``digits.npz`` from scikit-learn (run once; never imported at run time).

The archive holds the 1797 8x8 handwritten digits that scikit-learn ships (UCI "Optical Recognition of
Handwritten Digits", test part): ``images`` uint8 (1797, 8, 8) with the original 0..16 intensities rescaled
to 0..255 by ``round(v * 255 / 16)``, and ``labels`` int64 (1797,) in 0..9.

Usage: ``python -m s2hk.data.make_digits_npz [output.npz]`` (needs scikit-learn).
"""
from __future__ import annotations

import os
import sys


def main(path: str | None = None) -> str:
    """Write the archive to ``path`` (default: next to this file) and return the path."""
    import numpy as np
    from sklearn.datasets import load_digits  # only this script needs scikit-learn

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
    np.savez_compressed(path, images=images, labels=labels)
    return path


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else None))
