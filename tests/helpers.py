"""Helpers shared by several test files."""
from __future__ import annotations

import torch
import torch.nn as nn


def randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics, so that slicing mistakes show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model
