"""The mask-math and distillation ops of S2HPruner, each with its PyTorch reference beside it.

Each public op routes through :func:`s2hk.dispatch.choose` to the C++/CUDA op in the extension ``s2hk._C``
(``torch.ops.s2hk.*``, csrc/) or to its reference here:

- :func:`gates`: soft keep-probabilities, straight-through hard widths, expected widths and hard masks of every
  channel group in one launch (reference: :func:`gates_reference`, built on :func:`s2hk.masks.compute_gates`);
- :func:`decoupled_kd`: the decoupled bidirectional KD terms G_h, G_s and their routed gradients in one pass
  (reference: :func:`decoupled_kd_reference`);
- :func:`group_importance`: mean filter L1 importance, importance order and ranks of every group
  (reference: :func:`group_importance_reference`).

This module also registers the extension ops' fake kernels (for torch.compile / FakeTensor) and autograd
formulas, when the extension is loaded.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from s2hk import dispatch
from s2hk.masks import GateLayout, compute_gates, ranks_from_importance

__all__ = [
    "Gates",
    "gates",
    "gates_reference",
    "gate_layout_tensor",
    "DecoupledKD",
    "decoupled_kd",
    "decoupled_kd_reference",
    "batch_mean_kl",
    "GroupImportance",
    "group_importance",
    "group_importance_reference",
]

# --------------------------------------------------------------------------------------------------- gates


class Gates(NamedTuple):
    """Outputs of :func:`gates`, flat over all groups (``C = sum C_g``)."""

    keep_probs: Tensor  #: ``(C,)`` soft keep-probabilities ``w``, logits' dtype, differentiable
    hard_widths: Tensor  #: ``(G,)`` float64, values ``k_g``, gradient that of ``expected`` (straight-through)
    expected: Tensor  #: ``(G,)`` float64 expected widths ``E_g``, differentiable
    mask: Tensor  #: ``(C,)`` float32 hard masks (``rank < k_g``), not differentiable


_LAYOUT_TABLES: dict = {}


def gate_layout_tensor(layout: GateLayout, device: torch.device) -> Tensor:
    """The ``(G, 4)`` int64 table the ``s2hk::gates`` ops read: channel offset, logit offset, ``C_g``, ``d_g``.

    Cached per layout and device, so that a training step sends it to the device once, not every step. The ops
    take the table on the logits' device and its CPU copy, which they validate without reading the device.
    """
    key = (layout, torch.device(device))
    table = _LAYOUT_TABLES.get(key)
    if table is None:
        rows = list(zip(layout.channel_offsets, layout.logit_offsets, layout.channels, layout.granularities))
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(key[1])
        _LAYOUT_TABLES[key] = table
    return table


def gates_reference(logits: Tensor, ranks: Tensor, layout: GateLayout, tau: float = 1.0) -> Gates:
    """PyTorch reference of :func:`gates`: :func:`s2hk.masks.compute_gates` plus the hard masks.

    Args:
        logits: ``(sum L_g,)`` width-choice logits of all groups.
        ranks: ``(sum C_g,)`` int64 importance ranks (each group's ranks are a permutation of ``0..C_g-1``).
        layout: the group sizes.
        tau: softmax temperature.
    """
    keep_probs, hard_widths, expected = compute_gates(logits, ranks, layout, tau)
    per_channel = torch.tensor(layout.channels, dtype=torch.int64, device=ranks.device)
    widths = hard_widths.detach().repeat_interleave(per_channel, output_size=ranks.numel())
    return Gates(keep_probs, hard_widths, expected, (ranks < widths).to(torch.float32))


def gates(logits: Tensor, ranks: Tensor, layout: GateLayout, tau: float = 1.0) -> Gates:
    """Soft gates, straight-through hard widths and hard masks of every channel group at once.

    Matches :func:`s2hk.masks.compute_gates` (ALGORITHMS.md §1): per group, ``p = softmax(u / tau)``,
    ``w_r = sum_{j: n_j > r} p_j``, ``E = sum_j p_j n_j``, ``k = min(C, d ceil(ceil(E) / d))`` (gradient dk/dE = 1),
    ``mask = rank < k``. ``E`` is computed in float64, as in the reference, so ``ceil`` agrees with it.

    Args:
        logits: ``(sum L_g,)`` float32 or float64 flat logits of all groups (``L_g = C_g / d_g``).
        ranks: ``(sum C_g,)`` int64 flat importance ranks; each group's a permutation of ``0..C_g-1``.
        layout: the group sizes (channels and granularities).
        tau: softmax temperature.
    Returns:
        :class:`Gates`: ``keep_probs (sum C_g,)``, ``hard_widths (G,)``, ``expected (G,)``, ``mask (sum C_g,)``.
    """
    if dispatch.choose("gates", logits.device, ("cpp",)) == "cpp":
        table = gate_layout_tensor(layout, logits.device)
        host_table = gate_layout_tensor(layout, torch.device("cpu"))
        return Gates(*torch.ops.s2hk.gates(logits, ranks, table, host_table, float(tau)))
    return gates_reference(logits, ranks, layout, tau)


# -------------------------------------------------------------------------------------------- decoupled KD


class DecoupledKD(NamedTuple):
    """Outputs of :func:`decoupled_kd` for soft logits ``s`` and hard logits ``h`` of shape ``(N, K)``."""

    loss_hard: Tensor  #: ``()`` G_h = alpha KL(softmax(s̄) ‖ softmax(h)): reaches ``h`` only
    loss_soft: Tensor  #: ``()`` G_s = alpha KL(softmax(s) ‖ softmax(h̄)): reaches ``s`` only
    grad_hard: Tensor  #: ``(N, K)`` dG_h/dh, detached
    grad_soft: Tensor  #: ``(N, K)`` dG_s/ds, detached


def batch_mean_kl(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``mean_n KL(softmax(p_n / T) ‖ softmax(q_n / T))`` of ``(N, K)`` logits (no T² factor), a 0-dim tensor."""
    log_p = torch.log_softmax(p_logits / temperature, dim=-1)
    log_q = torch.log_softmax(q_logits / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def decoupled_kd_reference(soft_logits: Tensor, hard_logits: Tensor, temperature: float = 1.0,
                           alpha: float = 1.0) -> DecoupledKD:
    """PyTorch reference of :func:`decoupled_kd`: the two KL terms with their detaches, gradients in closed form.

    With ``p = softmax(s/T)``, ``q = softmax(h/T)``, ``KL_n = sum_k p (log p - log q)`` and ``c = alpha / (N T)``:
    ``dG_h/dh = c (q - p)`` and ``dG_s/ds = c p (log p - log q - KL_n)``.
    """
    loss_hard = alpha * batch_mean_kl(soft_logits.detach(), hard_logits, temperature)
    loss_soft = alpha * batch_mean_kl(soft_logits, hard_logits.detach(), temperature)
    with torch.no_grad():
        log_p = torch.log_softmax(soft_logits / temperature, dim=-1)
        log_q = torch.log_softmax(hard_logits / temperature, dim=-1)
        p = log_p.exp()
        kl_rows = (p * (log_p - log_q)).sum(-1, keepdim=True)
        scale = alpha / (soft_logits.shape[0] * temperature)
        grad_hard = scale * (log_q.exp() - p)
        grad_soft = scale * p * (log_p - log_q - kl_rows)
    return DecoupledKD(loss_hard, loss_soft, grad_hard, grad_soft)


def decoupled_kd(soft_logits: Tensor, hard_logits: Tensor, temperature: float = 1.0,
                 alpha: float = 1.0) -> DecoupledKD:
    """S2HPruner's decoupled bidirectional distillation terms and their routed gradients, in one pass.

    ``G_h = alpha KL(softmax(s̄/T) ‖ softmax(h/T))`` trains the weights through the hard network;
    ``G_s = alpha KL(softmax(s/T) ‖ softmax(h̄/T))`` trains the masks through the soft network (batch-mean KL,
    no T² factor). Both have the same value; each loss backpropagates only into its own logits.

    Args:
        soft_logits: ``(N, K)`` soft-path logits ``s`` (float32/float64; 16-bit inputs are computed in float32).
        hard_logits: ``(N, K)`` hard-path logits ``h``, same dtype.
        temperature: ``T > 0``.
        alpha: weight of both terms.
    Returns:
        :class:`DecoupledKD`: ``loss_hard ()``, ``loss_soft ()``, ``grad_hard (N, K)``, ``grad_soft (N, K)``.
    """
    if soft_logits.dtype in (torch.float16, torch.bfloat16):
        # a KL of 16-bit log-probabilities can come out negative; every implementation computes in float32
        soft_logits, hard_logits = soft_logits.float(), hard_logits.float()
    if dispatch.choose("decoupled_kd", soft_logits.device, ("cpp",)) == "cpp":
        losses, grad_hard, grad_soft = torch.ops.s2hk.decoupled_kd(soft_logits.detach(), hard_logits.detach(),
                                                                   float(temperature), float(alpha))
        # Two autograd nodes, one per term: G_s's backward must never enter the hard network (not even with
        # zeros), and G_h's never the soft one.
        return DecoupledKD(_WithGradient.apply(losses[0], hard_logits, grad_hard),
                           _WithGradient.apply(losses[1], soft_logits, grad_soft), grad_hard, grad_soft)
    return decoupled_kd_reference(soft_logits, hard_logits, temperature, alpha)


class _WithGradient(torch.autograd.Function):
    """``value`` (a 0-dim tensor) as a function of ``x`` whose gradient ``d value / dx = grad`` is known."""

    @staticmethod
    def forward(ctx, value: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        (grad,) = ctx.saved_tensors
        return None, grad_value * grad, None


# -------------------------------------------------------------------------------------------- importance


class GroupImportance(NamedTuple):
    """Outputs of :func:`group_importance`, flat over all groups (``C = sum C_g``, groups in index order)."""

    importance: Tensor  #: ``(C,)`` mean filter L1 norms; float32 (float64 if a weight is float64)
    order: Tensor  #: ``(C,)`` int64: per group, its local channel indices, most important first
    ranks: Tensor  #: ``(C,)`` int64: per group, the rank of each local channel (``ranks[order[r]] = r``)


def _check_groups(weights: Sequence[Tensor], groups: Sequence[int]) -> int:
    if len(weights) == 0 or len(weights) != len(groups):
        raise ValueError(f"need one group index per weight and at least one weight; got {len(weights)} weights "
                         f"and {len(groups)} group indices")
    num_groups = max(groups) + 1
    if min(groups) < 0 or set(groups) != set(range(num_groups)):
        raise ValueError(f"group indices must cover 0..G-1 with no gap; got {sorted(set(groups))}")
    return num_groups


def group_importance_reference(weights: Sequence[Tensor], groups: Sequence[int]) -> GroupImportance:
    """PyTorch reference of :func:`group_importance` (float64 accumulation, ranks by
    :func:`s2hk.masks.ranks_from_importance`)."""
    num_groups = _check_groups(weights, groups)
    out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    importance, order, ranks = [], [], []
    for g in range(num_groups):
        norms = [w.detach().abs().reshape(w.shape[0], -1).sum(1, dtype=torch.float64)
                 for w, gw in zip(weights, groups) if gw == g]
        if len({n.numel() for n in norms}) != 1:
            raise ValueError(f"group {g} has layers with different output channel counts")
        score = torch.stack(norms).mean(0).to(out_dtype)
        o, r = ranks_from_importance(score)
        importance.append(score)
        order.append(o)
        ranks.append(r)
    return GroupImportance(torch.cat(importance), torch.cat(order), torch.cat(ranks))


def group_importance(weights: Sequence[Tensor], groups: Sequence[int]) -> GroupImportance:
    """Channel importance of every group, its importance-descending order and ranks, in one launch.

    The importance of channel ``c`` of group ``g`` is the mean, over the layers producing ``g``, of the L1 norm of
    the output filter ``weight[c]`` (accumulated in float64). Order and ranks: descending importance, ties to
    the lower channel index (NaN first), exactly as :func:`s2hk.masks.ranks_from_importance`.

    Args:
        weights: the producing layers' weights, each ``(C_out, ...)`` (float32/64/16, bfloat16; one device).
        groups: ``groups[l]`` is the group of ``weights[l]``; the indices cover ``0..G-1``, every layer of a
            group has the group's ``C_g`` output channels.
    Returns:
        :class:`GroupImportance`: ``importance``, ``order``, ``ranks``, each ``(sum C_g,)``, groups in index order.
    """
    _check_groups(weights, groups)
    weights = [w.detach() for w in weights]
    if dispatch.choose("group_importance", weights[0].device, ("cpp",)) == "cpp":
        return GroupImportance(*torch.ops.s2hk.group_importance(weights, [int(g) for g in groups]))
    return group_importance_reference(weights, groups)


# ------------------------------------------------------------- fake kernels and autograd of the C++ ops


def _register_extension_ops() -> None:
    """Fake kernels and autograd formulas of ``torch.ops.s2hk.*`` (called once, if s2hk._C is loaded)."""
    lib = torch.library

    @lib.register_fake("s2hk::gates")
    def _gates_fake(logits: Tensor, ranks: Tensor, layout: Tensor, host_layout: Tensor, tau: float):
        num_groups = layout.shape[0]
        widths = logits.new_empty((num_groups,), dtype=torch.float64)
        return (logits.new_empty(ranks.shape), widths, torch.empty_like(widths),
                logits.new_empty(ranks.shape, dtype=torch.float32))

    @lib.register_fake("s2hk::gates_backward")
    def _gates_backward_fake(grad_keep_probs, grad_hard_widths, grad_expected, logits, ranks, layout, host_layout,
                             tau):
        return torch.empty_like(logits)

    def _gates_setup_context(ctx, inputs, output) -> None:
        logits, ranks, layout, host_layout, tau = inputs
        ctx.save_for_backward(logits, ranks, layout, host_layout)
        ctx.tau = tau
        ctx.mark_non_differentiable(output[3])

    def _gates_backward(ctx, grad_keep_probs, grad_hard_widths, grad_expected, grad_mask):
        logits, ranks, layout, host_layout = ctx.saved_tensors
        grad_logits = torch.ops.s2hk.gates_backward(grad_keep_probs, grad_hard_widths, grad_expected, logits, ranks,
                                                    layout, host_layout, ctx.tau)
        return grad_logits, None, None, None, None

    lib.register_autograd("s2hk::gates", _gates_backward, setup_context=_gates_setup_context)

    @lib.register_fake("s2hk::decoupled_kd")
    def _decoupled_kd_fake(soft: Tensor, hard: Tensor, temperature: float, alpha: float):
        return soft.new_empty((2,)), torch.empty_like(hard), torch.empty_like(soft)

    # Not differentiable itself: s2hk.ops.decoupled_kd attaches each routed gradient to its own logits.
    lib.register_autograd("s2hk::decoupled_kd", _no_backward, setup_context=_no_gradient_outputs)

    @lib.register_fake("s2hk::group_importance")
    def _group_importance_fake(weights: Sequence[Tensor], groups: Sequence[int]):
        channels: dict = {}
        for w, g in zip(weights, groups):
            channels.setdefault(g, w.shape[0])
        total = sum(channels.values())
        out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        first = weights[0]
        return (first.new_empty((total,), dtype=out_dtype), first.new_empty((total,), dtype=torch.int64),
                first.new_empty((total,), dtype=torch.int64))

    # Not differentiable: registered so that weights requiring grad give outputs that do not.
    lib.register_autograd("s2hk::group_importance", _no_backward, setup_context=_no_gradient_outputs)


def _no_gradient_outputs(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output)


def _no_backward(ctx, *grads):
    raise RuntimeError("this s2hk op is not differentiable")

if dispatch.extension(warn=False) is not None and hasattr(torch.ops.s2hk, "gates"):
    _register_extension_ops()
