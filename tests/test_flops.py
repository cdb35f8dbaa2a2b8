"""s2hk.flops: count_flops against hand counts and torch's FlopCounterMode; the FLOPs polynomial."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from s2hk import TwoPathNetwork, count_flops, count_macs, models


def reference_flops(module: nn.Module, inputs) -> int:
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


# --- count_flops -------------------------------------------------------------------------------------


def test_conv_and_linear_by_hand():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)               # 8x8 output
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # 4x4 output
            self.grouped = nn.Conv2d(8, 6, 1, groups=2)
            self.fc = nn.Linear(6 * 16, 5)

        def forward(self, x):
            x = F.relu(self.conv(x))
            x = self.grouped(self.dw(x))
            return self.fc(x.flatten(1))

    x = torch.randn(2, 3, 8, 8)
    macs = 2 * (8 * 64 * 3 * 9       # conv: out positions x in channels x kernel
                + 8 * 16 * 9         # depthwise: one input channel per output
                + 6 * 16 * 4         # 1x1 grouped: 4 input channels per group
                + 5 * 96)            # linear
    assert count_macs(Net(), x) == macs
    assert count_flops(Net(), x) == 2 * macs
    assert count_flops(Net(), x) == reference_flops(Net(), x)


def test_transposed_and_1d_convolutions():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)  # 5x5 -> 10x10
            self.up_grouped = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)            # 10x10 -> 20x20
            self.seq = nn.Conv1d(4, 3, 5, padding=2)

        def forward(self, x):
            y = self.up_grouped(self.up(x))
            return self.seq(y.flatten(2)).sum()

    x = torch.randn(2, 4, 5, 5)
    # a transposed conv scatters every input position to out/groups channels x kernel positions
    macs = 2 * 25 * 4 * 6 * 9 + 2 * 100 * 6 * 2 * 4 + 2 * 400 * 3 * 4 * 5
    assert count_macs(Net(), x) == macs
    assert count_flops(Net(), x) == reference_flops(Net(), x)


class Attention(nn.Module):
    """Two heads of width e, values of width ev: matmul, bmm, scaled_dot_product_attention and chained @."""

    def __init__(self, dim: int = 8, value_dim: int = 8) -> None:
        super().__init__()
        self.dim, self.value_dim = dim, value_dim
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, value_dim)
        self.out = nn.Linear(value_dim, dim)

    def forward(self, x):                                   # (B, S, D)
        b, s, _ = x.shape
        q, k = self.qk(x).view(b, s, 2, 2, self.dim // 2).permute(2, 0, 3, 1, 4)
        v = self.v(x).view(b, s, 2, self.value_dim // 2).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2))       # (B, 2, S, S)
        mixed = torch.bmm(scores.flatten(0, 1).softmax(-1), v.flatten(0, 1)).view(b, 2, s, -1)
        attended = F.scaled_dot_product_attention(q, k, v)
        y = (mixed + attended + q @ k.transpose(-1, -2) @ v).transpose(1, 2).reshape(b, s, self.value_dim)
        return self.out(y)


def attention_macs(b: int, s: int, d: int, dv: int) -> int:
    h, e, ev = 2, d // 2, dv // 2
    return (b * s * 2 * d * d          # q, k projection
            + b * s * dv * d           # v projection
            + b * h * s * s * e        # matmul q k^T
            + b * h * s * s * ev       # bmm scores v
            + b * h * s * s * (e + ev)  # sdpa: q k^T and attn v
            + b * h * s * s * (e + ev)  # (q @ k^T) @ v
            + b * s * d * dv)          # out projection


@pytest.mark.parametrize("value_dim", [8, 12])
def test_matmul_bmm_and_attention_by_hand(value_dim):
    x = torch.randn(3, 5, 8)
    assert count_macs(Attention(8, value_dim), x) == attention_macs(3, 5, 8, value_dim)
    assert count_flops(Attention(8, value_dim), x) == 2 * attention_macs(3, 5, 8, value_dim)


def test_attention_matches_flop_counter():
    # values wider than queries keep CPU attention on its matmul path, which FlopCounterMode counts (it does
    # not count the fused CPU flash-attention kernel used when the widths are equal)
    x = torch.randn(3, 5, 8)
    assert count_flops(Attention(8, 12), x) == reference_flops(Attention(8, 12), x)


def test_rmatmul_and_addmm():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):                       # (3, 6)
            y = torch.addmm(self.b, x, self.w)      # 3 x 4 outputs, 6 each
            return torch.mm(y, self.w.t())          # 3 x 6 outputs, 4 each

    x = torch.randn(3, 6)
    assert count_macs(Net(), x) == 3 * 4 * 6 + 3 * 6 * 4
    assert count_flops(Net(), x) == reference_flops(Net(), x)


def test_count_restores_training_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    model[1].eval()
    count_flops(model, torch.randn(1, 3))
    assert model.training and not model[1].training


@pytest.mark.parametrize("name", models.list_models())
def test_shipped_models_match_flop_counter(name):
    torch.manual_seed(0)
    model = models.get_model(name)
    x = torch.randn(1, 3, 32, 32)
    flops = count_flops(model, x)
    assert flops == reference_flops(model, x)
    assert flops == models.DENSE_FLOPS_32[name]


# --- FLOPs of the hard network -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet_net():
    torch.manual_seed(0)
    return TwoPathNetwork(models.mobilenet_v3_small(), torch.randn(1, 3, 16, 16))


@pytest.fixture(scope="module")
def resnet_net():
    torch.manual_seed(0)
    return TwoPathNetwork(models.resnet18(), torch.randn(1, 3, 16, 16))


def pin_fraction(net: TwoPathNetwork, fraction: float, seed: int) -> dict[str, int]:
    """Every prunable group at about ``fraction`` of its channels, with a random spread."""
    generator = torch.Generator().manual_seed(seed)
    widths = {}
    for g in net.prunable:
        jitter = 0.2 * (torch.rand((), generator=generator).item() - 0.5) if fraction < 1 else 0.0
        widths[g.name] = max(1, min(g.channels, round(g.channels * (fraction + jitter))))
    return widths


@pytest.mark.parametrize("fraction, seed", [(1.0, 0), (0.7, 1), (0.4, 2), (0.1, 3)])
@pytest.mark.parametrize("which", ["mobilenet_net", "resnet_net"])
def test_hard_flops_equal_exported_count(which, fraction, seed, request):
    net = request.getfixturevalue(which)
    widths = pin_fraction(net, fraction, seed)
    net.set_hard_widths(widths)
    try:
        x = net.example_inputs
        hard = net.flops("hard")
        assert hard == count_flops(net.export(), x)
        # the two-path module's own hard path runs the same convolutions and matmuls
        net.prepare_hard()
        assert hard == count_flops(_HardPath(net), x)
        assert net.flops("soft") == hard           # a pinned architecture: the regulariser sees the same count
        if fraction == 1.0:
            assert hard == net.flops("full") == count_flops(net.model, x)
        else:
            assert hard < net.flops("full")
    finally:
        net.set_hard_widths(None)


class _HardPath(nn.Module):
    def __init__(self, net: TwoPathNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.run("hard", x)


def test_soft_flops_follow_the_hard_widths():
    torch.manual_seed(0)
    net = TwoPathNetwork(models.resnet56(), torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        net.mask_logits.uniform_(-2.0, 2.0)
    net.refresh_plan()
    assert net.flops("soft") == net.flops("hard") < net.flops("full")


# --- FLOPs polynomial --------------------------------------------------------------------------------


class Small(nn.Module):
    """stem(3->6) -> [conv1(6->4) -> conv2(4->6)] + identity -> flatten (6 x 2x2) -> fc(24->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.pool = nn.AvgPool2d(2)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):                                            # (N, 3, 4, 4)
        x = F.relu(self.bn0(self.stem(x)))                           # 6 x 4x4
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))    # 6 x 2x2
        y = self.dw(y + self.pool(x))
        return self.fc(torch.flatten(y, 1))


