"""Uniform L1 pruning (s2hk.baselines) and the method comparison script (bench/compare_methods.py)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import s2hk
from s2hk.baselines import (UniformL1Pruner, flops_ratio_at, uniform_l1_plan, uniform_l1_widths,
                            uniform_widths_at)
from s2hk.data import make_loaders
from s2hk.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64, 2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


class Residual(nn.Module):
    """Two convs whose outputs are added: one channel group with two producing layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.a = nn.Conv2d(24, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(24, 16, 1, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.a(h) + self.b(h))
        return self.head(h.mean((2, 3)))


def _net(model: nn.Module, size: int = 8, **kwargs) -> s2hk.TwoPathNetwork:
    return s2hk.TwoPathNetwork(model, torch.zeros(1, 3, size, size), **kwargs)


def _best_uniform_error(net: s2hk.TwoPathNetwork, target: float) -> float:
    """The smallest |ratio - target| over all uniform architectures (a fine sweep of r)."""
    return min(abs(flops_ratio_at(net, uniform_widths_at(net, i / 4000)) - target) for i in range(4001))


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
@pytest.mark.parametrize("granularity", [None, 8])
def test_hits_the_target_within_the_granularity_limit(target, granularity):
    net = _net(small_cnn(), granularity=granularity)
    plan = uniform_l1_plan(net, target)
    widths = [plan.widths[g.name] for g in net.prunable]
    assert plan.flops_ratio == pytest.approx(flops_ratio_at(net, widths))
    # exact, by the engine's own FLOPs counter and by counting the exported model
    net.set_hard_widths(plan.widths)
    assert net.flops("hard") / net.flops("full") == pytest.approx(plan.flops_ratio)
    exported = s2hk.count_flops(net.export(), torch.zeros(1, 3, 8, 8))
    assert exported / s2hk.count_flops(small_cnn(), torch.zeros(1, 3, 8, 8)) == pytest.approx(plan.flops_ratio)
    # no uniform architecture is closer: within half the FLOPs step between the two uniform architectures
    # around the target (the granularity-limited tolerance), which is small for this model
    error = abs(plan.flops_ratio - target)
    assert error <= _best_uniform_error(net, target) + 1e-12
    ratios = sorted({flops_ratio_at(net, uniform_widths_at(net, i / 4000)) for i in range(4001)})
    below = max(r for r in ratios if r <= target)
    above = min(r for r in ratios if r >= target)
    assert error <= 0.5 * (above - below) + 1e-12
    assert error <= (0.03 if granularity is None else 0.06)


@pytest.mark.parametrize("target", [0.2, 0.35, 0.6])
def test_widths_are_uniform_in_ratio(target):
    net = _net(small_cnn(), granularity={"0": 4, "3": 8})  # mixed granularities
    plan = uniform_l1_plan(net, target)
    assert 0.0 < plan.keep_ratio <= 1.0
    for g, d in zip(net.prunable, net.gate_layout.granularities):
        k = plan.widths[g.name]
        assert k % d == 0 and d <= k <= g.channels
        assert abs(k - plan.keep_ratio * g.channels) <= d, (g.name, k, plan.keep_ratio, g.channels, d)
    assert uniform_l1_widths(net, target) == plan.widths


def _filter_l1(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Group-mean filter L1 norm, computed directly from the producing conv weights."""
    norms = [model.get_submodule(n).weight.detach().abs().flatten(1).sum(1) for n in names]
    return torch.stack(norms).mean(0)


def _kept(net: s2hk.TwoPathNetwork, group: str) -> list[int]:
    slot = [g.name for g in net.prunable].index(group)
    sel = net.plan.selections[slot]
    if sel is None:
        return list(range(net.prunable[slot].channels))
    return list(range(sel)) if isinstance(sel, int) else sorted(sel.tolist())


def _producers(net: s2hk.TwoPathNetwork) -> dict[str, list[str]]:
    """Group name -> names of the modules producing it (from the engine's layer specs)."""
    out: dict[str, list[str]] = {}
    names = {id(m): n for n, m in net.model.named_modules()}
    for spec in net.analysis.layers.values():
        if spec.kind == "norm":
            continue
        module = net.wrappers[spec.node].module
        for seg in spec.out_layout:
            group = net.groups[seg.group]
            if group.prunable:
                out.setdefault(group.name, []).append(names[id(module)])
    return out


@pytest.mark.parametrize("make", [small_cnn, Residual])
def test_keeps_the_highest_filter_l1_channels(make):
    torch.manual_seed(1)
    model = make()
    with torch.no_grad():  # spread the filter norms so that ties cannot decide anything
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand(m.out_channels, 1, 1, 1) * 4 + 0.1)
    net = _net(model, granularity=4)
    widths = uniform_l1_widths(net, 0.35)
    net.set_hard_widths(widths)
    producers = _producers(net)
    assert set(producers) == set(widths)
    if make is Residual:
        assert any(len(v) == 2 for v in producers.values())
    for name, k in widths.items():
        score = _filter_l1(model, producers[name])
        expected = sorted(torch.topk(score, k).indices.tolist())
        assert _kept(net, name) == expected, name


def test_pruner_trains_dense_then_prunes_and_fine_tunes_the_narrow_network():
    torch.manual_seed(0)
    train, val = make_loaders("digits", batch_size=64, image_size=8, seed=0)
    pruner = UniformL1Pruner(small_cnn(), torch.zeros(1, 3, 8, 8), target_flops=0.35, epochs=4)
    assert [pruner.config.phase(e) for e in range(4)] == ["warmup", "warmup", "hard", "hard"]
    trainer = Trainer(pruner, train, val, epochs=4, config=TrainConfig(lr=0.05, progress=False, max_steps_per_epoch=3,
                                                                       recalibrate_batches=2))
    seen = {}
    original = pruner.prune

    def prune():  # the widths are computed from the weights after dense training, at the switch
        weights, slots = pruner.producer_weights()
        seen["weights"] = {slot: w.detach().clone() for w, slot in zip(weights, slots)}  # one producer each
        seen["epoch"] = trainer.epoch
        return original()

    pruner.prune = prune
    result = trainer.fit(resume=False)
    assert seen["epoch"] == 2
    plan = pruner.uniform_plan
    assert plan is not None and pruner.hard_widths() == plan.widths
    assert result["hard_flops_ratio"] == pytest.approx(plan.flops_ratio)
    assert abs(plan.flops_ratio - 0.35) < 0.05
    # channels were chosen by the filter L1 norms at pruning time, and stayed fixed while fine-tuning
    weights = seen["weights"]
    assert set(weights) == set(range(len(pruner.prunable)))
    for slot, g in enumerate(pruner.prunable):
        score = weights[slot].abs().flatten(1).sum(1)
        assert _kept(pruner, g.name) == sorted(torch.topk(score, plan.widths[g.name]).indices.tolist())
    small = pruner.export()
    assert s2hk.count_flops(small, torch.zeros(1, 3, 8, 8)) == pruner.flops("hard")
    # a resumed run has the same plan and kept channels
    again = UniformL1Pruner(small_cnn(), torch.zeros(1, 3, 8, 8), target_flops=0.35, epochs=4)
    again.model.load_state_dict(pruner.model.state_dict())
    again.load_pruning_state(pruner.pruning_state())
    assert again.uniform_plan == plan
    assert all(_kept(again, g.name) == _kept(pruner, g.name) for g in pruner.prunable)


def test_pruner_rejects_bad_schedules():
    with pytest.raises(ValueError):
        UniformL1Pruner(small_cnn(), torch.zeros(1, 3, 8, 8), epochs=4, dense_epochs=5)
    with pytest.raises(ValueError):
        UniformL1Pruner(small_cnn(), torch.zeros(1, 3, 8, 8), epochs=4, hard_epochs=1)


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "bench" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comparison_script_runs_end_to_end(tmp_path):
    script = _load_script()
    out = tmp_path / "cmp.json"
    threads = torch.get_num_threads()
    try:
        rc = script.main(["--seeds", "0", "--epochs", "2", "--target", "0.35", "--max-steps-per-epoch", "2",
                          "--recalibrate-batches", "1", "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"settings", "machine", "runs", "summary", "dense_flops"}
    assert data["machine"]["cpu"] and data["machine"]["torch"] == torch.__version__
    assert [r["method"] for r in data["runs"]] == ["s2h", "stp", "uniform_l1"]
    for r in data["runs"]:
        assert 0.0 <= r["hard_acc"] <= 1.0 and 0.0 < r["flops_ratio"] <= 1.0 and r["wall_seconds"] > 0
        assert r["val_images"] == 359 and r["steps"] == 4
        # the exported model's hard accuracy is the trainer's final hard accuracy (same network, same split;
        # one image of slack for float summation order)
        assert r["hard_acc"] == pytest.approx(r["trainer_hard_acc"], abs=1.0 / r["val_images"] + 1e-9)
    by_method = {r["method"]: r for r in data["runs"]}
    assert abs(by_method["uniform_l1"]["flops_ratio"] - 0.35) < 0.05
    assert abs(by_method["stp"]["flops_ratio"] - 0.35) <= 0.011
    for method, e in data["summary"].items():
        assert e["n"] == 1 and e["hard_acc_std"] == 0.0 and not math.isnan(e["hard_acc_mean"])
    md = out.with_suffix(".md").read_text()
    assert "| method | seeds | hard acc (%) | FLOPs ratio | wall time (s) |" in md
    for method in ("s2h", "stp", "uniform_l1"):
        assert f"| {method} | 1 |" in md


def test_comparison_runs_start_from_the_same_weights(monkeypatch):
    script = _load_script()
    args = script.build_parser().parse_args(["--epochs", "2"])
    args.image_size = 8
    seen = []

    class Stop(Exception):
        pass

    def fake_build(method, model, example, settings):
        seen.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        raise Stop

    monkeypatch.setattr(script, "build_pruner", fake_build)
    torch.manual_seed(5)
    init = script.build_model("small_cnn", 10).state_dict()
    for method in ("s2h", "stp", "uniform_l1"):
        with pytest.raises(Stop):
            script.run_one(method, 5, init, args, 0.6, 1)
    assert all(torch.equal(seen[0], s) for s in seen[1:])
