"""s2hk.graph: channel groups found by the torch.fx analysis on hand-built modules and the shipped models."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import UnsupportedModelError, analyze, models
from s2hk.graph import GraphAnalysis, Segment


X8 = torch.randn(2, 3, 8, 8)


def out_group(a: GraphAnalysis, node: str):
    """The single channel group of a layer call's output."""
    layout = a.layers[node].out_layout
    assert len(layout) == 1, layout
    return a.groups[layout[0].group]


def in_groups(a: GraphAnalysis, node: str) -> list[int]:
    return [seg.group for seg in a.layers[node].in_layout]


def input_group(a: GraphAnalysis, first_layer: str):
    return a.groups[in_groups(a, first_layer)[0]]


# --- hand-built modules ------------------------------------------------------------------------------


class Residual(nn.Module):
    """stem -> bn0 -> relu -> [conv1 -> bn1 -> relu -> conv2 -> bn2] + identity -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + x)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_residual_add_merges_producer_groups():
    a = analyze(Residual(), X8)
    g = out_group(a, "stem")
    assert out_group(a, "conv2") is g           # both sides of the add are one group
    assert set(g.producers) == {"stem", "conv2"}
    assert set(g.members) == {"bn0", "bn2"}
    assert g.channels == 8 and g.prunable
    assert "conv1" in g.consumers and "fc" in g.consumers
    inner = out_group(a, "conv1")
    assert inner is not g and inner.producers == ["conv1"] and inner.members == ["bn1"] and inner.prunable
    assert in_groups(a, "conv2") == [inner.index]
    # the fc reads the merged group
    assert in_groups(a, "fc") == [g.index]
    # input, stem+residual, conv1, fc
    assert len(a.groups) == 4
    assert len(a.prunable_groups()) == 2


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bna = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bnb = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        y = torch.cat([self.bna(self.a(x)), F.relu(self.bnb(self.b(x)))], dim=1)
        return self.head(y)


def test_concat_gives_one_group_per_part():
    a = analyze(Concat(), X8)
    ga, gb = out_group(a, "a"), out_group(a, "b")
    assert ga is not gb
    assert (ga.channels, gb.channels) == (4, 6)
    assert ga.prunable and gb.prunable
    assert ga.members == ["bna"] and gb.members == ["bnb"]
    layout = a.layers["head"].in_layout
    assert layout == (Segment(ga.index, 4, 1), Segment(gb.index, 6, 1))
    assert "head" in ga.consumers and "head" in gb.consumers


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.proj = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.pw(x)))
        x = F.relu(self.bn2(self.dw(x)))
        return self.proj(x)


def test_depthwise_conv_is_tied_to_its_input_group():
    a = analyze(Depthwise(), X8)
    g = out_group(a, "pw")
    assert out_group(a, "dw") is g
    spec = a.layers["dw"]
    assert spec.depthwise and spec.in_layout == spec.out_layout
    assert "dw" in g.members and "dw" in g.producers
    assert set(g.members) == {"bn1", "dw", "bn2"}
    assert g.prunable
    # a depthwise conv is not a consumer that would read every channel
    assert g.consumers == ["proj"]
    # the only prunable group is the pointwise conv's: input and output are frozen
    assert [x.name for x in a.prunable_groups()] == ["pw"]


def test_norm_is_tied_to_its_producer():
    a = analyze(Residual(), X8)
    for conv, bn in [("stem", "bn0"), ("conv1", "bn1"), ("conv2", "bn2")]:
        spec = a.layers[bn]
        assert spec.kind == "norm"
        assert spec.in_layout == spec.out_layout == a.layers[conv].out_layout
        # soft gates act after the norm, not on the conv it normalises
        assert spec.gate and not a.layers[conv].gate


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.conv, self.bn2 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        return self.fc(self.bn2(self.conv(x)).mean((2, 3)))


def test_se_multiply_merges_excitation_with_features():
    a = analyze(SqueezeExcite(), X8)
    g = out_group(a, "stem")
    assert out_group(a, "fc2") is g
    assert set(g.producers) == {"stem", "fc2"} and g.prunable
    # the product must carry the keep-probability once: features gated at the BN, excitation not gated
    assert a.layers["bn"].gate
    assert not a.layers["fc2"].gate
    # the squeeze conv has its own (prunable) group, gated at its output as it has no norm
    squeeze = out_group(a, "fc1")
    assert squeeze is not g and squeeze.prunable and a.layers["fc1"].gate


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.other = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.gconv(self.bn(self.pw(x))), self.other(x)], 1))


def test_grouped_conv_ties_its_input_and_output_groups():
    a = analyze(Grouped(), X8)
    g_in, g_out = out_group(a, "pw"), out_group(a, "gconv")
    assert g_in is g_out and g_in.prunable and g_in.channels == 2  # two conv groups of four channels
    assert a.layers["gconv"].out_layout[0].repeat == 4 and a.layers["gconv"].depthwise
    assert a.layers["bn"].out_layout == a.layers["pw"].out_layout  # the norm follows the coarsened units
    assert out_group(a, "other").prunable


class GroupedOverConcat(nn.Module):
    """A grouped conv whose groups straddle the two parts of a concat: it runs at full width."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 5, 1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.gconv(torch.cat([self.a(x), self.b(x)], 1)))


