"""The ops of s2hk.ops against their PyTorch references: forward, every gradient, torch.library.opcheck.

The C++ ops allocate their outputs with at::empty; under ``torch.use_deterministic_algorithms(True)`` torch
fills every such allocation with NaN (floating point) or the largest integer, so an element an op forgets to
write cannot pass a comparison (fixture ``poisoned_outputs``).
"""
from __future__ import annotations

import os

import pytest
import torch

from s2hk import dispatch, ops
from s2hk.masks import GateLayout, max_init_logits, ranks_from_importance

EXTENSION = dispatch.extension(warn=False)
NO_EXTENSION_BUILD = os.environ.get("S2HK_NO_EXTENSION") == "1"
needs_extension = pytest.mark.skipif(EXTENSION is None, reason="s2hk._C is not loaded (test_extension_loads says why)")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_extension_loads():
    if NO_EXTENSION_BUILD:
        pytest.skip("installed with S2HK_NO_EXTENSION=1")
    assert EXTENSION is not None, f"s2hk._C did not load: {dispatch._ext.error}"
    for name in ("gates", "gates_backward", "decoupled_kd", "group_importance"):
        assert hasattr(torch.ops.s2hk, name), name


@pytest.fixture
def poisoned_outputs():
    """Fill every tensor torch allocates uninitialised (the ops' outputs) with NaN / the largest integer."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(3).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def close(dtype: torch.dtype) -> dict:
    """Tolerances of an op computed in ``dtype`` against the float64 reference on the same (upcast) inputs.

    The C++ ops compute in float64 inside and round once at the end, so a float32 result is the float64 one
    to within an ulp or two.
    """
    return dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)


#: A float32 op against the float32 reference, whose own rounding error dominates.
FLOAT32_REFERENCE = dict(rtol=3e-5, atol=3e-6)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """The float64 leaf with the values of ``t`` (an exact copy for float32 and float64)."""
    return t.detach().double().requires_grad_(t.requires_grad)


# ----------------------------------------------------------------------------------------------- gates

# C=1; C=7 at d=1 and d=7 (L=1); C=96 at d=3 (L=32); L=70 (more than one 32-wide tile); L=1 at C=96.
LAYOUTS = [
    GateLayout((1, 7, 96, 7, 70, 96, 12), (1, 1, 3, 7, 1, 96, 2)),
    GateLayout((5,), (5,)),
    GateLayout((33, 1), (1, 1)),
]


def random_gate_inputs(layout: GateLayout, dtype: torch.dtype, device: str, scale: float = 2.0):
    logits = (scale * torch.randn(sum(layout.num_choices), dtype=torch.float64)).to(dtype).to(device)
    ranks = torch.cat([torch.randperm(c) for c in layout.channels]).to(device)
    return logits.requires_grad_(True), ranks


def gate_grads(out: ops.Gates, logits: torch.Tensor, weights) -> torch.Tensor:
    w_keep, w_hard, w_expected = weights
    loss = (out.keep_probs * w_keep).sum() + (out.hard_widths * w_hard).sum() + (out.expected * w_expected).sum()
    return torch.autograd.grad(loss, logits)[0]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"C{l.channels}")
@pytest.mark.parametrize("tau", [1.0, 0.35, 2.5])
def test_gates_matches_reference(poisoned_outputs, device, dtype, layout, tau):
    logits, ranks = random_gate_inputs(layout, dtype, device)
    logits64 = upcast(logits)
    with dispatch.use_impl("cpp"):
        got = ops.gates(logits, ranks, layout, tau)
    want = ops.gates_reference(logits64, ranks, layout, tau)
    assert got.keep_probs.dtype == dtype and got.mask.dtype == torch.float32
    assert got.hard_widths.dtype == got.expected.dtype == torch.float64
    torch.testing.assert_close(got.keep_probs.double(), want.keep_probs, **close(dtype))
    torch.testing.assert_close(got.expected, want.expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.hard_widths, want.hard_widths)
    assert torch.equal(got.mask, want.mask)
    assert not got.mask.requires_grad
    if dtype == torch.float32:  # and the float32 reference itself
        want32 = ops.gates_reference(logits, ranks, layout, tau)
        torch.testing.assert_close(got.keep_probs, want32.keep_probs, **FLOAT32_REFERENCE)
        assert torch.equal(got.hard_widths, want32.hard_widths) and torch.equal(got.mask, want32.mask)

    # every gradient: each output alone, then all together
    n, g = ranks.numel(), layout.num_groups
    zeros = (torch.zeros(n, dtype=dtype, device=device), torch.zeros(g, dtype=torch.float64, device=device),
             torch.zeros(g, dtype=torch.float64, device=device))
    randoms = (torch.randn(n, dtype=dtype, device=device), torch.randn(g, dtype=torch.float64, device=device),
               torch.randn(g, dtype=torch.float64, device=device))
    for which in range(4):
        weights = randoms if which == 3 else tuple(r if i == which else z
                                                   for i, (r, z) in enumerate(zip(randoms, zeros)))
        with dispatch.use_impl("cpp"):
            grad_got = gate_grads(ops.gates(logits, ranks, layout, tau), logits, weights)
        grad_want = gate_grads(ops.gates_reference(logits64, ranks, layout, tau), logits64,
                               tuple(w.double() for w in weights))
        torch.testing.assert_close(grad_got.double(), grad_want, **close(dtype), msg=lambda m: f"gradient {which}: {m}")
        if dtype == torch.float32:
            grad_want32 = gate_grads(ops.gates_reference(logits, ranks, layout, tau), logits, weights)
            torch.testing.assert_close(grad_got, grad_want32, **FLOAT32_REFERENCE)


@needs_extension
def test_gates_max_init_is_full_width(poisoned_outputs):
    layout = LAYOUTS[0]
    logits = torch.cat([max_init_logits(c, d) for c, d in zip(layout.channels, layout.granularities)])
    ranks = torch.cat([torch.randperm(c) for c in layout.channels])
    with dispatch.use_impl("cpp"):
        got = ops.gates(logits, ranks, layout)
    assert got.hard_widths.tolist() == [float(c) for c in layout.channels]
    assert bool((got.mask == 1).all())
    assert torch.equal(got.hard_widths, ops.gates_reference(logits, ranks, layout).hard_widths)


@needs_extension
def test_gates_no_groups():
    layout = GateLayout((), ())
    table = ops.gate_layout_tensor(layout, torch.device("cpu"))
    got = torch.ops.s2hk.gates(torch.zeros(0), torch.zeros(0, dtype=torch.int64), table, 1.0)
    assert [t.shape for t in got] == [(0,)] * 4


@needs_extension
def test_gates_rejects_bad_ranks_and_layouts():
    layout = GateLayout((4, 3), (2, 1))
    logits, ranks = random_gate_inputs(layout, torch.float32, "cpu")
    table = ops.gate_layout_tensor(layout, torch.device("cpu"))
    bad_ranks = ranks.clone()
    bad_ranks[0] = bad_ranks[1]
    with pytest.raises(RuntimeError, match="permutation"):
        torch.ops.s2hk.gates(logits, bad_ranks, table, 1.0)
    with pytest.raises(RuntimeError, match="layout covers"):
        torch.ops.s2hk.gates(logits[:-1], ranks, table, 1.0)
    bad_table = table.clone()
    bad_table[1, 3] = 2  # granularity 2 does not divide 3 channels
    with pytest.raises(RuntimeError, match="divisor"):
        torch.ops.s2hk.gates(logits, ranks, bad_table, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.s2hk.gates(logits, ranks.int(), table, 1.0)


def test_gates_reference_gradcheck():
    layout = LAYOUTS[0]
    logits, ranks = random_gate_inputs(layout, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda u: ops.gates_reference(u, ranks, layout, 0.7).keep_probs, (logits,))
    assert torch.autograd.gradcheck(lambda u: ops.gates_reference(u, ranks, layout, 0.7).expected, (logits,))
    # hard widths are piecewise constant in value: their gradient is the expected widths' (straight-through)
    w = torch.randn(layout.num_groups, dtype=torch.float64)
    out = ops.gates_reference(logits, ranks, layout, 0.7)
    torch.testing.assert_close(torch.autograd.grad((out.hard_widths * w).sum(), logits, retain_graph=True)[0],
                               torch.autograd.grad((out.expected * w).sum(), logits)[0], rtol=0, atol=0)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gates_opcheck(dtype):
    layout = LAYOUTS[0]
    logits, ranks = random_gate_inputs(layout, dtype, "cpu")
    table = ops.gate_layout_tensor(layout, torch.device("cpu"))
    torch.library.opcheck(torch.ops.s2hk.gates.default, (logits, ranks, table, 0.8))
    grads = (torch.randn(ranks.numel(), dtype=dtype), torch.randn(layout.num_groups, dtype=torch.float64),
             torch.randn(layout.num_groups, dtype=torch.float64))
    torch.library.opcheck(torch.ops.s2hk.gates_backward.default, (*grads, logits.detach(), ranks, table, 0.8))


# ---------------------------------------------------------------------------------------- decoupled KD

KD_SHAPES = [(1, 1), (1, 7), (3, 10), (17, 100), (64, 33), (5, 1000)]


def kd_inputs(shape, dtype, device, scale=3.0):
    soft = (scale * torch.randn(shape, dtype=torch.float64)).to(dtype).to(device).requires_grad_(True)
    hard = (scale * torch.randn(shape, dtype=torch.float64)).to(dtype).to(device).requires_grad_(True)
    return soft, hard


def test_decoupled_kd_reference_routes_gradients():
    """Each KL term reaches only its own logits, and the closed-form gradients are autograd's."""
    soft, hard = kd_inputs((6, 9), torch.float64, "cpu")
    out = ops.decoupled_kd_reference(soft, hard, temperature=1.7, alpha=0.6)
    assert torch.autograd.grad(out.loss_hard, soft, allow_unused=True)[0] is None
    assert torch.autograd.grad(out.loss_soft, hard, allow_unused=True)[0] is None
    torch.testing.assert_close(torch.autograd.grad(out.loss_hard, hard)[0], out.grad_hard, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.autograd.grad(out.loss_soft, soft)[0], out.grad_soft, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.loss_hard, out.loss_soft, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda s, h: ops.batch_mean_kl(s, h, 1.7), (soft, hard))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", KD_SHAPES, ids=str)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.5, 0.3), (0.5, 4.0)])
