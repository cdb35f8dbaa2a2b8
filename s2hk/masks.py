"""S2HPruner's mask math (ALGORITHMS.md §1): the PyTorch reference every other implementation must match.

Notation for one channel group: ``C`` channels, granularity ``d`` (a divisor of C), ``L = C // d`` width
choices ``n_j = j * d`` for ``j = 1..L``; learnable logits ``u`` of shape ``(L,)``; temperature ``tau``.

- choice probabilities ``p = softmax(u / tau)``;
- soft keep-probability of the channel at importance rank ``r`` (0 = most important):
  ``w_r = sum_{j : n_j > r} p_j`` -- a reverse cumulative sum of ``p`` repeated over each block of ``d``
  ranks, so the ``d`` most important channels always have ``w = 1``;
- expected width ``E = sum_j p_j n_j`` (channels);
- hard width ``k = min(C, d * ceil(ceil(E) / d))`` with the straight-through gradient ``dk/dE = 1``;
- hard mask ``m_r = 1`` for ranks ``r < k``.

Ranks come from channel importance: the L1 norm of each output filter, averaged over the group's producing
layers, descending; ties are broken by channel index so the order is deterministic.

The batched functions (:func:`compute_gates`, :func:`group_ranks`) take every group at once through flat
buffers with offsets; they are what the C++/CUDA extension implements in one launch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "default_granularity",
    "max_init_logits",
    "keep_probs_by_block",
    "soft_keep_probs",
    "expected_width",
    "straight_through_hard_width",
    "hard_mask",
    "ranks_from_importance",
    "GateLayout",
    "compute_gates",
]


def default_granularity(channels: int, max_choices: int = 32) -> int:
    """The granularity ``d`` giving the most width choices ``L = C / d`` not above ``max_choices``."""
    if channels < 1:
        raise ValueError(f"a channel group needs at least one channel, got {channels}")
    if max_choices < 1:
        raise ValueError(f"max_choices must be >= 1, got {max_choices}")
    choices = max(n for n in range(1, min(channels, max_choices) + 1) if channels % n == 0)
    return channels // choices


def max_init_logits(channels: int, granularity: int, tau: float = 1.0) -> Tensor:
    """Logits that start the group at full width ("max-init"), shape ``(L,)``, float32.

    ``u = 0`` except ``u_L = tau * log((L - 1) t / (1 - t))`` with ``t = (C - d) / C``, which makes
    ``p_L = t`` and the expected width ``C - d / 2``, so the hard width rounds up to ``C``.
    """
    _check_granularity(channels, granularity)
    num_choices = channels // granularity
    logits = torch.zeros(num_choices, dtype=torch.float32)
    if num_choices > 1:
        t = (channels - granularity) / channels
        logits[-1] = tau * math.log((num_choices - 1) * t / (1.0 - t))
    return logits


def keep_probs_by_block(probs: Tensor) -> Tensor:
    """``W_b = sum_{j >= b} p_j`` for each block ``b`` of ``d`` ranks: shape ``(..., L)`` -> ``(..., L)``."""
    return probs.flip(-1).cumsum(-1).flip(-1)


def soft_keep_probs(logits: Tensor, ranks: Tensor, granularity: int, tau: float = 1.0) -> Tensor:
    """Per-channel keep-probability ``w`` of one group, in physical channel order.

    Args:
        logits: ``(L,)`` width-choice logits ``u``.
        ranks: ``(C,)`` int64, the importance rank of each physical channel (0 = most important).
        granularity: ``d``.
        tau: softmax temperature.
    Returns:
        ``(C,)`` keep-probabilities in ``[0, 1]``, differentiable with respect to ``logits``.
    """
    probs = torch.softmax(logits / tau, dim=-1)
    return keep_probs_by_block(probs)[ranks // granularity]


def expected_width(logits: Tensor, granularity: int, tau: float = 1.0) -> Tensor:
    """``E = sum_j softmax(u / tau)_j * j * d`` (channels), a 0-dim tensor in float64.

    Accumulated in float64 so that ``ceil(E)`` does not flip at an integer because of rounding noise.
    """
    probs = torch.softmax(logits.double() / tau, dim=-1)
    widths = granularity * torch.arange(1, probs.shape[-1] + 1, dtype=torch.float64, device=probs.device)
    return (probs * widths).sum(-1)


WIDTH_ROUNDING_SLACK = 1e-6
"""Channels by which ``E`` may exceed an integer and still round to it: float64 sums of ``p_j n_j`` carry
noise of ~1e-12 (e.g. uniform logits over 5 choices of 7 give 21.000000000000004, not 21), which ``ceil``
would otherwise turn into a whole extra granularity step."""


def straight_through_hard_width(expected: Tensor, granularity: int, channels: int) -> Tensor:
    """``k = min(C, d * ceil(ceil(E) / d))`` in value, with gradient ``dk/dE = 1`` (straight-through).

    ``ceil`` is taken of ``E - WIDTH_ROUNDING_SLACK`` so rounding noise never adds a granularity step."""
    whole = torch.ceil(expected.detach() - WIDTH_ROUNDING_SLACK)
    hard = torch.clamp(granularity * torch.ceil(whole / granularity), max=channels)
    return hard + (expected - expected.detach())


def hard_mask(ranks: Tensor, width: int | Tensor) -> Tensor:
    """Binary mask ``m`` in physical channel order: 1 for the ``width`` most important channels."""
    return (ranks < width).to(torch.float32)


def ranks_from_importance(importance: Tensor) -> tuple[Tensor, Tensor]:
    """Importance-descending order and the rank of each channel; ties go to the lower channel index.

    Args:
        importance: ``(C,)`` non-negative scores.
    Returns:
        ``order`` ``(C,)``: channel indices, most important first; ``ranks`` ``(C,)``: ``ranks[order[r]] = r``.
    """
    order = torch.sort(importance, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return order, ranks


def _check_granularity(channels: int, granularity: int) -> None:
    if granularity < 1 or channels % granularity:
        raise ValueError(f"granularity {granularity} must be a positive divisor of the channel count {channels}")


@dataclass(frozen=True)
class GateLayout:
    """Where each prunable group lives in the flat buffers of :func:`compute_gates`.

    Group ``g`` owns ``logits[logit_offsets[g]:logit_offsets[g+1]]`` (its ``L_g`` choices) and
    ``ranks[channel_offsets[g]:channel_offsets[g+1]]`` (its ``C_g`` channels).
    """

    channels: tuple[int, ...]
    granularities: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.granularities):
            raise ValueError("channels and granularities must have one entry per group")
        for c, d in zip(self.channels, self.granularities):
            _check_granularity(c, d)

    @property
    def num_groups(self) -> int:
        return len(self.channels)

    @property
    def num_choices(self) -> tuple[int, ...]:
        return tuple(c // d for c, d in zip(self.channels, self.granularities))

    @property
    def logit_offsets(self) -> tuple[int, ...]:
        return _offsets(self.num_choices)

    @property
    def channel_offsets(self) -> tuple[int, ...]:
        return _offsets(self.channels)


def _offsets(sizes: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return tuple(out)


def compute_gates(logits: Tensor, ranks: Tensor, layout: GateLayout, tau: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Soft keep-probabilities and straight-through hard widths of every group at once (reference).

    Args:
        logits: ``(sum L_g,)`` flat logits of all groups.
        ranks: ``(sum C_g,)`` int64 flat per-channel importance ranks (each group's ranks are 0..C_g-1).
        layout: the group sizes.
        tau: softmax temperature.
    Returns:
        ``keep_probs`` ``(sum C_g,)`` float32 (the soft gates ``w``), ``hard_widths`` ``(G,)`` float64 whose
        values are the hard widths ``k_g`` and whose gradient is that of the expected widths (straight-through),
        and ``expected`` ``(G,)`` float64, the expected widths ``E_g``.
    """
    lo, co = layout.logit_offsets, layout.channel_offsets
    keep, hard, expected = [], [], []
    for g, (channels, d) in enumerate(zip(layout.channels, layout.granularities)):
        u = logits[lo[g]:lo[g + 1]]
        keep.append(soft_keep_probs(u, ranks[co[g]:co[g + 1]], d, tau))
        e = expected_width(u, d, tau)
        expected.append(e)
        hard.append(straight_through_hard_width(e, d, channels))
    if not keep:
        empty = logits.new_zeros(0)
        return empty, empty.double(), empty.double()
    return torch.cat(keep), torch.stack(hard), torch.stack(expected)
