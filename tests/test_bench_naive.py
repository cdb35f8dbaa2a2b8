"""The two-pass baseline of bench/ (bench/naive_two_pass.py) computes the same algorithm as s2hk.

For the same weights, mask logits and pinned widths, its soft logits, its hard logits (the full-width network
with 0/1 masks) and its losses must match s2hk's soft path and physically narrow hard path to float32
rounding -- otherwise the step benchmark's speedup over it would compare different computations. A few steps
are compared too (weights, mask logits, widths), pinned and following the logits.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import S2HPruner
from s2hk.baselines import uniform_l1_widths
from s2hk.models import get_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from naive_two_pass import NaiveS2HPruner  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4


class Block(nn.Module):
    """A residual block, then a depthwise-separable block with squeeze-excitation (MobileNet-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn3 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn4 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 6, 1), nn.Conv2d(6, 16, 1)
        self.project, self.bn5 = nn.Conv2d(16, 10, 1, bias=False), nn.BatchNorm2d(10)
        self.fc1, self.fc2 = nn.Linear(10, 12), nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.hardswish(self.bn3(self.expand(x)))
        x = F.hardswish(self.bn4(self.dw(x)))
        x = x * F.hardsigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = self.bn5(self.project(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def _pair(model: nn.Module, shape, target: float, granularity=1, pin: bool = True):
    torch.manual_seed(0)
    example = torch.randn(1, *shape)
    twin = copy.deepcopy(model)
    pruner = S2HPruner(model, example, target_flops=target, granularity=granularity).train()
    naive = NaiveS2HPruner(twin, example, target_flops=target, granularity=granularity)
    twin.train()
    if pin:
        widths = uniform_l1_widths(pruner, target)
        pruner.set_hard_widths(widths)
        naive.set_hard_widths(widths)
    return pruner, naive


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name,shape", [("block", (3, 8, 8)), ("resnet56", (3, 8, 8)),
                                        ("mobilenet_v3_small", (3, 16, 16))])
def test_logits_and_losses_match(name, shape):
    torch.manual_seed(0)
    model = Block() if name == "block" else get_model(name, num_classes=5)
    for m in model.modules():  # two forwards draw different dropout masks in each implementation
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    pruner, naive = _pair(model, shape, 0.35, granularity=None)
    assert pruner.hard_widths() == dict(zip([g.name for g in naive.prunable], naive.widths))
    assert any(k < g.channels for g, k in zip(naive.prunable, naive.widths))  # something is pruned
    x, y = torch.randn(6, *shape), torch.randint(0, 5, (6,))
    _close(naive.forward_soft(x), pruner(x, path="soft"), "soft logits")
    _close(naive.forward_hard(x), pruner(x, path="hard"), "hard logits (full width with 0/1 masks vs narrow)")

    opt_s = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    opt_n = torch.optim.SGD(naive.weight_parameters(), lr=0.05, momentum=0.9)
    got_s, got_n = pruner.train_step(x, y, opt_s), naive.train_step(x, y, opt_n)
    for key in ("loss", "kd_hard", "kd_soft", "flops_loss", "soft_flops_ratio", "soft_acc", "hard_acc"):
        assert got_n[key] == pytest.approx(got_s[key], rel=RTOL, abs=ATOL), key


def _state(pruner: S2HPruner):
    return [p.detach().clone() for p in pruner.model.parameters()]


@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "following-logits"])
def test_steps_match(pin):
    """Five steps: the same metrics, mask logits, hard widths and weights."""
    torch.manual_seed(1)
    pruner, naive = _pair(Block(), (3, 8, 8), 0.4, granularity=2, pin=pin)
    opt_s = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    opt_n = torch.optim.SGD(naive.weight_parameters(), lr=0.05, momentum=0.9)
    widths_seen = set()
    for step in range(5):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
        got_s, got_n = pruner.train_step(x, y, opt_s), naive.train_step(x, y, opt_n)
        for key in ("loss", "kd_hard", "kd_soft", "flops_loss", "soft_flops_ratio"):
            assert got_n[key] == pytest.approx(got_s[key], rel=RTOL, abs=ATOL), (step, key)
        _close(torch.cat([u.detach() for u in naive.logits]), pruner.mask_logits.detach(), f"mask logits, step {step}")
        assert list(pruner.hard_widths().values()) == naive.widths, step
        widths_seen.add(tuple(naive.widths))
        for a, b in zip(naive.weight_parameters(), _state(pruner)):
            _close(a.detach(), b, f"weights, step {step}")
    if not pin:
        assert len(widths_seen) > 1  # the widths moved with the logits
