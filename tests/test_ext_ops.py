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

    The C++ ops compute in float64 inside and round once at the end, on the CPU and on CUDA alike, so a float32
    result is the float64 one to within an ulp or two: one tolerance per dtype, the same on every device.
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
    randoms = tuple(r.to(device) for r in (torch.randn(n, dtype=dtype), torch.randn(g, dtype=torch.float64),
                                           torch.randn(g, dtype=torch.float64)))
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
@pytest.mark.parametrize("device", DEVICES)
def test_gates_max_init_is_full_width(poisoned_outputs, device):
    layout = LAYOUTS[0]
    logits = torch.cat([max_init_logits(c, d) for c, d in zip(layout.channels, layout.granularities)]).to(device)
    ranks = torch.cat([torch.randperm(c) for c in layout.channels]).to(device)
    with dispatch.use_impl("cpp"):
        got = ops.gates(logits, ranks, layout)
    assert got.hard_widths.tolist() == [float(c) for c in layout.channels]
    assert bool((got.mask == 1).all())
    assert torch.equal(got.hard_widths, ops.gates_reference(logits, ranks, layout).hard_widths)


#: Two groups: 4 channels at granularity 2 (2 choices), then 3 channels at granularity 1 (3 choices).
SMALL_LAYOUT = GateLayout((4, 3), (2, 1))


def gate_args(device: str, dtype: torch.dtype = torch.float32) -> dict:
    """Valid arguments of torch.ops.s2hk.gates and gates_backward on SMALL_LAYOUT; tests spoil one at a time."""
    logits, ranks = random_gate_inputs(SMALL_LAYOUT, dtype, device)
    grads = (torch.randn(ranks.numel(), dtype=dtype), torch.randn(2, dtype=torch.float64),
             torch.randn(2, dtype=torch.float64))
    return dict(logits=logits.detach(), ranks=ranks, layout=ops.gate_layout_tensor(SMALL_LAYOUT, device).clone(),
                host_layout=ops.gate_layout_tensor(SMALL_LAYOUT, "cpu").clone(), tau=1.0,
                **dict(zip(("grad_keep_probs", "grad_hard_widths", "grad_expected"), (g.to(device) for g in grads))))


def call_gates(a: dict):
    return torch.ops.s2hk.gates(a["logits"], a["ranks"], a["layout"], a["host_layout"], a["tau"])


def call_gates_backward(a: dict):
    return torch.ops.s2hk.gates_backward(a["grad_keep_probs"], a["grad_hard_widths"], a["grad_expected"],
                                         a["logits"], a["ranks"], a["layout"], a["host_layout"], a["tau"])


def with_entry(table: torch.Tensor, row: int, column: int, value: int) -> torch.Tensor:
    table = table.clone()
    table[row, column] = value
    return table


def spoil_both_layouts(row: int, column: int, value: int):
    """The same bad entry in layout and host_layout, so that only the content check can catch it."""
    return lambda a: dict(layout=with_entry(a["layout"], row, column, value),
                          host_layout=with_entry(a["host_layout"], row, column, value))


