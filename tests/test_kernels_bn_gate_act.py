"""bn_gate_act: output, running statistics and every gradient against the float64 PyTorch reference; the
custom ops under torch.library.opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_common import (DEVICE, assert_matches, compare_all, gradients,  # noqa: E402
                                 poisoned_allocations, rounded_leaves)

from s2hk.kernels import bn_gate_act as bga  # noqa: E402

ALL_GRADS = ("x", "weight", "bias", "gate", "residual")


def inputs(shape, gate=True, residual=True, affine=True, channels_last=False, offset=0.0):
    """Fresh random inputs: x (mean ``offset``), affine parameters, a gate with a closed channel, a residual."""
    c = shape[1]
    x = torch.randn(*shape) * 2 + offset
    g = torch.rand(c) if gate else None
    if g is not None:
        g[0] = 0.0
    values = dict(x=x, weight=torch.rand(c) + 0.5 if affine else None, bias=torch.randn(c) if affine else None,
                  gate=g, residual=torch.randn(*shape) if residual else None)
    if channels_last:
        values = {k: v.contiguous(memory_format=torch.channels_last) if v is not None and v.dim() == 4 else v
                  for k, v in values.items()}
    return values


def run_case(shape, activation, gate=True, residual=True, affine=True, training=True, running=True,
             channels_last=False, dtype=torch.float32, offset=0.0, needs=ALL_GRADS):
    c = shape[1]
    ref_in, low_in = rounded_leaves(inputs(shape, gate, residual, affine, channels_last, offset), dtype,
                                    requires_grad=needs)
    if channels_last:  # rounded_leaves keeps strides: the kernel sees channels_last tensors
        assert low_in["x"].is_contiguous(memory_format=torch.channels_last)
    stats = (torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5) if running else (None, None)
    ref_stats = [s.double().clone() if s is not None else None for s in stats]
    got_stats = [s.clone() if s is not None else None for s in stats]
    args = dict(activation=activation, momentum=0.1, eps=1e-5, training=training)

    ref_out = bga.bn_gate_act_reference(**{k: ref_in[k] for k in ("x", "weight", "bias")}, running_mean=ref_stats[0],
                                        running_var=ref_stats[1], gate=ref_in["gate"],
                                        residual=ref_in["residual"], **args)
    upstream = [torch.randn_like(ref_out)]
    ref_grads = gradients([ref_out], upstream, ref_in)
    with poisoned_allocations():
        got_out = bga.bn_gate_act(**{k: low_in[k] for k in ("x", "weight", "bias")}, running_mean=got_stats[0],
                                  running_var=got_stats[1], gate=low_in["gate"], residual=low_in["residual"], **args)
        got_grads = gradients([got_out], upstream, low_in)
    compare_all([got_out], [ref_out], got_grads, ref_grads, dtype, ["y"])
    if channels_last:
        assert got_out.is_contiguous(memory_format=torch.channels_last)
    for got, ref, name in zip(got_stats, ref_stats, ("running_mean", "running_var")):
        if ref is not None:
            assert_matches(got, ref, torch.float32, name)


# ----------------------------------------------------------------------------------------------------------
# The GPU layout (channels_last, an (N*H*W, C) row-major matrix): both paths, with and without residual, in
# every dtype. N*H*W = 6*5*7 = 210 rows: not a multiple of any tile; C = 42 (one channel block, partly masked)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("path", ["soft", "hard"])
def test_channels_last(dtype, activation, residual, path):
    run_case((6, 42, 5, 7), activation, gate=path == "soft", residual=residual, channels_last=True, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_several_channel_blocks(dtype):
    """C = 123: two channel blocks, the second partly masked."""
    run_case((6, 123, 5, 7), "relu", channels_last=True, dtype=dtype)


CASES = [
    # shape, activation, gate, residual, affine, training, running, channels_last, offset
    pytest.param((6, 42, 5, 7), "relu", True, True, True, True, True, False, 0.0, id="nchw-soft-residual"),
    pytest.param((6, 42, 5, 7), "identity", False, False, True, True, True, False, 0.0, id="nchw-hard"),
    pytest.param((6, 42, 5, 7), "hardswish", True, True, True, True, True, True, 100.0,
                 id="hardswish-channels-last-large-mean"),
    pytest.param((6, 42, 5, 7), "relu", True, False, True, True, True, False, 100.0, id="nchw-large-mean"),
    pytest.param((5, 7, 3, 3), "relu", True, False, False, False, True, False, 0.0, id="eval-no-affine"),
    pytest.param((3, 10, 6, 5), "hardswish", True, True, True, False, True, True, 0.0, id="eval-channels-last"),
    pytest.param((3, 10, 6, 5), "identity", False, True, True, False, True, True, 0.0, id="eval-identity-residual"),
    pytest.param((37, 42), "relu", True, False, True, True, True, False, 0.0, id="2d-input"),
    pytest.param((7, 13, 37), "hardswish", True, True, True, True, False, False, 0.0, id="3d-no-running-stats"),
    pytest.param((2, 3, 1, 1), "relu", True, True, True, True, True, False, 0.0, id="1x1-spatial"),
]


@pytest.mark.parametrize("shape,activation,gate,residual,affine,training,running,channels_last,offset", CASES)
def test_layouts_modes_and_options(shape, activation, gate, residual, affine, training, running, channels_last,
                                   offset):
    run_case(shape, activation, gate, residual, affine, training, running, channels_last, offset=offset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nchw_16_bit(dtype):
    run_case((4, 20, 9, 7), "relu", dtype=dtype)


def test_parameter_gradients_only():
    """x and the residual need no gradient (dx pass skipped), the per-channel gradients still match."""
    run_case((3, 12, 5, 6), "relu", needs=("weight", "bias", "gate"))


def test_residual_gradient_without_input_gradient():
    run_case((3, 12, 5, 6), "relu", channels_last=True, needs=("residual", "gate"))


def test_other_layouts_are_read_through_a_copy():
    """A permuted x (neither NCHW nor channels_last) gives the same values as its NCHW copy."""
    x = torch.randn(4, 6, 5, 3, device=DEVICE).permute(0, 1, 3, 2)
    assert not x.is_contiguous() and not x.movedim(1, -1).is_contiguous()
    w, b = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    got = bga.bn_gate_act(x, w, b, None, None, activation="relu")
    want = bga.bn_gate_act(x.contiguous(), w, b, None, None, activation="relu")
    torch.testing.assert_close(got, want)


def test_running_statistics_of_a_prefix_view_are_updated_in_place():
    """The hard path passes the first k entries of its statistics buffers (a view): only those change."""
    buffers = [torch.zeros(10, device=DEVICE), torch.ones(10, device=DEVICE)]
    before = [b.clone() for b in buffers]
    x = torch.randn(4, 6, 3, 3, device=DEVICE) * 3 + 1
    bga.bn_gate_act(x, None, None, buffers[0].narrow(0, 0, 6), buffers[1].narrow(0, 0, 6), activation="identity")
    ref = [b.clone() for b in before]
    torch.nn.functional.batch_norm(x, ref[0][:6], ref[1][:6], training=True)
    for got, want, old in zip(buffers, ref, before):
        torch.testing.assert_close(got, want)
        assert torch.equal(got[6:], old[6:]) and not torch.equal(got[:6], old[:6])


def test_single_value_per_channel_is_rejected_in_training():
    x = torch.randn(1, 4, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bga.bn_gate_act(x, None, None, None, None)


def test_bad_arguments_are_rejected():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="activation"):
        bga.bn_gate_act(x, None, None, None, None, activation="gelu")
    with pytest.raises(ValueError, match="gate must have shape"):
        bga.bn_gate_act(x, None, None, None, None, gate=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="eval mode needs"):
        bga.bn_gate_act(x, None, None, None, None, training=False)
    with pytest.raises(ValueError, match="momentum=None"):
        bga.bn_gate_act(x, None, None, None, None, momentum=None)


# ----------------------------------------------------------------------------------------------------------
# Custom ops: torch.library.opcheck (schema, fake kernels, autograd registration, AOT dispatch) and
# torch.compile. Tiny shapes: opcheck runs each op several times.
# ----------------------------------------------------------------------------------------------------------
def _op_inputs(channels_last: bool, gate: bool, residual: bool):
    v = inputs((3, 5, 2, 3), gate=gate, residual=residual, channels_last=channels_last)
    rm, rv = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.5
    grads = {k: t.to(DEVICE).requires_grad_() if t is not None else None for k, t in v.items()}
    return grads, rm, rv


@pytest.mark.parametrize("channels_last,gate,residual,activation,training", [
    (True, True, True, "relu", True),
    (False, False, False, "identity", True),
    (True, True, False, "hardswish", False),
    (False, True, True, "identity", True),
])
def test_opcheck(channels_last, gate, residual, activation, training):
    t, rm, rv = _op_inputs(channels_last, gate, residual)
    fwd_args = (t["x"], t["weight"], t["bias"], rm, rv, t["gate"], t["residual"], activation, 1e-5, training)
    torch.library.opcheck(torch.ops.s2hk.bn_gate_act_forward.default, fwd_args)
    y, stats = torch.ops.s2hk.bn_gate_act_forward(*fwd_args)
    if training:
        torch.library.opcheck(torch.ops.s2hk.bn_update_running_stats.default, (rm, rv, stats.detach(), 0.1, 18))
    dy = torch.randn_like(y)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args[:7]]
    bwd_args = (dy, detached[0], *detached[1:3], detached[5], detached[6], stats.detach(), activation, training, True)
    torch.library.opcheck(torch.ops.s2hk.bn_gate_act_backward.default, bwd_args)


def test_torch_compile_matches_eager():
    """One graph (fullgraph): forward, backward and the running-statistics update as in eager mode."""
    def step(x, weight, bias, gate, residual, rm, rv):
        return bga.bn_gate_act(x, weight, bias, rm, rv, gate=gate, residual=residual, activation="relu")

    t, rm, rv = _op_inputs(True, True, True)
    eager_stats, compiled_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    args = [t[k] for k in ("x", "weight", "bias", "gate", "residual")]
    y = step(*args, *eager_stats)
    want = torch.autograd.grad(y.square().sum(), args)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y_c = compiled(*args, *compiled_stats)
    got = torch.autograd.grad(y_c.square().sum(), args)
    torch.testing.assert_close(y_c, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for g, w in zip(compiled_stats, eager_stats):
        torch.testing.assert_close(g, w)
    assert not torch.equal(compiled_stats[0], rm)
