"""s2hk.graph.trace: train-only code, custom autograd Functions, ignored modules as leaves, trace failures."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import TwoPathNetwork, UnsupportedModelError


class StochasticResidual(nn.Module):
    """A residual block with the train-only code of modern CNNs: stochastic depth, functional dropout and an
    ``if self.training:`` branch (here: noise injection)."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        if self.training and torch.rand(()) < 0.5:  # stochastic depth: the whole branch dropped
            return x
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.dropout(out, 0.3, training=self.training)
        if self.training:
            out = out + 0.1 * torch.randn_like(out)
        return F.relu(x + self.drop(self.bn2(self.conv2(out))))


class StochasticNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block1, self.block2 = StochasticResidual(8, 6), StochasticResidual(8, 10)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.bn0(self.stem(x)))))
        return self.fc(F.dropout(x.mean((2, 3)), 0.2, training=self.training))


def half_widths(net: TwoPathNetwork) -> dict[str, int]:
    return {g.name: max(1, g.channels // 2) for g in net.prunable}


def test_train_mode_model_is_traced_as_in_eval_mode():
    torch.manual_seed(0)
    model = StochasticNet().train()
    x = torch.randn(3, 3, 10, 10)
    net = TwoPathNetwork(model, x[:1])
    assert model.training and all(m.training for m in model.modules()), "the user's train flags are restored"
    assert net.prunable, "the blocks' inner widths are prunable"
    net.set_hard_widths(half_widths(net))
    net.eval()
    small = net.export().eval()
    with torch.no_grad():
        first, second = small(x), small(x)
        hard = net(x, path="hard")
        dense = net(x, path="dense")
        reference = model.eval()(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no stochastic op left in the export
    torch.testing.assert_close(first, hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense, reference, rtol=1e-5, atol=1e-6)


def test_dropout_modules_still_follow_train_and_eval():
    torch.manual_seed(0)
    net = TwoPathNetwork(StochasticNet().train(), torch.randn(1, 3, 10, 10))
    x = torch.randn(4, 3, 10, 10)
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, path="soft"), net(x, path="soft")), "nn.Dropout is active in training"
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, path="soft"), net(x, path="soft"), rtol=0, atol=0)


class GradientReversal(torch.autograd.Function):
    """Forward: identity; backward: the negated gradient (domain-adversarial training)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Reverse(nn.Module):
    def forward(self, x):
        return GradientReversal.apply(x)


class ReversalNet(nn.Module):
    """conv -> BN -> ReLU -> gradient reversal -> conv -> BN -> ReLU -> mean -> linear; the reversal is a
    module (``reverse``) or, with ``functional``, called in this forward."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.reverse = Reverse()
        self.c2, self.b2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = GradientReversal.apply(x) if self.functional else self.reverse(x)
        return self.fc(F.relu(self.b2(self.c2(x))).mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_custom_autograd_function_is_refused_naming_the_layer(functional):
    with pytest.raises(UnsupportedModelError) as err:
        TwoPathNetwork(ReversalNet(functional), torch.randn(1, 3, 8, 8))
    message = str(err.value)
    assert "GradientReversal" in message and "autograd.Function" in message
    assert ("reverse" in message) if not functional else ("gradient_reversal_apply" in message)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_ignored_autograd_function_keeps_its_backward(functional):
    torch.manual_seed(0)
    model = ReversalNet(functional)
    ignore = ["gradient_reversal_apply"] if functional else ["reverse"]
    net = TwoPathNetwork(model, torch.randn(1, 3, 8, 8), ignore=ignore)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model.double()
    net.double()

    def first_conv_grad(fn) -> torch.Tensor:
        model.zero_grad()
        fn(x).sum().backward()
        return model.c1.weight.grad.clone()

    expected = first_conv_grad(model)
    got = first_conv_grad(lambda inp: net(inp, path="dense"))
    torch.testing.assert_close(got, expected)
    # the reversal really is in the reference gradient: without it the sign flips
    plain = ReversalNet(functional).double()
    plain.load_state_dict(model.state_dict())
    plain.reverse = nn.Identity()
    if not functional:
        plain.zero_grad()
        plain(x).sum().backward()
        torch.testing.assert_close(plain.c1.weight.grad, -expected)
    group = net.group("c1")
    assert not group.prunable and any("ignored" in reason for reason in group.frozen_reasons)


class Untraceable(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class HasUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.ReLU(), Untraceable())
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.body(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(self.c3(x).mean((2, 3)))


def test_trace_failure_names_the_module_and_its_ignore_works():
    model = HasUntraceable()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedModelError) as err:
        TwoPathNetwork(model, x[:1])
    assert "'body.1'" in str(err.value) and "ignore=['body.1']" in str(err.value)
    net = TwoPathNetwork(model, x[:1], ignore=["body.1"])
    assert net.group("c2").prunable and not net.group("c1").prunable
    net.set_hard_widths(half_widths(net))
    net.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, path="dense"), model(x))
        torch.testing.assert_close(net.export().eval()(x), net(x, path="hard"), rtol=1e-5, atol=1e-6)


