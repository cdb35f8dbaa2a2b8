"""Seeds derived from (seed, epoch, batch index, ...) so every random draw is a pure function of them.

Each purpose (shuffling order, augmentation of one view of one batch) gets its own ``torch.Generator``
seeded from a hash of its coordinates; the global RNG is never touched. Hashing with SplitMix64 makes
nearby coordinates (batch 3 vs batch 4) give unrelated streams.
"""
from __future__ import annotations

import torch

__all__ = ["mix_seed", "make_generator", "ORDER_STREAM", "AUGMENT_STREAM", "DATA_STREAM", "SPLIT_STREAM",
           "HOLDOUT_STREAM"]

_MASK64 = (1 << 64) - 1

# Domain tags: the first coordinate of every hash, so that streams of different purposes never coincide.
ORDER_STREAM = 0x4F52444552  # "ORDER"
AUGMENT_STREAM = 0x4155474D  # "AUGM"
DATA_STREAM = 0x44415441  # "DATA"
SPLIT_STREAM = 0x53504C54  # "SPLT"
HOLDOUT_STREAM = 0x484F4C44  # "HOLD"


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integer coordinates (any sign) into a 63-bit seed accepted by ``torch.Generator.manual_seed``."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1


def make_generator(*parts: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``mix_seed(*parts)``."""
    gen = torch.Generator()
    gen.manual_seed(mix_seed(*parts))
    return gen
