"""s2hk.engine.TwoPathNetwork: soft, hard and dense paths against hand-written forwards."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import TwoPathNetwork, models
from s2hk.layers import GatedNorm
from helpers import ResidualNet, randomise_norms


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> global mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class Flat(nn.Module):
    """conv -> BN -> ReLU -> flatten (4 channels x 4x4) -> fc1 -> ReLU -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(64, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.flatten(F.relu(self.bn(self.conv(x))), 1)
        return self.fc2(F.relu(self.fc1(x)))


class Residual(ResidualNet):
    def __init__(self) -> None:
        super().__init__(width=6, inner=5, num_classes=2)


class Concat(nn.Module):
    """Two branches concatenated along channels into one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bna = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bnb = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(10, 2, 3, padding=1)

    def forward(self, x):
        y = torch.cat([F.relu(self.bna(self.a(x))), F.relu(self.bnb(self.b(x)))], dim=1)
        return self.head(y).mean((2, 3))


class SqueezeExcite(nn.Module):
    """stem -> BN -> ReLU -> x * sigmoid(fc2(relu(fc1(mean(x))))) -> conv -> BN -> mean -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.conv, self.bn2 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.fc(self.bn2(self.conv(x * s)).mean((2, 3)))


def make(cls, x, **kwargs) -> TwoPathNetwork:
    torch.manual_seed(1)
    return TwoPathNetwork(randomise_norms(cls()), x, **kwargs)


def bn(x, m: nn.BatchNorm2d, idx=None, mean=None, var=None):
    """Eval-mode BatchNorm on channels ``idx`` (all when None), with the given statistics."""
    idx = torch.arange(m.num_features) if idx is None else torch.as_tensor(idx)
    mean = (m.running_mean if mean is None else mean)[idx]
    var = (m.running_var if var is None else var)[idx]
    return (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + m.eps) * m.weight[idx, None, None] \
        + m.bias[idx, None, None]


def l1_order(*weights: torch.Tensor) -> list[int]:
    """Channels sorted by mean filter L1 norm over the given producers, descending, ties to the lower index."""
    importance = sum(w.detach().abs().flatten(1).sum(1) for w in weights) / len(weights)
    return sorted(range(importance.numel()), key=lambda c: (-importance[c].item(), c))


def slot_of(net: TwoPathNetwork, name: str) -> int:
    """Position of a prunable group in the flat mask buffers."""
    return [g.name for g in net.prunable].index(name)


X = torch.randn(3, 3, 8, 8)


# --- soft path ---------------------------------------------------------------------------------------


def force_full_width(net: TwoPathNetwork) -> None:
    """Logits with p_L = 1 (to float precision): every keep-probability is 1."""
    with torch.no_grad():
        for slot in range(len(net.prunable)):
            u = net.group_logits(slot)
            u.zero_()
            u[-1] = 60.0


@pytest.mark.parametrize("cls", [Tiny, Flat, Residual, Concat, SqueezeExcite])
@pytest.mark.parametrize("train", [False, True])
def test_soft_path_at_full_keep_probability_equals_dense(cls, train):
    net = make(cls, X)
    force_full_width(net)
    keep, _ = net.gates()
    assert torch.allclose(keep, torch.ones_like(keep))
    net.train(train)
    with torch.no_grad():
        dense = net(X, path="dense")
        soft = net(X, path="soft")
    assert torch.allclose(soft, dense, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet56", "mobilenet_v3_small"])
def test_shipped_soft_path_at_full_keep_probability_equals_dense(name):
    torch.manual_seed(0)
    model = randomise_norms(models.get_model(name)).eval()
    x = torch.randn(2, 3, 16, 16)
    net = TwoPathNetwork(model, x[:1])
    with torch.no_grad():
        dense = net(x, path="dense")
        reference = model(x)
        soft_at_init = net(x, path="soft")
        force_full_width(net)
        soft = net(x, path="soft")
    assert torch.allclose(dense, reference, atol=1e-6)
    assert torch.allclose(soft, dense, rtol=1e-4, atol=1e-6)
    # at max-init the keep-probabilities are below one: the soft path is not the dense one
    assert not torch.allclose(soft_at_init, dense, rtol=1e-4, atol=1e-6)


def hand_keep_probs(logits: torch.Tensor, order: list[int], d: int = 1) -> torch.Tensor:
    """w of each physical channel: w_r = sum_{j: j d > r} p_j, r the channel's position in ``order``."""
    p = torch.softmax(logits.detach().double(), 0).tolist()
    w = torch.zeros(len(order), dtype=torch.float64)
    for r, c in enumerate(order):
        w[c] = sum(pj for j, pj in enumerate(p, start=1) if j * d > r)
    return w.float()


@pytest.mark.parametrize("train", [False, True])
def test_soft_path_tiny_by_hand(train):
    net = make(Tiny, X, granularity=1)
    with torch.no_grad():
        net.mask_logits.copy_(torch.tensor([0.3, -1.0, 0.5, 0.2]))
    model = net.model
    order = l1_order(model.conv.weight)
    assert net.group_ranks(0).tolist() == [order.index(c) for c in range(4)]
    w = hand_keep_probs(net.mask_logits, order)
    assert w[order[0]] == pytest.approx(1.0) and w.min() < 0.5
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    net.train(train)
    out = net(X, path="soft")
    with torch.no_grad():
        h = F.conv2d(X, model.conv.weight, padding=1)
        if train:
            h = F.batch_norm(h, None, None, model.bn.weight, model.bn.bias, True, 0.0, model.bn.eps)
        else:
            h = bn(h, model.bn, mean=stats[0], var=stats[1])
        # the gate multiplies after the BN (and before the ReLU, equal to after it as w >= 0)
        expected = model.fc(F.relu(h * w[:, None, None]).mean((2, 3)))
    assert torch.allclose(out, expected, atol=1e-5)
    # the soft path's task loss reaches the mask logits
    out.sum().backward()
    assert net.mask_logits.grad is not None and net.mask_logits.grad.abs().sum() > 0


def test_soft_path_flat_gates_linear_output():
    # fc1 has no norm: its output is gated directly; the flattened conv channels carry the BN gate
    net = make(Flat, X, granularity=1)
    with torch.no_grad():
        net.mask_logits.uniform_(-1.0, 1.0)
    net.eval()
    m = net.model
    w_conv = hand_keep_probs(net.group_logits(slot_of(net, "conv")), l1_order(m.conv.weight))
    w_fc1 = hand_keep_probs(net.group_logits(slot_of(net, "fc1")), l1_order(m.fc1.weight))
    with torch.no_grad():
        h = F.relu(bn(m.conv(X), m.bn) * w_conv[:, None, None])
        h = F.relu(m.fc1(h.flatten(1)) * w_fc1)
        expected = m.fc2(h)
        out = net(X, path="soft")
    assert torch.allclose(out, expected, atol=1e-5)


def test_soft_path_squeeze_excite_gates_once():
    # the features carry w at their BN; the excitation (same channels) must not multiply it in again
    net = make(SqueezeExcite, X, granularity=1)
    with torch.no_grad():
        net.mask_logits.uniform_(-1.0, 1.0)
    net.eval()
    m = net.model
    w_stem = hand_keep_probs(net.group_logits(slot_of(net, "stem")), l1_order(m.stem.weight, m.fc2.weight))
    w_fc1 = hand_keep_probs(net.group_logits(slot_of(net, "fc1")), l1_order(m.fc1.weight))
    w_conv = hand_keep_probs(net.group_logits(slot_of(net, "conv")), l1_order(m.conv.weight))
    with torch.no_grad():
        x = F.relu(bn(m.stem(X), m.bn) * w_stem[:, None, None])
        s = torch.sigmoid(m.fc2(F.relu(m.fc1(x.mean((2, 3), keepdim=True)) * w_fc1[:, None, None])))
        expected = m.fc((bn(m.conv(x * s), m.bn2) * w_conv[:, None, None]).mean((2, 3)))
        assert torch.allclose(net(X, path="soft"), expected, atol=1e-5)


def test_soft_path_concat():
    net = make(Concat, X, granularity=1)
    with torch.no_grad():
        net.mask_logits.uniform_(-1.0, 1.0)
    net.eval()
    m = net.model
    w_a = hand_keep_probs(net.group_logits(slot_of(net, "a")), l1_order(m.a.weight))
    w_b = hand_keep_probs(net.group_logits(slot_of(net, "b")), l1_order(m.b.weight))
    with torch.no_grad():
        y = torch.cat([F.relu(bn(m.a(X), m.bna)) * w_a[:, None, None],
                       F.relu(bn(m.b(X), m.bnb)) * w_b[:, None, None]], 1)
        assert torch.allclose(net(X, path="soft"), m.head(y).mean((2, 3)), atol=1e-5)


def test_soft_path_resnet_equals_dense_with_scaled_norms():
    # every gate of a ResNet sits at a BN: scaling each BN's affine parameters by its group's w is the same net
    torch.manual_seed(0)
    model = randomise_norms(models.resnet56()).eval()
    x = torch.randn(2, 3, 8, 8)
    net = TwoPathNetwork(model, x[:1])
    with torch.no_grad():
        net.mask_logits.uniform_(-1.0, 1.0)
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for slot, g in enumerate(net.prunable):
        ranks = net.group_ranks(slot).tolist()
        order = sorted(range(g.channels), key=lambda c: ranks[c])
        w = hand_keep_probs(net.group_logits(slot), order, net.gate_layout.granularities[slot])
        for name in g.members:
            with torch.no_grad():
                modules[name].weight.mul_(w)
                modules[name].bias.mul_(w)
    with torch.no_grad():
        assert torch.allclose(net(x, path="soft"), reference(x), rtol=1e-4, atol=1e-5)


def test_importance_is_group_mean_l1():
    net = make(Residual, X, granularity=1)
    m = net.model
    slot = slot_of(net, "stem")
    order = l1_order(m.stem.weight, m.conv2.weight)
    assert net.group_ranks(slot).tolist() == [order.index(c) for c in range(6)]
    # frozen importance keeps the first ranking after the weights change
    frozen = make(Residual, X, granularity=1, importance="frozen")
    before = frozen.ranks.clone()
    with torch.no_grad():
        frozen.model.stem.weight.mul_(torch.linspace(0.1, 3.0, 6)[:, None, None, None])
        frozen.model.conv2.weight.mul_(torch.linspace(0.1, 3.0, 6)[:, None, None, None])
    frozen.refresh_plan()
    assert torch.equal(frozen.ranks, before)
    net.model.stem.weight.data.mul_(torch.linspace(0.1, 3.0, 6)[:, None, None, None] ** 8)
    net.refresh_plan()
    assert net.group_ranks(slot).tolist() == [5, 4, 3, 2, 1, 0]


# --- hard path ---------------------------------------------------------------------------------------


def tiny_narrow(m: Tiny, keep: list[int], x, stats=None):
    mean, var = stats if stats is not None else (None, None)
    h = F.conv2d(x, m.conv.weight[keep], padding=1)
    h = F.relu(bn(h, m.bn, keep, mean, var))
    return F.linear(h.mean((2, 3)), m.fc.weight[:, keep], m.fc.bias)


def test_hard_path_pinned_width_keeps_most_important_channels():
    net = make(Tiny, X).eval()
    order = l1_order(net.model.conv.weight)
    for k in (1, 2, 3):
        net.set_hard_widths({"conv": k})
        assert net.hard_widths() == {"conv": k}
        keep = sorted(order[:k])
        with torch.no_grad():
            assert torch.allclose(net(X, path="hard"), tiny_narrow(net.model, keep, X), atol=1e-5)


@pytest.mark.parametrize("channels", [[0, 1], [0, 1, 2], [3, 1], [2], [0, 3], [1, 2, 3]])
def test_hard_path_explicit_channels(channels):
    net = make(Tiny, X).eval()
    net.set_hard_widths({"conv": channels})
    keep = sorted(channels)
    sel = net.plan.selections[0]
    # a prefix becomes a width (sliced as a view); anything else stays an index list
    if keep == list(range(len(keep))):
        assert sel == len(keep)
    else:
        assert sel.tolist() == keep
    with torch.no_grad():
        assert torch.allclose(net(X, path="hard"), tiny_narrow(net.model, keep, X), atol=1e-5)


def test_hard_path_flatten_selects_whole_channel_blocks():
    net = make(Flat, X).eval()
    conv_keep, fc1_keep = [1, 3], [0, 2, 4]
    net.set_hard_widths({"conv": conv_keep, "fc1": fc1_keep})
    m = net.model
    features = [c * 16 + i for c in conv_keep for i in range(16)]
    with torch.no_grad():
        h = F.conv2d(X, m.conv.weight[conv_keep], m.conv.bias[conv_keep], stride=2, padding=1)
        h = F.relu(bn(h, m.bn, conv_keep)).flatten(1)
        h = F.relu(F.linear(h, m.fc1.weight[fc1_keep][:, features], m.fc1.bias[fc1_keep]))
        expected = F.linear(h, m.fc2.weight[:, fc1_keep], m.fc2.bias)
        assert torch.allclose(net(X, path="hard"), expected, atol=1e-5)
    # the prefix case of the same network
    net.set_hard_widths({"conv": [0, 1], "fc1": 2})
    fc1_top = sorted(l1_order(m.fc1.weight)[:2])
    with torch.no_grad():
        h = F.conv2d(X, m.conv.weight[:2], m.conv.bias[:2], stride=2, padding=1)
        h = F.relu(bn(h, m.bn, [0, 1])).flatten(1)
        h = F.relu(F.linear(h, m.fc1.weight[fc1_top][:, :32], m.fc1.bias[fc1_top]))
        expected = F.linear(h, m.fc2.weight[:, fc1_top], m.fc2.bias)
        assert torch.allclose(net(X, path="hard"), expected, atol=1e-5)


@pytest.mark.parametrize("outer, inner", [([0, 2, 5], [1, 4]), ([0, 1, 2, 3], [0, 1, 2]), ([5], [3])])
def test_hard_path_residual(outer, inner):
    net = make(Residual, X).eval()
    net.set_hard_widths({"stem": outer, "conv1": inner})
    m = net.model
    with torch.no_grad():
        x = F.relu(bn(F.conv2d(X, m.stem.weight[outer], padding=1), m.bn0, outer))
        h = F.relu(bn(F.conv2d(x, m.conv1.weight[inner][:, outer], padding=1), m.bn1, inner))
        h = bn(F.conv2d(h, m.conv2.weight[outer][:, inner], padding=1), m.bn2, outer)
        expected = F.linear(F.relu(h + x).mean((2, 3)), m.fc.weight[:, outer], m.fc.bias)
        assert torch.allclose(net(X, path="hard"), expected, atol=1e-5)


@pytest.mark.parametrize("keep_a, keep_b", [([1, 3], [0, 1]), ([0, 1, 2], [5, 2, 4]), ([2], 2)])
def test_hard_path_concat(keep_a, keep_b):
    net = make(Concat, X).eval()
    net.set_hard_widths({"a": keep_a, "b": keep_b})
    m = net.model
    a = sorted(keep_a)
    b = sorted(l1_order(m.b.weight)[:keep_b]) if isinstance(keep_b, int) else sorted(keep_b)
    with torch.no_grad():
        ya = F.relu(bn(F.conv2d(X, m.a.weight[a]), m.bna, a))
        yb = F.relu(bn(F.conv2d(X, m.b.weight[b], padding=1), m.bnb, b))
        head_in = a + [4 + c for c in b]       # the second part starts after a's 4 channels
        out = F.conv2d(torch.cat([ya, yb], 1), m.head.weight[:, head_in], m.head.bias, padding=1)
        assert torch.allclose(net(X, path="hard"), out.mean((2, 3)), atol=1e-5)


def test_hard_path_squeeze_excite():
    net = make(SqueezeExcite, X).eval()
    keep, squeeze, inner = [0, 2, 5, 7], [1, 3], [0, 4, 5]
    net.set_hard_widths({"stem": keep, "fc1": squeeze, "conv": inner})
    m = net.model
    with torch.no_grad():
        x = F.relu(bn(F.conv2d(X, m.stem.weight[keep], padding=1), m.bn, keep))
        h = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), m.fc1.weight[squeeze][:, keep], m.fc1.bias[squeeze]))
        s = torch.sigmoid(F.conv2d(h, m.fc2.weight[keep][:, squeeze], m.fc2.bias[keep]))
        y = bn(F.conv2d(x * s, m.conv.weight[inner][:, keep]), m.bn2, inner).mean((2, 3))
        expected = F.linear(y, m.fc.weight[:, inner], m.fc.bias)
        assert torch.allclose(net(X, path="hard"), expected, atol=1e-5)


