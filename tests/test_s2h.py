"""S2HPruner.train_step, its phases, BN recalibration, evaluation and the pruning state.

The reference values come from forwards of the test network written out by hand (sliced weights for the hard
network, BN with the keep-probabilities folded into its affine parameters for the soft one), with importance
ranks, keep-probabilities and hard widths computed from the spec's formulas in plain Python.
"""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import S2HPruner, dispatch
from helpers import TwoConvNet as Net

NUM_CLASSES = 5
EPS = 1e-5
KEYS = {"loss", "kd_hard", "kd_soft", "flops_loss", "soft_flops_ratio", "hard_flops_ratio", "hard_flops_ratio_prunable",
        "soft_acc", "hard_acc"}


class Other(nn.Module):
    """A different network (different layer names)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def make(seed: int = 0, dtype=torch.float64, logits=None, net=None, **overrides) -> S2HPruner:
    torch.manual_seed(seed)
    model = (net or Net()).to(dtype)
    settings = dict(target_flops=0.35, granularity=2, mask_lr=5.0, alpha=1.0)
    settings.update(overrides)
    pruner = S2HPruner(model, torch.randn(1, 3, 6, 6, dtype=dtype), **settings).to(dtype)
    if logits is not None:
        with torch.no_grad():
            pruner.mask_logits.copy_(logits.to(dtype) if isinstance(logits, torch.Tensor)
                                     else logits * torch.randn(pruner.mask_logits.shape, dtype=dtype))
        pruner.refresh_plan()
    return pruner


def data(seed: int, n: int = 8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 6, 6, generator=gen, dtype=dtype),
            torch.randint(0, NUM_CLASSES, (n,), generator=gen))


# ----------------------------------------------------------------------------------------- hand formulas

def hand_ranks(weight):
    """Importance ranks: L1 norm of each output filter, descending, ties to the lower channel index."""
    imp = weight.detach().abs().reshape(weight.shape[0], -1).sum(1).tolist()
    order = sorted(range(len(imp)), key=lambda c: (-imp[c], c))
    ranks = [0] * len(imp)
    for r, c in enumerate(order):
        ranks[c] = r
    return ranks


def hand_group(u, weight, d: int, tau: float = 1.0):
    """p, E, k, the kept channels and the per-channel keep-probabilities w of one group."""
    channels = weight.shape[0]
    logits = [float(v) / tau for v in u]
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    p = [v / sum(e) for v in e]
    n = [d * (j + 1) for j in range(len(p))]
    expected = sum(a * b for a, b in zip(p, n))
    k = min(channels, d * math.ceil(math.ceil(expected) / d))
    ranks = hand_ranks(weight)
    kept = sorted(c for c in range(channels) if ranks[c] < k)
    w = [sum(pj for pj, nj in zip(p, n) if nj > ranks[c]) for c in range(channels)]
    return {"k": k, "kept": kept, "w": torch.tensor(w, dtype=weight.dtype), "ranks": ranks}


def hand_plan(pruner):
    model = pruner.model
    u = pruner.mask_logits.detach()
    lo = pruner.gate_layout.logit_offsets
    return (hand_group(u[lo[0]:lo[1]], model.c1.weight, 2, pruner.tau),
            hand_group(u[lo[1]:lo[2]], model.c2.weight, 2, pruner.tau))


def hand_flops_ratio(k1, k2, c1=8, c2=12):
    def macs(a, b):
        return 36 * 27 * a + 36 * 9 * a * b + b * NUM_CLASSES
    return macs(k1, k2) / macs(c1, c2)


def kept_list(sel, channels):
    if sel is None:
        return list(range(channels))
    if isinstance(sel, int):
        return list(range(sel))
    return sel.tolist()


def bn(z, gamma, beta, mean=None, var=None):
    if mean is None:
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
    shape = (1, -1, 1, 1)
    return (z - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * gamma.view(shape) + beta.view(shape)


def params_of(model):
    return {"W1": model.c1.weight, "g1": model.b1.weight, "b1": model.b1.bias, "W2": model.c2.weight,
            "g2": model.b2.weight, "b2": model.b2.bias, "Wfc": model.fc.weight, "bfc": model.fc.bias}


def hand_hard(P, x, s1, s2, stats=None):
    """The hard network by hand: weights sliced to the kept channels; BN on batch statistics unless ``stats``
    = ((mean1, var1), (mean2, var2)) for the kept channels. Returns logits and the two pre-BN activations."""
    s1, s2 = torch.tensor(s1), torch.tensor(s2)
    z1 = F.conv2d(x, P["W1"][s1], padding=1)
    a1 = F.relu(bn(z1, P["g1"][s1], P["b1"][s1], *(stats[0] if stats else ())))
    z2 = F.conv2d(a1, P["W2"][s2][:, s1], padding=1)
    a2 = F.relu(bn(z2, P["g2"][s2], P["b2"][s2], *(stats[1] if stats else ())))
    return F.linear(a2.mean((2, 3)), P["Wfc"][:, s2], P["bfc"]), z1, z2


def hand_soft(P, x, w1, w2, stats=None):
    """The soft network by hand: full width, BN(x) * w = xhat * (gamma w) + beta w."""
    z1 = F.conv2d(x, P["W1"], padding=1)
    a1 = F.relu(bn(z1, P["g1"] * w1, P["b1"] * w1, *(stats[0] if stats else ())))
    z2 = F.conv2d(a1, P["W2"], padding=1)
    a2 = F.relu(bn(z2, P["g2"] * w2, P["b2"] * w2, *(stats[1] if stats else ())))
    return F.linear(a2.mean((2, 3)), P["Wfc"], P["bfc"])


def hard_buffers(pruner):
    return {name: {k: v.clone() for k, v in w.state_dict().items() if k.startswith("hard_")}
            for name, w in pruner.wrappers.items() if getattr(w, "hard_running_mean", None) is not None}


def module_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def equal_dicts(a, b):
    return a.keys() == b.keys() and all(
        equal_dicts(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


def accuracy(logits, y):
    return (logits.argmax(-1) == y).double().mean().item()


# ----------------------------------------------------------------------------------------- train_step

def test_train_step_metrics_are_the_documented_floats_and_values():
    pruner = make(logits=2.0, mask_lr=50.0, flops_weight=2.0, alpha=0.5)
    x, y = data(1)
    g1, g2 = hand_plan(pruner)
    assert (kept_list(pruner.plan.selections[0], 8), kept_list(pruner.plan.selections[1], 12)) == \
        (g1["kept"], g2["kept"])
    P = params_of(pruner.model)
    with torch.no_grad():
        s = hand_soft(P, x, g1["w"], g2["w"])
        h, _, _ = hand_hard(P, x, g1["kept"], g2["kept"])
    ratio = hand_flops_ratio(g1["k"], g2["k"])
    kd = F.kl_div(F.log_softmax(h, -1), F.log_softmax(s, -1), reduction="batchmean", log_target=True).item()

    metrics = pruner.train_step(x, y, torch.optim.SGD(pruner.weight_parameters(), lr=0.1, momentum=0.9))
    assert set(metrics) == KEYS
    assert all(type(v) is float for v in metrics.values())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-10)
    assert metrics["kd_hard"] == pytest.approx(0.5 * kd, rel=1e-8)
    assert metrics["kd_soft"] == pytest.approx(0.5 * kd, rel=1e-8)
    assert metrics["soft_flops_ratio"] == pytest.approx(ratio, rel=1e-12)
    assert metrics["flops_loss"] == pytest.approx(2.0 * (ratio - 0.35) ** 2, rel=1e-12)
    assert metrics["soft_acc"] == accuracy(s, y)
    assert metrics["hard_acc"] == accuracy(h, y)
    # hard_flops_ratio is that of the next step's hard network: the updated logits and weights
    n1, n2 = hand_plan(pruner)
    assert (n1["k"], n2["k"]) != (g1["k"], g2["k"])
    assert metrics["hard_flops_ratio"] == pytest.approx(hand_flops_ratio(n1["k"], n2["k"]), rel=1e-12)
    assert pruner.plan.widths == [n1["k"], n2["k"]]
    assert kept_list(pruner.plan.selections[0], 8) == n1["kept"]
    assert kept_list(pruner.plan.selections[1], 12) == n2["kept"]


def _run(seed: int, steps: int = 5):
    pruner = make(seed=seed, dtype=torch.float32, mask_lr=20.0, target_flops=0.3)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    history = []
    for step in range(steps):
        x, y = data(100 + step, dtype=torch.float32)
        history.append(pruner.train_step(x, y, opt))
    x, _ = data(999, dtype=torch.float32)
    pruner.eval()
    with torch.no_grad():
        outputs = (pruner(x, path="soft"), pruner(x, path="hard"))
    return pruner, history, outputs


def test_train_step_is_deterministic():
    a, hist_a, out_a = _run(seed=3)
    b, hist_b, out_b = _run(seed=3)
    assert hist_a == hist_b  # bit-identical floats (no NaN in the joint phase)
    assert all(not math.isnan(v) for h in hist_a for v in h.values())
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.mask_logits, b.mask_logits)
    assert torch.equal(a.ranks, b.ranks)
    assert equal_dicts(hard_buffers(a), hard_buffers(b))
    assert all(torch.equal(p, q) for p, q in zip(out_a, out_b))
    assert a.plan.widths == b.plan.widths
    # and the run did something: the architecture moved away from full width
    assert a.plan.widths != [8, 12]
    _, hist_c, _ = _run(seed=4)
    assert hist_c != hist_a


def test_warmup_trains_the_dense_network_only():
    pruner = make(logits=2.0)
    pruner.set_phase("warmup")
    model = pruner.model
    reference = copy.deepcopy(model)
    start = copy.deepcopy(model)
    logits, plan, hard_bn = pruner.mask_logits.detach().clone(), copy.deepcopy(pruner.plan), hard_buffers(pruner)
    x, y = data(2)
    lr = 0.2
    metrics = pruner.train_step(x, y, torch.optim.SGD(pruner.weight_parameters(), lr=lr))
    # by hand: one SGD step of CE on the plain model
    loss = F.cross_entropy(reference(x), y)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= lr * p.grad
    assert set(metrics) == KEYS and all(type(v) is float for v in metrics.values())
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.equal(model.c1.weight, start.c1.weight)
    assert not torch.equal(model.b1.running_mean, start.b1.running_mean)
    assert torch.equal(pruner.mask_logits.detach(), logits)
    assert equal_dicts(hard_buffers(pruner), hard_bn)
    assert pruner.plan.widths == plan.widths


def test_hard_phase_pins_the_architecture_and_trains_only_the_hard_network():
    pruner = make(logits=2.0, seed=1)
    x0, y0 = data(3)
    pruner.train_step(x0, y0, torch.optim.SGD(pruner.weight_parameters(), lr=0.1))  # a joint step first
    g1, g2 = hand_plan(pruner)
    assert g1["k"] < 8 or g2["k"] < 12
    pruner.set_phase("hard")
    assert pruner.phase == "hard"
    widths = list(pruner.plan.widths)
    kept = [kept_list(s, c) for s, c in zip(pruner.plan.selections, (8, 12))]
    assert kept == [g1["kept"], g2["kept"]]
    logits = pruner.mask_logits.detach().clone()
    stats = module_stats(pruner.model)
    hard_bn = hard_buffers(pruner)

    lr = 0.3
    P = {k: v.detach().clone().requires_grad_(True) for k, v in params_of(pruner.model).items()}
    x, y = data(4)
    h, z1, _ = hand_hard(P, x, *kept)
    loss = F.cross_entropy(h, y)
    loss.backward()
    metrics = pruner.train_step(x, y, torch.optim.SGD(pruner.weight_parameters(), lr=lr))
    assert set(metrics) == KEYS and all(type(v) is float for v in metrics.values())
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert metrics["hard_acc"] == accuracy(h, y)
    for name, p in params_of(pruner.model).items():
        want = P[name].detach() - lr * P[name].grad
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14, msg=name)
    # pruned channels' weights did not move
    s1 = torch.tensor(kept[0])
    dropped1 = torch.tensor([c for c in range(8) if c not in kept[0]])
    if dropped1.numel():
        assert torch.equal(pruner.model.c1.weight[dropped1], P["W1"].detach()[dropped1])
    # the module's own BN statistics are the dense network's: untouched; the hard ones follow momentum 0.1
    assert equal_dicts(module_stats(pruner.model), stats)
    new_bn = hard_buffers(pruner)
    mean1 = z1.detach().mean((0, 2, 3))
    var1 = z1.detach().var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(new_bn["b1"]["hard_running_mean"][s1],
                               0.9 * hard_bn["b1"]["hard_running_mean"][s1] + 0.1 * mean1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(new_bn["b1"]["hard_running_var"][s1],
                               0.9 * hard_bn["b1"]["hard_running_var"][s1] + 0.1 * var1, rtol=1e-12, atol=1e-14)

    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.5)
    for step in range(3):
        pruner.train_step(*data(10 + step), opt)
        assert pruner.plan.widths == widths
        assert [kept_list(s, c) for s, c in zip(pruner.plan.selections, (8, 12))] == kept
    pruner.refresh_plan()  # weights changed (ranks may differ now), the pins hold
    assert pruner.plan.widths == widths
    assert [kept_list(s, c) for s, c in zip(pruner.plan.selections, (8, 12))] == kept
    assert torch.equal(pruner.mask_logits.detach(), logits)
    assert equal_dicts(module_stats(pruner.model), stats)


def test_set_phase_rejects_unknown_phase():
    pruner = make()
    with pytest.raises(ValueError, match="phase"):
        pruner.set_phase("finetune")


# ----------------------------------------------------------------------------------------- BN and evaluation

def test_recalibrate_bn_re_estimates_the_soft_and_the_hard_statistics():
    pruner = make(logits=2.0, seed=2)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1)
    for step in range(2):
        pruner.train_step(*data(20 + step), opt)
    g1, g2 = hand_plan(pruner)
    kept = [kept_list(s, c) for s, c in zip(pruner.plan.selections, (8, 12))]
    assert kept == [g1["kept"], g2["kept"]] and (g1["k"] < 8 or g2["k"] < 12)
    stats = module_stats(pruner.model)
    weights = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    batches = [data(30 + i) for i in range(5)]
    pruner.eval()
    used = pruner.recalibrate_bn(batches, num_batches=3)
    assert used == 3
    assert not pruner.training
    assert pruner.model.b1.momentum == 0.1 and pruner.model.b2.momentum == 0.1
    state = pruner.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k not in stats)
    assert not equal_dicts(module_stats(pruner.model), stats)

    P = params_of(pruner.model)
    means1, vars1, means2, vars2 = [], [], [], []
    soft_stats = [[], [], [], []]  # running mean and variance of b1, b2
    with torch.no_grad():
        for x, _ in batches[:3]:
            _, z1, z2 = hand_hard(P, x, *kept)
            means1.append(z1.mean((0, 2, 3)))
            vars1.append(z1.var((0, 2, 3), unbiased=True))
            means2.append(z2.mean((0, 2, 3)))
            vars2.append(z2.var((0, 2, 3), unbiased=True))
            # the soft network at its keep-probabilities: BN(z) * w folded into the affine parameters
            s1 = F.conv2d(x, P["W1"], padding=1)
            a1 = F.relu(bn(s1, P["g1"] * g1["w"], P["b1"] * g1["w"]))
            s2 = F.conv2d(a1, P["W2"], padding=1)
            for i, v in enumerate((s1.mean((0, 2, 3)), s1.var((0, 2, 3), unbiased=True),
                                   s2.mean((0, 2, 3)), s2.var((0, 2, 3), unbiased=True))):
                soft_stats[i].append(v)
    module = module_stats(pruner.model)
    for key, values in zip(("b1.running_mean", "b1.running_var", "b2.running_mean", "b2.running_var"), soft_stats):
        torch.testing.assert_close(module[key], torch.stack(values).mean(0), rtol=1e-12, atol=1e-14)
    assert int(module["b1.num_batches_tracked"]) == int(module["b2.num_batches_tracked"]) == 3
    new = hard_buffers(pruner)
    s1, s2 = torch.tensor(kept[0]), torch.tensor(kept[1])
    for name, sel, means, variances in (("b1", s1, means1, vars1), ("b2", s2, means2, vars2)):
        torch.testing.assert_close(new[name]["hard_running_mean"][sel], torch.stack(means).mean(0),
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(new[name]["hard_running_var"][sel], torch.stack(variances).mean(0),
                                   rtol=1e-12, atol=1e-14)
        assert int(new[name]["hard_num_batches_tracked"]) == 3


def test_evaluate_reports_soft_and_hard_accuracy_and_their_gap():
    # logits favouring the narrowest widths: a hard network far from the soft one
    u = torch.tensor([2.0, 0.0, 0.0, 0.0] + [2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    pruner = make(logits=u, seed=4, mask_lr=0.0)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1)
    for step in range(2):
        pruner.train_step(*data(40 + step), opt)
    pruner.recalibrate_bn([data(50 + i) for i in range(3)])
    g1, g2 = hand_plan(pruner)
    kept = [kept_list(s, c) for s, c in zip(pruner.plan.selections, (8, 12))]
    assert kept == [g1["kept"], g2["kept"]] and g1["k"] < 8 and g2["k"] < 12
    model = pruner.model
    P = params_of(model)
    s1, s2 = torch.tensor(kept[0]), torch.tensor(kept[1])
    hard_stats = ((pruner.wrappers["b1"].hard_running_mean[s1], pruner.wrappers["b1"].hard_running_var[s1]),
                  (pruner.wrappers["b2"].hard_running_mean[s2], pruner.wrappers["b2"].hard_running_var[s2]))
    soft_stats = ((model.b1.running_mean, model.b1.running_var), (model.b2.running_mean, model.b2.running_var))
    batches, agree, total = [], 0, 0
    with torch.no_grad():
        for i in range(3):
            x, _ = data(60 + i, n=10)
            soft_pred = hand_soft(P, x, g1["w"], g2["w"], soft_stats).argmax(-1)
            hard_pred = hand_hard(P, x, *kept, stats=hard_stats)[0].argmax(-1)
            batches.append((x, soft_pred))  # labels = the soft network's predictions
            agree += int((soft_pred == hard_pred).sum())
            total += x.shape[0]
    assert agree < total, "the test needs the two paths to disagree somewhere"
    stats = module_stats(model)
    hard_bn = hard_buffers(pruner)
    pruner.train()
    result = pruner.evaluate(batches)
    assert pruner.training
    assert set(result) == {"soft_acc", "hard_acc", "gap"}
    assert result["soft_acc"] == pytest.approx(1.0, abs=1e-12)
    assert result["hard_acc"] == pytest.approx(agree / total, abs=1e-12)
    assert result["gap"] == pytest.approx(1.0 - agree / total, abs=1e-12)
    assert equal_dicts(module_stats(model), stats) and equal_dicts(hard_buffers(pruner), hard_bn)
    assert pruner.evaluate(batches, paths=("hard",)) == {"hard_acc": pytest.approx(agree / total, abs=1e-12)}


# ----------------------------------------------------------------------------------------- pruning state

def _snapshot(pruner):
    return {"logits": pruner.mask_logits.detach().clone(), "ranks": pruner.ranks.clone(),
            "pinned": {k: (v if isinstance(v, int) else v.tolist()) for k, v in pruner._pinned.items()},
            "hard_bn": hard_buffers(pruner), "phase": pruner.phase, "widths": list(pruner.plan.widths),
            "kept": [kept_list(s, c) for s, c in zip(pruner.plan.selections, (8, 12))],
            "mask_lr": pruner.mask_optimizer.lr, "momentum": pruner.mask_optimizer.state_dict()["momentum_buffer"]}


def _same(a, b):
    return (torch.equal(a["logits"], b["logits"]) and torch.equal(a["ranks"], b["ranks"])
            and a["pinned"] == b["pinned"] and equal_dicts(a["hard_bn"], b["hard_bn"]) and a["phase"] == b["phase"]
            and a["widths"] == b["widths"] and a["kept"] == b["kept"] and a["mask_lr"] == b["mask_lr"]
            and _same_buffer(a["momentum"], b["momentum"]))


def _same_buffer(a, b):
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


@pytest.mark.parametrize("importance", ["dynamic", "frozen"])
def test_pruning_state_round_trip(importance):
    """Saved with the model's weights (a checkpoint), restored into the same pruner after it moved on, and into
    a fresh one. With frozen importance the ranks cannot be re-derived from the weights: they must come back
    from the state itself."""
    pruner = make(logits=2.0, seed=6, importance=importance, mask_momentum=0.9)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.5)
    for step in range(2):
        pruner.train_step(*data(70 + step), opt)
    pruner.set_hard_widths({"c1": [0, 3, 5, 6], "c2": 6})
    pruner.mask_optimizer.lr = 1.25
    saved = _snapshot(pruner)
    assert saved["pinned"] and saved["kept"][0] == [0, 3, 5, 6] and saved["momentum"] is not None
    weights = copy.deepcopy(pruner.model.state_dict())
    buffer = io.BytesIO()
    torch.save(pruner.pruning_state(), buffer)

    # change everything, then restore
    pruner.set_hard_widths(None)
    pruner.set_phase("hard")
    pruner.set_hard_widths(None)
    pruner.set_phase("joint")
    for step in range(2):
        pruner.train_step(*data(80 + step), opt)
    pruner.recalibrate_bn([data(90)])
    with torch.no_grad():
        pruner.mask_logits.add_(1.0)
        pruner.ranks.copy_(pruner.ranks.flip(0))
    pruner.mask_optimizer.lr = 7.0
    assert not _same(_snapshot(pruner), saved)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    pruner.model.load_state_dict(weights)
    pruner.load_pruning_state(state)
    assert _same(_snapshot(pruner), saved)

    if importance == "dynamic":  # a resume: a fresh pruner of the same architecture, then the checkpoint
        fresh = make(seed=11, importance=importance, mask_momentum=0.9)
        fresh.model.load_state_dict(weights)
        fresh.load_pruning_state(state)
        assert _same(_snapshot(fresh), saved)


def test_pruning_state_resume_with_frozen_importance():
    pruner = make(logits=2.0, seed=6, importance="frozen")
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.5)
    pruner.train_step(*data(70), opt)
    pruner.set_hard_widths({"c2": 6})
    saved = _snapshot(pruner)
    weights = copy.deepcopy(pruner.model.state_dict())
    state = pruner.pruning_state()

    fresh = make(seed=11, importance="frozen")
    fresh.model.load_state_dict(weights)
    fresh.load_pruning_state(state)
    assert torch.equal(fresh.ranks, saved["ranks"])
    # the hard network keeps the channels whose restored rank is below the width
    co = fresh.gate_layout.channel_offsets
    for slot, (sel, channels) in enumerate(zip(fresh.plan.selections, (8, 12))):
        ranks = fresh.ranks[co[slot]:co[slot + 1]].tolist()
        k = fresh.plan.widths[slot]
        assert kept_list(sel, channels) == [c for c in range(channels) if ranks[c] < k]
    assert _same(_snapshot(fresh), saved)


def test_pruning_state_from_another_model_is_refused():
    state = make(logits=2.0).pruning_state()
    other = make(net=Other(), seed=1)
    before = other.mask_logits.detach().clone()
    with pytest.raises(ValueError, match="different channel groups"):
        other.load_pruning_state(state)
    assert torch.equal(other.mask_logits.detach(), before)


def test_pruning_state_from_same_names_other_widths_is_refused_cleanly():
    state = make(net=Net(8, 12)).pruning_state()
    other = make(net=Net(12, 8), seed=1)  # same layer names, same number of logits and channels in total
    before = other.mask_logits.detach().clone()
    with pytest.raises(ValueError):
        other.load_pruning_state(state)
    assert torch.equal(other.mask_logits.detach(), before)


# ----------------------------------------------------------------------------------------- implementations

@pytest.mark.skipif(dispatch.extension(warn=False) is None, reason="s2hk._C is not built")
def test_extension_and_reference_give_the_same_training(monkeypatch):
    chosen = []
    real_choose = dispatch.choose

    def choose(op, device, kinds):
        kind = real_choose(op, device, kinds)
        chosen.append(kind)
        return kind

    monkeypatch.setattr(dispatch, "choose", choose)
    runs = {}
    for impl in ("reference", "cpp"):
        chosen.clear()
        with dispatch.use_impl(impl):
            pruner = make(seed=5, dtype=torch.float32, logits=2.0, mask_lr=10.0)
            opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1, momentum=0.9)
            history = [pruner.train_step(*data(200 + step, dtype=torch.float32), opt) for step in range(3)]
        assert set(chosen) == {impl}
        runs[impl] = (history, pruner)
    (hist_r, ref), (hist_c, ext) = runs["reference"], runs["cpp"]
    for step_r, step_c in zip(hist_r, hist_c):
        assert step_r.keys() == step_c.keys()
        for key in step_r:
            assert step_c[key] == pytest.approx(step_r[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(ext.mask_logits, ref.mask_logits, rtol=1e-5, atol=1e-5)
    assert ext.plan.widths == ref.plan.widths
    for a, b in zip(ext.weight_parameters(), ref.weight_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- mask optimiser state

def test_mask_momentum_buffer_follows_the_network_moves():
    """The momentum buffer converts like the logits (dtype), goes to "meta" with them, and restarts when the
    network leaves "meta" (to_empty), where it has no values; the optimiser holds the new logits."""
    pruner = make(dtype=torch.float32, logits=2.0, mask_momentum=0.9, mask_nesterov=True)
    pruner.train_step(*data(1, dtype=torch.float32), torch.optim.SGD(pruner.weight_parameters(), lr=0.1))
    buffer = pruner.mask_optimizer.momentum_buffer
    assert buffer.dtype == torch.float32 and torch.count_nonzero(buffer) > 0
    pruner.double()
    moved = pruner.mask_optimizer.momentum_buffer
    assert moved.dtype == torch.float64 and torch.equal(moved, buffer.double())
    pruner.to("meta")
    assert pruner.mask_optimizer.momentum_buffer.is_meta
    pruner.to_empty(device="cpu")
    assert pruner.mask_optimizer.momentum_buffer is None
    assert pruner.mask_optimizer.logits is pruner.mask_logits and not pruner.mask_logits.is_meta


# ----------------------------------------------------------------------------------------- FLOPs scope

@pytest.mark.parametrize("scope", ["all", "prunable"])
def test_flops_scope_sets_the_regulariser_and_the_reported_ratios(scope):
    """R and *_flops_ratio count under flops_scope; the hard network's ratio under the other scope is reported
    as hard_flops_ratio_<other>. "prunable" leaves out the stem c1 (reads the input) and the classifier, so only
    c2 counts: k1 k2 / (8 * 12)."""
    other = "prunable" if scope == "all" else "all"

    def ratios(g1, g2):
        return {"all": hand_flops_ratio(g1["k"], g2["k"]), "prunable": g1["k"] * g2["k"] / 96}

    pruner = make(logits=2.0, mask_lr=50.0, flops_weight=2.0, flops_scope=scope)
    now = ratios(*hand_plan(pruner))
    assert now["all"] != pytest.approx(now["prunable"], rel=1e-3)
    _, widths = pruner.gates()
    r, ratio = pruner.flops_loss(widths)
    assert ratio.item() == pytest.approx(now[scope], rel=1e-12)
    assert r.item() == pytest.approx(2.0 * (now[scope] - 0.35) ** 2, rel=1e-12)

    metrics = pruner.train_step(*data(1), torch.optim.SGD(pruner.weight_parameters(), lr=0.1))
    assert set(metrics) == {k for k in KEYS if k != "hard_flops_ratio_prunable"} | {f"hard_flops_ratio_{other}"} \
        if scope == "prunable" else set(metrics) == KEYS
    assert metrics["soft_flops_ratio"] == pytest.approx(now[scope], rel=1e-12)
    assert metrics["flops_loss"] == pytest.approx(2.0 * (now[scope] - 0.35) ** 2, rel=1e-12)
    after = ratios(*hand_plan(pruner))
    want = {"hard_flops_ratio": after[scope], f"hard_flops_ratio_{other}": after[other]}
    assert {k: metrics[k] for k in want} == pytest.approx(want, rel=1e-12)
    assert pruner.hard_flops_ratios() == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------------- what cannot be pruned

@pytest.mark.parametrize("kd", ["decoupled", "mutual"])
def test_nothing_prunable_trains_the_weights_and_says_so_once(kd):
    """A model whose only conv feeds the output has no prunable group: construction warns once, and each
    step trains the weights exactly as plain cross-entropy (the hard network is the dense one, so the KD
    terms vanish) without touching a mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = S2HPruner(model, torch.randn(1, 3, 6, 6, dtype=torch.float64), target_flops=0.35, kd=kd)
        opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1)
        steps = [pruner.train_step(*data(200 + i), opt) for i in range(2)]
    ours = [str(w.message) for w in caught if str(w.message).startswith("S2HPruner")]
    assert len(ours) == 1 and "prunable" in ours[0]
    assert pruner.mask_logits.numel() == 0
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i in range(2):
        x, y = data(200 + i)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert not torch.equal(next(model.parameters()), next(copy.deepcopy(reference).parameters()) * 0)
    assert all(m["hard_flops_ratio"] == 1.0 and m["kd_hard"] == 0.0 for m in steps)


@pytest.mark.parametrize("scope,target,warns", [("all", 0.08, True), ("all", 0.09, False),
                                                ("prunable", 0.04, True), ("prunable", 0.05, False)])
def test_unreachable_target_warns_at_construction_with_the_minimum_ratio(scope, target, warns):
    """At the narrowest widths (2 and 2 channels) the network keeps hand_flops_ratio(2, 2) = 0.0835 of its
    FLOPs under "all" (the stem's input and the classifier's output cannot shrink), 4 / 96 = 0.0417 under
    "prunable"; a target below that is unreachable."""
    minimum = {"all": hand_flops_ratio(2, 2), "prunable": 4 / 96}[scope]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(target_flops=target, flops_scope=scope)
    ours = [str(w.message) for w in caught if str(w.message).startswith("S2HPruner")]
    if warns:
        assert len(ours) == 1 and "unreachable" in ours[0] and f"{minimum:.4f}" in ours[0]
    else:
        assert ours == []
