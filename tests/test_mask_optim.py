"""S2HPruner's mask optimiser (ALGORITHMS.md §1) against the balancing rule written out per group:

    [decoupled KD, task_grad_scale c: dL/du <- c ||dG_s/du|| / ||dL/du|| * dL/du;  g_D = dG_s/du + dL/du]
    dyn = min(R / (lambda rho^2), 1)
    if dyn > 0: scale the smaller of ||g_D|| and (beta / dyn) ||g_F|| up so that ||g_D|| = (beta / dyn) ||g_F||
    g = g_D + g_F + wd u;  b <- m b + g (b = g first);  d = g + m b (Nesterov) or b
    u <- u - lr * lr_scale * d

The expected values are computed in plain Python floats, one group at a time; S2HConfig's validation of the
optimiser settings is checked at the end.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import S2HConfig, S2HPruner
from s2hk.mask_optim import MaskOptimizer, balance_gradients, rescale_task_gradient
from s2hk.masks import GateLayout


def hand_balance(g_d, g_f, r, lam, rho, beta, choices, max_scale=None):
    """The rule per group, in Python floats; returns the balanced (g_D, g_F) as flat lists."""
    dyn = min(r / (lam * rho ** 2), 1.0)
    out_d, out_f, start = [], [], 0
    for num in choices:
        d, f = list(g_d[start:start + num]), list(g_f[start:start + num])
        start += num
        norm_d = math.sqrt(sum(v * v for v in d))
        norm_f = math.sqrt(sum(v * v for v in f))
        scale_d = scale_f = 1.0
        if dyn > 0:
            weighted_f = beta / dyn * norm_f
            if 0 < norm_d < weighted_f:
                scale_d = weighted_f / norm_d          # ||g_D|| up to (beta/dyn) ||g_F||
            elif 0 < weighted_f < norm_d:
                scale_f = norm_d / weighted_f          # (beta/dyn) ||g_F|| up to ||g_D||
        if max_scale is not None:
            scale_d, scale_f = min(scale_d, max_scale), min(scale_f, max_scale)
        out_d += [v * scale_d for v in d]
        out_f += [v * scale_f for v in f]
    return out_d, out_f


def group_norms(values, choices):
    out, start = [], 0
    for num in choices:
        out.append(math.sqrt(sum(float(v) ** 2 for v in values[start:start + num])))
        start += num
    return out


#: The spec's plain mask step (no momentum, weight decay or task-gradient rescaling), for tests of other rules.
PLAIN = {"mask_momentum": 0.0, "mask_nesterov": False, "mask_weight_decay": 0.0, "task_grad_scale": None}

LAYOUTS = {
    "one-group": GateLayout((8,), (2,)),
    "sizes-1-3-4-5": GateLayout((4, 12, 8, 5), (4, 4, 2, 1)),
    "sizes-6-2": GateLayout((12, 4), (2, 2)),
}


def random_grads(layout, seed, f_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(layout.num_choices)
    g_d = torch.randn(n, generator=gen, dtype=torch.float64)
    g_f = f_scale * torch.randn(n, generator=gen, dtype=torch.float64)
    return g_d, g_f


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("r_over_band", [5.0, 1.0, 0.25, 0.01])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_balance_matches_hand_rule(layout_name, r_over_band, beta):
    """Outside the band (R >= lambda rho^2: dyn = 1) and inside it (0 < dyn < 1), several group sizes."""
    layout = LAYOUTS[layout_name]
    lam, rho = 2.0, 0.05
    r = r_over_band * lam * rho ** 2
    dyn = min(r_over_band, 1.0)
    # per-group magnitudes of (beta / dyn) g_F differ so that some groups scale g_D and others g_F
    g_d, g_f = random_grads(layout, seed=7)
    start = 0
    for i, num in enumerate(layout.num_choices):
        g_f[start:start + num] *= [0.05, 20.0, 1.0, 0.3][i % 4] * dyn / beta
        start += num
    got_d, got_f = balance_gradients(g_d, g_f, torch.tensor(r, dtype=torch.float64), layout, lam, rho, beta)
    want_d, want_f = hand_balance(g_d.tolist(), g_f.tolist(), r, lam, rho, beta, layout.num_choices)
    torch.testing.assert_close(got_d, torch.tensor(want_d, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got_f, torch.tensor(want_f, dtype=torch.float64), rtol=1e-12, atol=0)
    # the rule's post-condition, group by group: the smaller side went up, the larger one is untouched
    nd0, nf0 = group_norms(g_d, layout.num_choices), group_norms(g_f, layout.num_choices)
    nd1, nf1 = group_norms(got_d, layout.num_choices), group_norms(got_f, layout.num_choices)
    scaled_d = scaled_f = 0
    for a0, b0, a1, b1 in zip(nd0, nf0, nd1, nf1):
        assert a1 == pytest.approx(beta / dyn * b1, rel=1e-12)
        assert a1 == pytest.approx(max(a0, beta / dyn * b0), rel=1e-12)
        scaled_d += a1 > a0 * (1 + 1e-9)
        scaled_f += b1 > b0 * (1 + 1e-9)
    if layout.num_groups >= 2:
        assert scaled_d and scaled_f, "the case should exercise both directions"


def test_exactly_on_target_no_scaling():
    """R = 0: dyn = 0, both gradients pass unchanged."""
    layout = LAYOUTS["sizes-1-3-4-5"]
    g_d, g_f = random_grads(layout, seed=3, f_scale=50.0)
    got_d, got_f = balance_gradients(g_d, g_f, torch.tensor(0.0, dtype=torch.float64), layout, 1.0, 0.01, 1.0)
    assert torch.equal(got_d, g_d) and torch.equal(got_f, g_f)


def test_equal_norms_no_scaling():
    layout = GateLayout((8,), (2,))
    g_d = torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64)           # norm 5
    g_f = torch.tensor([0.0, 1.25, 0.0, 0.0], dtype=torch.float64)          # (beta/dyn) * 1.25 = 5 with dyn = 0.25
    r = torch.tensor(0.25 * 0.01 ** 2, dtype=torch.float64)
    got_d, got_f = balance_gradients(g_d, g_f, r, layout, 1.0, 0.01, 1.0)
    torch.testing.assert_close(got_d, g_d, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_f, g_f, rtol=1e-12, atol=0)


@pytest.mark.parametrize("r_over_band", [3.0, 0.5])
def test_zero_gradient_groups_stay_finite_and_unscaled(r_over_band):
    layout = GateLayout((4, 6, 4, 8), (1, 2, 2, 2))  # choices 4, 3, 2, 4
    g_d, g_f = random_grads(layout, seed=11)
    lo = layout.logit_offsets
    g_d[lo[0]:lo[1]] = 0.0                     # group 0: no data gradient
    g_f[lo[1]:lo[2]] = 0.0                     # group 1: no FLOPs gradient
    g_d[lo[2]:lo[3]] = 0.0                     # group 2: nothing at all
    g_f[lo[2]:lo[3]] = 0.0
    lam, rho = 1.0, 0.01
    r = r_over_band * lam * rho ** 2
    got_d, got_f = balance_gradients(g_d, g_f, torch.tensor(r, dtype=torch.float64), layout, lam, rho, 1.0)
    assert torch.isfinite(got_d).all() and torch.isfinite(got_f).all()
    want_d, want_f = hand_balance(g_d.tolist(), g_f.tolist(), r, lam, rho, 1.0, layout.num_choices)
    torch.testing.assert_close(got_d, torch.tensor(want_d, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got_f, torch.tensor(want_f, dtype=torch.float64), rtol=1e-12, atol=0)
    for start, stop in ((lo[0], lo[1]), (lo[1], lo[2]), (lo[2], lo[3])):
        assert torch.equal(got_d[start:stop], g_d[start:stop])
        assert torch.equal(got_f[start:stop], g_f[start:stop])
    # the fourth group is balanced as usual
    assert not torch.equal(torch.cat([got_d[lo[3]:], got_f[lo[3]:]]), torch.cat([g_d[lo[3]:], g_f[lo[3]:]]))


def test_max_scale_caps_the_up_scaling():
    layout = GateLayout((4, 4), (1, 1))
    g_d = torch.tensor([1e-3, 0, 0, 0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    g_f = torch.tensor([1.0, 1.0, 0, 0, 1e-4, 0, 0, 0], dtype=torch.float64)
    r = torch.tensor(1.0, dtype=torch.float64)
    got_d, got_f = balance_gradients(g_d, g_f, r, layout, 1.0, 0.01, 1.0, max_scale=10.0)
    want_d, want_f = hand_balance(g_d.tolist(), g_f.tolist(), 1.0, 1.0, 0.01, 1.0, (4, 4), max_scale=10.0)
    torch.testing.assert_close(got_d, torch.tensor(want_d, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got_f, torch.tensor(want_f, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(got_d[0]) == pytest.approx(1e-2) and float(got_f[4]) == pytest.approx(1e-3)


@pytest.mark.parametrize("recenter", [False, True])
@pytest.mark.parametrize("lr_scale", [1.0, 0.3])
def test_mask_optimizer_step(recenter, lr_scale):
    layout = LAYOUTS["sizes-1-3-4-5"]
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(sum(layout.num_choices), generator=gen, dtype=torch.float64)
    u0 = logits.clone()
    g_d, g_f = random_grads(layout, seed=9, f_scale=0.2)
    lam, rho, beta, lr = 1.5, 0.02, 0.8, 0.7
    r = 0.4 * lam * rho ** 2
    opt = MaskOptimizer(logits, layout, lr=lr, flops_weight=lam, tolerance=rho, balance=beta, recenter=recenter)
    opt.step(g_d, g_f, torch.tensor(r, dtype=torch.float64), lr_scale=lr_scale)
    want_d, want_f = hand_balance(g_d.tolist(), g_f.tolist(), r, lam, rho, beta, layout.num_choices)
    want = [u - lr * lr_scale * (a + b) for u, a, b in zip(u0.tolist(), want_d, want_f)]
    if recenter:
        out, start = [], 0
        for num in layout.num_choices:
            part = want[start:start + num]
            start += num
            mean = sum(part) / num
            out += [v - mean for v in part]
        want = out
    torch.testing.assert_close(logits, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    if recenter:
        start = 0
        for num in layout.num_choices:
            assert abs(float(logits[start:start + num].mean())) < 1e-14
            start += num


def test_mask_optimizer_state_round_trip():
    layout = GateLayout((4,), (1,))
    a = MaskOptimizer(torch.zeros(4), layout, lr=3.0, flops_weight=1.0, tolerance=0.01, balance=1.0)
    b = MaskOptimizer(torch.zeros(4), layout, lr=9.0, flops_weight=1.0, tolerance=0.01, balance=1.0)
    b.load_state_dict(a.state_dict())
    assert b.lr == 3.0


def hand_rescale(task, kd, scale, choices):
    """dL/du of each group rescaled to ``scale`` x ||dG_s/du|| of that group, in Python floats."""
    out, start = [], 0
    for num in choices:
        t, k = task[start:start + num], kd[start:start + num]
        start += num
        norm_t, norm_k = math.sqrt(sum(v * v for v in t)), math.sqrt(sum(v * v for v in k))
        out += [v * scale * norm_k / norm_t if norm_t > 0 else 0.0 for v in t]
    return out


@pytest.mark.parametrize("scale", [1.0, 0.25, 0.0])
def test_rescale_task_gradient_matches_hand(scale):
    layout = LAYOUTS["sizes-1-3-4-5"]
    task, kd = random_grads(layout, seed=21, f_scale=0.01)
    lo = layout.logit_offsets
    task[lo[1]:lo[2]] = 0.0          # a group without task gradient stays zero
    kd[lo[2]:lo[3]] = 0.0            # a group without KD gradient loses its task gradient
    got = rescale_task_gradient(task, kd, layout, scale)
    want = hand_rescale(task.tolist(), kd.tolist(), scale, layout.num_choices)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert group_norms(got, layout.num_choices)[3] == pytest.approx(scale * group_norms(kd, layout.num_choices)[3])


def hand_sgd(u, grads, lr, momentum, nesterov, weight_decay):
    """torch.optim.SGD's rule in Python floats, one list of gradients per step (lr may change per step)."""
    u, buf = list(u), None
    for g, step_lr in grads:
        d = [gi + weight_decay * ui for gi, ui in zip(g, u)]
        if momentum:
            buf = list(d) if buf is None else [momentum * b + di for b, di in zip(buf, d)]
            d = [di + momentum * b for di, b in zip(d, buf)] if nesterov else buf
        u = [ui - step_lr * di for ui, di in zip(u, d)]
    return u


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.9, True, 0.0), (0.9, False, 0.0), (0.5, True, 0.05),
                                                            (0.0, False, 0.1), (0.0, False, 0.0)])
