"""bn_gate_act: output, running statistics and every gradient against the float64 PyTorch reference."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_common import (DEVICE, assert_matches, compare_all, gradients,  # noqa: E402
                                 poisoned_allocations, rounded_leaves)

from s2hk.kernels import bn_gate_act as bga  # noqa: E402


def run_case(shape, activation, gate=True, residual=True, affine=True, training=True, running=True,
             channels_last=False, dtype=torch.float32, offset=0.0, needs=("x", "weight", "bias", "gate", "residual")):
    c = shape[1]
    x = torch.randn(*shape) * 2 + offset
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.rand(c) if gate else None
    if g is not None:
        g[0] = 0.0
    values = dict(x=x, weight=torch.rand(c) + 0.5 if affine else None, bias=torch.randn(c) if affine else None,
                  gate=g, residual=torch.randn(*shape) if residual else None)
    ref_in, low_in = rounded_leaves(values, dtype, requires_grad=needs)
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
    return got_grads


CASES = [
    # shape, activation, gate, residual, affine, training, running, channels_last, offset
    pytest.param((6, 42, 11, 13), "relu", True, True, True, True, True, False, 0.0, id="6x42x11x13-relu"),
    pytest.param((6, 42, 11, 13), "hardswish", True, True, True, True, True, True, 100.0,
                 id="hardswish-channels-last-large-mean"),
    pytest.param((5, 19, 7, 9), "identity", False, True, True, True, True, False, 0.0, id="hard-path-identity"),
    pytest.param((5, 7, 3, 3), "relu", True, False, False, False, True, False, 0.0, id="eval-no-affine"),
    pytest.param((3, 10, 6, 5), "hardswish", True, True, True, False, True, True, 0.0, id="eval-channels-last"),
    pytest.param((4, 30), "relu", True, False, True, True, True, False, 0.0, id="2d-input"),
    pytest.param((7, 13, 37), "hardswish", True, True, True, True, False, False, 0.0, id="3d-no-running-stats"),
    pytest.param((2, 3, 1, 1), "relu", True, True, True, True, True, False, 0.0, id="1x1-spatial"),
]


@pytest.mark.parametrize("shape,activation,gate,residual,affine,training,running,channels_last,offset", CASES)
def test_bn_gate_act_fp32(shape, activation, gate, residual, affine, training, running, channels_last, offset):
    run_case(shape, activation, gate, residual, affine, training, running, channels_last, offset=offset)


@pytest.mark.parametrize("activation", ["relu", "hardswish"])
def test_bn_gate_act_bf16(activation):
    run_case((4, 20, 9, 7), activation, dtype=torch.bfloat16)


def test_parameter_gradients_only():
    """x and residual need no gradient (dx pass skipped), the per-channel gradients still match."""
    run_case((3, 12, 5, 6), "relu", needs=("weight", "bias", "gate"))


def test_single_value_per_channel_is_rejected_in_training():
    x = torch.randn(1, 4, 1, 1, device=DEVICE)
    with pytest.raises(ValueError):
        bga.bn_gate_act(x, None, None, None, None)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError):
        bga.bn_gate_act(torch.randn(2, 3, 4, 4, device=DEVICE), None, None, None, None, activation="gelu")