def test_decoupled_kd_matches_reference(poisoned_outputs, device, dtype, shape, temperature, alpha):
    soft, hard = kd_inputs(shape, dtype, device)
    soft64, hard64 = upcast(soft), upcast(hard)
    with dispatch.use_impl("cpp"):
        got = ops.decoupled_kd(soft, hard, temperature, alpha)
    want = ops.decoupled_kd_reference(soft64, hard64, temperature, alpha)
    want32 = ops.decoupled_kd_reference(soft, hard, temperature, alpha)
    for name in ("loss_hard", "loss_soft", "grad_hard", "grad_soft"):
        value = getattr(got, name)
        assert value.dtype == dtype
        torch.testing.assert_close(value.double(), getattr(want, name), **close(dtype), msg=lambda m: f"{name}: {m}")
        if dtype == torch.float32:
            torch.testing.assert_close(value, getattr(want32, name), **FLOAT32_REFERENCE)
    assert not got.grad_hard.requires_grad and not got.grad_soft.requires_grad

    # routing: G_h reaches the hard logits only, G_s the soft logits only, with the reference KL terms' gradients
    routes = (("loss_hard", hard, soft, hard64), ("loss_soft", soft, hard, soft64))
    for loss_name, reached, untouched, reached64 in routes:
        g = torch.tensor(0.75, dtype=dtype, device=device)
        grad_got = torch.autograd.grad(getattr(got, loss_name), (reached, untouched), g, allow_unused=True)
        grad_want = torch.autograd.grad(getattr(want, loss_name), reached64, g.double())[0]
        grad_want32 = torch.autograd.grad(getattr(want32, loss_name), (reached, untouched), g, allow_unused=True)
        assert grad_got[1] is None and grad_want32[1] is None, f"{loss_name} must not reach the other logits"
        torch.testing.assert_close(grad_got[0].double(), grad_want, **close(dtype))