def test_momentum_nesterov_weight_decay_steps_match_hand(momentum, nesterov, weight_decay):
    """Three steps with different gradients, R and lr scales: the balanced gradient goes through SGD's weight
    decay, momentum buffer and Nesterov look-ahead exactly as written out by hand."""
    layout = LAYOUTS["sizes-6-2"]
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(sum(layout.num_choices), generator=gen, dtype=torch.float64)
    u0 = logits.tolist()
    lam, rho, beta, lr = 1.0, 0.02, 1.0, 0.6
    opt = MaskOptimizer(logits, layout, lr=lr, flops_weight=lam, tolerance=rho, balance=beta, momentum=momentum,
                        nesterov=nesterov, weight_decay=weight_decay)
    hand_steps = []
    for i, (r_over_band, lr_scale) in enumerate([(4.0, 1.0), (0.3, 0.7), (2.0, 0.2)]):
        g_d, g_f = random_grads(layout, seed=30 + i, f_scale=0.3)
        r = r_over_band * lam * rho ** 2
        opt.step(g_d, g_f, torch.tensor(r, dtype=torch.float64), lr_scale=lr_scale)
        bd, bf = hand_balance(g_d.tolist(), g_f.tolist(), r, lam, rho, beta, layout.num_choices)
        hand_steps.append(([a + b for a, b in zip(bd, bf)], lr * lr_scale))
    want = hand_sgd(u0, hand_steps, lr, momentum, nesterov, weight_decay)
    torch.testing.assert_close(logits, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert (opt.momentum_buffer is None) == (momentum == 0)


@pytest.mark.parametrize("scale", [None, 2.0])
def test_step_with_kd_gradient_rescales_the_task_gradient(scale):
    """With dG_s/du given apart, g_D = dG_s/du + dL/du (dL/du rescaled when task_grad_scale is set), then the
    balancing and the momentum step."""
    layout = LAYOUTS["sizes-1-3-4-5"]
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(sum(layout.num_choices), generator=gen, dtype=torch.float64)
    u0 = logits.tolist()
    task, kd = random_grads(layout, seed=18, f_scale=0.1)
    _, g_f = random_grads(layout, seed=19, f_scale=0.05)
    lam, rho, beta, lr, m = 1.0, 0.01, 1.0, 0.4, 0.8
    r = 3.0 * lam * rho ** 2
    opt = MaskOptimizer(logits, layout, lr=lr, flops_weight=lam, tolerance=rho, balance=beta, momentum=m,
                        nesterov=True, task_grad_scale=scale)
    opt.step(task, g_f, torch.tensor(r, dtype=torch.float64), kd_grad=kd)
    t = task.tolist() if scale is None else hand_rescale(task.tolist(), kd.tolist(), scale, layout.num_choices)
    bd, bf = hand_balance([a + b for a, b in zip(t, kd.tolist())], g_f.tolist(), r, lam, rho, beta,
                          layout.num_choices)
    want = hand_sgd(u0, [([a + b for a, b in zip(bd, bf)], lr)], lr, m, True, 0.0)
    torch.testing.assert_close(logits, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_task_grad_scale_needs_a_separate_kd_gradient():
    """Without dG_s/du on its own (kd modes other than "decoupled") the data gradient is used as given."""
    layout = LAYOUTS["sizes-6-2"]
    g_d, g_f = random_grads(layout, seed=23)
    r = torch.tensor(1.0, dtype=torch.float64)
    a = MaskOptimizer(torch.zeros(8, dtype=torch.float64), layout, 1.0, 1.0, 0.01, 1.0, task_grad_scale=0.5)
    b = MaskOptimizer(torch.zeros(8, dtype=torch.float64), layout, 1.0, 1.0, 0.01, 1.0)
    a.step(g_d, g_f, r)
    b.step(g_d, g_f, r)
    assert torch.equal(a.logits, b.logits) and a.logits.abs().max() > 0


def test_momentum_state_round_trip_resumes_the_same_trajectory():
    layout = LAYOUTS["sizes-6-2"]
    r = torch.tensor(2e-4, dtype=torch.float64)
    grads = [random_grads(layout, seed=40 + i) for i in range(3)]

    def make_opt():
        return MaskOptimizer(torch.zeros(8, dtype=torch.float64), layout, 0.5, 1.0, 0.01, 1.0, momentum=0.9,
                             nesterov=True, weight_decay=1e-3)

    whole = make_opt()
    for g_d, g_f in grads:
        whole.step(g_d, g_f, r)
    first = make_opt()
    first.step(*grads[0], r)
    state = first.state_dict()
    resumed = make_opt()
    resumed.logits.copy_(first.logits)
    resumed.load_state_dict(state)
    first.step(*grads[1], r)  # the saved buffer is a copy: stepping on does not change it
    resumed.load_state_dict(state)
    for g_d, g_f in grads[1:]:
        resumed.step(g_d, g_f, r)
    torch.testing.assert_close(resumed.logits, whole.logits, rtol=0, atol=0)
    assert "momentum_buffer" in state and state["momentum_buffer"] is not None
    old = make_opt()  # a state saved before the buffer existed restarts the momentum
    old.load_state_dict({"lr": 0.25})
    assert old.lr == 0.25 and old.momentum_buffer is None


@pytest.mark.parametrize("bad,field", [({"mask_momentum": 1.0}, "mask_momentum"),
                                       ({"mask_momentum": -0.1}, "mask_momentum"),
                                       ({"mask_momentum": 0.0, "mask_nesterov": True}, "mask_nesterov"),
                                       ({"mask_weight_decay": -1e-4}, "mask_weight_decay"),
                                       ({"mask_lr": -1.0}, "mask_lr"),
                                       ({"task_grad_scale": -0.5}, "task_grad_scale"),
                                       ({"task_grad_scale": float("inf")}, "task_grad_scale"),
                                       ({"task_grad_scale": float("nan")}, "task_grad_scale"),
                                       ({"flops_scope": "convs"}, "flops_scope"),
                                       ({"max_balance_scale": 0.5}, "max_balance_scale")])
def test_config_rejects_bad_mask_optimiser_settings(bad, field):
    with pytest.raises(ValueError, match=field):
        S2HConfig(**bad)


def test_config_accepts_the_documented_ranges():
    for cfg in (S2HConfig(), S2HConfig(**PLAIN),
                S2HConfig(mask_momentum=0.5, mask_nesterov=False, mask_weight_decay=0.0, task_grad_scale=0.0,
                          flops_scope="prunable", max_balance_scale=1.0)):
        assert S2HConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------ lr following the weight schedule

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def capture(pruner):
    calls = []
    original = pruner.mask_optimizer.step

    def step(task_grad, flops_grad, flops_loss, lr_scale=1.0, kd_grad=None):
        data_grad = task_grad if kd_grad is None else task_grad + kd_grad  # no rescaling by default
        calls.append((data_grad.detach().clone(), flops_grad.detach().clone(), float(flops_loss.detach()), lr_scale,
                      pruner.mask_logits.detach().clone()))
        return original(task_grad, flops_grad, flops_loss, lr_scale, kd_grad)

    pruner.mask_optimizer.step = step
    return calls


def expected_after(call, pruner, mask_lr, lr_scale):
    data_grad, flops_grad, r, _, before = call
    cfg = pruner.config
    g_d, g_f = hand_balance(data_grad.tolist(), flops_grad.tolist(), r, cfg.flops_weight, cfg.tolerance,
                            cfg.balance, pruner.gate_layout.num_choices)
    return torch.tensor([u - mask_lr * lr_scale * (a + b) for u, a, b in zip(before.tolist(), g_d, g_f)])


def test_mask_lr_follows_the_weight_lr_schedule():
    torch.manual_seed(0)
    pruner = S2HPruner(Net(), torch.randn(1, 3, 6, 6), target_flops=0.4, granularity=2, mask_lr=2.0,
                       tolerance=0.05, balance=0.7, **PLAIN)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1)
    factors = [0.25, 0.1]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: factors[min(epoch, 1)])
    calls = capture(pruner)
    for i, factor in enumerate(factors):
        pruner.train_step(x, y, opt)
        assert calls[i][3] == pytest.approx(factor, rel=1e-12)
        torch.testing.assert_close(pruner.mask_logits.detach(), expected_after(calls[i], pruner, 2.0, factor),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.equal(pruner.mask_logits.detach(), calls[i][4])
        sched.step()
    # no schedule at all: the mask lr is used as is
    opt2 = torch.optim.SGD(pruner.weight_parameters(), lr=0.05)
    pruner.train_step(x, y, opt2)
    assert calls[2][3] == 1.0
    torch.testing.assert_close(pruner.mask_logits.detach(), expected_after(calls[2], pruner, 2.0, 1.0),
                               rtol=1e-5, atol=1e-6)
