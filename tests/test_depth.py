from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import models
from s2hk.depth import find_stages, skip_blocks
from s2hk.flops import FlopsPolynomial, count_flops
from s2hk.graph import analyze, trace

SMALL = torch.zeros(1, 3, 8, 8)


def identity_blocks(stages: list[nn.Sequential], is_identity) -> list[list[str]]:
    """Per stage of the model's own structure, the module names of its identity-shortcut blocks."""
    return [[name for name, block in stage.named_children() if is_identity(block)] for stage in stages]


def found(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Per found stage, its name and the module of each block (from the add node's module stack)."""
    analysis = analyze(model, SMALL)
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    return [(s.name, [list(nodes[b.add].meta["nn_module_stack"])[-1] for b in s.blocks])
            for s in find_stages(analysis)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet56"])
def test_resnet_skippable_blocks_are_the_identity_shortcut_blocks(name):
    model = models.get_model(name)
    expected = identity_blocks([getattr(model, f"layer{i + 1}") for i in range(model.num_stages)],
                               lambda block: block.downsample is None)
    stages = found(model)
    assert [blocks for _, blocks in stages] == [[f"layer{i + 1}.{b}" for b in names]
                                                 for i, names in enumerate(expected)]
    if name == "resnet56":  # the first block of stages 2 and 3 has a projection shortcut
        assert [(n, len(b)) for n, b in stages] == [("layer1", 9), ("layer2", 8), ("layer3", 8)]


def test_wrn_skippable_blocks_are_the_pre_activation_identity_blocks():
    model = models.wrn28_10()
    expected = identity_blocks([model.block1, model.block2, model.block3], lambda block: block.shortcut is None)
    assert [len(e) for e in expected] == [3, 3, 3]  # every stage's first block widens: a 1x1 projection
    assert found(model) == [(f"block{i + 1}", [f"block{i + 1}.{b}" for b in names])
                            for i, names in enumerate(expected)]


def test_mobilenet_inverted_residuals_form_stages_of_consecutive_blocks():
    model = models.mobilenet_v3_small()
    runs: list[list[str]] = []
    previous = False
    for name, block in model.features.named_children():
        residual = bool(getattr(block, "use_res_connect", False))
        if residual and previous:
            runs[-1].append(f"features.{name}")
        elif residual:
            runs.append([f"features.{name}"])
        previous = residual
    assert [blocks for _, blocks in found(model)] == runs


class Block(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + x); ``leak`` also returns an
    intermediate of the branch."""

    def __init__(self, c: int, leak: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.leak = leak

    def forward(self, x: torch.Tensor):
        mid = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(mid)) + x)
        return (out, mid) if self.leak else out


class TinyResNet(nn.Module):
    """Stem, one stage of three residual blocks, a projection block, a second stage of two blocks, head.
    ``skip`` names blocks the forward leaves out (a hand-written shallower model)."""

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.a = nn.ModuleList([Block(4) for _ in range(3)])
        self.down, self.proj = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1, stride=2)
        self.b = nn.ModuleList([Block(6) for _ in range(2)])
        self.fc = nn.Linear(6, 5)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.a):
            x = x if f"a.{i}" in self.skip else block(x)
        x = F.relu(self.down(x) + self.proj(x))
        for i, block in enumerate(self.b):
            x = x if f"b.{i}" in self.skip else block(x)
        return self.fc(x.mean((2, 3)))


def test_tiny_net_stages_and_projection_not_skippable():
    analysis = analyze(TinyResNet(), SMALL)
    stages = find_stages(analysis)
    assert [s.name for s in stages] == ["a", "b"] and [s.depth for s in stages] == [3, 2]
    block = stages[0].blocks[1]
    assert block.layers == ("a_1_conv1", "a_1_bn1", "a_1_conv2", "a_1_bn2")
    assert block.shortcut == "relu_1" and block.branch_nodes[-1] == "a_1_bn2"  # block a.0's output
    projection_add = next(n.name for n in analysis.graph_module.graph.nodes
                          if [str(a) for a in n.args] == ["down", "proj"])
    with pytest.raises(ValueError, match=f"'{projection_add}' does not close a skippable"):
        skip_blocks(analysis.graph_module, [projection_add])
    with pytest.raises(ValueError, match="no node named 'nope'"):
        skip_blocks(analysis.graph_module, ["nope"])


def test_branch_read_outside_the_block_is_not_skippable():
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.block, self.other = Block(4, leak=True), Block(4)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.other(F.relu(self.stem(x)))
            out, mid = self.block(x)
            return self.fc(torch.cat([out, mid], 1).mean((2, 3)))

    analysis = analyze(Leaky(), SMALL)
    stages = find_stages(analysis)
    assert [[b.layers[0] for b in s.blocks] for s in stages] == [["other_conv1"]]


def test_skip_blocks_equals_the_hand_written_shallower_model_and_leaves_the_graph_alone():
    torch.manual_seed(0)
    model = TinyResNet().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -0.5, 0.5)
            nn.init.uniform_(m.running_var, 0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    model.eval()
    analysis = analyze(model, SMALL.double())
    gm = analysis.graph_module
    before_code, before_nodes = gm.code, [n.name for n in gm.graph.nodes]
    stages = find_stages(analysis)
    skipped = [stages[0].blocks[0], stages[0].blocks[2], stages[1].blocks[1]]
    small = skip_blocks(gm, [b.add for b in skipped])
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    hand = TinyResNet(skip=("a.0", "a.2", "b.1")).double().eval()
    hand.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(small(x), hand(x))
        assert torch.equal(gm(x), model(x))
    assert gm.code == before_code and [n.name for n in gm.graph.nodes] == before_nodes
    # only what the graph still uses is held, and those are gm's own modules
    keys = set(small.state_dict())
    assert not any(k.startswith(("a.0.", "a.2.", "b.1.")) for k in keys)
    assert keys == {k for k in gm.state_dict() if not k.startswith(("a.0.", "a.2.", "b.1."))}
    assert small.get_submodule("a.1.conv1") is gm.get_submodule("a.1.conv1")
    assert not set(n.name for n in small.graph.nodes) & {n for b in skipped for n in b.branch_nodes + (b.add,)}


def test_flops_without_skipped_layers_equal_the_skipped_model():
    model = models.resnet56()
    analysis = analyze(model, SMALL)
    poly = FlopsPolynomial(analysis, model, SMALL)
    stages = find_stages(analysis)
    skipped = [b for s in stages for b in s.blocks[3:]]
    layers = {n for b in skipped for n in b.layers}
    small = skip_blocks(trace(model), [b.add for b in skipped])
    assert poly.flops_at(poly.full_widths, skipped_nodes=layers) == count_flops(small, SMALL)
    assert poly.flops_at(poly.full_widths) == count_flops(model, SMALL) == poly.dense_flops
