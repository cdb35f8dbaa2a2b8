"""s2hk: prune neural networks while they train (S2HPruner, CR-SFP, STP) on one two-path engine."""
from __future__ import annotations

__version__ = "0.1.0"
