"""TwoPathNetwork.run_dual: both paths in one traversal, against two separate runs of the same network.

With the PyTorch implementations every layer's ``dual`` is the soft and the hard computation of its
``forward``, so outputs, gradients and running statistics must be bit-identical to ``run("soft")`` and
``run("hard")``. Under Triton (its CPU interpreter when there is no GPU) the stem conv and the linear head run
the fused dual-path kernels and match within float32 tolerance.

The bit-for-bit comparisons run on CPU tensors on every machine: on a GPU, cuDNN may choose backward algorithms
that are not deterministic from one run to the next. The Triton comparisons run on CUDA tensors where there is a
GPU.
"""
from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2hk import S2HPruner, TwoPathNetwork, dispatch, models
from s2hk.layers import GatedConv, GatedLinear, GatedNorm
from helpers import randomise_norms

NUM_CLASSES = 5
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


pytestmark = pytest.mark.usefixtures("full_float32", "clean_env")


class Small(nn.Module):
    """stem conv (with bias) -> BN -> ReLU -> conv -> BN -> ReLU -> global mean -> linear (gated: its outputs
    are a prunable group) -> ReLU -> linear. Without ``stem_norm`` the stem's BN is left out, so the stem conv
    itself carries its group's soft gate."""

    def __init__(self, stem_norm: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8) if stem_norm else nn.Identity()
        self.conv, self.bn1 = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.hidden = nn.Linear(6, 7)
        self.fc = nn.Linear(7, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.conv(x)))
        return self.fc(F.relu(self.hidden(x.mean((2, 3)))))


INPUT = {"small": (2, 3, 8, 8), "small_gated_stem": (2, 3, 8, 8), "resnet56": (2, 3, 16, 16),
         "mobilenet_v3_small": (2, 3, 16, 16)}
_BUILT: dict = {}


def make_model(name: str) -> nn.Module:
    if name.startswith("small"):
        return Small(stem_norm=name == "small")
    return models.get_model(name, num_classes=NUM_CLASSES)


def build(name: str) -> tuple[TwoPathNetwork, torch.Tensor]:
    """A fresh copy of the network (traced once per model), random mask logits, and its input batch."""
    if name not in _BUILT:
        torch.manual_seed(1)
        model = make_model(name)
        x = torch.randn(INPUT[name])
        net = TwoPathNetwork(randomise_norms(model), x[:1])
        with torch.no_grad():
            net.mask_logits.copy_(torch.randn(net.mask_logits.shape))
        _BUILT[name] = (net, x)
    net, x = _BUILT[name]
    return copy.deepcopy(net), x