# name: (replacement arguments from the valid ones, the error after "s2hk::<op>: ")
GATE_BAD_INPUTS = {
    "logits_2d": (lambda a: dict(logits=a["logits"].reshape(1, -1)), r"logits must be the flat \(sum L_g,\) buffer"),
    "logits_int64": (lambda a: dict(logits=a["logits"].long()), "logits must be float32 or float64, got int64"),
    "logits_float16": (lambda a: dict(logits=a["logits"].half()), "logits must be float32 or float64, got float16"),
    "ranks_2d": (lambda a: dict(ranks=a["ranks"].reshape(1, -1)), r"ranks must be the flat \(sum C_g,\) buffer"),
    "ranks_int32": (lambda a: dict(ranks=a["ranks"].int()), "ranks must be int64, got int32"),
    "layout_3_columns": (lambda a: dict(layout=a["layout"][:, :3]), r"layout must be \(G, 4\) rows"),
    "layout_float64": (lambda a: dict(layout=a["layout"].double()), "layout must be int64, got float64"),
    "host_layout_1d": (lambda a: dict(host_layout=a["host_layout"].flatten()), r"host_layout must be \(G, 4\) rows"),
    "host_layout_int32": (lambda a: dict(host_layout=a["host_layout"].int()), "host_layout must be int64, got int32"),
    "host_layout_fewer_rows": (lambda a: dict(host_layout=a["host_layout"][:1]),
                               "host_layout has 1 groups but layout has 2"),
    "granularity_not_a_divisor": (spoil_both_layouts(1, 3, 2),
                                  "host_layout group 1: granularity 2 must be a positive divisor of its 3 channels"),
    "granularity_zero": (spoil_both_layouts(0, 3, 0), "host_layout group 0: granularity 0 must be a positive divisor"),
    "channels_negative": (spoil_both_layouts(0, 2, -4), "host_layout group 0: granularity 2 must be a positive divisor "
                                                        "of its -4 channels"),
    "offsets_gap": (spoil_both_layouts(1, 0, 5), r"host_layout group 1: offsets \(5, 2\) do not follow the previous "
                                                 r"groups \(4, 2\)"),
    "group_past_the_buffers": (spoil_both_layouts(1, 2, 2**62), r"host_layout group 1 \(4611686018427387904 channels"),
    "logits_short": (lambda a: dict(logits=a["logits"][:-1]), r"host_layout group 1 \(3 channels, 3 choices\) runs "
                                                              "past the 7 ranks or the 4 logits"),
    "ranks_long": (lambda a: dict(ranks=torch.cat([a["ranks"], a["ranks"][:1]])),
                   "host_layout covers 7 channels and 5 logits, but ranks hold 8 and logits 5"),
    "tau_zero": (lambda a: dict(tau=0.0), "tau must be positive, got 0"),
    "tau_nan": (lambda a: dict(tau=float("nan")), "tau must be positive, got nan"),
}

GATE_BACKWARD_BAD_INPUTS = {
    "grad_keep_probs_2d": (lambda a: dict(grad_keep_probs=a["grad_keep_probs"].reshape(1, -1)),
                           r"grad_keep_probs must be \(sum C_g,\)"),
    "grad_keep_probs_short": (lambda a: dict(grad_keep_probs=a["grad_keep_probs"][:-1]),
                              "grad_keep_probs has 6 elements but ranks 7"),
    "grad_keep_probs_float64": (lambda a: dict(grad_keep_probs=a["grad_keep_probs"].double()),
                                "grad_keep_probs must be float32, got float64"),
    "grad_hard_widths_float32": (lambda a: dict(grad_hard_widths=a["grad_hard_widths"].float()),
                                 "grad_hard_widths must be float64, got float32"),
    "grad_hard_widths_2d": (lambda a: dict(grad_hard_widths=a["grad_hard_widths"].reshape(1, 2)),
                            r"grad_hard_widths must be \(G,\)"),
    "grad_expected_short": (lambda a: dict(grad_expected=a["grad_expected"][:1]),
                            "grad_expected has 1 elements but layout has 2 groups"),
}


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GATE_BAD_INPUTS)
def test_gates_reject_bad_inputs(device, case):
    spoil, message = GATE_BAD_INPUTS[case]
    a = gate_args(device)
    a.update(spoil(a))
    with pytest.raises(RuntimeError, match=f"s2hk::gates: {message}"):
        call_gates(a)
    with pytest.raises(RuntimeError, match=f"s2hk::gates_backward: {message}"):
        call_gates_backward(a)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GATE_BACKWARD_BAD_INPUTS)
