"""CR-SFP and SFP on the two-path engine, both structures: which layers are masked, masks per criterion,
gradients of the two paths, zeroing and regrowth, the loss formula, the export (== the P-NN, its FLOPs), SFP's
single head, state round trips, BN re-estimation, the Trainer and the command line."""
from __future__ import annotations

import io
import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import s2hk
from helpers import randomise_norms
from s2hk import CRSFPruner, SFPruner
from s2hk.cli import main
from s2hk.crsfp_layers import apply_pnn_edits, conv_roles, pnn_edits
from s2hk.export import export_hard_network
from s2hk.models import WideResNet, get_model
from s2hk.models.resnet import BasicBlock, Bottleneck, ResNet
from s2hk.trainer import TrainConfig, Trainer


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


# ============================================================================ structure="groups"

def test_groups_and_two_heads():
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, structure="groups")
    assert len(p.prunable) == 2 and p.head_node is not None
    assert p.pnn_head is not None and p.pnn_head is not model[8]
    assert torch.equal(p.pnn_head.weight, model[8].weight)
    assert any(q is p.pnn_head.weight for q in p.weight_parameters())
    assert p.mask_parameters() == []
    assert all(len(v) == 6 for v in p.kept_channels().values())


@pytest.mark.parametrize("criterion", ["l2", "fpgm"])
def test_masks_match_hand_computation(criterion):
    model = small_net()
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, criterion=criterion, structure="groups")
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
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, criterion="taylor", structure="groups")
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
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, structure="groups")
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
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, structure="groups")
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
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, structure="groups")
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
    p = CRSFPruner(model, EXAMPLE, prune_rate=RATE, criterion="taylor", structure="groups")
    x1, x2, y = batch()
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.1)
    p.train_step((x1, x2), y, opt)
    with torch.no_grad():
        model[0].weight[masked_rows(p, model, "0")[0]] *= 100.0
    p.on_epoch_end()
    p.train_step((x1, x2), y, opt)
    state = p.pruning_state()
    q = CRSFPruner(small_net(), EXAMPLE, prune_rate=RATE, criterion="taylor", structure="groups")
    q.model.load_state_dict(model.state_dict())
    q.load_pruning_state(state)
    assert q.kept_channels() == p.kept_channels()
    assert torch.equal(q.pnn_head.weight, p.pnn_head.weight)
    p.eval(), q.eval()
    with torch.no_grad():
        assert torch.equal(q(x1, path="hard"), p(x1, path="hard"))
    with pytest.raises(ValueError, match="separate P-NN head"):
        SFPruner(small_net(), EXAMPLE, prune_rate=RATE, structure="groups").load_pruning_state(state)
    with pytest.raises(ValueError, match="structure='groups'"):
        CRSFPruner(small_net(), EXAMPLE, prune_rate=RATE).load_pruning_state(state)


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
    args = ["prune", "--method", method, "--prune-rate", "0.5", "--set", "criterion=fpgm", "--set",
            "structure=groups", "--out", str(out), *TINY]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["target_flops"] is None
    assert 0 < summary["remaining_flops"] < 1
    assert (out / "pruned" / "model.pt").is_file()
    assert main(["eval", str(out), "--json"]) == 0
    # the run resumes from its checkpoint (pruning state included) without training again
    assert main(args) == 0
    capsys.readouterr()
    assert main(["prune", "--method", method, "--set", "mask_lr=3", "--out", str(out), *TINY]) == 2
    assert "mask_lr" in capsys.readouterr().err
    assert main(["prune", "--method", method, "--set", "structure=channels", "--out", str(tmp_path / "bad"),
                 *TINY]) == 2
    assert "structure" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["crsfp", "sfp"])
