"""s2hk: prune neural networks while they train (S2HPruner, CR-SFP, STP) on one two-path engine.

Quick start::

    import torch, s2hk
    model = s2hk.models.resnet56(num_classes=10)
    pruner = s2hk.S2HPruner(model, torch.randn(1, 3, 32, 32), target_flops=0.35)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for x, y in loader:
        pruner.train_step(x, y, opt)
    small = pruner.export()          # a plain, physically smaller torch.fx.GraphModule
"""
from __future__ import annotations

from . import models
from .config import S2HConfig
from .crsfp import CRSFPruner, SFPruner
from .engine import TwoPathNetwork
from .export import load_pruned, save_pruned
from .flops import count_flops, count_macs
from .graph import UnsupportedModelError, analyze
from .s2h import S2HPruner
from .stp import STPConfig, STPruner

__version__ = "0.1.0"

__all__ = ["S2HPruner", "CRSFPruner", "SFPruner", "STPruner", "STPConfig", "S2HConfig", "TwoPathNetwork",
           "count_flops", "count_macs", "analyze", "UnsupportedModelError", "save_pruned", "load_pruned", "models",
           "__version__"]