def test_gates_backward_rejects_bad_gradients(device, case):
    spoil, message = GATE_BACKWARD_BAD_INPUTS[case]
    a = gate_args(device)
    a.update(spoil(a))
    with pytest.raises(RuntimeError, match=f"s2hk::gates_backward: {message}"):
        call_gates_backward(a)


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
@pytest.mark.parametrize("name,message", [
    ("ranks", "ranks is on cpu but logits is on cuda:0"),
    ("layout", "layout is on cpu but logits is on cuda:0"),
    ("host_layout", "host_layout must be the CPU copy of layout, got a tensor on cuda:0"),
    ("grad_keep_probs", "grad_keep_probs is on cpu but logits is on cuda:0"),
    ("grad_expected", "grad_expected is on cpu but logits is on cuda:0"),
])
def test_gates_reject_mixed_devices(name, message):
    a = gate_args("cuda")
    a[name] = a[name].to("cuda:0" if name == "host_layout" else "cpu")
    ops_to_check = [("gates_backward", call_gates_backward)]
    if not name.startswith("grad_"):
        ops_to_check.append(("gates", call_gates))
    for op, call in ops_to_check:
        with pytest.raises(RuntimeError, match=f"s2hk::{op}: {message}"):
            call(a)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_gates_accept_non_contiguous_inputs(device):
    a = gate_args(device, torch.float64)
    want = call_gates(a), call_gates_backward(a)
    strided = dict(a)
    for name in ("logits", "ranks", "grad_keep_probs", "grad_hard_widths", "grad_expected"):
        strided[name] = torch.stack([a[name], torch.zeros_like(a[name])], dim=1)[:, 0]
        assert not strided[name].is_contiguous()
    for name in ("layout", "host_layout"):
        strided[name] = a[name].t().contiguous().t()
        assert not strided[name].is_contiguous()
    got = call_gates(strided), call_gates_backward(strided)
    for g, w in zip([*got[0], got[1]], [*want[0], want[1]]):
        assert torch.equal(g, w)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_gates_no_groups(device):
    layout = GateLayout((), ())
    table, host_table = ops.gate_layout_tensor(layout, device), ops.gate_layout_tensor(layout, "cpu")
    logits, ranks = torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    got = torch.ops.s2hk.gates(logits, ranks, table, host_table, 1.0)
    assert [t.shape for t in got] == [(0,)] * 4
    grad = torch.ops.s2hk.gates_backward(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.float64, device=device),
                                         torch.zeros(0, dtype=torch.float64, device=device), logits, ranks, table,
                                         host_table, 1.0)
    assert grad.shape == (0,)


def spoil_group_0_ranks(ranks: torch.Tensor, how: str) -> torch.Tensor:
    ranks = ranks.clone()
    ranks[0] = {"duplicate": ranks[1].item(), "negative": -1, "too_large": 4, "huge": 2**62}[how]
    return ranks


BAD_RANKS = ["duplicate", "negative", "too_large", "huge"]


@needs_extension
@pytest.mark.parametrize("how", BAD_RANKS)
def test_gates_cpu_rejects_ranks_that_are_no_permutation(how):
    a = gate_args("cpu")
    a["ranks"] = spoil_group_0_ranks(a["ranks"], how)
    for op, call in (("gates", call_gates), ("gates_backward", call_gates_backward)):
        with pytest.raises(RuntimeError, match=rf"s2hk::{op}: ranks of group 0 must be a permutation of 0..3 "
                                               rf"\(channel [01] has rank"):
            call(a)


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA only: the CPU ops read the ranks and raise instead (previous test)")
@pytest.mark.parametrize("how", BAD_RANKS)
def test_gates_cuda_poisons_the_group_of_bad_ranks(how):
    """Checking CUDA ranks on the host would synchronise every call: the kernels give the group NaN instead."""
    a = gate_args("cuda")
    want = call_gates(a), call_gates_backward(a)
    a["ranks"] = spoil_group_0_ranks(a["ranks"], how)
    keep, hard, expected, mask = call_gates(a)
    grad = call_gates_backward(a)
    torch.cuda.synchronize()  # an access outside the buffers would surface here
    for t in (keep[:4], mask[:4], hard[:1], expected[:1], grad[:2]):  # group 0: channels 0..3, logits 0..1
        assert t.isnan().all()
    for got, ref in ((keep[4:], want[0][0][4:]), (hard[1:], want[0][1][1:]), (expected[1:], want[0][2][1:]),
                     (mask[4:], want[0][3][4:]), (grad[2:], want[1][2:])):
        assert torch.equal(got, ref)