def small_macs(n: int, s: int, h: int) -> int:
    """MACs of Small at stem/residual width s and inner width h, batch n, by hand."""
    return n * (16 * s * 3 * 9      # stem, 4x4
                + 4 * h * s * 9     # conv1, 2x2
                + 4 * s * h         # conv2, 2x2
                + 4 * s * 9         # depthwise, 2x2
                + 5 * s * 4)        # fc: 4 features per channel


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return TwoPathNetwork(Small(), torch.randn(2, 3, 4, 4), granularity=1)


def test_polynomial_by_hand(small_net):
    poly = small_net.flops_polynomial
    stem, inner = small_net.group("stem").index, small_net.group("conv1").index
    assert poly.dense_flops == 2 * small_macs(2, 6, 4)
    for s, h in [(6, 4), (3, 2), (1, 1), (5, 3)]:
        widths = list(poly.full_widths)
        widths[stem], widths[inner] = s, h
        assert poly.flops_at(widths) == 2 * small_macs(2, s, h)
        small_net.set_hard_widths({"stem": s, "conv1": h})
        assert small_net.flops("hard") == 2 * small_macs(2, s, h)
        assert count_flops(small_net.export(), small_net.example_inputs) == 2 * small_macs(2, s, h)
    small_net.set_hard_widths(None)


