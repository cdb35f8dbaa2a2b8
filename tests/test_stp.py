from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import STPruner
from s2hk.cli import main
from s2hk.flops import count_flops


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


EXAMPLE = torch.zeros(1, 3, 8, 8)


def make(seed: int = 0, **kw) -> STPruner:
    torch.manual_seed(seed)
    kw.setdefault("granularity", 2)
    kw.setdefault("target_flops", 0.3)
    return STPruner(small_net(), EXAMPLE, **kw)


def batches(n: int, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def in_space(p: STPruner, widths) -> bool:
    return all(w % d == 0 and d <= w <= g.channels
               for w, d, g in zip(widths, p.gate_layout.granularities, p.prunable))


def test_sampled_subnets_respect_the_space():
    p = make(num_subnets=4, include_anchor=False, total_epochs=4, expansion_fraction=1.0)
    assert len(p.prunable) == 3
    for epoch in range(4):
        p.epoch = epoch
        budget = p.current_budget()
        assert abs(budget - (1 - 0.7 * (epoch + 1) / 4)) < 1e-12
        for _ in range(10):
            for w in p.sample_subnets():
                assert in_space(p, w)
                assert p.feasible(w, budget)
        assert in_space(p, p.random_architecture()) and in_space(p, p.mutate(p.best))
    assert in_space(p, p.best) and p.feasible(p.best)


def test_search_within_budget_and_beats_random():
    p = make(population=6, generations=2, held_out_batches=2, calibration_batches=2)
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(6):
        m = p.train_step(x, y, opt)
    assert set(m) >= {"loss", "kd", "hard_flops_ratio", "soft_acc", "hard_acc"}
    assert m["kd"] >= 0 and abs(m["hard_flops_ratio"] - 0.3) <= 0.01
    result = p.search()
    assert result is not None and result["evaluations"] <= 6 + 2 * 3
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
    archs = [p.best, p.repair([8, 16, 16], 0.3)]
    assert archs[0] != archs[1]
    p.sample_subnets = lambda budget=None: archs
    params = p.weight_parameters()
    opt = torch.optim.SGD(params, lr=0.0)
    p.train_step(x, y, opt)
    got = [q.grad.clone() if q.grad is not None else torch.zeros_like(q) for q in params]

    def hand(detach: bool) -> list[torch.Tensor]:
        z = p.run("dense", x)
        total = F.cross_entropy(z, y)
        teacher = z.detach() if detach else z
        for w in archs:
            p.set_hard_widths({g.name: k for g, k in zip(p.prunable, w)})
            p.prepare_hard()
            zs = p.run("hard", x)
            total = total + F.kl_div(F.log_softmax(zs, -1), F.log_softmax(teacher, -1), reduction="batchmean",
                                     log_target=True)
        return [g if g is not None else torch.zeros_like(q)
                for g, q in zip(torch.autograd.grad(total, params, allow_unused=True), params)]

    expected = hand(True)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    coupled = hand(False)  # a teacher with a gradient path gives other gradients
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(got, coupled))
    # a filter outside every subnet gets the full network's CE gradient only
    conv = p.model[0]
    kept = set()
    for w in archs:
        p.set_hard_widths({g.name: k for g, k in zip(p.prunable, w)})
        sel = p.plan.selections[0]
        kept |= set(range(16)) if sel is None else set(range(sel)) if isinstance(sel, int) else set(sel.tolist())
    dropped = sorted(set(range(16)) - kept)
    assert dropped
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(p.run("dense", x), y), conv.weight)
    idx = params.index(conv.weight)
    assert torch.allclose(got[idx][dropped], ce_grad[dropped], atol=1e-7)


def test_export_equals_best_subnet():
    p = make(population=4, generations=1)
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.05)
    for x, y in batches(4):
        p.train_step(x, y, opt)
    p.on_epoch_end()
    assert p.last_search is not None and p.epoch == 1
    small = p.export()
    p.eval()
    x = batches(1, seed=7)[0][0]
    with torch.no_grad():
        assert torch.allclose(small(x), p(x, path="hard"), atol=1e-5)
    assert count_flops(small, EXAMPLE) == p.flops("hard")
    assert p.flops("hard") == p.flops_polynomial.flops_at(p.all_widths())
    assert abs(p.flops("hard") / p.flops("full") - 0.3) <= 0.01


def test_pruning_state_round_trip():
    p = make()
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.05)
    for x, y in batches(3):
        p.train_step(x, y, opt)
    p.on_epoch_end()
    state = p.pruning_state()
    q = make(seed=3)
    q.model.load_state_dict(p.model.state_dict())
    q.load_pruning_state(state)
    assert q.best == p.best and q.epoch == p.epoch
    assert q.sample_subnets() == p.sample_subnets()


def test_cli_prune_stp(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", "--method", "stp", "--epochs", "1", "--warmup-epochs", "0", "--image-size", "8",
                 "--max-steps-per-epoch", "3", "--batch-size", "16", "--recalibrate-batches", "2",
                 "--set", "population=4", "--set", "generations=1", "--out", str(out), "--no-progress"]) == 0
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