def test_cli_prune_per_layer(method, tmp_path):
    """The default structure through the command line: trained, exported (its exact FLOPs in the summary),
    resumed from its checkpoint."""
    out = tmp_path / "run"
    args = ["prune", "--method", method, "--prune-rate", "0.3", "--out", str(out), *TINY]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    dense = get_model("resnet56", num_classes=10)
    p = CRSFPruner(dense, torch.zeros(1, 3, 8, 8), prune_rate=0.3)
    assert summary["pruned_flops"] == p.flops("hard") and summary["dense_flops"] == p.flops("full")
    assert main(args) == 0


def test_cli_eval_per_layer(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", "--method", "crsfp", "--prune-rate", "0.3", "--out", str(out), *TINY]) == 0
    assert main(["eval", str(out), "--json"]) == 0


# ============================================================================ structure="layers" (the default)

def tiny_resnet(block: type = BasicBlock, widths: tuple = (8, 16)) -> ResNet:
    """Two stages of two blocks (a projection shortcut in the second), 8 stem channels, 5 classes."""
    return ResNet(block, [2, 2], widths=widths, num_classes=5, stem_width=8)


def masked_rows_of(p: CRSFPruner, target: str) -> list[int]:
    kept = set(p.kept_channels()[target])
    return [c for c in range(p.model.get_submodule(target).out_channels) if c not in kept]


def weights(p: CRSFPruner) -> dict[str, torch.Tensor]:
    return {layer.target: p.model.get_submodule(layer.target).weight for layer in p.masked_layers}


def randomise_hard_norms(p: CRSFPruner) -> None:
    """Non-trivial P-NN (hard-path) BatchNorm statistics, unlike the R-NN's."""
    with torch.no_grad():
        for w in p.wrappers.values():
            if getattr(w, "hard_running_mean", None) is not None:
                w.hard_running_mean.uniform_(-0.3, 0.3)
                w.hard_running_var.uniform_(0.5, 2.0)


def regrow(p: CRSFPruner, seed: int = 0) -> None:
    """Move every weight, masked filters included (what a training epoch through the R-NN does to them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in weights(p).values():
            w.add_(0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype))


@pytest.mark.parametrize("name, kwargs, size", [("resnet18", {"stem": "imagenet"}, 32),
                                                ("resnet50", {"stem": "imagenet"}, 32), ("resnet56", {}, 8)])
def test_every_block_conv_is_masked_on_its_own_never_stem_or_shortcut(name, kwargs, size):
    model = get_model(name, num_classes=5, **kwargs)
    p = CRSFPruner(model, torch.zeros(1, 3, size, size), prune_rate=0.3)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    block = [n for n in convs if re.fullmatch(r"layer\d+\.\d+\.conv\d", n)]  # the last conv of a block included
    assert [layer.target for layer in p.masked_layers] == block
    assert all(layer.removable and layer.masked == int(convs[layer.target].out_channels * 0.3)
               for layer in p.masked_layers)
    roles = {p.analysis.layers[node].target: role for node, role in conv_roles(p.analysis).items()}
    assert roles["conv1"] == "stem"
    shortcuts = [n for n in convs if "downsample" in n]
    assert shortcuts and all(roles[n] == "shortcut" for n in shortcuts)
    for target in block:
        assert len(masked_rows_of(p, target)) == int(convs[target].out_channels * 0.3)


class PoolShortcut(nn.Module):
    """A ResNet-D-like block (the shortcut pools, then projects) beside a one-conv residual branch and two
    one-conv branches summed, behind a stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a1, self.ba1 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a2, self.ba2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.proj, self.bp = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.single, self.bs = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.left, self.right = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.ba2(self.a2(F.relu(self.ba1(self.a1(x))))) + self.bp(self.proj(F.avg_pool2d(x, 2))))
        x = F.relu(self.bs(self.single(x)) + x)
        x = F.relu(self.left(x) + self.right(x))
        return self.fc(x.mean((2, 3)))