def random_widths(net: TwoPathNetwork, generator: torch.Generator) -> list[int]:
    widths = [g.channels for g in net.groups]
    for g in net.prunable:
        widths[g.index] = int(torch.randint(1, g.channels + 1, (), generator=generator))
    return widths


@pytest.mark.parametrize("which", ["small_net", "mobilenet_net"])
def test_polynomial_on_float_widths_equals_flops_at(which, request):
    net = request.getfixturevalue(which)
    poly = net.flops_polynomial
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        widths = random_widths(net, generator)
        value = poly(torch.tensor(widths, dtype=torch.float64))
        assert value.dtype == torch.float64 and value.dim() == 0
        assert value.item() == pytest.approx(poly.flops_at(widths), rel=1e-12)
    full = torch.tensor([float(c) for c in poly.full_widths], dtype=torch.float64)
    assert poly(full).item() == pytest.approx(poly.dense_flops, rel=1e-12)


@pytest.mark.parametrize("which", ["small_net", "mobilenet_net"])
def test_polynomial_gradient_matches_finite_differences(which, request):
    net = request.getfixturevalue(which)
    poly = net.flops_polynomial
    generator = torch.Generator().manual_seed(1)
    base = torch.tensor(random_widths(net, generator), dtype=torch.float64) - 0.3
    w = base.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(poly(w), w)
    eps = 0.5   # the polynomial is quadratic in the widths: central differences are exact
    for g in range(len(base)):
        step = torch.zeros_like(base)
        step[g] = eps
        fd = (poly(base + step) - poly(base - step)).item() / (2 * eps)
        assert grad[g].item() == pytest.approx(fd, rel=1e-9, abs=1e-6)
    # frozen groups have widths too; the model input's width matters (stem cost) even if never pruned
    prunable = {g.index for g in net.prunable}
    assert all(grad[g.index] > 0 for g in net.groups if g.index in prunable)


def test_polynomial_gradient_by_hand(small_net):
    # d flops / d s and d flops / d h of 2 * small_macs(2, s, h)
    poly = small_net.flops_polynomial
    stem, inner = small_net.group("stem").index, small_net.group("conv1").index
    widths = torch.tensor([float(c) for c in poly.full_widths], dtype=torch.float64)
    widths[stem], widths[inner] = 2.5, 1.5
    widths.requires_grad_(True)
    (grad,) = torch.autograd.grad(poly(widths), widths)
    s, h = 2.5, 1.5
    d_s = 2 * 2 * (16 * 3 * 9 + 4 * h * 9 + 4 * h + 4 * 9 + 5 * 4)
    d_h = 2 * 2 * (4 * s * 9 + 4 * s)
    assert grad[stem].item() == pytest.approx(d_s)
    assert grad[inner].item() == pytest.approx(d_h)