class ManyUnsupported(nn.Module):
    """Three operations s2hk cannot follow, one after the other on one path."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.odd1, self.odd2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c1(x)
        x = GradientReversal.apply(x)
        x = self.odd1(x.transpose(1, 3).transpose(1, 3).contiguous())
        x = torch.fft.fft2(x).real
        x = GradientReversal.apply(self.c2(x))
        return self.fc(x.mean((2, 3)))


def test_every_unsupported_operation_is_listed_at_once():
    with pytest.raises(UnsupportedModelError) as err:
        TwoPathNetwork(ManyUnsupported(), torch.randn(1, 3, 8, 8))
    listed = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert len(listed) == 3, str(err.value)
    assert "gradient_reversal_apply" in listed[0] and "fft2" in listed[1] and "gradient_reversal_apply_1" in listed[2]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, through permutes and F.layer_norm (ConvNeXt's form)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """stem -> LayerNorm2d -> [depthwise 7x7 -> LayerNorm (channels last) -> MLP x4 -> layer scale] + x."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem, self.norm0 = nn.Conv2d(3, dim, 2, stride=2), LayerNorm2d(dim)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.norm0(self.stem(x))
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_functional_layer_norm_over_channels_runs_dense_and_the_mlp_prunes():
    torch.manual_seed(0)
    model = ConvNeXtLike()
    x = torch.randn(2, 3, 12, 12)
    net = TwoPathNetwork(model, x[:1])
    assert [g.name for g in net.prunable] == ["fc1"], net.analysis.report()
    assert any("layer_norm" in r for r in net.group("stem").frozen_reasons)
    net.set_hard_widths({"fc1": 13})
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, path="dense"), model.eval()(x))
        torch.testing.assert_close(net.export().eval()(x), net(x, path="hard"), rtol=1e-5, atol=1e-6)


class EncoderBlock(nn.Module):
    """A pre-norm transformer block around nn.MultiheadAttention (torchvision's ViT form)."""

    def __init__(self, dim: int = 12, heads: int = 3, batch_first: bool = True) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        y = self.ln1(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln2(x))


class MHAViT(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 12)
        self.blocks = nn.Sequential(EncoderBlock(batch_first=batch_first), EncoderBlock(batch_first=batch_first))
        self.head = nn.Linear(12, 4)

    def forward(self, tokens):
        x = self.blocks(self.embed(tokens))
        return self.head(x.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_runs_dense_and_the_mlps_prune(batch_first):
    torch.manual_seed(0)
    model = MHAViT(batch_first)
    x = torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    net = TwoPathNetwork(model, x)
    assert sorted(g.name for g in net.prunable) == ["blocks.0.mlp.0", "blocks.1.mlp.0"], net.analysis.report()
    net.set_hard_widths({"blocks.0.mlp.0": 20, "blocks.1.mlp.0": 9})
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, path="dense"), model.eval()(x))
        torch.testing.assert_close(net.export().eval()(x), net(x, path="hard"), rtol=1e-5, atol=1e-6)


