"""Helpers shared by several test files."""
from __future__ import annotations

import torch
import torch.nn as nn


Range = tuple[float, float]


def randomise_norms(model: nn.Module, weight: Range = (0.5, 1.5), bias: Range = (-0.5, 0.5),
                    mean: Range = (-0.3, 0.3), var: Range = (0.5, 2.0)) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics and LayerNorm affine parameters (uniform in the
    given ranges), so that slicing mistakes show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(*weight)
                m.bias.uniform_(*bias)
                m.running_mean.uniform_(*mean)
                m.running_var.uniform_(*var)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(*weight)
                m.bias.uniform_(*bias)
    return model