def test_full_width_hard_path_equals_dense():
    net = make(Residual, X).eval()   # max-init: every hard width is full
    assert net.hard_widths() == {"stem": 6, "conv1": 5}
    assert all(sel is None for sel in net.plan.selections)
    with torch.no_grad():
        assert torch.allclose(net(X, path="hard"), net(X, path="dense"), atol=1e-6)


def test_hard_path_does_not_reach_mask_logits():
    net = make(Tiny, X)
    net.set_hard_widths({"conv": 2})
    out = net(X, path="hard")
    out.sum().backward()
    assert net.mask_logits.grad is None or torch.count_nonzero(net.mask_logits.grad) == 0
    assert net.model.conv.weight.grad is not None


def test_plan_follows_logits():
    net = make(Tiny, X, granularity=1)
    with torch.no_grad():  # p concentrated on width 2 -> E just above 2 -> k = 3
        net.mask_logits.copy_(torch.tensor([-20.0, 5.0, 0.0, -20.0]))
    net.refresh_plan()
    assert net.hard_widths() == {"conv": 3}
    keep = sorted(l1_order(net.model.conv.weight)[:3])
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(X, path="hard"), tiny_narrow(net.model, keep, X), atol=1e-5)
    # unpinning returns to the logits' widths
    net.set_hard_widths({"conv": 1})
    net.set_hard_widths(None)
    assert net.hard_widths() == {"conv": 3}