@needs_extension
def test_gates_cpu_rejects_a_layout_that_differs_from_host_layout():
    a = gate_args("cpu")
    a["layout"] = with_entry(a["layout"], 1, 2, 300)
    for op, call in (("gates", call_gates), ("gates_backward", call_gates_backward)):
        with pytest.raises(RuntimeError, match=f"s2hk::{op}: layout differs from its copy host_layout"):
            call(a)


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA only: the CPU ops compare layout with host_layout and raise instead (previous test)")
@pytest.mark.parametrize("column,value", [(0, 2**40), (0, -1), (1, 5), (2, 300), (3, 0), (3, 2)],
                         ids=["channel_offset", "negative_offset", "logit_offset", "channels", "granularity_0",
                              "granularity_not_a_divisor"])
def test_gates_cuda_stays_inside_the_buffers_whatever_the_device_layout(column, value):
    """The kernels read the device layout, which the host cannot check: a row that does not fit the buffers
    gives its group NaN widths and touches nothing else."""
    a = gate_args("cuda")
    want = call_gates(a), call_gates_backward(a)
    a["layout"] = with_entry(a["layout"], 1, column, value)
    keep, hard, expected, mask = call_gates(a)
    grad = call_gates_backward(a)
    torch.cuda.synchronize()  # an access outside the buffers would surface here
    assert hard[1].isnan() and expected[1].isnan()
    for got, ref in ((keep[:4], want[0][0][:4]), (hard[:1], want[0][1][:1]), (expected[:1], want[0][2][:1]),
                     (mask[:4], want[0][3][:4]), (grad[:2], want[1][:2])):
        assert torch.equal(got, ref)


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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gates_opcheck(device, dtype):
    a = gate_args(device, dtype)
    torch.library.opcheck(torch.ops.s2hk.gates.default,
                          (a["logits"].clone().requires_grad_(True), a["ranks"], a["layout"], a["host_layout"], 0.8))
    torch.library.opcheck(torch.ops.s2hk.gates_backward.default,
                          (a["grad_keep_probs"], a["grad_hard_widths"], a["grad_expected"], a["logits"], a["ranks"],
                           a["layout"], a["host_layout"], 0.8))


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
@pytest.mark.parametrize("device", DEVICES)
def test_decoupled_kd_extreme_logits(poisoned_outputs, device):
    soft, hard = kd_inputs((8, 50), torch.float32, device, scale=80.0)
    with dispatch.use_impl("cpp"):
        got = ops.decoupled_kd(soft, hard)
    want = ops.decoupled_kd_reference(upcast(soft), upcast(hard))
    for name, g, w in zip(got._fields, got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, **close(torch.float32), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_decoupled_kd_half_inputs_compute_in_float32(impl):
    if impl == "cpp" and EXTENSION is None:
        pytest.skip("the s2hk._C extension is not built")
    soft, hard = kd_inputs((4, 12), torch.bfloat16, "cpu")
    with dispatch.use_impl(impl):
        got = ops.decoupled_kd(soft, hard)
    assert got.loss_soft.dtype == torch.float32 and got.loss_soft.item() >= 0
    want = ops.decoupled_kd_reference(soft.float(), hard.float())
    torch.testing.assert_close(got.grad_soft, want.grad_soft, **close(torch.float32))
    got.loss_soft.backward()
    assert soft.grad is not None and soft.grad.dtype == torch.bfloat16 and hard.grad is None


# name: (soft, hard, temperature, alpha from valid (3, 4) float32 ones, the error after "s2hk::decoupled_kd: ")
KD_BAD_INPUTS = {
    "soft_1d": (lambda s, h, t, a: (s[0], h[0], t, a), r"soft must be \(N, K\) logits, got shape \[4\]"),
    "soft_3d": (lambda s, h, t, a: (s[None], h[None], t, a), r"soft must be \(N, K\) logits, got shape \[1, 3, 4\]"),
    "soft_int64": (lambda s, h, t, a: (s.long(), h.long(), t, a), "soft must be float32 or float64, got int64"),
    "soft_bfloat16": (lambda s, h, t, a: (s.bfloat16(), h.bfloat16(), t, a),
                      "soft must be float32 or float64, got bfloat16"),
    "no_rows": (lambda s, h, t, a: (s[:0], h[:0], t, a), r"soft must hold N >= 1 rows of K >= 1 classes, got shape "
                                                         r"\[0, 4\]"),
    "no_classes": (lambda s, h, t, a: (s[:, :0], h[:, :0], t, a), r"soft must hold N >= 1 rows of K >= 1 classes"),
    "hard_shape": (lambda s, h, t, a: (s, h[:, :3], t, a), r"hard must have the shape of soft \[3, 4\], got \[3, 3\]"),
    "hard_transposed": (lambda s, h, t, a: (s[:, :3], h[:3].t(), t, a), r"hard must have the shape of soft"),
    "hard_float64": (lambda s, h, t, a: (s, h.double(), t, a), "hard must be float32, got float64"),
    "temperature_zero": (lambda s, h, t, a: (s, h, 0.0, a), "temperature must be positive, got 0"),
    "temperature_negative": (lambda s, h, t, a: (s, h, -1.5, a), "temperature must be positive, got -1.5"),
    "temperature_nan": (lambda s, h, t, a: (s, h, float("nan"), a), "temperature must be positive, got nan"),
    "alpha_inf": (lambda s, h, t, a: (s, h, t, float("inf")), "alpha must be finite, got inf"),
    "alpha_nan": (lambda s, h, t, a: (s, h, t, float("nan")), "alpha must be finite, got nan"),
}


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", KD_BAD_INPUTS)
def test_decoupled_kd_rejects_bad_inputs(device, case):
    spoil, message = KD_BAD_INPUTS[case]
    soft, hard = kd_inputs((3, 4), torch.float32, device)
    with pytest.raises(RuntimeError, match=f"s2hk::decoupled_kd: {message}"):
        torch.ops.s2hk.decoupled_kd(*spoil(soft.detach(), hard.detach(), 1.0, 1.0))


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
def test_decoupled_kd_rejects_mixed_devices():
    soft, hard = kd_inputs((3, 4), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="s2hk::decoupled_kd: hard is on cpu but soft is on cuda:0"):
        torch.ops.s2hk.decoupled_kd(soft.detach(), hard.detach().cpu(), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="s2hk::decoupled_kd: hard is on cuda:0 but soft is on cpu"):
        torch.ops.s2hk.decoupled_kd(soft.detach().cpu(), hard.detach(), 1.0, 1.0)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoupled_kd_accepts_non_contiguous_logits(device, dtype):
    soft, hard = (t.detach() for t in kd_inputs((9, 6), dtype, device))
    want = torch.ops.s2hk.decoupled_kd(soft, hard, 0.7, 1.3)
    got = torch.ops.s2hk.decoupled_kd(soft.t().contiguous().t(), hard[:, None].expand(9, 2, 6)[:, 1], 0.7, 1.3)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoupled_kd_opcheck(device, dtype):
    soft, hard = kd_inputs((7, 13), dtype, device)
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
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_importance_16_bit_weights(poisoned_outputs, device, dtype):
    weights, groups = importance_inputs(dtype=dtype, device=device)
    weights, groups = weights[:-1], groups[:-1]
    with dispatch.use_impl("cpp"):
        got = ops.group_importance(weights, groups)
    check_importance(got, ops.group_importance_reference(weights, groups))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_group_importance_ties_and_nan_follow_ranks_from_importance(poisoned_outputs, device):
    """Equal scores keep index order, NaN sorts first: exactly s2hk.masks.ranks_from_importance."""
    w = torch.randn(9, 4)
    w[2] = w[5] = w[7]  # three equal filters
    w[0] = w[3] = 0.0  # two dead filters
    v = torch.randn(4, 4)
    v[1, 2] = float("nan")
    v[3] = v[0]
    w, v = w.to(device), v.to(device)
    with dispatch.use_impl("cpp"):
        got = ops.group_importance([w, v], [0, 1])
    check_importance(got, ops.group_importance_reference([w, v], [0, 1]))
    order, ranks = ranks_from_importance(got.importance[:9])
    assert torch.equal(got.order[:9], order) and torch.equal(got.ranks[:9], ranks)
    assert got.order[9].item() == 1  # the NaN channel first
    later = got.order[10:].tolist()
    assert later.index(0) < later.index(3)  # equal scores: lower index first


# name: (weights and groups on a device, the error after "s2hk::group_importance: ")
IMPORTANCE_BAD_INPUTS = {
    "fewer_groups": (lambda d: ([torch.randn(3, 2).to(d)], [0, 0]),
                     "groups must hold one index per weight, got 2 for 1 weights"),
    "negative_group": (lambda d: ([torch.randn(3, 2).to(d)], [-1]),
                       r"groups\[0\] = -1 is not a group index in 0..0"),
    "group_past_the_layers": (lambda d: ([torch.randn(3, 2).to(d)] * 2, [0, 5]),
                              r"groups\[1\] = 5 is not a group index in 0..1"),
    "huge_group": (lambda d: ([torch.randn(3, 2).to(d)], [2**62]), r"groups\[0\] = 4611686018427387904 is not"),
    "group_without_layer": (lambda d: ([torch.randn(3, 2).to(d)] * 2, [1, 1]),
                            r"groups has no layer of group 0 \(the indices must cover 0..G-1\)"),
    "scalar_weight": (lambda d: ([torch.randn(3, 2).to(d), torch.tensor(1.0).to(d)], [0, 1]),
                      r"weights\[1\] must be \(C_out, ...\) with C_out >= 1, got shape \[\]"),
    "no_output_channels": (lambda d: ([torch.randn(0, 2).to(d)], [0]),
                           r"weights\[0\] must be \(C_out, ...\) with C_out >= 1, got shape \[0, 2\]"),
    "int64_weight": (lambda d: ([torch.ones(3, 2, dtype=torch.int64).to(d)], [0]),
                     r"weights\[0\] must be float32, float64, float16 or bfloat16, got int64"),
    "channel_counts_differ": (lambda d: ([torch.randn(3, 2).to(d), torch.randn(4, 2).to(d)], [0, 0]),
                              r"weights\[1\] has 4 output channels but the other layers of group 0 have 3"),
}


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", IMPORTANCE_BAD_INPUTS)
def test_group_importance_rejects_bad_inputs(device, case):
    make, message = IMPORTANCE_BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=f"s2hk::group_importance: {message}"):
        torch.ops.s2hk.group_importance(*make(device))