def pin(net: TwoPathNetwork, widths: str) -> None:
    """"prefix": every group at half width (prefix selections); "gathered": every other channel from 1 on
    (index selections); "plan": what the logits give."""
    if widths == "prefix":
        net.set_hard_widths({g.name: max(1, g.channels // 2) for g in net.prunable})
    elif widths == "gathered":
        net.set_hard_widths({g.name: list(range(1, g.channels, 2)) or [0] for g in net.prunable})


def prepare(net: TwoPathNetwork) -> None:
    keep, _ = net.gates()
    net.prepare_soft(keep)
    net.prepare_hard()


def separate(net: TwoPathNetwork, x: torch.Tensor):
    prepare(net)
    return net.run("soft", x), net.run("hard", x)


def dual(net: TwoPathNetwork, x: torch.Tensor):
    prepare(net)
    return net.run_dual(x)


def running_stats(net: TwoPathNetwork) -> dict:
    """Every norm's soft (the module's) and hard running statistics, by layer call."""
    out = {}
    for name, w in net.wrappers.items():
        if isinstance(w, GatedNorm) and w.hard_running_mean is not None:
            m = w.module
            out[name] = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked,
                                             w.hard_running_mean, w.hard_running_var, w.hard_num_batches_tracked)]
    return out


def grads_of(net: TwoPathNetwork) -> list:
    return [p.grad for p in net.weight_parameters()] + [net.mask_logits.grad]


def assert_same(a, b, exact: bool = True, **tol) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
        elif exact:
            assert torch.equal(u, v)
        else:
            torch.testing.assert_close(u, v, **tol)


# ----------------------------------------------------------------------------------------- structure

def test_dual_graph_calls_each_wrapper_once_and_shares_inputs():
    net, x = build("small")
    keys = list(net.state_dict())
    gm = net.dual_module
    assert gm is net.dual_module  # built once
    assert gm.get_submodule("paths") is net.graph_module  # modules and attributes reached through it
    nodes = list(gm.graph.nodes)
    source = list(net.graph_module.graph.nodes)
    duals = [n for n in nodes if n.op == "call_method" and n.target == "dual"]
    assert len(duals) == len(net.wrappers)
    # no wrapper is called through its forward; placeholders are not duplicated
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), (GatedConv, GatedLinear,
                                                                                          GatedNorm))
                   for n in nodes)
    assert sum(n.op == "placeholder" for n in nodes) == sum(n.op == "placeholder" for n in source) == 1
    # every other node has a soft and a hard copy
    others = [n for n in source if n.op in ("call_function", "call_method", "call_module")
              and n.name not in net.wrappers]
    copies = [n for n in nodes if n.op in ("call_function", "call_method", "call_module")
              and n not in duals and not (n.target is operator.getitem and n.args[0] in duals)]
    assert len(copies) == 2 * len(others) > 0
    # the stem's dual call sees the same input twice
    placeholder = nodes[0]
    assert duals[0].args[1] is placeholder and duals[0].args[2] is placeholder
    # the module is not registered: the state dict is unchanged
    assert list(net.state_dict()) == keys


def test_run_dual_needs_both_states_prepared():
    net, x = build("small")
    with pytest.raises(RuntimeError, match="prepare_soft"):
        net.run_dual(x)
    keep, _ = net.gates()
    net.prepare_soft(keep)
    with pytest.raises(RuntimeError, match="prepare_hard"):
        net.run_dual(x)
    net.prepare_hard()
    soft, hard = net.run_dual(x)
    assert net.state.path == "dense"
    assert soft.shape == hard.shape == (2, NUM_CLASSES)


# ----------------------------------------------------------------------------------------- reference: exact

@pytest.mark.parametrize("name", ["small", "small_gated_stem", "resnet56", "mobilenet_v3_small"])
@pytest.mark.parametrize("widths", ["prefix", "gathered"])
@pytest.mark.parametrize("train", [True, False])
def test_run_dual_equals_separate_runs(name, widths, train):
    """Outputs, running-statistic updates (soft and hard path), and gradients of both outputs with respect to
    the weights and the mask logits -- including the decoupled mask-only backward of the soft output taken
    before the full one -- are those of two separate runs, bit for bit."""
    net_a, x = build(name)
    pin(net_a, widths)
    net_a.train(train)
    net_b = copy.deepcopy(net_a)
    gen = torch.Generator().manual_seed(7)
    g_soft, g_hard, g_mask = (torch.randn(2, NUM_CLASSES, generator=gen) for _ in range(3))

    results = []
    for net, fn in ((net_a, separate), (net_b, dual)):
        torch.manual_seed(3)  # mobilenet's dropout draws in the same order (soft, then hard)
        soft, hard = fn(net, x)
        (mask_only,) = torch.autograd.grad(soft, net.mask_logits, g_mask, retain_graph=True)
        assert torch.autograd.grad(hard, net.mask_logits, g_hard, retain_graph=True, allow_unused=True) == (None,)
        torch.autograd.backward([soft, hard], [g_soft, g_hard])
        results.append(((soft, hard), mask_only, running_stats(net), grads_of(net)))

    (out_a, mask_a, stats_a, grads_a), (out_b, mask_b, stats_b, grads_b) = results
    assert_same(out_a, out_b)
    assert torch.equal(mask_a, mask_b)
    assert stats_a.keys() == stats_b.keys() and all(torch.equal(u, v) for k in stats_a
                                                    for u, v in zip(stats_a[k], stats_b[k]))
    assert_same(grads_a, grads_b)
    assert net_a.mask_logits.grad is not None and net_a.mask_logits.grad.abs().sum() > 0