def test_a_loaded_ranking_is_kept_by_the_next_plan_refresh_only():
    """load_state_dict plans from the loaded ranks, not from a ranking of the loaded weights (which differ after
    steps that train the weights without refreshing the plan: warm-up); the refresh after it re-ranks."""
    def kept(n: TwoPathNetwork) -> list[int]:
        sel = n.plan.selections[0]
        return list(range(sel)) if isinstance(sel, int) else sel.tolist()

    net = make(Tiny, X, granularity=1)
    with torch.no_grad():  # width 3 of 4, the least important channel out
        net.mask_logits.copy_(torch.tensor([-20.0, 5.0, 0.0, -20.0]))
        net.refresh_plan()
        net.model.conv.weight.copy_(net.model.conv.weight.flip(0))  # reverses the ranking, no refresh
    least = l1_order(net.model.conv.weight)[-1]
    assert least in kept(net)
    fresh = make(Tiny, X, granularity=1)
    fresh.load_state_dict(copy.deepcopy(net.state_dict()))
    assert torch.equal(fresh.ranks, net.ranks) and kept(fresh) == kept(net)
    fresh.refresh_plan()
    assert least not in kept(fresh) and not torch.equal(fresh.ranks, net.ranks)


def test_pinned_widths_are_constant_in_gates():
    net = make(Residual, X, granularity=1)
    net.set_hard_widths({"stem": 2})
    _, widths = net.gates()
    group = net.group("stem")
    assert widths[group.index].item() == 2
    widths.sum().backward()
    grad, lo = net.mask_logits.grad, net.gate_layout.logit_offsets
    pinned, free = slot_of(net, "stem"), slot_of(net, "conv1")
    assert torch.count_nonzero(grad[lo[pinned]:lo[pinned + 1]]) == 0
    assert torch.count_nonzero(grad[lo[free]:lo[free + 1]]) > 0


