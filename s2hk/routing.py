"""Gradient routing of S2HPruner's losses (ALGORITHMS.md §1, the table is the contract).

With soft logits ``s``, hard logits ``h`` and ``¯`` meaning detached:

===========================================  =======================  =========================
term                                          reaches weights θ         reaches mask logits u
===========================================  =======================  =========================
L   = CE(s, y)                                yes                       yes (through w)
G_h = α KL(softmax(s¯) ‖ softmax(h))          yes, through the hard path no
G_s = α KL(softmax(s) ‖ softmax(h¯))          NO (decoupling)           yes, through the soft path
R   = λ (F_soft / F_full − T)^2               no                        yes (straight-through k)
===========================================  =======================  =========================

The terms are differentiated with respect to the *logits* here (cheap, ``(N, K)``); the networks are then
back-propagated with those logit gradients: one full backward of both paths for what reaches θ, and, for
the decoupled mode, one extra backward of the soft path restricted to ``u`` -- ``torch.autograd.grad`` with
only ``u`` as input, so autograd computes input gradients through the convolutions and skips every weight
gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["LogitGrads", "logit_gradients", "route"]


@dataclass
class LogitGrads:
    """Loss values and their gradients with respect to the two paths' logits."""

    task_loss: Tensor            # L
    kd_hard: Tensor              # G_h
    kd_soft: Tensor              # G_s
    task_to_soft: Tensor         # dL/ds
    kd_hard_to_hard: Tensor      # dG_h/dh
    kd_soft_to_soft: Tensor      # dG_s/ds


def logit_gradients(soft: Tensor, hard: Optional[Tensor], target: Tensor, alpha: float,
                    temperature: float) -> LogitGrads:
    """Evaluate L, G_h, G_s on detached copies of the logits and return their logit gradients."""
    s = soft.detach().requires_grad_(True)
    task = F.cross_entropy(s, target)
    (task_to_soft,) = torch.autograd.grad(task, s)
    if hard is None:
        zero = soft.new_zeros(())
        return LogitGrads(task.detach(), zero, zero, task_to_soft, soft.new_zeros(0), torch.zeros_like(soft))
    kd = ops.decoupled_kd(soft.detach(), hard.detach(), temperature, alpha)
    g_h, g_s, kd_hard_to_hard, kd_soft_to_soft = kd.loss_hard, kd.loss_soft, kd.grad_hard, kd.grad_soft
    return LogitGrads(task.detach(), g_h.detach(), g_s.detach(), task_to_soft, kd_hard_to_hard, kd_soft_to_soft)


def route(mode: str, soft: Tensor, hard: Optional[Tensor], grads: LogitGrads,
          mask_logits: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Back-propagate the logit gradients as ``mode`` says; returns the data gradients of the mask logits.

    After the call every weight's ``.grad`` holds its share (L, plus G_h, plus G_s in "mutual" mode). The
    result is ``(task_grad, kd_grad)``: ``task_grad`` is what the backward of both paths leaves on u -- dL/du,
    plus dG_s/du in "mutual" mode where the two share that backward -- and ``kd_grad`` is dG_s/du from its own
    u-only backward in "decoupled" mode, None in the others (no G_s reaches u apart, so g_D is ``task_grad``).
    Logits the soft path does not use (a model with nothing to prune) get zeros. ``mask_logits.grad`` is left
    as it was.
    """
    mask_grad_before = mask_logits.grad
    mask_logits.grad = None
    soft_grad = grads.task_to_soft
    kd_grad = None
    if mode == "decoupled":
        # G_s reaches u only: a backward of the soft path restricted to u (input gradients only)
        (kd_grad,) = torch.autograd.grad(soft, mask_logits, grads.kd_soft_to_soft, retain_graph=True,
                                         allow_unused=True, materialize_grads=True)
    elif mode == "mutual":
        soft_grad = soft_grad + grads.kd_soft_to_soft
    outputs, output_grads = [soft], [soft_grad]
    if hard is not None and mode != "none":
        outputs.append(hard)
        output_grads.append(grads.kd_hard_to_hard)
    torch.autograd.backward(outputs, output_grads)
    task_grad = mask_logits.grad if mask_logits.grad is not None else torch.zeros_like(mask_logits)
    mask_logits.grad = mask_grad_before
    return task_grad, kd_grad