def test_grouped_conv_over_channels_that_do_not_split_runs_dense():
    a = analyze(GroupedOverConcat(), X8)
    for node in ("a", "b", "gconv"):
        g = out_group(a, node)
        assert not g.prunable
        assert any("gconv" in r and "groups=2" in r for r in g.frozen_reasons), g.frozen_reasons
    assert "gconv" in a.report()


class Flattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.flatten(F.relu(self.bn(self.conv(x))), 1)
        return self.fc2(F.relu(self.fc1(x)))


def test_flatten_into_linear_repeats_each_channel():
    a = analyze(Flattened(), X8)          # 8x8 input, stride 2 -> 4x4 per channel
    g = out_group(a, "conv")
    assert a.layers["fc1"].in_layout == (Segment(g.index, 4, 16),)
    assert g.prunable and "fc1" in g.consumers
    hidden = out_group(a, "fc1")
    assert hidden.prunable and a.layers["fc1"].gate  # no norm after fc1: its output is gated
    assert not out_group(a, "fc2").prunable


def test_model_input_and_output_groups_are_frozen():
    a = analyze(Residual(), X8)
    g_in = input_group(a, "stem")
    assert g_in.channels == 3 and not g_in.prunable
    assert any("model input" in r for r in g_in.frozen_reasons)
    g_out = out_group(a, "fc")
    assert g_out.channels == 5 and not g_out.prunable
    assert any("output" in r for r in g_out.frozen_reasons)
    assert not a.layers["fc"].gate


def test_output_of_a_conv_net_freezes_the_last_group():
    # the head's channels reach the output; the parts feeding it remain prunable
    a = analyze(Concat(), X8)
    assert not out_group(a, "head").prunable
    assert out_group(a, "a").prunable


# --- unsupported operations --------------------------------------------------------------------------


class Chunked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        return self.head(a + b)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.up(self.conv(x)))


class SlicedChannels(nn.Module):
    """Half of the channels taken by indexing: which channels survive pruning would be unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x)[:, :4])


class ChannelSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x).softmax(dim=1))


class Swapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).transpose(1, 3))


class ChunkedOnce(nn.Module):
    """torch.chunk along channels, one part used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.chunk(self.conv(x), 2, dim=1)[0])


@pytest.mark.parametrize("module, layer", [(SlicedChannels, "getitem"), (Transposed, "up"),
                                           (ChannelSoftmax, "softmax")])
def test_unsupported_operation_is_an_error_naming_the_layer(module, layer):
    with pytest.raises(UnsupportedModelError) as info:
        analyze(module(), X8)
    assert layer in str(info.value)
    assert "ignore" in str(info.value)  # says how to get past it


@pytest.mark.parametrize("module", [Chunked, ChunkedOnce])
def test_chunk_along_channels_gives_equal_parts_of_one_group(module):
    a = analyze(module(), X8)
    halves = a.layers["conv"].out_layout
    assert [s.size for s in halves] == [4, 4] and halves[0].group == halves[1].group
    assert a.layers["head"].in_layout == (halves[0],)


def test_transpose_moves_the_channel_dimension():
    a = analyze(Swapped(), X8)
    assert a.layers["fc"].in_layout == a.layers["conv"].out_layout
    assert out_group(a, "conv").prunable


def test_ignore_runs_an_unsupported_layer_dense():
    a = analyze(Transposed(), X8, ignore=["up"])
    assert "up" in a.opaque_nodes
    assert "up" not in a.layers
    g = out_group(a, "conv")
    assert not g.prunable
    assert any("up" in r and "ignored" in r for r in g.frozen_reasons), g.frozen_reasons