class GroupedBranch(nn.Module):
    """A grouped conv (pruned by whole groups) beside a plain branch, both feeding a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.pw, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.branch, self.bnb = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(14, 4)

    def forward(self, x):                      # (N, 3, 4, 4)
        g = self.grouped(F.relu(self.bn(self.pw(x))))
        b = F.relu(self.bnb(self.branch(x)))
        return self.fc(torch.cat([g, b], 1).mean((2, 3)))


@pytest.mark.parametrize("k,units", [(6, 4), (4, 2), (1, 1)])
def test_grouped_conv_counts_its_kept_groups(k, units):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4)
    net = TwoPathNetwork(GroupedBranch(), x)
    assert [g.name for g in net.prunable] == ["pw", "branch"]
    net.set_hard_widths({"branch": k, "pw": units})  # units of the grouped conv: two channels each
    c = 2 * units
    macs = 16 * c * 3 + 16 * c * 2 * 9 + 16 * k * 3 * 9 + 4 * (c + k)
    assert net.flops("hard") == 2 * macs
    assert count_flops(net.export(), x) == 2 * macs


# --- scope "prunable": the prunable layers only, stem and classifier excluded ------------------------


def test_prunable_scope_by_hand():
    """ResidualNet (stem 3->6, conv1 6->4, conv2 4->6, fc 6->3 on 5x5 maps), both groups pruned, counted
    term by term: the residual stream feeds the classifier but is prunable, the stem and fc stay out."""
    from helpers import ResidualNet

    model = ResidualNet(width=6, inner=4, num_classes=3)
    x = torch.randn(1, 3, 5, 5)
    net = TwoPathNetwork(model, x)
    poly = net.flops_polynomial
    stream, inner = net.group("stem"), net.group("conv1")
    assert stream.prunable and inner.prunable and stream.from_input is False
    widths = net.all_widths()
    widths[stream.index], widths[inner.index] = 5, 2
    # under "prunable": conv1 (stream -> inner) and conv2 (inner -> stream); not the stem, not fc
    by_hand = 25 * 9 * (2 * 5 + 5 * 2)
    dense = 25 * 9 * (4 * 6 + 6 * 4)
    assert poly.macs_at(widths, scope="prunable") == by_hand
    assert poly.ratio_at(widths, scope="prunable") == pytest.approx(by_hand / dense, rel=1e-12)
    everything = 25 * 9 * (3 * 5 + 2 * 5 + 5 * 2) + 3 * 5
    assert poly.ratio_at(widths) == pytest.approx(everything / (25 * 9 * (3 * 6 + 48) + 3 * 6), rel=1e-12)
    w = torch.tensor(widths, dtype=torch.float64, requires_grad=True)
    ratio = poly.ratio(w, scope="prunable")
    assert ratio.item() == pytest.approx(by_hand / dense, rel=1e-12)
    ratio.backward()
    # d/d(stream) = 25*9*(2 + 2) / dense; d/d(inner) = 25*9*(5 + 5) / dense
    assert w.grad[stream.index].item() == pytest.approx(25 * 9 * 4 / dense, rel=1e-12)
    assert w.grad[inner.index].item() == pytest.approx(25 * 9 * 10 / dense, rel=1e-12)
    with pytest.raises(ValueError, match="flops_scope"):
        poly.ratio_at(widths, scope="convs")


def test_boundary_groups_are_marked():
    from helpers import TwoConvNet

    net = TwoPathNetwork(TwoConvNet(), torch.randn(1, 3, 6, 6))
    inputs = [g for g in net.groups if g.from_input]
    outputs = [g for g in net.groups if g.to_output]
    assert [g.channels for g in inputs] == [3] and [g.channels for g in outputs] == [5]
    assert all(not g.prunable for g in inputs + outputs)


# --- einsum -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("equation,shapes", [
    ("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ("bhqk,bhkd->bhqd", [(2, 3, 5, 6), (2, 3, 6, 4)]),
    ("...qd,...kd->...qk", [(2, 3, 5, 4), (3, 6, 4)]),
    ("ij,jk", [(4, 5), (5, 7)]),
])
def test_einsum_counted_like_flop_counter(equation, shapes):
    class Net(nn.Module):
        def forward(self, a, b):
            return torch.einsum(equation, a, b)

    inputs = tuple(torch.randn(s) for s in shapes)
    assert count_flops(Net(), inputs) == reference_flops(Net(), inputs) > 0


class EinsumAttention(nn.Module):
    """Multi-head attention written with einsum (heads in dimension 1 of q, k, v)."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
        out = torch.einsum("bhqk,bhkd->bhqd", attn, v).transpose(1, 2).reshape(n, t, d)
        return self.head((x + self.proj(out)).mean(1))


def test_einsum_attention_prunes_heads_and_counts_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12)
    model = EinsumAttention()
    net = TwoPathNetwork(model, x[:1])
    heads = [g for g in net.prunable if g.channels == 3]
    assert len(heads) == 1, net.analysis.report()
    net.set_hard_widths({heads[0].name: 2})
    small = net.export().eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), net.eval()(x, path="hard"), rtol=1e-5, atol=1e-6)
    assert net.flops("hard") == count_flops(small, x[:1]) == reference_flops(small, x[:1])
    assert net.flops("full") == reference_flops(model, x[:1])
