"""S2HPruner's gradient routing (ALGORITHMS.md §1, the routing table) and the FLOPs regulariser.

Every expected gradient is computed here with plain autograd on the soft and hard logits of the pruner's own
paths (``pruner(x, path="soft")`` / ``pruner(x, path="hard")``), term by term, in float64:

    L   = CE(s, y)
    G_h = alpha KL(softmax(s̄ / T) ‖ softmax(h / T))     (batch-mean KL, no T² factor)
    G_s = alpha KL(softmax(s / T) ‖ softmax(h̄ / T))

and compared with what one ``train_step`` (weight lr 0, mask lr 0) leaves in the weights' ``.grad`` and hands
to the mask optimiser as the data gradient. The FLOPs regulariser is checked against a FLOPs count written
out by hand for the test network and the expected-width derivative dE/du_j = p_j (n_j - E) / tau.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from s2hk import S2HPruner, dispatch, routing
from s2hk.mask_optim import balance_gradients
from helpers import ResidualNet, TwoConvNet as Net

RTOL, ATOL = 1e-10, 1e-13
NUM_CLASSES = 5
EXAMPLE_SHAPE = (2, 3, 6, 6)  # batch 2: the FLOPs polynomial counts the example batch


class Residual(ResidualNet):
    def __init__(self) -> None:
        super().__init__(width=6, inner=4, num_classes=NUM_CLASSES)


def make_pruner(net_cls=Net, seed: int = 0, logit_scale: float = 2.0, **overrides) -> S2HPruner:
    """A float64 pruner with random mask logits (so the hard network is really narrower than the soft one)."""
    torch.manual_seed(seed)
    model = net_cls().double()
    example = torch.randn(*EXAMPLE_SHAPE, dtype=torch.float64)
    settings = dict(target_flops=0.3, granularity=2 if net_cls is Net else 1, mask_lr=0.0, alpha=0.7)
    settings.update(overrides)
    pruner = S2HPruner(model, example, **settings).double()
    assert pruner.mask_logits.dtype == torch.float64
    with torch.no_grad():
        pruner.mask_logits.copy_(logit_scale * torch.randn(pruner.mask_logits.shape, dtype=torch.float64))
    pruner.refresh_plan()
    return pruner


def batch(seed: int = 1, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x, y


def capture_mask_steps(pruner: S2HPruner) -> list:
    """Record what train_step hands the mask optimiser (then let the real step run)."""
    calls = []
    original = pruner.mask_optimizer.step

    def step(task_grad, flops_grad, flops_loss, lr_scale=1.0, kd_grad=None):
        calls.append({"task_grad": task_grad.detach().clone(), "flops_grad": flops_grad.detach().clone(),
                      "kd_grad": None if kd_grad is None else kd_grad.detach().clone(),
                      "flops_loss": flops_loss.detach().clone(), "lr_scale": lr_scale})
        return original(task_grad, flops_grad, flops_loss, lr_scale, kd_grad)

    pruner.mask_optimizer.step = step
    return calls


def kl(p_logits, q_logits, temperature):
    """Batch-mean KL(softmax(p / T) ‖ softmax(q / T)), via torch's kl_div (independent of s2hk)."""
    return F.kl_div(F.log_softmax(q_logits / temperature, -1), F.log_softmax(p_logits / temperature, -1),
                    reduction="batchmean", log_target=True)


def hand_terms(pruner: S2HPruner, x, y, alpha: float, temperature: float) -> dict:
    """Values and (weights, mask logits) gradients of L, G_h, G_s, each on its own, by plain autograd."""
    params = pruner.weight_parameters()
    u = pruner.mask_logits
    soft = pruner(x, path="soft")
    hard = pruner(x, path="hard")
    terms = {
        "L": F.cross_entropy(soft, y),
        "G_h": alpha * kl(soft.detach(), hard, temperature),
        "G_s": alpha * kl(soft, hard.detach(), temperature),
    }
    out = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(value, params + [u], retain_graph=True, allow_unused=True)
        out[name] = {"value": value.detach(), "theta": list(grads[:-1]), "u": grads[-1],
                     "soft": soft.detach(), "hard": hard.detach()}
    return out