def test_roles_follow_the_graph_not_the_names():
    p = CRSFPruner(PoolShortcut(), torch.zeros(1, 3, 8, 8), prune_rate=0.25)
    roles = {p.analysis.layers[node].target: role for node, role in conv_roles(p.analysis).items()}
    assert roles == {"stem": "stem", "a1": "block", "a2": "block", "proj": "shortcut", "single": "block",
                     "left": "block", "right": "block"}
    removable = {layer.target: layer.removable for layer in p.masked_layers}
    # left and right meet in one sum: the export restores one narrowed operand, so it keeps both whole
    assert removable == {"a1": True, "a2": True, "single": True, "left": False, "right": False}


def test_pre_activation_shortcut_depthwise_and_grouped_convs():
    wrn = CRSFPruner(WideResNet(depth=10, widen_factor=2, num_classes=5), torch.zeros(1, 3, 8, 8))
    roles = {wrn.analysis.layers[node].target: role for node, role in conv_roles(wrn.analysis).items()}
    assert {t for t, r in roles.items() if r == "shortcut"} == {"block1.0.shortcut", "block2.0.shortcut",
                                                                  "block3.0.shortcut"}
    assert {t for t, r in roles.items() if r == "block"} == {f"block{i}.0.conv{j}" for i in (1, 2, 3) for j in (1, 2)}
    mobile = CRSFPruner(get_model("mobilenet_v3_small", num_classes=5), torch.zeros(1, 3, 16, 16))
    roles = conv_roles(mobile.analysis)
    depthwise = {node for node, spec in mobile.analysis.layers.items() if spec.depthwise}
    assert depthwise and all(roles[node] == "depthwise" for node in depthwise)
    assert not {layer.node for layer in mobile.masked_layers} & depthwise


def test_masked_filters_are_zeroed_in_place_at_construction_and_every_epoch_end_and_can_regrow():
    model = tiny_resnet()
    p = CRSFPruner(model, torch.zeros(1, 3, 8, 8), prune_rate=0.3)
    target = p.masked_layers[-1].target  # a block's last conv: its output feeds the residual sum
    for name, w in weights(p).items():
        masked = masked_rows_of(p, name)
        assert masked and torch.count_nonzero(w[masked]) == 0
        assert torch.count_nonzero(w[[c for c in range(w.shape[0]) if c not in masked]].abs().sum((1, 2, 3))) \
            == w.shape[0] - len(masked)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.5)
    p.train_step((x, x), y, opt)
    before = masked_rows_of(p, target)
    assert torch.count_nonzero(weights(p)[target][before]) > 0  # the R-NN's gradient moved them
    with torch.no_grad():
        weights(p)[target][before[0]].fill_(10.0)  # grew more than any kept filter
    p.on_epoch_end()
    after = masked_rows_of(p, target)
    assert before[0] not in after and len(after) == len(before)  # it came back
    for name, w in weights(p).items():
        assert torch.count_nonzero(w[masked_rows_of(p, name)]) == 0


def test_pnn_loss_gives_masked_filters_exactly_zero_gradient_rnn_loss_does_not():
    model = tiny_resnet()
    p = CRSFPruner(model, torch.zeros(1, 3, 8, 8), prune_rate=0.3)
    regrow(p)  # masked filters are not zero mid-epoch; the P-NN must not see them
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    p.prepare_hard()
    F.cross_entropy(p.run("hard", x), y).backward()
    for name, w in weights(p).items():
        masked = masked_rows_of(p, name)
        kept = [c for c in range(w.shape[0]) if c not in masked]
        assert torch.count_nonzero(w.grad[masked]) == 0
        assert (w.grad[kept].flatten(1).abs().sum(1) > 0).all()
    p.zero_grad(set_to_none=True)
    F.cross_entropy(p.run("dense", x), y).backward()
    for name, w in weights(p).items():
        assert (w.grad[masked_rows_of(p, name)].flatten(1).abs().sum(1) > 0).all()