@needs_extension
def test_group_importance_wrapper_rejects_bad_groups_before_the_op():
    weights, _ = importance_inputs()
    with pytest.raises(ValueError, match="cover"):
        ops.group_importance(weights[:3], [0, 0, 2])
    with pytest.raises(ValueError, match="at least one weight"):
        ops.group_importance([], [])
    with pytest.raises(NotImplementedError, match="no tensor arguments"):  # the dispatcher has no device to pick
        torch.ops.s2hk.group_importance([], [])


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
def test_group_importance_rejects_mixed_devices():
    on_cpu = torch.randn(3, 2)
    on_cuda = on_cpu.to("cuda")
    with pytest.raises(RuntimeError, match=r"s2hk::group_importance: weights\[1\] is on cpu but weights\[0\] is on "
                                           "cuda:0"):
        torch.ops.s2hk.group_importance([on_cuda, on_cpu], [0, 0])
    with pytest.raises(RuntimeError, match=r"s2hk::group_importance: weights\[1\] is on cuda:0 but weights\[0\] is "
                                           "on cpu"):
        torch.ops.s2hk.group_importance([on_cpu, on_cuda], [0, 0])


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_group_importance_opcheck(device):
    weights, groups = importance_inputs(device=device)
    weights = [w.detach().requires_grad_(True) for w in weights]
    torch.library.opcheck(torch.ops.s2hk.group_importance.default, (weights, groups))
    out = torch.ops.s2hk.group_importance(weights, groups)
    assert not any(t.requires_grad for t in out)
