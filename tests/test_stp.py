from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import STPruner
from s2hk.cli import main
from s2hk.depth import skip_blocks
from s2hk.export import load_pruned, save_pruned
from s2hk.flops import count_flops
from s2hk.stp import Architecture


class Block(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + x), (N, C, H, W) -> same."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class ResNet(nn.Module):
    """Stem (16 ch), stage ``a`` of 3 blocks, a projection block to 32 channels (stride 2), stage ``b`` of 2
    blocks, pooling, linear head: (N, 3, 8, 8) -> (N, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(*[Block(16) for _ in range(3)])
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32))
        self.proj = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.b = nn.Sequential(*[Block(32) for _ in range(2)])
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(self.stem(x))
        x = self.b(F.relu(self.down(x) + self.proj(x)))
        return self.fc(x.mean((2, 3)))


class PreActNet(nn.Module):
    """Stem, stage ``a`` of 3 pre-activation blocks (x + conv2(relu(bn2(conv1(relu(bn1(x))))))), whose adds
    follow each other directly, then BN-ReLU, pooling, linear head: (N, 3, 8, 8) -> (N, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.a = nn.ModuleList([nn.ModuleDict({"bn1": nn.BatchNorm2d(16), "conv1": nn.Conv2d(16, 16, 3, padding=1),
                                               "bn2": nn.BatchNorm2d(16), "conv2": nn.Conv2d(16, 16, 3, padding=1)})
                                for _ in range(3)])
        self.bn, self.fc = nn.BatchNorm2d(16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for m in self.a:
            x = x + m["conv2"](F.relu(m["bn2"](m["conv1"](F.relu(m["bn1"](x))))))
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


def plain_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


EXAMPLE = torch.zeros(1, 3, 8, 8)


def make(seed: int = 0, net=ResNet, **kw) -> STPruner:
    torch.manual_seed(seed)
    kw.setdefault("granularity", 2)
    kw.setdefault("target_flops", 0.3)
    return STPruner(net(), EXAMPLE, **kw)


def batches(n: int, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def in_space(p: STPruner, arch: Architecture, min_depth: int = 1) -> bool:
    widths_ok = len(arch.widths) == len(p.prunable) and all(
        w % d == 0 and d <= w <= g.channels for w, d, g in zip(arch.widths, p.gate_layout.granularities, p.prunable))
    return widths_ok and len(arch.depths) == len(p.stages) and all(
        min(min_depth, s.depth) <= d <= s.depth for d, s in zip(arch.depths, p.stages))


def skipping(p: STPruner, depths: tuple, budget: float = 0.3) -> Architecture:
    """An architecture at ``depths`` within the budget (its widths reach it)."""
    arch = p.repair(Architecture(p.full_architecture().widths, depths), budget)
    assert arch.depths == depths and p.feasible(arch, budget)
    return arch


def test_stages_and_exact_flops_of_depth():
    p = make()
    assert [(s.name, s.depth) for s in p.stages] == [("a", 3), ("b", 2)]
    full = p.full_architecture()
    assert full.depths == (3, 2) and p.flops_ratio_of(full) == 1.0
    # a skipped block's layers cost nothing: 16x16 3x3 convs at 8x8 positions, two per block
    arch = Architecture(full.widths, (1, 2))
    saved = 2 * 2 * (16 * 16 * 9 * 64)
    assert p.flops_ratio_of(arch) * p.flops("full") == p.flops("full") - 2 * saved
    with pytest.raises(ValueError, match="2 stages"):
        p.flops_ratio_of(Architecture(full.widths))
    q = make(net=plain_net, granularity=1)
    assert q.stages == [] and q.best.depths == () and q.feasible(q.best)


def test_sampled_subnets_respect_the_space():
    p = make(num_subnets=4, include_anchor=False, total_epochs=4, expansion_fraction=1.0)
    assert len(p.prunable) == 7
    depths_seen = set()
    for epoch in range(4):
        p.epoch = epoch
        budget = p.current_budget()
        assert abs(budget - (1 - 0.7 * (epoch + 1) / 4)) < 1e-12
        for _ in range(5):
            for arch in p.sample_subnets():
                assert in_space(p, arch)
                assert p.feasible(arch, budget)
                depths_seen.add(arch.depths)
        rand = p.random_architecture()
        assert in_space(p, rand) and p.feasible(rand) and in_space(p, p.mutate(p.best))
        depths_seen.add(rand.depths)
    assert in_space(p, p.best) and p.feasible(p.best)
    assert len(depths_seen) > 1 and any(d != (3, 2) for d in depths_seen)
    # min_depth bounds every stage; without depth search every stage stays full
    q = make(min_depth=2)
    assert all(in_space(q, q.random_architecture(), min_depth=2) for _ in range(5))
    w = make(search_depth=False)
    for _ in range(5):
        assert w.random_architecture().depths == (3, 2) and w.mutate(w.best).depths == (3, 2)
    assert all(a.depths == (3, 2) and w.feasible(a) for a in w.sample_subnets())


def test_search_within_budget_and_beats_random():
    p = make(population=6, generations=2, held_out_batches=2, calibration_batches=2)
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(6):
        m = p.train_step(x, y, opt)
    assert set(m) >= {"loss", "kd", "hard_flops_ratio", "soft_acc", "hard_acc"}
    assert m["kd"] >= 0 and abs(m["hard_flops_ratio"] - 0.3) <= 0.01
    result = p.search()
    assert result is not None and result["evaluations"] <= 6 + 2 * 3
    assert set(result["depths"]) == {"a", "b"} and tuple(result["depths"].values()) == p.best.depths
    assert abs(result["flops_ratio"] - 0.3) <= 0.01
    assert abs(p.flops("hard") / p.flops("full") - 0.3) <= 0.01
    best_kd = p.fitness(p.best)
    assert abs(best_kd - result["kd"]) < 1e-6
    for _ in range(3):
        rand = p.random_architecture()
        assert p.feasible(rand)
        assert best_kd <= p.fitness(rand) + 1e-9


def test_gradient_routing_ce_full_kl_subnets_teacher_detached():
    p = make(num_subnets=2, include_anchor=True)
    (x, y), = batches(1)
    archs = [skipping(p, (2, 2)), skipping(p, (1, 2))]  # block a.2 is skipped by both subnets
    assert archs[0] != archs[1]
    p.sample_subnets = lambda budget=None: archs
    params = p.weight_parameters()
    bn = p.model.a[2].bn1
    stats = [p.wrappers[n].hard_running_mean.clone() for n in ("a_2_bn1", "a_1_bn1")]
    opt = torch.optim.SGD(params, lr=0.0)
    p.train_step(x, y, opt)
    got = [q.grad.clone() if q.grad is not None else torch.zeros_like(q) for q in params]
    # a skipped block's norms do not run on the hard path: their hard statistics stay; a kept block's move
    assert torch.equal(p.wrappers["a_2_bn1"].hard_running_mean, stats[0])
    assert not torch.equal(p.wrappers["a_1_bn1"].hard_running_mean, stats[1])

    def hand(detach: bool) -> list[torch.Tensor]:
        z = p.run("dense", x)
        total = F.cross_entropy(z, y)
        teacher = z.detach() if detach else z
        for arch in archs:
            p.set_hard_widths({g.name: k for g, k in zip(p.prunable, arch.widths)})
            p.prepare_hard()
            blocks = [b.add for s, d in zip(p.stages, arch.depths) for b in s.blocks[d:]]
            p.state.path = "hard"
            zs = skip_blocks(p.graph_module, blocks)(x)
            p.state.path = "dense"
            total = total + F.kl_div(F.log_softmax(zs, -1), F.log_softmax(teacher, -1), reduction="batchmean",
                                     log_target=True)
        return [g if g is not None else torch.zeros_like(q)
                for g, q in zip(torch.autograd.grad(total, params, allow_unused=True), params)]

    expected = hand(True)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    coupled = hand(False)  # a teacher with a gradient path gives other gradients
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(got, coupled))
    # the layers of a block every subnet skips, and a filter outside every subnet, get the full network's CE
    # gradient only
    (ce_skipped, ce_bn, ce_stem) = torch.autograd.grad(F.cross_entropy(p.run("dense", x), y),
                                                       [p.model.a[2].conv1.weight, bn.weight, p.model.stem[0].weight])
    index = {id(q): i for i, q in enumerate(params)}
    assert torch.allclose(got[index[id(p.model.a[2].conv1.weight)]], ce_skipped, atol=1e-7)
    assert torch.allclose(got[index[id(bn.weight)]], ce_bn, atol=1e-7)
    stem_group = p.prunable.index(p.group("stem.0"))
    kept = set()
    for arch in archs:
        p.set_hard_widths({g.name: k for g, k in zip(p.prunable, arch.widths)})
        sel = p.plan.selections[stem_group]
        kept |= set(range(16)) if sel is None else set(range(sel)) if isinstance(sel, int) else set(sel.tolist())
    dropped = sorted(set(range(16)) - kept)
    assert dropped
    assert torch.allclose(got[index[id(p.model.stem[0].weight)]][dropped], ce_stem[dropped], atol=1e-7)


@pytest.mark.parametrize("net, target, depths, gone", [(ResNet, 0.25, (1, 1), ("a.1.", "a.2.", "b.1.")),
                                                      (PreActNet, 0.2, (1,), ("a.1.", "a.2."))])
def test_export_equals_best_subnet_with_skipped_blocks(net, target, depths, gone, tmp_path):
    p = make(net=net, population=4, generations=1, target_flops=target)
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.05)
    for x, y in batches(4):
        p.train_step(x, y, opt)
    p.on_epoch_end()
    assert p.last_search is not None and p.epoch == 1
    p.best = skipping(p, depths, target)
    p.export()  # pins the best architecture
    blocks = [b for s, d in zip(p.stages, depths) for b in s.blocks[d:]]
    stats = {n: p.wrappers[n].hard_running_mean.clone() for b in blocks for n in b.layers if "bn" in n}
    p.recalibrate_bn(batches(2, seed=3), 2)
    assert stats and all(torch.equal(p.wrappers[n].hard_running_mean, v) for n, v in stats.items())
    # consecutive pre-activation blocks: the second one's shortcut is the first one's add, resolved
    first_input = p.stages[0].blocks[1].shortcut if net is ResNet else p.stages[0].blocks[0].add
    assert p.skipped_blocks()[:2] == [(blocks[0].add, first_input),
                                      (blocks[1].add, blocks[1].shortcut if net is ResNet else first_input)]
    small = p.export()
    p.eval()
    x = batches(1, seed=7)[0][0]
    with torch.no_grad():
        assert torch.allclose(small(x), p(x, path="hard"), atol=1e-5)
    assert count_flops(small, EXAMPLE) == p.flops("hard")
    assert p.flops("hard") / p.flops("full") == p.flops_ratio_of(p.best)
    assert p.flops("hard") == p.flops_polynomial.flops_at(
        p.all_widths(), skipped_nodes={n for s, d in zip(p.stages, p.best.depths) for b in s.blocks[d:]
                                       for n in b.layers})
    assert abs(p.flops("hard") / p.flops("full") - target) <= 0.01
    # the skipped blocks' layers are gone from the exported model
    assert not any(k.startswith(gone) for k in small.state_dict())
    assert any(k.startswith("a.0.") for k in small.state_dict())
    # saved and rebuilt from the dense model: the same shallower, narrower network
    save_pruned(p, tmp_path)
    loaded = load_pruned(tmp_path, model=net())
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    # architecture.json says which layers went with their blocks (the report draws them as skipped)
    layers = json.loads((tmp_path / "architecture.json").read_text())["layers"]
    removed = {name for name, layer in layers.items() if layer["removed"]}
    assert removed == {name for name in layers if name.startswith(gone)}


def test_pruning_state_round_trip():
    p = make()
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.05)
    for x, y in batches(3):
        p.train_step(x, y, opt)
    p.on_epoch_end()
    p.best = skipping(p, (2, 1))
    state = p.pruning_state()
    assert state["best"]["depths"] == [2, 1]
    q = make(seed=3)
    q.model.load_state_dict(p.model.state_dict())
    q.load_pruning_state(state)
    assert q.best == p.best and q.epoch == p.epoch
    assert [add for add, _ in q.skipped_blocks()] == [p.stages[0].blocks[2].add, p.stages[1].blocks[1].add]
    assert q.sample_subnets() == p.sample_subnets()
    width_only = {**state, "best": list(state["best"]["widths"])}  # as the earlier, width-only STP wrote it
    with pytest.raises(ValueError, match="width-only"):
        q.load_pruning_state(width_only)
    state["stages"][1][1] = state["stages"][1][1][:1]
    with pytest.raises(ValueError, match="different stages"):
        q.load_pruning_state(state)