# --- BatchNorm statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [[0, 1], [1, 3]])
def test_hard_path_keeps_its_own_running_statistics(keep):
    net = make(Tiny, X)
    m = net.model
    wrapper = next(w for w in net.wrappers.values() if isinstance(w, GatedNorm))
    mean0, var0 = m.bn.running_mean.clone(), m.bn.running_var.clone()
    # both paths start from the model's statistics
    assert torch.equal(wrapper.hard_running_mean, mean0)
    net.set_hard_widths({"conv": keep})
    net.train()
    x_soft, x_hard = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 2 + 1
    with torch.no_grad():
        net(x_soft, path="soft")
        soft_mean, soft_var = m.bn.running_mean.clone(), m.bn.running_var.clone()
        net(x_hard, path="hard")
    # the hard forward left the model's (soft/dense) statistics alone
    assert torch.equal(m.bn.running_mean, soft_mean) and torch.equal(m.bn.running_var, soft_var)
    with torch.no_grad():
        h_soft = F.conv2d(x_soft, m.conv.weight, padding=1)
        h_hard = F.conv2d(x_hard, m.conv.weight[keep], padding=1)
    # momentum 0.1 updates, by hand (unbiased variance for the running estimate)
    assert torch.allclose(soft_mean, 0.9 * mean0 + 0.1 * h_soft.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(soft_var, 0.9 * var0 + 0.1 * h_soft.var((0, 2, 3), unbiased=True), atol=1e-5)
    hard_mean, hard_var = mean0.clone(), var0.clone()
    hard_mean[keep] = 0.9 * mean0[keep] + 0.1 * h_hard.mean((0, 2, 3))
    hard_var[keep] = 0.9 * var0[keep] + 0.1 * h_hard.var((0, 2, 3), unbiased=True)
    assert torch.allclose(wrapper.hard_running_mean, hard_mean, atol=1e-6)
    assert torch.allclose(wrapper.hard_running_var, hard_var, atol=1e-5)
    assert not torch.allclose(wrapper.hard_running_mean, m.bn.running_mean)
    assert wrapper.hard_num_batches_tracked.item() == 1 and m.bn.num_batches_tracked.item() == 1
    # eval: the hard path normalises with its own statistics
    net.eval()
    with torch.no_grad():
        expected = tiny_narrow(m, keep, X, stats=(wrapper.hard_running_mean, wrapper.hard_running_var))
        assert torch.allclose(net(X, path="hard"), expected, atol=1e-5)


# --- pinning errors ----------------------------------------------------------------------------------


def test_set_hard_widths_errors():
    net = make(Residual, X)
    with pytest.raises(ValueError, match="frozen"):
        net.set_hard_widths({"fc": 1})
    with pytest.raises(KeyError, match="no channel group named 'nope'"):
        net.set_hard_widths({"nope": 1})
    for bad in (0, 7, -1):
        with pytest.raises(ValueError, match=r"outside 1\.\.6"):
            net.set_hard_widths({"stem": bad})
    for bad in ([1, 1], [0, 6], [-1, 2], []):
        with pytest.raises(ValueError, match="distinct indices in 0..5"):
            net.set_hard_widths({"stem": bad})
    # a failed call leaves the plan as it was
    assert net.hard_widths() == {"stem": 6, "conv1": 5}


def test_forward_rejects_unknown_path():
    net = make(Tiny, X)
    with pytest.raises(ValueError, match="path"):
        net(X, path="medium")


def test_parameters_are_shared_with_the_model():
    net = make(Tiny, X)
    ids = {id(p) for p in net.weight_parameters()}
    assert ids == {id(p) for p in net.model.parameters()}
    assert all(id(p) not in ids for p in net.mask_parameters())
    # one prunable group of C = 4 channels, d = 1: four width choices
    assert [g.name for g in net.prunable] == ["conv"] and net.mask_logits.shape == (4,)


def test_pinned_channel_lists_are_classified_once_as_prefix_or_gather():
    net = TwoPathNetwork(models.resnet56(), torch.randn(1, 3, 16, 16))
    first, second = net.prunable[0], net.prunable[1]
    net.set_hard_widths({first.name: [0, 1, 2], second.name: [1, 2, 3]})
    slots = {g.name: i for i, g in enumerate(net.prunable)}
    assert net.plan.selections[slots[first.name]] == 3                 # a prefix: a narrow view, no gather
    assert net.plan.selections[slots[second.name]].tolist() == [1, 2, 3]
    net.set_hard_widths({second.name: [0, 1]})                         # other pins are kept
    assert net.plan.selections[slots[first.name]] == 3
    assert net.plan.selections[slots[second.name]] == 2