def test_hard_running_statistics_update_in_dual_traversal():
    net_a, x = build("small")
    pin(net_a, "gathered")
    net_b = copy.deepcopy(net_a)
    before = running_stats(net_a)
    with torch.no_grad():
        separate(net_a, x)
        dual(net_b, x)
    after_a, after_b = running_stats(net_a), running_stats(net_b)
    for name in before:
        assert all(torch.equal(u, v) for u, v in zip(after_a[name], after_b[name]))
        assert not torch.equal(before[name][3], after_b[name][3])  # hard mean moved
        assert int(after_b[name][2]) == int(after_b[name][5]) == int(before[name][2]) + 1


def test_copies_rebuild_their_own_dual_graph():
    net, x = build("small")
    pin(net, "prefix")
    net.eval()
    with torch.no_grad():
        expected = dual(net, x)
    clone = copy.deepcopy(net)
    assert clone.dual_module is not net.dual_module
    assert clone.dual_module.get_submodule("paths") is clone.graph_module
    with torch.no_grad():
        torch.nn.init.zeros_(net.model.fc.weight)  # the original changes; the copy must not see it
        got = dual(clone, x)
    assert_same(expected, got)


# ----------------------------------------------------------------------------------------- train_step

def _train(name: str, fused: bool, steps: int = 5, impl: str = "auto", device: torch.device = torch.device("cpu"),
           **overrides):
    """``steps`` S2HPruner steps from the same start and batches (drawn on the CPU, then moved to ``device``)."""
    torch.manual_seed(0)
    model = make_model(name)
    x0 = torch.randn(INPUT[name])
    model, x0 = randomise_norms(model).to(device), x0.to(device)
    settings = dict(target_flops=0.4, mask_lr=5.0, fused_paths=fused)
    settings.update(overrides)
    pruner = S2HPruner(model, x0[:1], **settings)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(11)
    history = []
    torch.manual_seed(5)
    with dispatch.use_impl(impl):
        for _ in range(steps):
            x = torch.randn(INPUT[name], generator=gen)
            y = torch.randint(0, NUM_CLASSES, (x.shape[0],), generator=gen)
            history.append(pruner.train_step(x.to(device), y.to(device), opt))
    return pruner, history


def _nan_free(metrics: dict) -> dict:
    """NaN compares unequal to itself: mark it (kd="none" has no hard-path metrics)."""
    return {k: "nan" if math.isnan(v) else v for k, v in metrics.items()}


def _state(pruner: S2HPruner) -> list:
    return ([t for _, t in sorted(pruner.model.state_dict().items())] + [pruner.mask_logits.detach()]
            + [t for s in running_stats(pruner).values() for t in s])


@pytest.mark.parametrize("name,kd", [("small", "decoupled"), ("small", "mutual"), ("small", "unidirectional"),
                                     ("small", "none"), ("resnet56", "decoupled"),
                                     ("mobilenet_v3_small", "decoupled")])
def test_fused_train_step_trajectory_is_bit_identical(name, kd):
    unfused, hist_a = _train(name, False, kd=kd)
    fused, hist_b = _train(name, True, kd=kd)
    assert [_nan_free(h) for h in hist_a] == [_nan_free(h) for h in hist_b]  # bit-identical floats
    if kd != "none":
        assert all(not math.isnan(v) for h in hist_a for v in h.values())
    assert_same(_state(unfused), _state(fused))
    assert unfused.plan.widths == fused.plan.widths
    if kd == "decoupled" and name == "small":
        assert fused.plan.widths != [g.channels for g in fused.prunable]  # the architecture moved