def zeros_for_none(grads, like):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def add(*lists):
    return [sum(items) for items in zip(*lists)]


EXPECTED_THETA = {
    "decoupled": ("L", "G_h"),
    "unidirectional": ("L", "G_h"),
    "mutual": ("L", "G_h", "G_s"),
    "none": ("L",),
}
# what reaches u, as (the task gradient of the shared backward, dG_s/du from its own u-only backward or None)
EXPECTED_U = {
    "decoupled": (("L",), ("G_s",)),
    "unidirectional": (("L",), None),
    "mutual": (("L", "G_s"), None),
    "none": (("L",), None),
}

CASES = ([(Net, mode, "cpp", 1.0) for mode in EXPECTED_THETA]
         + [(Net, mode, "reference", 1.0) for mode in EXPECTED_THETA]
         + [(Residual, mode, "cpp", 1.0) for mode in EXPECTED_THETA]
         + [(Net, "decoupled", "cpp", 2.0), (Net, "decoupled", "reference", 2.0)])


@pytest.mark.parametrize("net_cls,mode,impl,temperature", CASES,
                         ids=[f"{c[0].__name__}-{c[1]}-{c[2]}-T{c[3]:g}" for c in CASES])
def test_train_step_routes_each_term_as_the_table_says(net_cls, mode, impl, temperature):
    if impl == "cpp" and dispatch.extension(warn=False) is None:
        pytest.skip("s2hk._C is not built")
    alpha = 0.7
    with dispatch.use_impl(impl):
        pruner = make_pruner(net_cls, kd=mode, alpha=alpha, kd_temperature=temperature)
        x, y = batch()
        params = pruner.weight_parameters()
        u = pruner.mask_logits
        # the hard network is a strict sub-network here, so G_h and G_s are not trivially zero
        assert any(k < g.channels for g, k in zip(pruner.prunable, pruner.plan.widths))
        hand = hand_terms(pruner, x, y, alpha, temperature)
        before = [p.detach().clone() for p in params]
        u_before = u.detach().clone()
        calls = capture_mask_steps(pruner)
        opt = torch.optim.SGD(params, lr=0.0)
        metrics = pruner.train_step(x, y, opt)

    # lr 0 everywhere: nothing moved, so the hand terms were taken at the same point
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert torch.equal(u.detach(), u_before)
    assert len(calls) == 1

    # G_h never reaches u (the hard path does not depend on the mask logits at all)
    assert hand["G_h"]["u"] is None or torch.count_nonzero(hand["G_h"]["u"]) == 0

    routed_theta = [p.grad for p in params]
    assert all(g is not None for g in routed_theta)
    expected_theta = add(*(zeros_for_none(hand[t]["theta"], params) for t in EXPECTED_THETA[mode]))
    for name, got, want in zip([n for n, _ in pruner.graph_module.named_parameters()], routed_theta,
                               expected_theta):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"{mode}: weight gradient of {name}")

    def hand_u(terms):
        return sum(hand[t]["u"] if hand[t]["u"] is not None else torch.zeros_like(u) for t in terms)

    task_terms, kd_terms = EXPECTED_U[mode]
    torch.testing.assert_close(calls[0]["task_grad"], hand_u(task_terms), rtol=RTOL, atol=ATOL)
    assert torch.count_nonzero(hand_u(task_terms)) > 0
    if kd_terms is None:
        assert calls[0]["kd_grad"] is None
    else:
        torch.testing.assert_close(calls[0]["kd_grad"], hand_u(kd_terms), rtol=RTOL, atol=ATOL)
        assert torch.count_nonzero(hand_u(kd_terms)) > 0

    # the reported values are the terms' values
    assert metrics["loss"] == pytest.approx(float(hand["L"]["value"]), rel=1e-12)
    if mode != "none":
        assert metrics["kd_hard"] == pytest.approx(float(hand["G_h"]["value"]), rel=1e-10)
        assert metrics["kd_soft"] == pytest.approx(float(hand["G_s"]["value"]), rel=1e-10)
        assert metrics["kd_hard"] > 1e-6

    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    g_s_theta = flat(zeros_for_none(hand["G_s"]["theta"], params))
    if mode == "decoupled":
        # G_s does have a weight gradient of its own, and the routed one excludes it
        assert g_s_theta.abs().max() > 1e-6
        with_g_s = flat(expected_theta) + g_s_theta
        assert not torch.allclose(flat(routed_theta), with_g_s, rtol=RTOL, atol=ATOL)
        assert (flat(routed_theta) - with_g_s).abs().max() > 1e3 * ATOL
    if mode in ("unidirectional", "none"):
        g_s_u = hand["G_s"]["u"]
        assert g_s_u.abs().max() > 1e-8  # so leaving it out is visible