# --- the export and save / load of models the tracer treats specially -----------------------------------


def test_export_keeps_parameters_the_forward_reads_as_parameters():
    torch.manual_seed(0)
    net = TwoPathNetwork(ConvNeXtLike(), torch.randn(1, 3, 12, 12))
    net.set_hard_widths({"fc1": 13})
    small = net.export()
    names = dict(small.named_parameters())
    assert "gamma" in names and names["gamma"].requires_grad  # a LayerScale stays trainable after export
    assert "gamma" not in dict(small.named_buffers())


class WithConstant(nn.Module):
    """A tensor created in forward(): fx stores it as a constant attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = self.c2(x) * torch.tensor(0.5)
        return self.fc(x.mean((2, 3)))


def test_tensor_constants_keep_their_names_over_traces(tmp_path):
    from s2hk import load_pruned, save_pruned

    torch.manual_seed(0)
    model = WithConstant()
    x = torch.randn(2, 3, 8, 8)
    TwoPathNetwork(model, x[:1])  # a first trace (an attempt before a retry with ignore=...)
    net = TwoPathNetwork(model, x[:1])
    assert not any(name.startswith("_tensor_constant") for name in vars(model))
    net.set_hard_widths({"c1": 5})
    save_pruned(net, tmp_path)
    loaded = load_pruned(tmp_path, model=WithConstant())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.export().eval()(x))


def test_save_and_load_a_model_with_an_ignored_untraceable_module(tmp_path):
    from s2hk import load_pruned, save_pruned

    torch.manual_seed(0)
    model = HasUntraceable()
    x = torch.randn(2, 3, 8, 8)
    net = TwoPathNetwork(model, x[:1], ignore=["body.1"])
    net.set_hard_widths({"c2": 7})
    save_pruned(net, tmp_path)
    loaded = load_pruned(tmp_path, model=HasUntraceable())
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x, path="hard"), rtol=1e-5, atol=1e-6)


# --- grouped convolutions, pruned by whole groups ---------------------------------------------------------


class ResNeXtBlock(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 grouped (``groups``) -> BN -> ReLU -> 1x1 -> BN, plus the identity; then a
    depthwise conv with a channel multiplier of 2 and a classifier."""

    def __init__(self, width: int = 8, inner: int = 12, groups: int = 4) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c1, self.b1 = nn.Conv2d(width, inner, 1, bias=False), nn.BatchNorm2d(inner)
        self.c2, self.b2 = nn.Conv2d(inner, inner, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(inner)
        self.c3, self.b3 = nn.Conv2d(inner, width, 1, bias=False), nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, 2 * width, 3, padding=1, groups=width)
        self.fc = nn.Linear(2 * width, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        x = F.relu(x + self.b3(self.c3(y)))
        return self.fc(F.relu(self.expand(x)).mean((2, 3)))


def test_grouped_convolutions_prune_by_whole_groups(tmp_path):
    from helpers import randomise_norms
    from s2hk import count_flops, load_pruned, save_pruned

    torch.manual_seed(0)
    model = randomise_norms(ResNeXtBlock())
    x = torch.randn(2, 3, 6, 6)
    net = TwoPathNetwork(model, x[:1])
    inner = net.group("c1")
    assert inner.prunable and inner.channels == 4, net.analysis.report()  # 4 groups of 3 channels
    assert net.group("stem").prunable  # the residual stream reaches the depthwise expansion, a group of 8
    net.set_hard_widths({"c1": [0, 2], "stem": [1, 2, 4, 5, 7]})
    c2 = net.export().get_submodule("c2")
    assert (c2.in_channels, c2.out_channels, c2.groups) == (6, 6, 2)
    net.eval()
    small = net.export().eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x, path="hard"), rtol=1e-5, atol=1e-6)
    expand = small.get_submodule("expand")
    assert (expand.in_channels, expand.out_channels, expand.groups) == (5, 10, 5)
    assert net.flops("hard") == count_flops(small, x[:1])
    save_pruned(net, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path, model=ResNeXtBlock())(x), small(x))
