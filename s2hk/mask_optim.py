"""S2HPruner's mask optimiser: SGD on the width-choice logits with data / FLOPs gradient balancing.

Per group ``g`` (ALGORITHMS.md §1): with the data gradient ``g_D = dG_s/du + dL/du``, the FLOPs gradient
``g_F = dR/du``, tolerance band ``rho`` and balance factor ``beta``::

    [optional, decoupled KD: dL/du <- c ||dG_s/du|| dL/du / ||dL/du||]      c = task_grad_scale
    dyn = min(R / (lambda rho^2), 1)
    if dyn > 0: scale the smaller of ||g_D|| and (beta / dyn) ||g_F|| up so that ||g_D|| = (beta / dyn) ||g_F||
    g = g_D + g_F + wd u
    b <- m b + g   (b = g at the first step);   d = g + m b (Nesterov) or b
    u <- u - lr d

Outside the band (``|F/F_full - T| >= rho``, ``dyn = 1``) the FLOPs direction keeps a fixed share; inside
it fades as ``dyn``. The last three lines are torch.optim.SGD's (weight decay, momentum ``m``, Nesterov); with
``m = 0`` and ``wd = 0`` they are the spec's plain step. Everything is computed on the logits' device for all
groups at once (no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .masks import GateLayout

__all__ = ["balance_gradients", "rescale_task_gradient", "MaskOptimizer"]


def _segment_ids(layout: GateLayout, device: torch.device) -> Tensor:
    return torch.repeat_interleave(torch.arange(layout.num_groups, device=device),
                                   torch.tensor(layout.num_choices, device=device))


def _group_norms(values: Tensor, seg: Tensor, num_groups: int) -> Tensor:
    """The L2 norm of each group's slice of the flat ``values``, shape ``(G,)``."""
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, seg, values ** 2).sqrt()


def rescale_task_gradient(task_grad: Tensor, kd_grad: Tensor, layout: GateLayout, scale: float) -> Tensor:
    """Each group's dL/du rescaled to ``scale`` times that group's ||dG_s/du|| (the S2HPruner authors'
    ``sup_soft_dis_scale``); a group whose dL/du is zero stays zero. Flat ``(sum L_g,)`` like the logits."""
    if task_grad.numel() == 0:
        return task_grad
    seg = _segment_ids(layout, task_grad.device)
    norm_task = _group_norms(task_grad, seg, layout.num_groups)
    norm_kd = _group_norms(kd_grad, seg, layout.num_groups)
    factor = torch.where(norm_task > 0, scale * norm_kd / norm_task.clamp_min(1e-30), torch.zeros_like(norm_task))
    return task_grad * factor[seg]


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
    norm_d = _group_norms(data_grad, seg, layout.num_groups)
    norm_f = _group_norms(flops_grad, seg, layout.num_groups)
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
    """SGD on the flat mask logits with the balancing rule; its lr follows the weight lr schedule.

    Args:
        logits: the flat mask-logit parameter.
        layout: its group layout.
        lr: learning rate at the weight optimiser's initial lr.
        flops_weight, tolerance, balance, max_scale: lambda, rho, beta and the optional cap.
        recenter: subtract each group's mean logit after the update.
        momentum, nesterov, weight_decay: torch.optim.SGD's settings, applied to the balanced gradient.
        task_grad_scale: where :meth:`step` gets dG_s/du on its own, rescale dL/du to this multiple of its norm
            per group (:func:`rescale_task_gradient`); None: add them as they are.

    Its one tensor of state is the momentum buffer (None until the first step with momentum), which lives with
    the logits: its owner converts it on moves (:meth:`s2hk.S2HPruner._move_state`) and points :attr:`logits`
    at the new parameter where a move replaces the parameter object (to or from ``"meta"``,
    ``load_state_dict(assign=True)``).
    """

    def __init__(self, logits: Tensor, layout: GateLayout, lr: float, flops_weight: float, tolerance: float,
                 balance: float, max_scale: Optional[float] = None, recenter: bool = False, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, task_grad_scale: Optional[float] = None) -> None:
        self.logits = logits
        self.layout = layout
        self.lr = lr
        self.flops_weight = flops_weight
        self.tolerance = tolerance
        self.balance = balance
        self.max_scale = max_scale
        self.recenter = recenter
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.task_grad_scale = task_grad_scale
        self.momentum_buffer: Optional[Tensor] = None

    @torch.no_grad()
    def step(self, task_grad: Tensor, flops_grad: Tensor, flops_loss: Tensor, lr_scale: float = 1.0,
             kd_grad: Optional[Tensor] = None) -> None:
        """One update from the flat gradients of the logits.

        Args:
            task_grad: the data gradient reaching u through the soft path's backward: dL/du, or all of g_D where
                no ``kd_grad`` is given.
            flops_grad: dR/du.
            flops_loss: R (0-dim).
            lr_scale: the weight optimiser's lr over its initial lr.
            kd_grad: dG_s/du where it was computed on its own (decoupled KD); g_D is then ``kd_grad`` plus
                ``task_grad``, the latter rescaled if ``task_grad_scale`` is set.
        """
        data_grad = task_grad
        if kd_grad is not None:
            if self.task_grad_scale is not None:
                task_grad = rescale_task_gradient(task_grad, kd_grad, self.layout, self.task_grad_scale)
            data_grad = task_grad + kd_grad
        g_d, g_f = balance_gradients(data_grad, flops_grad, flops_loss, self.layout, self.flops_weight,
                                     self.tolerance, self.balance, self.max_scale)
        direction = g_d + g_f
        if self.weight_decay:
            direction = direction + self.weight_decay * self.logits
        if self.momentum:
            if self.momentum_buffer is None:
                self.momentum_buffer = direction.clone()
            else:
                self.momentum_buffer.mul_(self.momentum).add_(direction)
            direction = direction + self.momentum * self.momentum_buffer if self.nesterov else self.momentum_buffer
        self.logits.sub_(self.lr * lr_scale * direction)
        if self.recenter and self.logits.numel():
            seg = _segment_ids(self.layout, self.logits.device)
            sums = torch.zeros(self.layout.num_groups, dtype=self.logits.dtype,
                               device=self.logits.device).index_add_(0, seg, self.logits)
            counts = torch.tensor(self.layout.num_choices, dtype=self.logits.dtype, device=self.logits.device)
            self.logits.sub_((sums / counts)[seg])

    def state_dict(self) -> dict:
        """The lr and the momentum buffer (a copy; None before the first step with momentum)."""
        buffer = None if self.momentum_buffer is None else self.momentum_buffer.detach().clone()
        return {"lr": self.lr, "momentum_buffer": buffer}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the buffer goes to the logits' device and dtype. A state saved before
        the buffer existed restarts the momentum."""
        self.lr = float(state["lr"])
        buffer = state.get("momentum_buffer")
        self.momentum_buffer = None if buffer is None else buffer.to(self.logits.device, self.logits.dtype).clone()