def test_fused_paths_is_a_documented_config_option():
    from s2hk.config import S2HConfig

    assert S2HConfig().fused_paths is False
    assert "fused_paths" in S2HConfig.__doc__
    assert S2HConfig.from_dict({"fused_paths": True}).fused_paths is True


# ----------------------------------------------------------------------------------------- Triton kernels

@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the dual-path kernels' entry points."""
    pytest.importorskip("triton")
    from s2hk.kernels import dual_conv as dc
    from s2hk.kernels import dual_linear as dl

    counts = {"dual_conv": 0, "dual_linear": 0}

    def spy(module, name):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(dc, "dual_conv")
    spy(dl, "dual_linear")
    return counts


def _skip_without_kernels() -> None:
    from s2hk import kernels

    reason = kernels.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(f"Triton kernels cannot run on {DEVICE.type} tensors here: {reason}")


@pytest.mark.parametrize("widths", ["prefix", "gathered"])
@pytest.mark.parametrize("name,ops", [("small", None), ("small", ("dual_conv", "dual_linear")),
                                      ("small_gated_stem", None)])
def test_triton_dual_kernels_match_reference(kernel_calls, widths, name, ops):
    """Every op on Triton (the norms too), or only the dual-path ops; the stem gated by the conv itself."""
    _skip_without_kernels()
    net_a, x = build(name)
    stem = net_a.analysis.layers["stem"]
    assert stem.gate == (name == "small_gated_stem")
    pin(net_a, widths)
    net_a.to(DEVICE)
    x = x.to(DEVICE)
    net_b = copy.deepcopy(net_a)
    gen = torch.Generator().manual_seed(7)
    g_soft, g_hard = (torch.randn(2, NUM_CLASSES, generator=gen).to(DEVICE) for _ in range(2))

    soft_a, hard_a = separate(net_a, x)
    (mask_a,) = torch.autograd.grad(soft_a, net_a.mask_logits, g_soft, retain_graph=True)
    torch.autograd.backward([soft_a, hard_a], [g_soft, g_hard])
    prepare(net_b)
    with dispatch.use_impl("triton", ops=ops):
        soft_b, hard_b = net_b.run_dual(x)
    assert kernel_calls == {"dual_conv": 1, "dual_linear": 2}  # the stem and the two linear layers
    (mask_b,) = torch.autograd.grad(soft_b, net_b.mask_logits, g_soft, retain_graph=True)
    torch.autograd.backward([soft_b, hard_b], [g_soft, g_hard])

    tol = dict(rtol=1e-4, atol=1e-5)
    assert_same((soft_a, hard_a, mask_a), (soft_b, hard_b, mask_b), exact=False, **tol)
    assert_same(grads_of(net_a), grads_of(net_b), exact=False, **tol)
    stats_a, stats_b = running_stats(net_a), running_stats(net_b)
    for name in stats_a:
        assert_same(stats_a[name], stats_b[name], exact=False, **tol)


def test_auto_never_takes_the_dual_kernels_on_cpu(kernel_calls):
    net, x = build("small")
    pin(net, "prefix")
    with torch.no_grad():
        expected = separate(net, x)
        got = dual(net, x)
    assert kernel_calls == {"dual_conv": 0, "dual_linear": 0}
    assert_same(expected, got)


def test_fused_train_step_on_triton_kernels_matches_reference(kernel_calls):
    _skip_without_kernels()
    _, hist_a = _train("small", False, steps=2, device=DEVICE)
    _, hist_b = _train("small", True, steps=2, impl="triton", device=DEVICE)
    assert kernel_calls == {"dual_conv": 2, "dual_linear": 4}
    for a, b in zip(hist_a, hist_b):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5), (k, a[k], b[k])