def test_kd_logit_gradients_match_autograd():
    """logit_gradients: dL/ds, dG_h/dh, dG_s/ds against autograd of the KL written with torch.kl_div."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    h = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=gen)
    for impl in ("reference", "cpp"):
        if impl == "cpp" and dispatch.extension(warn=False) is None:
            continue
        with dispatch.use_impl(impl):
            got = routing.logit_gradients(s, h, y, alpha=0.3, temperature=1.7)
        s_ = s.clone().requires_grad_(True)
        h_ = h.clone().requires_grad_(True)
        task = F.cross_entropy(s_, y)
        g_h = 0.3 * kl(s_.detach(), h_, 1.7)
        g_s = 0.3 * kl(s_, h_.detach(), 1.7)
        torch.testing.assert_close(got.task_to_soft, torch.autograd.grad(task, s_)[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got.kd_hard_to_hard, torch.autograd.grad(g_h, h_)[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got.kd_soft_to_soft, torch.autograd.grad(g_s, s_)[0], rtol=RTOL, atol=ATOL)
        assert float(got.task_loss) == pytest.approx(task.item(), rel=1e-12)
        assert float(got.kd_hard) == pytest.approx(g_h.item(), rel=1e-10)
        assert float(got.kd_soft) == pytest.approx(g_s.item(), rel=1e-10)


def test_decoupled_mask_only_backward_computes_no_weight_gradient(monkeypatch):
    """route("decoupled"): the extra soft-path backward for G_s is restricted to u -- no weight's gradient is
    computed during it -- while the full backward reaches every weight; mask_logits.grad is left as it was."""
    pruner = make_pruner(kd="decoupled")
    x, y = batch()
    params = pruner.weight_parameters()
    u = pruner.mask_logits
    hand = hand_terms(pruner, x, y, 0.7, 1.0)

    fired: list = []
    handles = [p.register_hook(lambda g, i=i: fired.append(i)) for i, p in enumerate(params)]
    restricted = []
    real_grad = torch.autograd.grad

    def grad(outputs, inputs, *args, **kwargs):
        fired.clear()
        result = real_grad(outputs, inputs, *args, **kwargs)
        restricted.append({"fired": list(fired), "inputs": inputs, "result": [r.detach().clone() for r in result]})
        fired.clear()
        return result

    try:
        keep, _ = pruner.gates()
        pruner.prepare_soft(keep)
        soft = pruner.run("soft", x)
        pruner.prepare_hard()
        hard = pruner.run("hard", x)
        grads = routing.logit_gradients(soft, hard, y, 0.7, 1.0)
        sentinel = torch.full_like(u, 123.0)
        u.grad = sentinel
        monkeypatch.setattr(torch.autograd, "grad", grad)
        fired.clear()
        task_grad, kd_grad = routing.route("decoupled", soft, hard, grads, u)
        monkeypatch.undo()
    finally:
        for handle in handles:
            handle.remove()

    assert len(restricted) == 1, "decoupled routing makes exactly one mask-only backward"
    only = restricted[0]
    inputs = only["inputs"] if isinstance(only["inputs"], (tuple, list)) else [only["inputs"]]
    assert len(inputs) == 1 and inputs[0] is u
    assert only["fired"] == [], "a weight gradient was computed during the mask-only backward"
    # that pass is exactly dG_s/du
    torch.testing.assert_close(only["result"][0], hand["G_s"]["u"], rtol=RTOL, atol=ATOL)
    # the full backward reached every weight once
    assert sorted(fired) == list(range(len(params)))
    torch.testing.assert_close(task_grad, hand["L"]["u"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(kd_grad, hand["G_s"]["u"], rtol=RTOL, atol=ATOL)
    assert u.grad is sentinel and torch.equal(u.grad, torch.full_like(u, 123.0))


@pytest.mark.parametrize("mode", ["decoupled", "mutual", "unidirectional"])
def test_task_gradient_rescaling_acts_on_the_routed_terms(mode):
    """task_grad_scale c: one step moves u by -lr times the balanced (g_D, g_F), where in "decoupled" mode g_D =
    dG_s/du + c ||dG_s/du|| / ||dL/du|| dL/du per group, from the hand terms; the other modes route no separate
    dG_s/du, so g_D is what reaches u, unscaled. (The balancing itself is checked in test_mask_optim.py, and so
    are momentum and weight decay, off here so that the step is -lr times the balanced gradient.)"""
    c, lr = 0.5, 0.7
    pruner = make_pruner(kd=mode, mask_lr=lr, task_grad_scale=c, mask_momentum=0.0, mask_nesterov=False,
                         mask_weight_decay=0.0)
    x, y = batch()
    hand = hand_terms(pruner, x, y, 0.7, 1.0)
    u = pruner.mask_logits
    before = u.detach().clone()
    calls = capture_mask_steps(pruner)
    pruner.train_step(x, y, torch.optim.SGD(pruner.weight_parameters(), lr=0.0))
    task, kd = hand["L"]["u"], hand["G_s"]["u"]
    if mode == "decoupled":
        rescaled, lo = [], pruner.gate_layout.logit_offsets
        for start, stop in zip(lo, lo[1:]):
            t, k = task[start:stop].tolist(), kd[start:stop].tolist()
            factor = c * math.sqrt(sum(v * v for v in k)) / math.sqrt(sum(v * v for v in t))
            rescaled += [v * factor for v in t]
        data_grad = torch.tensor(rescaled, dtype=torch.float64) + kd
        assert not torch.allclose(data_grad, task + kd, rtol=1e-3)
    else:
        data_grad = task + kd if mode == "mutual" else task
    cfg = pruner.config
    g_d, g_f = balance_gradients(data_grad, calls[0]["flops_grad"], calls[0]["flops_loss"], pruner.gate_layout,
                                 cfg.flops_weight, cfg.tolerance, cfg.balance)
    torch.testing.assert_close(u.detach(), before - lr * (g_d + g_f), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------- FLOPs regulariser

def hand_flops(k1: float, k2: float) -> float:
    """FLOPs (2 x MACs) of Net at the example input (batch 2, 6x6) with k1, k2 channels in its two groups."""
    n, hw = EXAMPLE_SHAPE[0], EXAMPLE_SHAPE[2] * EXAMPLE_SHAPE[3]
    macs = n * hw * 9 * 3 * k1 + n * hw * 9 * k1 * k2 + n * k2 * NUM_CLASSES
    return 2.0 * macs


def hand_widths(u: torch.Tensor, channels, granularities, tau):
    """Per group: p, n, E and k = min(C, d ceil(ceil(E) / d)), in Python floats."""
    out, offset = [], 0
    for c, d in zip(channels, granularities):
        num = c // d
        logits = [float(v) / tau for v in u[offset:offset + num]]
        offset += num
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        p = [v / sum(e) for v in e]
        n = [d * (j + 1) for j in range(num)]
        expected = sum(pj * nj for pj, nj in zip(p, n))
        k = min(c, d * math.ceil(math.ceil(expected) / d))
        out.append({"p": p, "n": n, "E": expected, "k": k})
    return out


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_flops_regulariser_reaches_only_u_through_straight_through_widths(tau):
    lam, target = 3.0, 0.3
    pruner = make_pruner(kd="decoupled", tau=tau, flops_weight=lam, target_flops=target, seed=5)
    layout = pruner.gate_layout
    assert layout.channels == (8, 12) and layout.granularities == (2, 2)
    u = pruner.mask_logits
    groups = hand_widths(u.detach(), layout.channels, layout.granularities, tau)
    k1, k2 = groups[0]["k"], groups[1]["k"]
    assert (k1, k2) != (8, 12)
    full = hand_flops(8, 12)

    def r_of(a, b):
        return lam * (hand_flops(a, b) / full - target) ** 2

    r_hand = r_of(k1, k2)
    step = 1e-4  # dR/dk from the FLOPs polynomial by central differences
    dr_dk = [(r_of(k1 + step, k2) - r_of(k1 - step, k2)) / (2 * step),
             (r_of(k1, k2 + step) - r_of(k1, k2 - step)) / (2 * step)]
    expected = []
    for g, slope in zip(groups, dr_dk):
        expected += [slope * pj * (nj - g["E"]) / tau for pj, nj in zip(g["p"], g["n"])]
    expected = torch.tensor(expected, dtype=torch.float64)

    # the regulariser on its own
    _, widths = pruner.gates()
    r, ratio = pruner.flops_loss(widths)
    assert r.item() == pytest.approx(r_hand, rel=1e-12)
    assert ratio.item() == pytest.approx(hand_flops(k1, k2) / full, rel=1e-12)
    assert pruner.flops("hard") == hand_flops(k1, k2)  # F_soft equals the hard network's FLOPs
    params = pruner.weight_parameters()
    grads = torch.autograd.grad(r, params + [u], retain_graph=True, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[:-1]), "R reached a weight"
    torch.testing.assert_close(grads[-1], expected, rtol=1e-6, atol=1e-12)

    # what train_step hands the mask optimiser, and R's absence from the weight gradients
    x, y = batch()
    hand = hand_terms(pruner, x, y, 0.7, 1.0)
    calls = capture_mask_steps(pruner)
    metrics = pruner.train_step(x, y, torch.optim.SGD(params, lr=0.0))
    torch.testing.assert_close(calls[0]["flops_grad"], expected, rtol=1e-6, atol=1e-12)
    assert float(calls[0]["flops_loss"]) == pytest.approx(r_hand, rel=1e-12)
    assert metrics["flops_loss"] == pytest.approx(r_hand, rel=1e-12)
    assert metrics["soft_flops_ratio"] == pytest.approx(hand_flops(k1, k2) / full, rel=1e-12)
    want = add(*(zeros_for_none(hand[t]["theta"], params) for t in ("L", "G_h")))
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=RTOL, atol=ATOL)


def test_pinned_group_gets_no_flops_gradient():
    pruner = make_pruner(kd="decoupled", seed=5, flops_weight=2.0, target_flops=0.3)
    pruner.set_hard_widths({"c1": 4})
    lo = pruner.gate_layout.logit_offsets
    groups = hand_widths(pruner.mask_logits.detach(), (8, 12), (2, 2), 1.0)
    _, widths = pruner.gates()
    r, ratio = pruner.flops_loss(widths)
    full = hand_flops(8, 12)
    assert ratio.item() == pytest.approx(hand_flops(4, groups[1]["k"]) / full, rel=1e-12)
    (grad,) = torch.autograd.grad(r, pruner.mask_logits)
    assert torch.count_nonzero(grad[lo[0]:lo[1]]) == 0
    assert torch.count_nonzero(grad[lo[1]:lo[2]]) > 0
