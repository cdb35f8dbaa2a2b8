"""S2HPruner's mask optimiser: SGD on the width-choice logits with data / FLOPs gradient balancing.

Per group ``g`` (ALGORITHMS.md §1): with the data gradient ``g_D = dG_s/du + dL/du``, the FLOPs gradient
``g_F = dR/du``, tolerance band ``rho`` and balance factor ``beta``::

    dyn = min(R / (lambda rho^2), 1)
    if dyn > 0: scale the smaller of ||g_D|| and (beta / dyn) ||g_F|| up so that ||g_D|| = (beta / dyn) ||g_F||
    u <- u - lr (g_D + g_F)

Outside the band (``|F/F_full - T| >= rho``, ``dyn = 1``) the FLOPs direction keeps a fixed share; inside
it fades as ``dyn``. Everything is computed on the logits' device for all groups at once (no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .masks import GateLayout

__all__ = ["balance_gradients", "MaskOptimizer"]


def _segment_ids(layout: GateLayout, device: torch.device) -> Tensor:
    return torch.repeat_interleave(torch.arange(layout.num_groups, device=device),
                                   torch.tensor(layout.num_choices, device=device))


def balance_gradients(data_grad: Tensor, flops_grad: Tensor, flops_loss: Tensor, layout: GateLayout,
                      flops_weight: float, tolerance: float, balance: float,
                      max_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """The balanced ``(g_D, g_F)`` of every group, flat ``(sum L_g,)`` like the logits.

    Args:
        data_grad, flops_grad: flat gradients of the data losses and of R with respect to the logits.
        flops_loss: R (0-dim).
        flops_weight, tolerance, balance: lambda, rho, beta.
        max_scale: optional cap on the up-scaling factor (None: uncapped).
    """
    if data_grad.numel() == 0:
        return data_grad, flops_grad
    seg = _segment_ids(layout, data_grad.device)
    g = layout.num_groups
    norm_d = torch.zeros(g, dtype=data_grad.dtype, device=data_grad.device).index_add_(0, seg, data_grad ** 2).sqrt()
    norm_f = torch.zeros(g, dtype=flops_grad.dtype, device=flops_grad.device).index_add_(0, seg, flops_grad ** 2).sqrt()
    dyn = torch.clamp(flops_loss.detach() / (flops_weight * tolerance ** 2), max=1.0).to(data_grad.dtype)
    active = dyn > 0
    target_f = torch.where(active, balance / torch.where(active, dyn, torch.ones_like(dyn)), torch.zeros_like(dyn))
    weighted_f = target_f * norm_f                   # (beta / dyn) ||g_F||
    scale_d = torch.where(active & (norm_d < weighted_f) & (norm_d > 0), weighted_f / norm_d.clamp_min(1e-30),
                          torch.ones_like(norm_d))
    scale_f = torch.where(active & (weighted_f <= norm_d) & (weighted_f > 0), norm_d / weighted_f.clamp_min(1e-30),
                          torch.ones_like(norm_f))
    if max_scale is not None:
        scale_d, scale_f = scale_d.clamp(max=max_scale), scale_f.clamp(max=max_scale)
    return data_grad * scale_d[seg], flops_grad * scale_f[seg]


class MaskOptimizer:
    """Plain SGD on the flat mask logits with the balancing rule; its lr follows the weight lr schedule.

    Args:
        logits: the flat mask-logit parameter.
        layout: its group layout.
        lr: learning rate at the weight optimiser's initial lr.
        flops_weight, tolerance, balance, max_scale: lambda, rho, beta and the optional cap.
        recenter: subtract each group's mean logit after the update.

    It holds the logit parameter itself and no state on a device (the lr only), so moving the network needs
    nothing from it beyond holding the right parameter: where a move replaces the parameter object (to or from
    ``"meta"``, ``load_state_dict(assign=True)``), its owner points it at the new one
    (:meth:`s2hk.S2HPruner._move_state`).
    """

    def __init__(self, logits: Tensor, layout: GateLayout, lr: float, flops_weight: float, tolerance: float,
                 balance: float, max_scale: Optional[float] = None, recenter: bool = False) -> None:
        self.logits = logits
        self.layout = layout
        self.lr = lr
        self.flops_weight = flops_weight
        self.tolerance = tolerance
        self.balance = balance
        self.max_scale = max_scale
        self.recenter = recenter

    @torch.no_grad()
    def step(self, data_grad: Tensor, flops_grad: Tensor, flops_loss: Tensor, lr_scale: float = 1.0) -> None:
        g_d, g_f = balance_gradients(data_grad, flops_grad, flops_loss, self.layout, self.flops_weight,
                                     self.tolerance, self.balance, self.max_scale)
        self.logits.sub_(self.lr * lr_scale * (g_d + g_f))
        if self.recenter and self.logits.numel():
            seg = _segment_ids(self.layout, self.logits.device)
            sums = torch.zeros(self.layout.num_groups, dtype=self.logits.dtype,
                               device=self.logits.device).index_add_(0, seg, self.logits)
            counts = torch.tensor(self.layout.num_choices, dtype=self.logits.dtype, device=self.logits.device)
            self.logits.sub_((sums / counts)[seg])

    def state_dict(self) -> dict:
        return {"lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.lr = float(state["lr"])