def test_ignore_runs_a_chunk_dense():
    a = analyze(ChunkedOnce(), X8, ignore=["chunk"])
    assert not out_group(a, "conv").prunable
    assert not input_group(a, "head").prunable


def test_ignore_a_supported_layer_freezes_what_it_touches():
    a = analyze(Residual(), X8, ignore=["conv1"])
    assert "conv1" not in a.layers
    assert not out_group(a, "stem").prunable   # conv1's input
    assert not input_group(a, "conv2").prunable  # conv1's output (through bn1)


def test_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedModelError, match="torch.fx"):
        analyze(DataDependent(), X8)


# --- shipped models ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def shipped(name: str) -> GraphAnalysis:
    torch.manual_seed(0)
    return analyze(models.get_model(name), torch.randn(1, 3, 32, 32))


def test_resnet56_groups():
    a = shipped("resnet56")
    prunable = a.prunable_groups()
    assert len(prunable) == 30
    inner = [g for g in prunable if g.producers == [g.name] and g.name.endswith(".conv1")]
    assert len(inner) == 27
    for g in inner:
        assert g.members == [g.name[:-len("conv1")] + "bn1"]
    # the three residual stages: every block's conv2 (and the stem / projection) in one group
    stage_heads = {"conv1": 16, "layer2.0.downsample.0": 32, "layer3.0.downsample.0": 64}
    for stage, (head, channels) in enumerate(stage_heads.items(), start=1):
        g = next(x for x in prunable if x.name == head)
        assert g.channels == channels
        assert set(g.producers) == {head} | {f"layer{stage}.{b}.conv2" for b in range(9)}
        norms = {f"layer{stage}.{b}.bn2" for b in range(9)}
        norms.add("bn1" if stage == 1 else f"layer{stage}.0.downsample.1")
        assert set(g.members) == norms
    # the model input (3) and the classifier output (10) are the only frozen groups
    frozen = [g for g in a.groups if not g.prunable]
    assert sorted(g.channels for g in frozen) == [3, 10]


def test_resnet18_groups():
    a = shipped("resnet18")
    prunable = a.prunable_groups()
    # 8 blocks with one inner conv each + 4 residual stages
    assert len(prunable) == 12
    stage4 = next(g for g in prunable if g.name == "layer4.0.downsample.0")
    assert set(stage4.producers) == {"layer4.0.downsample.0", "layer4.0.conv2", "layer4.1.conv2"}
    assert "fc" in stage4.consumers


def spec_of(a: GraphAnalysis, target: str):
    """The layer spec of the (single) call of module ``target``."""
    found = [spec for spec in a.layers.values() if spec.target == target]
    assert len(found) == 1, target
    return found[0]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_mobilenet_se_excitation_is_not_gated(name):
    a = shipped(name)
    model = models.get_model(name)
    se_blocks = [n for n, m in model.named_modules() if type(m).__name__ == "SqueezeExcitation"]
    assert len(se_blocks) == {"mobilenet_v3_small": 9, "mobilenet_v3_large": 8}[name]
    for block in se_blocks:
        fc1, fc2 = spec_of(a, f"{block}.fc1"), spec_of(a, f"{block}.fc2")
        assert not fc2.gate
        # the excitation's output channels are the expanded features the SE block squeezes and multiplies
        features = a.groups[fc2.out_layout[0].group]
        assert features.index == fc1.in_layout[0].group
        assert f"{block}.fc2" in features.producers and features.prunable
        # the block's depthwise conv sits in that group, and its BN carries the soft gate
        seq = block.rsplit(".", 1)[0]
        dw_index = int(block.rsplit(".", 1)[1]) - 1
        dw, dw_bn = spec_of(a, f"{seq}.{dw_index}.0"), spec_of(a, f"{seq}.{dw_index}.1")
        assert dw.depthwise and dw.out_layout[0].group == features.index
        assert dw_bn.gate


def test_wrn_groups():
    a = shipped("wrn28_10")
    # the stem, 12 inner block convs and 3 residual stages (the stem feeds stage 1's projection)
    assert len(a.prunable_groups()) == 16
    for stage, channels in zip((1, 2, 3), (160, 320, 640)):
        g = out_group(a, f"block{stage}_0_shortcut")
        assert g.channels == channels and g.prunable
        assert set(g.producers) == {f"block{stage}.0.shortcut"} | {f"block{stage}.{b}.conv2" for b in range(4)}
    stem = out_group(a, "conv1")
    assert stem.channels == 16 and stem.producers == ["conv1"] and stem.members == ["block1.0.bn1"]