def test_pnn_is_the_network_with_masked_filters_zeroed():
    model = tiny_resnet()
    p = CRSFPruner(model, torch.zeros(1, 3, 8, 8), prune_rate=0.3, two_heads=False)
    regrow(p)
    x = torch.randn(4, 3, 8, 8)
    p.train()
    p.prepare_hard()
    pnn = p.run("hard", x)
    with torch.no_grad():
        for name, w in weights(p).items():
            w[masked_rows_of(p, name)] = 0.0
    assert torch.equal(pnn, p.run("hard", x))  # zeroing changes nothing the P-NN computes
    # the dense path with zeroed filters and the P-NN's statistics differs only in BN statistics: same in train mode
    torch.testing.assert_close(p.run("dense", x), pnn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion, frozen", [("fpgm", True), ("l2", False)])
def test_fpgm_also_zeroes_masked_gradients_every_step(criterion, frozen):
    p = CRSFPruner(tiny_resnet(), torch.zeros(1, 3, 8, 8), prune_rate=0.3, criterion=criterion)
    regrow(p)  # a zeroed filter before a ReLU whose BN shift is 0 gets no gradient anyway: move them first
    before = {name: w.detach().clone() for name, w in weights(p).items()}
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    p.train_step((x, x), y, torch.optim.SGD(p.weight_parameters(), lr=0.1))
    for name, w in weights(p).items():
        masked = masked_rows_of(p, name)
        assert (torch.count_nonzero(w.grad[masked]) == 0) == frozen
        assert torch.equal(w[masked], before[name][masked]) == frozen


def pnn_case(model: nn.Module, size: int, seed: int = 0) -> tuple[CRSFPruner, torch.Tensor]:
    """A float64 pruner in eval mode with random R-NN and P-NN BN statistics and affine parameters, masked
    filters regrown, a trained-looking P-NN head; and a batch."""
    torch.manual_seed(seed)
    model = randomise_norms(model).double()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    p = CRSFPruner(model, x[:1], prune_rate=0.3)
    randomise_hard_norms(p)
    regrow(p, seed)
    with torch.no_grad():
        p.pnn_head.weight.normal_()
    return p.eval(), x


class InplaceBlock(nn.Module):
    """The authors' basic block idiom: ``out += residual`` and ``ReLU(inplace=True)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        return self.relu(out)


def inplace_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), InplaceBlock(8),
                         InplaceBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


EXPORT_CASES = [
    ("inplace-idiom", inplace_net, 8),
    ("resnet20-like", lambda: ResNet(BasicBlock, [3, 3, 3], widths=(16, 32, 64), num_classes=5, stem_width=16), 8),
    ("resnet56", lambda: get_model("resnet56", num_classes=5), 8),
    ("resnet18", lambda: get_model("resnet18", num_classes=5, stem="imagenet"), 32),
    ("resnet50", lambda: get_model("resnet50", num_classes=5, stem="imagenet"), 32),
    ("bottleneck-like", lambda: tiny_resnet(Bottleneck, (4, 8)), 8),
]


@pytest.mark.parametrize("name, build, size", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_export_is_the_masked_pnn_physically_smaller_plain_and_counted_exactly(name, build, size):
    p, x = pnn_case(build(), size)
    exported = p.export()
    with torch.no_grad():
        out = exported(x)
        torch.testing.assert_close(out, p(x, path="hard"), rtol=1e-12, atol=1e-12)
        assert torch.equal(exported(x), out)  # deterministic
        assert not torch.allclose(out, p(x, path="dense"), atol=1e-3)
    assert all(type(m).__module__.startswith("torch") for m in exported.modules())
    for layer in p.masked_layers:
        assert exported.get_submodule(layer.target).out_channels == layer.channels - layer.masked
    # a 3x3 conv reading removed channels responds to them less near the borders: a map, not a bias
    assert any(b.dim() == 3 and b.shape[1] > 1 for k, b in exported.named_buffers() if k.startswith("s2hk_pnn"))
    assert s2hk.count_flops(exported, x[:1]) == p.flops("hard") < p.flops("full")
    saved = io.BytesIO()
    torch.save(exported.state_dict(), saved)
    saved.seek(0)
    again = p.export()
    again.load_state_dict(torch.load(saved, weights_only=True))
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_export_graph_changes_and_state_dict_rebuild_the_pnn():
    """The edits' JSON and the state_dict suffice: the narrow layers alone, plus the edits applied, loaded
    with the exported state_dict, compute the exported P-NN (what loading a saved model has to do)."""
    p, x = pnn_case(tiny_resnet(), 8)
    exported = p.export()
    edits = json.loads(json.dumps(pnn_edits(p)))
    assert {e["kind"] for e in edits} == {"conv", "add"}
    rebuilt = export_hard_network(p)
    apply_pnn_edits(rebuilt, edits)
    rebuilt.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), exported(x))


def test_export_is_made_for_the_example_size_where_a_border_map_is_stored():
    p, _ = pnn_case(tiny_resnet(), 8)
    exported = p.export()
    with pytest.raises(RuntimeError):
        exported(torch.randn(1, 3, 16, 16, dtype=torch.float64))


def test_unremovable_layers_export_their_masked_filters_zeroed():
    """A conv before global pooling (its channels reach no conv or sum) stays whole in the export, masked
    filters zero: still the P-NN, counted at full width; the removed channels of the conv before it reach only
    its kept filters."""
    torch.manual_seed(0)
    model = randomise_norms(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))).double()
    p = CRSFPruner(model, EXAMPLE.double(), prune_rate=RATE)
    assert [(layer.target, layer.removable) for layer in p.masked_layers] == [("3", True), ("6", False)]
    randomise_hard_norms(p)
    regrow(p)
    p.eval()
    x = batch()[0].double()
    exported = p.export()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), p(x, path="hard"), rtol=1e-12, atol=1e-12)
    assert exported.get_submodule("6").out_channels == 8
    assert torch.count_nonzero(exported.get_submodule("6").weight[masked_rows_of(p, "6")]) == 0
    assert p.flops("full") > p.flops("hard") == s2hk.count_flops(exported, EXAMPLE.double())


def test_pruning_state_round_trip_and_refusals_write_nothing():
    model = tiny_resnet()
    p = CRSFPruner(model, torch.zeros(1, 3, 8, 8), prune_rate=0.3, criterion="taylor")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.1)
    p.train_step((x, x), y, opt)
    p.on_epoch_end()
    p.train_step((x, x), y, opt)
    state = p.pruning_state()
    assert state["structure"] == "layers" and [t for t, _ in state["layers"]] == [l.target for l in p.masked_layers]

    q = CRSFPruner(tiny_resnet(), torch.zeros(1, 3, 8, 8), prune_rate=0.3, criterion="taylor")
    q.model.load_state_dict(model.state_dict())
    untouched = {k: v.clone() for k, v in q.state_dict().items()}
    bad = [{**state, "layers": state["layers"][:-1]},                      # saved for other layers
           {**state, "kept": {**state["kept"], "layer1.0.conv1": [0, 1]}},  # another rate
           {**state, "structure": "groups"}]
    for wrong in bad:
        with pytest.raises(ValueError):
            q.load_pruning_state(wrong)
        assert all(torch.equal(v, untouched[k]) for k, v in q.state_dict().items())
    with pytest.raises(ValueError, match="different block convolutions"):
        CRSFPruner(tiny_resnet(Bottleneck, (4, 8)), torch.zeros(1, 3, 8, 8), prune_rate=0.3,
                   criterion="taylor").load_pruning_state(state)

    q.load_pruning_state(state)
    assert q.kept_channels() == p.kept_channels()
    assert all(torch.equal(a, b) for a, b in zip(q._taylor, p._taylor))
    p.eval(), q.eval()
    with torch.no_grad():
        assert torch.equal(q(x, path="hard"), p(x, path="hard"))
        assert torch.equal(q.export()(x), p.export()(x))


def test_recalibrate_bn_re_estimates_each_network_s_own_statistics():
    p = CRSFPruner(tiny_resnet(), torch.zeros(1, 3, 8, 8), prune_rate=0.3)
    regrow(p)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    assert p.recalibrate_bn(batches, 3) == 3
    layer = p.masked_layers[0]
    norm = p.wrappers[layer.norms[0]]
    masked = masked_rows_of(p, layer.target)
    # the P-NN's masked conv outputs zero, the R-NN's (regrown) filters do not
    assert torch.count_nonzero(norm.hard_running_mean[masked]) == 0
    assert torch.count_nonzero(norm.hard_running_var[masked]) == 0
    assert (norm.module.running_var[masked] > 0).all()
    assert int(norm.hard_num_batches_tracked) == 3 and int(norm.module.num_batches_tracked) == 3


def test_trainer_zeroes_at_epoch_end_and_reports_the_pnn_flops():
    from s2hk.data import make_loaders

    train, val = make_loaders("digits", batch_size=16, image_size=8, two_views=True)
    model = ResNet(BasicBlock, [1, 1], widths=(8, 16), num_classes=train.num_classes, stem_width=8)
    p = CRSFPruner(model, torch.zeros(1, 3, 8, 8), prune_rate=0.3)
    trainer = Trainer(p, train, val, epochs=1, config=TrainConfig(lr=0.05, progress=False, max_steps_per_epoch=2,
                                                                   recalibrate_batches=1))
    result = trainer.fit()
    assert p.flops("hard") < p.flops("full")
    assert result["hard_flops_ratio"] == pytest.approx(p.flops("hard") / p.flops("full"))
    for name, w in weights(p).items():
        assert torch.count_nonzero(w[masked_rows_of(p, name)]) == 0


def test_masks_follow_dtype_and_meta_moves():
    """The masks are buffers of the conv wrappers: ``.double()`` converts them, a trip through ``"meta"`` and
    back is restored by the pruner's state_dict or its pruning state, and the export still equals the P-NN."""
    torch.manual_seed(0)
    p = CRSFPruner(tiny_resnet(), torch.zeros(1, 3, 8, 8), prune_rate=0.3)
    regrow(p)
    p.double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = p(x, path="hard")
        torch.testing.assert_close(p.export()(x), reference, rtol=1e-12, atol=1e-12)
    weights_state, pruning = p.state_dict(), p.pruning_state()
    p.to("meta")
    p.to_empty(device="cpu")
    p.load_state_dict(weights_state)
    p.load_pruning_state(pruning)
    with torch.no_grad():
        assert torch.equal(p(x, path="hard"), reference)
        torch.testing.assert_close(p.export()(x), reference, rtol=1e-12, atol=1e-12)


def test_flops_script_counts_the_exported_pnn(tmp_path):
    """bench/crsfp_flops.py at a small input: its P-NN counts are the exports' and agree with flops()."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "crsfp_flops.py"
    spec = importlib.util.spec_from_file_location("crsfp_flops", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "flops.json"
    assert script.main(["--size", "32", "--out", str(out)]) == 0
    rows = {(r["model"], r["structure"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(m, s) for m in ("resnet18", "resnet50") for s in ("layers", "groups")}
    for row in rows.values():
        assert 0 < row["reduction"] < 1 and row["paper_reduction"] is None  # the paper's figure is for 224 px
        if row["structure"] == "layers":  # the stem, shortcuts and classifier are kept whole
            assert row["reduction"] < row["block_reduction"] < 1
    assert rows[("resnet18", "layers")]["masked_convs"] == 16 and rows[("resnet50", "layers")]["masked_convs"] == 48
    assert "| resnet18 | layers | 1x3x32x32 |" in out.with_suffix(".md").read_text()
