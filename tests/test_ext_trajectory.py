"""The extension s2hk._C and the PyTorch references train identically (issue 5's "done when").

Twenty S2HPruner steps of a small model (residual, depthwise and squeeze-excitation layers), once with
``S2HK_IMPL=reference`` and once with ``S2HK_IMPL=cpp`` (selected with :func:`s2hk.dispatch.use_impl`), from
the same weights and batches: every step's metrics, hard widths and mask logits, and the weights, must agree
to float32 rounding. The mask learning rate is raised so that the widths move during the run.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import S2HPruner, dispatch

STEPS = 20
ATOL, RTOL = 1e-5, 1e-4

pytestmark = pytest.mark.skipif(dispatch.extension(warn=False) is None, reason="s2hk._C is not built")


class Small(nn.Module):
    """stem -> residual block -> expand -> depthwise (stride 2) -> squeeze-excitation -> project -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.conv2, self.bn2 = nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.expand, self.bn3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.dw, self.bn4 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False), nn.BatchNorm2d(32)
        self.se1, self.se2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project, self.bn5 = nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.hardswish(self.bn3(self.expand(x)))
        x = F.hardswish(self.bn4(self.dw(x)))
        x = x * F.hardsigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.bn5(self.project(x)).mean((2, 3)))


def _trajectory(impl: str, model: nn.Module, batches) -> dict:
    with dispatch.use_impl(impl):
        assert dispatch.choose("gates", "cpu", ("cpp",)) == impl
        pruner = S2HPruner(model, batches[0][0][:1], target_flops=0.4, granularity=2, mask_lr=40.0).train()
        opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
        out = {"metrics": [], "widths": [], "logits": [], "weights": []}
        for x, y in batches:
            out["metrics"].append(pruner.train_step(x, y, opt))
            out["widths"].append(list(pruner.hard_widths().values()))
            out["logits"].append(pruner.mask_logits.detach().clone())
            out["weights"].append([p.detach().clone() for p in pruner.weight_parameters()])
    return out


def test_reference_and_extension_trajectories_match():
    torch.manual_seed(0)
    model = Small()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 12, 12, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(STEPS)]
    ref = _trajectory("reference", copy.deepcopy(model), batches)
    ext = _trajectory("cpp", copy.deepcopy(model), batches)

    assert len({tuple(w) for w in ref["widths"]}) > 2, "the widths should move during the run"
    for step in range(STEPS):
        assert ext["widths"][step] == ref["widths"][step], f"hard widths differ at step {step}"
        for key, value in ref["metrics"][step].items():
            assert ext["metrics"][step][key] == pytest.approx(value, rel=RTOL, abs=ATOL, nan_ok=True), \
                f"{key} differs at step {step}"
        torch.testing.assert_close(ext["logits"][step], ref["logits"][step], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"mask logits at step {step}: {m}")
        for a, b in zip(ext["weights"][step], ref["weights"][step]):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"weights at step {step}: {m}")
