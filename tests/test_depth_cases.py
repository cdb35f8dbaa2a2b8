"""Which residual blocks STP may skip (s2hk/depth.py, s2hk/stp.py): branches that read more than the block's
input, in-place activations after the add, terms that depend on the input only through its size."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import STPruner
from s2hk.depth import find_stages
from s2hk.flops import count_flops
from s2hk.graph import analyze
from s2hk.stp import Architecture

EXAMPLE = torch.zeros(1, 3, 8, 8)


class FeedBranch(nn.Module):
    """One residual block ``h + (c1(h) + bn2(c2(y)))`` with ``h = relu(y)``: part of the branch (c2, bn2) reads
    ``y``, a tensor from before the shortcut ``h``, and is used nowhere else."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        h = F.relu(y)
        a = h + (self.c1(h) + self.bn2(self.c2(y)))
        return self.fc(a.mean((2, 3)))


def test_a_branch_that_also_reads_a_tensor_from_before_the_block_is_not_skippable():
    # skipping the block would also drop c2 and bn2 (they feed only the branch): the block is not f(h) alone
    assert find_stages(analyze(FeedBranch(), EXAMPLE)) == []


class InplaceReluNet(nn.Module):
    """torchvision-style post-activation blocks: ``out = conv(h); out += h; h = relu_(out)`` (ReLU(inplace))."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.r0 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.c1, self.r1 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.c2, self.r2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.r0(self.stem(x))
        out = self.c1(h)
        out += h
        h = self.r1(out)
        out = self.c2(h)
        out += h
        h = self.r2(out)
        return self.fc(h.mean((2, 3)))


def test_train_step_with_a_skipped_block_followed_by_an_inplace_relu():
    # the in-place ReLU after a skipped block's add reads a copy of the shortcut, not the shortcut that the
    # layers before it saved for their backward; the export does the same
    torch.manual_seed(0)
    p = STPruner(InplaceReluNet(), EXAMPLE, target_flops=0.5, granularity=2, min_depth=0, num_subnets=1)
    assert [s.depth for s in p.stages] == [2]
    arch = Architecture(p.full_architecture().widths, (1,))
    p.sample_subnets = lambda budget=None: [arch]
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.01)
    p.train_step(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)), opt)
    p.best = arch
    small = p.export()
    x = torch.randn(2, 3, 8, 8)
    p.eval()
    with torch.no_grad():
        assert torch.allclose(small(x), p(x, path="hard"), atol=1e-6)
    assert count_flops(small, EXAMPLE) == p.flops("hard")


class MLPBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class PosEmbedNet(nn.Module):
    """Tokens + a position embedding cut to the sequence length (``pos[:, :x.shape[1]]``), two residual blocks."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(12, d)
        self.pos = nn.Parameter(torch.randn(1, 32, d))
        self.blocks = nn.Sequential(MLPBlock(d), MLPBlock(d))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.pos[:, :x.shape[1]]
        return self.head(self.blocks(x).mean(1))


def test_position_embedding_add_is_not_a_skippable_residual_block():
    # pos[:, :x.shape[1]] reaches x only through its size: it is no residual branch of x
    stages = find_stages(analyze(PosEmbedNet(), torch.zeros(1, 8, 12)))
    assert [[b.shortcut for b in s.blocks] for s in stages] == [["add", "add_1"]]