@needs_extension
def test_decoupled_kd_extreme_logits(poisoned_outputs):
    soft, hard = kd_inputs((8, 50), torch.float32, "cpu", scale=80.0)
    with dispatch.use_impl("cpp"):
        got = ops.decoupled_kd(soft, hard)
    want = ops.decoupled_kd_reference(soft.double(), hard.double())
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


@needs_extension
def test_decoupled_kd_half_inputs_compute_in_float32():
    soft, hard = kd_inputs((4, 12), torch.bfloat16, "cpu")
    with dispatch.use_impl("cpp"):
        got = ops.decoupled_kd(soft, hard)
    want = ops.decoupled_kd_reference(soft.float(), hard.float())
    torch.testing.assert_close(got.grad_soft, want.grad_soft, **close(torch.float32))
    got.loss_soft.backward()
    assert soft.grad is not None and soft.grad.dtype == torch.bfloat16 and hard.grad is None


@needs_extension
def test_decoupled_kd_rejects_bad_inputs():
    soft, hard = kd_inputs((3, 4), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.s2hk.decoupled_kd(soft, hard[:, :3], 1.0, 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.s2hk.decoupled_kd(soft, hard, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        torch.ops.s2hk.decoupled_kd(soft, hard.double(), 1.0, 1.0)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoupled_kd_opcheck(dtype):
    soft, hard = kd_inputs((7, 13), dtype, "cpu")
    torch.library.opcheck(torch.ops.s2hk.decoupled_kd.default, (soft, hard, 1.5, 0.5))


# ------------------------------------------------------------------------------------- group importance


def importance_inputs(dtype=torch.float32, device="cpu"):
    """Groups of C = 7 (conv + linear + BN), 1, 96 (1x1 conv, channels_last conv), 5 (transposed linear)."""
    weights = [
        torch.randn(7, 3, 3, 3, dtype=dtype),
        torch.randn(7, 5, dtype=dtype),
        torch.rand(7, dtype=dtype),  # a norm layer's weight (C,)
        torch.randn(1, 4, 3, 3, dtype=dtype),
        torch.randn(96, 4, 1, 1, dtype=dtype),
        torch.randn(96, 6, 3, 3, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(11, 5, dtype=dtype).t(),  # (5, 11), not contiguous
        torch.randn(96, 2, dtype=torch.float64),
    ]
    groups = [0, 0, 0, 1, 2, 2, 3, 2]
    return [w.to(device) for w in weights], groups


def check_importance(got: ops.GroupImportance, want: ops.GroupImportance):
    assert got.importance.dtype == want.importance.dtype
    torch.testing.assert_close(got.importance, want.importance, equal_nan=True, **close(want.importance.dtype))
    assert torch.equal(got.order, want.order)
    assert torch.equal(got.ranks, want.ranks)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_float64", [False, True])
def test_group_importance_matches_reference(poisoned_outputs, device, with_float64):
    weights, groups = importance_inputs(device=device)
    if not with_float64:  # importance in float32
        weights, groups = weights[:-1], groups[:-1]
    with dispatch.use_impl("cpp"):
        got = ops.group_importance(weights, groups)
    check_importance(got, ops.group_importance_reference(weights, groups))
    assert got.importance.dtype == (torch.float64 if with_float64 else torch.float32)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_importance_16_bit_weights(poisoned_outputs, dtype):
    weights, groups = importance_inputs(dtype=dtype)
    weights, groups = weights[:-1], groups[:-1]
    with dispatch.use_impl("cpp"):
        got = ops.group_importance(weights, groups)
    check_importance(got, ops.group_importance_reference(weights, groups))


@needs_extension
def test_group_importance_ties_and_nan_follow_ranks_from_importance(poisoned_outputs):
    """Equal scores keep index order, NaN sorts first: exactly s2hk.masks.ranks_from_importance."""
    w = torch.randn(9, 4)
    w[2] = w[5] = w[7]  # three equal filters
    w[0] = w[3] = 0.0  # two dead filters
    v = torch.randn(4, 4)
    v[1, 2] = float("nan")
    v[3] = v[0]
    with dispatch.use_impl("cpp"):
        got = ops.group_importance([w, v], [0, 1])
    check_importance(got, ops.group_importance_reference([w, v], [0, 1]))
    order, ranks = ranks_from_importance(got.importance[:9])
    assert torch.equal(got.order[:9], order) and torch.equal(got.ranks[:9], ranks)
    assert got.order[9].item() == 1  # the NaN channel first
    later = got.order[10:].tolist()
    assert later.index(0) < later.index(3)  # equal scores: lower index first


@needs_extension
def test_group_importance_rejects_bad_groups():
    weights, groups = importance_inputs()
    with pytest.raises(ValueError, match="cover"):
        ops.group_importance(weights[:3], [0, 0, 2])
    with pytest.raises(RuntimeError, match="output channels"):
        torch.ops.s2hk.group_importance([torch.randn(3, 2), torch.randn(4, 2)], [0, 0])
    with pytest.raises(RuntimeError, match="no layer"):
        torch.ops.s2hk.group_importance([torch.randn(3, 2)], [1])


@needs_extension
def test_group_importance_opcheck():
    weights, groups = importance_inputs()
    weights = [w.detach().requires_grad_(True) for w in weights]
    torch.library.opcheck(torch.ops.s2hk.group_importance.default, (weights, groups))
    out = torch.ops.s2hk.group_importance(weights, groups)
    assert not any(t.requires_grad for t in out)
