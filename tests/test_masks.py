"""s2hk.masks: the S2HPruner mask math of ALGORITHMS.md §1, checked against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from s2hk import masks
from s2hk.masks import (
    GateLayout,
    compute_gates,
    default_granularity,
    expected_width,
    hard_mask,
    keep_probs_by_block,
    max_init_logits,
    ranks_from_importance,
    soft_keep_probs,
    straight_through_hard_width,
)


def logits_for(probs: list[float], tau: float = 1.0) -> torch.Tensor:
    """Logits whose softmax(u / tau) is ``probs``."""
    return tau * torch.log(torch.tensor(probs, dtype=torch.float64))


def loop_keep_probs(probs: list[float], ranks: list[int], d: int) -> list[float]:
    """w of each physical channel: w_r = sum of p_j over the choices j (width n_j = j * d) with n_j > r."""
    out = []
    for r in ranks:
        out.append(sum(p for j, p in enumerate(probs, start=1) if j * d > r))
    return out


def loop_hard_width(e: float, d: int, channels: int) -> int:
    return min(channels, d * math.ceil(math.ceil(e) / d))


# --- granularity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, expected", [
    (64, 2),     # 32 choices of 2
    (960, 30),   # 32 choices of 30
    (88, 4),     # divisors of 88 up to 32: 1, 2, 4, 8, 11, 22 -> 22 choices of 4
    (16, 1),
    (7, 1),      # prime below 32: one channel per choice
    (1, 1),
    (33, 3),     # 33 = 3 * 11: 11 choices (33 choices would exceed 32)
    (576, 18),   # 576 = 18 * 32
    (37, 37),    # prime above 32: a single choice, the full width
])
def test_default_granularity(channels, expected):
    assert default_granularity(channels) == expected


def test_default_granularity_honours_max_choices():
    assert default_granularity(64, max_choices=8) == 8
    assert default_granularity(64, max_choices=64) == 1
    assert default_granularity(12, max_choices=5) == 3  # 4 choices: 5 does not divide 12


@pytest.mark.parametrize("channels, max_choices", [(0, 32), (-3, 32), (8, 0)])
def test_default_granularity_rejects_bad_arguments(channels, max_choices):
    with pytest.raises(ValueError):
        default_granularity(channels, max_choices)


# --- max-init ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, d, tau", [(64, 2, 1.0), (960, 30, 1.0), (88, 4, 1.0), (16, 1, 1.0),
                                              (12, 3, 0.5), (10, 5, 2.0)])
def test_max_init_logits_start_at_full_width(channels, d, tau):
    u = max_init_logits(channels, d, tau)
    L = channels // d
    assert u.shape == (L,) and u.dtype == torch.float32
    # every logit but the last is zero
    assert torch.count_nonzero(u[:-1]) == 0
    p = torch.softmax(u.double() / tau, dim=0)
    t = (channels - d) / channels
    assert p[-1].item() == pytest.approx(t, rel=1e-6)
    e = expected_width(u, d, tau).item()
    assert e == pytest.approx(channels - d / 2, rel=1e-6)
    k = straight_through_hard_width(expected_width(u, d, tau), d, channels)
    assert k.item() == channels


def test_max_init_single_choice_is_full_width():
    u = max_init_logits(5, 5)
    assert u.tolist() == [0.0]
    assert expected_width(u, 5).item() == 5.0


@pytest.mark.parametrize("channels, d", [(10, 3), (10, 0), (8, -2)])
def test_max_init_rejects_non_divisor(channels, d):
    with pytest.raises(ValueError, match="granularity"):
        max_init_logits(channels, d)


# --- soft keep-probabilities -------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3])
def test_soft_keep_probs_match_loop(d):
    L = 4
    channels = L * d
    probs = [0.1, 0.2, 0.3, 0.4]
    generator = torch.Generator().manual_seed(d)
    ranks = torch.randperm(channels, generator=generator)
    w = soft_keep_probs(logits_for(probs), ranks, d)
    expected = loop_keep_probs(probs, ranks.tolist(), d)
    assert w.tolist() == pytest.approx(expected, abs=1e-12)
    # the d most important channels are always kept
    assert torch.allclose(w[ranks < d], torch.ones(d, dtype=w.dtype), rtol=0, atol=1e-12)
    # keep-probabilities never increase with rank
    by_rank = w[torch.argsort(ranks)]
    assert torch.all(by_rank[1:] <= by_rank[:-1] + 1e-12)


def test_soft_keep_probs_hand_values():
    # C = 4, d = 2: ranks 0, 1 -> p1 + p2 = 1; ranks 2, 3 -> p2 = 0.75
    w = soft_keep_probs(logits_for([0.25, 0.75]), torch.tensor([3, 0, 2, 1]), 2)
    assert w.tolist() == pytest.approx([0.75, 1.0, 0.75, 1.0], abs=1e-12)


def test_soft_keep_probs_temperature():
    # softmax([0, log 3] / 0.5) = softmax([0, 2 log 3]) = [1/10, 9/10]
    u = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    w = soft_keep_probs(u, torch.tensor([0, 1]), 1, tau=0.5)
    assert w.tolist() == pytest.approx([1.0, 0.9], abs=1e-12)


def test_keep_probs_by_block_is_reverse_cumsum():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    expected = [[1.0, 0.9, 0.7, 0.4], [1.0, 0.6, 0.3, 0.1]]
    assert keep_probs_by_block(p).tolist() == [pytest.approx(row) for row in expected]


def test_soft_keep_probs_gradcheck():
    u = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ranks = torch.randperm(10)
    assert torch.autograd.gradcheck(lambda v: soft_keep_probs(v, ranks, 2, tau=0.7), (u,))


def test_soft_keep_probs_gradient_by_hand():
    # w_r = sum_{j > r//d} p_j ; dw_r/du_i = p_i (1[i >= b] - W_b) with b = r // d (tau = 1)
    probs = [0.1, 0.2, 0.3, 0.4]
    u = logits_for(probs).requires_grad_(True)
    ranks = torch.tensor([2, 0, 3, 1])
    w = soft_keep_probs(u, ranks, 1)
    (grad,) = torch.autograd.grad(w[0], u)  # channel 0 has rank 2 -> block 2, W = 0.7
    expected = [p * ((1.0 if i >= 2 else 0.0) - 0.7) for i, p in enumerate(probs)]
    assert grad.tolist() == pytest.approx(expected, abs=1e-12)


# --- expected and hard widths ------------------------------------------------------------------------


@pytest.mark.parametrize("probs, d, channels, e, k", [
    ([0.5, 0.25, 0.15, 0.1], 3, 12, 5.55, 6),     # ceil(5.55) = 6 -> 6
    ([0.05, 0.15, 0.5, 0.3], 3, 12, 9.15, 12),    # ceil -> 10, rounded up to a multiple of 3 -> 12
    ([0.6, 0.2, 0.1, 0.1], 3, 12, 5.1, 6),
    ([0.7, 0.2, 0.05, 0.05], 3, 12, 4.35, 6),     # ceil -> 5 -> 6
    ([0.9, 0.05, 0.05], 4, 12, 4.6, 8),           # ceil -> 5 -> 8
    ([0.3, 0.3, 0.4], 1, 3, 2.1, 3),
    ([0.5, 0.5], 1, 2, 1.5, 2),
    ([0.98, 0.02], 2, 4, 2.04, 4),
])
def test_expected_and_hard_width_hand_picked(probs, d, channels, e, k):
    u = logits_for(probs).float()  # the float64 accumulation must absorb float32 logits
    expected = expected_width(u, d)
    assert expected.dtype == torch.float64
    assert expected.item() == pytest.approx(e, abs=1e-5)
    assert loop_hard_width(e, d, channels) == k  # the table itself follows the formula
    assert straight_through_hard_width(expected, d, channels).item() == k


def test_hard_width_is_capped_at_channels():
    assert straight_through_hard_width(torch.tensor(12.0, dtype=torch.float64), 5, 12).item() == 12
    assert straight_through_hard_width(torch.tensor(11.2, dtype=torch.float64), 4, 12).item() == 12


def test_hard_width_uniform_logits_exact_integer():
    # uniform p over L = 4 choices of d = 2: E = 2 * 2.5 = 5 exactly -> k = 2 * ceil(5 / 2) = 6
    e = expected_width(torch.zeros(4), 2)
    assert e.item() == 5.0
    assert straight_through_hard_width(e, 2, 8).item() == 6


def test_hard_width_does_not_flip_on_rounding_noise():
    # uniform p over 5 choices of 7 channels: E = 7 * (1 + 2 + 3 + 4 + 5) / 5 = 21 exactly -> k = 21
    e = expected_width(torch.zeros(5), 7)
    assert straight_through_hard_width(e, 7, 35).item() == 21


def test_straight_through_gradient_equals_expected_width_gradient():
    u = torch.tensor([0.3, -0.2, 1.1, 0.4, -0.7], dtype=torch.float64, requires_grad=True)
    (grad_e,) = torch.autograd.grad(expected_width(u, 3, tau=0.8), u)
    k = straight_through_hard_width(expected_width(u, 3, tau=0.8), 3, 15)
    (grad_k,) = torch.autograd.grad(k, u)
    assert torch.allclose(grad_k, grad_e, atol=0, rtol=1e-12)
    # and dE/du_i = d/tau * p_i (i - sum_j p_j j), by hand
    p = torch.softmax(u.detach() / 0.8, 0)
    j = torch.arange(1, 6, dtype=torch.float64)
    assert torch.allclose(grad_e, 3 / 0.8 * p * (j - (p * j).sum()), rtol=1e-10)
    assert torch.count_nonzero(grad_k) == 5


# --- hard mask and ranks -----------------------------------------------------------------------------


def test_hard_mask():
    ranks = torch.tensor([4, 0, 3, 1, 2])
    assert hard_mask(ranks, 2).tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert hard_mask(ranks, 5).tolist() == [1.0] * 5
    assert hard_mask(ranks, torch.tensor(3)).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]


def test_ranks_from_importance_ties_go_to_lower_index():
    importance = torch.tensor([1.0, 3.0, 1.0, 3.0, 2.0, 1.0])
    order, ranks = ranks_from_importance(importance)
    assert order.tolist() == [1, 3, 4, 0, 2, 5]
    assert ranks.tolist() == [3, 0, 4, 1, 2, 5]


def test_ranks_from_importance_all_equal_is_identity():
    order, ranks = ranks_from_importance(torch.zeros(7))
    assert order.tolist() == list(range(7)) and ranks.tolist() == list(range(7))


def test_ranks_inverse_of_order():
    importance = torch.rand(50)
    order, ranks = ranks_from_importance(importance)
    assert torch.equal(order[ranks], torch.arange(50))
    assert torch.all(importance[order][1:] <= importance[order][:-1])


# --- batched gates -----------------------------------------------------------------------------------


def test_compute_gates_matches_per_group_hand_values():
    layout = GateLayout(channels=(4, 6, 3), granularities=(2, 3, 1))
    probs = [[0.25, 0.75], [0.9, 0.1], [0.2, 0.3, 0.5]]
    logits = torch.cat([logits_for(p) for p in probs]).float().requires_grad_(True)
    ranks_by_group = [[3, 0, 2, 1], [5, 4, 3, 2, 1, 0], [1, 2, 0]]
    ranks = torch.tensor(sum(ranks_by_group, []))
    keep, hard, expected = compute_gates(logits, ranks, layout)
    assert keep.dtype == torch.float32 and keep.shape == (13,)
    hand_keep = sum((loop_keep_probs(p, r, d) for p, r, d in zip(probs, ranks_by_group, (2, 3, 1))), [])
    assert keep.tolist() == pytest.approx(hand_keep, abs=1e-6)
    hand_e = [2 * 0.25 + 4 * 0.75, 3 * 0.9 + 6 * 0.1, 0.2 + 0.6 + 1.5]
    assert expected.tolist() == pytest.approx(hand_e, abs=1e-6)
    assert hard.tolist() == [4, 6, 3]   # 3.5 -> 4, 3.3 -> 4 -> 6, 2.3 -> 3
    # straight-through: the hard widths carry the expected widths' gradients
    (g_hard,) = torch.autograd.grad(hard.sum(), logits, retain_graph=True)
    (g_exp,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.allclose(g_hard, g_exp)


def test_compute_gates_equals_single_group_functions():
    layout = GateLayout(channels=(8, 12, 5), granularities=(2, 4, 1))
    logits = torch.randn(sum(layout.num_choices))
    ranks = torch.cat([torch.randperm(c) for c in layout.channels])
    keep, hard, expected = compute_gates(logits, ranks, layout, tau=1.3)
    lo, co = layout.logit_offsets, layout.channel_offsets
    for g, (c, d) in enumerate(zip(layout.channels, layout.granularities)):
        u, r = logits[lo[g]:lo[g + 1]], ranks[co[g]:co[g + 1]]
        assert torch.allclose(keep[co[g]:co[g + 1]], soft_keep_probs(u, r, d, 1.3))
        e = expected_width(u, d, 1.3)
        assert expected[g].item() == pytest.approx(e.item())
        assert hard[g].item() == loop_hard_width(e.item(), d, c)


def test_compute_gates_empty_layout():
    keep, hard, expected = compute_gates(torch.zeros(0), torch.zeros(0, dtype=torch.long), GateLayout((), ()))
    assert keep.numel() == hard.numel() == expected.numel() == 0


def test_gate_layout_offsets_and_validation():
    layout = GateLayout(channels=(4, 6, 3), granularities=(2, 3, 1))
    assert layout.num_groups == 3
    assert layout.num_choices == (2, 2, 3)
    assert layout.logit_offsets == (0, 2, 4, 7)
    assert layout.channel_offsets == (0, 4, 10, 13)
    with pytest.raises(ValueError):
        GateLayout(channels=(4, 6), granularities=(3, 3))
    with pytest.raises(ValueError):
        GateLayout(channels=(4,), granularities=(2, 2))


def test_module_exports():
    for name in masks.__all__:
        assert hasattr(masks, name)