def test_cli_prune_stp(tmp_path, recwarn):
    out = tmp_path / "run"
    assert main(["prune", "--method", "stp", "--epochs", "1", "--warmup-epochs", "0", "--image-size", "8",
                 "--max-steps-per-epoch", "3", "--batch-size", "16", "--recalibrate-batches", "2",
                 "--set", "population=4", "--set", "generations=1", "--out", str(out), "--no-progress"]) == 0
    # the search scored on held-out training images: 5% of digits' 1438, at most 4 batches of 16
    assert json.loads((out / "config.json").read_text())["search_holdout"] == 64
    assert not [w for w in recwarn if "no held-out batches" in str(w.message)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "stp" and summary["target_flops"] == 0.35
    assert abs(summary["remaining_flops"] - 0.35) <= 0.01
    assert (out / "pruned" / "model.pt").is_file()
    assert main(["eval", str(out), "--json"]) == 0
    # the run resumes from its checkpoint (pruning state included) without training again
    assert main(["prune", "--method", "stp", "--epochs", "1", "--warmup-epochs", "0", "--image-size", "8",
                 "--max-steps-per-epoch", "3", "--batch-size", "16", "--recalibrate-batches", "2",
                 "--set", "population=4", "--set", "generations=1", "--out", str(out), "--no-progress"]) == 0
    assert main(["prune", "--method", "stp", "--set", "mask_lr=3", "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 2


@pytest.mark.parametrize("phase", ["joint", "hard"])
def test_a_gradient_scaler_scales_every_loss_and_skips_non_finite_steps(phase):
    """train_step(scaler=...) (fp16 training): the losses scaled by a power of two and the gradients unscaled before
    the step give exactly the unscaled step's weights; a step whose gradients are not finite is skipped."""
    ((x, y),) = batches(1)

    def stepped(inputs: torch.Tensor, scaler=None) -> list[torch.Tensor]:
        p = make()
        p.set_phase(phase)
        opt = torch.optim.SGD(p.weight_parameters(), lr=0.05, momentum=0.9)
        p.train_step(inputs, y, opt, **({"scaler": scaler} if scaler is not None else {}))
        return [w.detach().clone() for w in p.weight_parameters()]

    plain = stepped(x)
    scaled = stepped(x, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))
    assert not all(torch.equal(a, b.detach()) for a, b in zip(plain, make().weight_parameters()))  # a real step
    broken = x.clone()
    broken[0] = float("nan")
    skipped = stepped(broken, torch.amp.GradScaler("cpu"))
    assert all(torch.equal(a, b.detach()) for a, b in zip(skipped, make().weight_parameters()))



def test_search_scores_on_the_held_out_batches_and_calibrates_on_remembered_ones(monkeypatch):
    """With held-out batches the fitness (the teacher's and every candidate's KD) is measured on them, BN statistics
    are re-estimated from the last calibration_batches training batches; without them the search falls back to
    remembered training batches and warns once."""
    p = make(population=2, generations=0, held_out_batches=2, calibration_batches=2)
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.05)
    trained = batches(5)
    for x, y in trained:
        p.train_step(x, y, opt)
    scored, calibrated = [], []
    teacher, recalibrate = p._teacher, p.recalibrate_norms
    monkeypatch.setattr(p, "_teacher", lambda held: scored.append(held) or teacher(held))
    monkeypatch.setattr(p, "recalibrate_norms",
                        lambda b, n, paths: calibrated.append(list(b)[:n]) or recalibrate(b, n, paths))
    with pytest.warns(UserWarning, match="no held-out batches .* remembered training batches"):
        p.search()
    assert [torch.equal(x, t[0]) for (x, _), t in zip(scored[-1], trained[-2:])] == [True, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.search()  # said once
    held_out = batches(2, seed=7)
    p.set_search_batches(held_out)
    p.search()
    assert [torch.equal(x, h[0]) for (x, _), h in zip(scored[-1], held_out)] == [True, True]
    assert all([torch.equal(x, t[0]) for (x, _), t in zip(c, trained[-2:])] == [True, True] for c in calibrated[-3:])
    with pytest.raises(ValueError, match="no batches given"):
        p.set_search_batches([])
