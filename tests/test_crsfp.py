"""CR-SFP and SFP on the two-path engine: masks per criterion, gradients of the two paths, regrowth, the loss
formula, export equivalence, SFP's single head, state round trip and the command line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import s2hk
from s2hk import CRSFPruner, SFPruner
from s2hk.cli import main


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


EXAMPLE = torch.zeros(1, 3, 6, 6)
RATE = 0.25  # 8 channels -> 2 masked, 6 kept


def batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randn(n, 3, 6, 6, generator=g), \
        torch.randint(0, 4, (n,), generator=g)


def top(scores: torch.Tensor, rate: float = RATE) -> list[int]:
    keep = scores.numel() - int(scores.numel() * rate)
    return sorted(torch.sort(-scores, stable=True).indices[:keep].tolist())


def convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {"0": model[0], "3": model[3]}


def group_of(pruner: CRSFPruner, conv_name: str) -> str:
    for g in pruner.prunable:
        if conv_name in g.producers:
            return g.name
    raise AssertionError(conv_name)


def test_groups_and_two_heads():
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE)
    assert len(p.prunable) == 2 and p.head_node is not None
    assert p.pnn_head is not None and p.pnn_head is not model[8]
    assert torch.equal(p.pnn_head.weight, model[8].weight)
    assert any(q is p.pnn_head.weight for q in p.weight_parameters())
    assert p.mask_parameters() == []
    assert all(len(v) == 6 for v in p.kept_channels().values())


@pytest.mark.parametrize("criterion", ["l2", "fpgm"])
def test_masks_match_hand_computation(criterion):
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, criterion=criterion)
    kept = p.kept_channels()
    for name, conv in convs(model).items():
        w = conv.weight.detach().reshape(8, -1).double()
        if criterion == "l2":
            scores = torch.sqrt((w ** 2).sum(1))
        else:
            scores = torch.stack([sum(torch.sqrt(((w[i] - w[j]) ** 2).sum()) for j in range(8)) for i in range(8)])
        assert kept[group_of(p, name)] == top(scores)


def test_taylor_mask_matches_hand_computation():
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, criterion="taylor")
    x1, x2, y = batch()
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.0)  # weights stay put, gradients stay readable
    acc = {name: torch.zeros(8, dtype=torch.float64) for name in convs(model)}
    for _ in range(2):
        p.train_step((x1, x2), y, opt)
        for name, conv in convs(model).items():
            acc[name] += (conv.weight * conv.weight.grad).abs().reshape(8, -1).sum(1).double()
    p.on_epoch_end()
    kept = p.kept_channels()
    for name in convs(model):
        assert kept[group_of(p, name)] == top(acc[name])


def masked_rows(p: CRSFPruner, model: nn.Module, name: str) -> list[int]:
    kept = set(p.kept_channels()[group_of(p, name)])
    return [c for c in range(8) if c not in kept]


def test_pnn_gives_no_gradient_to_masked_filters_rnn_does():
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE)
    x1, x2, y = batch()
    p.prepare_hard()
    F.cross_entropy(p.run("hard", x1), y).backward()
    for name, conv in convs(model).items():
        masked = masked_rows(p, model, name)
        assert len(masked) == 2
        assert torch.count_nonzero(conv.weight.grad[masked]) == 0
        kept = [c for c in range(8) if c not in masked]
        assert torch.count_nonzero(conv.weight.grad[kept]) > 0
    assert model[8].weight.grad is None  # the P-NN uses its own head
    assert p.pnn_head.weight.grad is not None
    p.zero_grad(set_to_none=True)
    F.cross_entropy(p.run("dense", x2), y).backward()
    for name, conv in convs(model).items():
        masked = masked_rows(p, model, name)
        assert (conv.weight.grad[masked].reshape(2, -1).abs().sum(1) > 0).all()
    assert p.pnn_head.weight.grad is None and model[8].weight.grad is not None


def test_pruned_filter_regrows_after_epoch_end():
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE)
    c = masked_rows(p, model, "0")[0]
    with torch.no_grad():
        model[0].weight[c] *= 100.0
    assert c not in p.kept_channels()[group_of(p, "0")]  # masks change only at epoch ends
    p.on_epoch_end()
    assert c in p.kept_channels()[group_of(p, "0")]
    assert len(p.kept_channels()[group_of(p, "0")]) == 6


def hand_loss(p, x1, x2, y, alpha):
    p.prepare_hard()
    zp, zr = p.run("hard", x1), p.run("dense", x2)
    lp, lr = F.log_softmax(zp, -1), F.log_softmax(zr, -1)
    pp, pr = lp.exp(), lr.exp()
    kl_rp = (pr * (lr - lp)).sum(-1).mean()
    kl_pr = (pp * (lp - lr)).sum(-1).mean()
    ce_p = -lp[torch.arange(len(y)), y].mean()
    ce_r = -lr[torch.arange(len(y)), y].mean()
    return ce_p + ce_r + alpha / 2 * (kl_rp + kl_pr), ce_p, ce_r, (kl_rp + kl_pr) / 2


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_equals_formula(symmetric):
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, alpha=0.7, symmetric=symmetric)
    with torch.no_grad():  # heads differ, so the KD term is not trivially small
        p.pnn_head.weight.normal_()
    x1, x2, y = batch()
    with torch.no_grad():
        expected = hand_loss(p, x1, x2, y, 0.7)
        if symmetric:
            swapped = hand_loss(p, x2, x1, y, 0.7)
            expected = tuple((a + b) / 2 for a, b in zip(expected, swapped))
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.0)
    m = p.train_step((x1, x2), y, opt)
    for key, value in zip(("loss", "ce_pnn", "ce_rnn", "kd"), expected):
        assert m[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6)
    assert m["kd"] > 1e-3
    assert m["soft_acc"] == m["rnn_acc"] and m["hard_acc"] == m["pnn_acc"]
    assert m["hard_flops_ratio"] == pytest.approx(p.flops("hard") / p.flops("full"))


def test_export_equals_hard_path():
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE)
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.1)
    x1, x2, y = batch()
    for _ in range(3):
        p.train_step((x1, x2), y, opt)
    assert not torch.equal(p.pnn_head.weight, model[8].weight)
    p.eval()
    exported = p.export()
    with torch.no_grad():
        assert torch.allclose(exported(x1), p(x1, path="hard"), atol=1e-5)
        assert not torch.allclose(exported(x1), p(x1, path="dense"), atol=1e-3)
    assert exported.get_submodule("0").out_channels == 6 and exported.get_submodule("3").out_channels == 6
    kept = p.kept_channels()[group_of(p, "3")]
    assert torch.equal(exported.get_submodule("8").weight, p.pnn_head.weight[:, kept])
    assert s2hk.count_flops(exported, EXAMPLE) == p.flops("hard") < p.flops("full")


def test_sfp_single_head_no_kd():
    model = small_net()
    p = SFPruner(model, EXAMPLE, prune_rate=RATE)
    assert p.pnn_head is None and p.alpha == 0.0
    x1, x2, y = batch()
    with torch.no_grad():
        _, ce_p, ce_r, _ = hand_loss(p, x1, x1, y, 0.0)
    m = p.train_step(x1, y, torch.optim.SGD(p.weight_parameters(), lr=0.0))
    assert m["kd"] == 0.0
    assert m["loss"] == pytest.approx(float(ce_p + ce_r), rel=1e-6)
    assert model[8].weight.grad is not None
    p.eval()
    with torch.no_grad():
        assert torch.allclose(p.export()(x1), p(x1, path="hard"), atol=1e-5)


def test_pruning_state_round_trip():
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, criterion="taylor")
    x1, x2, y = batch()
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.1)
    p.train_step((x1, x2), y, opt)
    with torch.no_grad():
        model[0].weight[masked_rows(p, model, "0")[0]] *= 100.0
    p.on_epoch_end()
    p.train_step((x1, x2), y, opt)
    state = p.pruning_state()
    q = CRSFPruner(small_net(), EXAMPLE, prune_rate=RATE, criterion="taylor")
    q.model.load_state_dict(model.state_dict())
    q.load_pruning_state(state)
    assert q.kept_channels() == p.kept_channels()
    assert torch.equal(q.pnn_head.weight, p.pnn_head.weight)
    p.eval(), q.eval()
    with torch.no_grad():
        assert torch.equal(q(x1, path="hard"), p(x1, path="hard"))
    with pytest.raises(ValueError):
        SFPruner(small_net(), EXAMPLE, prune_rate=RATE).load_pruning_state(state)


def test_bad_arguments():
    with pytest.raises(ValueError):
        CRSFPruner(small_net(), EXAMPLE, criterion="l1")
    with pytest.raises(ValueError):
        CRSFPruner(small_net(), EXAMPLE, prune_rate=1.0)


TINY = ["--image-size", "8", "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0",
        "--max-steps-per-epoch", "2", "--recalibrate-batches", "1", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("method", ["crsfp", "sfp"])
def test_cli_prune(method, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--method", method, "--prune-rate", "0.5", "--set", "criterion=fpgm", "--out", str(out),
                 *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["target_flops"] is None
    assert 0 < summary["remaining_flops"] < 1
    assert (out / "pruned" / "model.pt").is_file()
    assert main(["eval", str(out), "--json"]) == 0
    # the run resumes from its checkpoint (pruning state included) without training again
    assert main(["prune", "--method", method, "--prune-rate", "0.5", "--set", "criterion=fpgm", "--out", str(out),
                 *TINY]) == 0
    capsys.readouterr()
    assert main(["prune", "--method", method, "--set", "mask_lr=3", "--out", str(out), *TINY]) == 2
    assert "mask_lr" in capsys.readouterr().err
