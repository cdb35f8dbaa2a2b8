"""dual_conv: both outputs and every gradient against the float64 PyTorch reference."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_common import (DEVICE, compare_all, gradients, make_kept,  # noqa: E402
                                 poisoned_allocations, rounded_leaves)

from s2hk.kernels import dual_conv as dc  # noqa: E402


# fp32 cases compare against float64 at fp32 tolerances: on a GPU the backward's cuDNN convolutions and the
# forward's tl.dot must not use TF32 (cuDNN's default)
pytestmark = pytest.mark.usefixtures("full_float32")


def run_case(n, c_in, h, w, c_out, kernel, kept_spec, stride=1, padding=0, dilation=1, bias=True, gate=True,
             dtype=torch.float32, weight_grad=True, use="both", channels_last=False):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    kept = make_kept(kept_spec, c_out)
    g = torch.rand(c_out) if gate else None
    if g is not None:
        g[-1] = 0.0
    x = torch.randn(n, c_in, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    values = dict(x=x, weight=torch.randn(c_out, c_in, kh, kw) / (c_in * kh * kw) ** 0.5,
                  bias=torch.randn(c_out) if bias else None, gate=g)
    ref_in, low_in = rounded_leaves(values, dtype, requires_grad=list(values))
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    ref_out = dc.dual_conv_reference(**ref_in, kept_out=kept, **conv, weight_grad=weight_grad)
    upstream = [torch.randn_like(ref_out[0]) if use in ("both", "soft") else None,
                torch.randn_like(ref_out[1]) if use in ("both", "hard") else None]
    ref_grads = gradients(ref_out, upstream, ref_in)
    with poisoned_allocations():
        got_out = dc.dual_conv(**low_in, kept_out=kept, **conv, weight_grad=weight_grad)
        got_grads = gradients(got_out, upstream, low_in)
    compare_all(list(got_out), list(ref_out), got_grads, ref_grads, dtype, ["y_soft", "y_hard"])
    return got_grads


CASES = [
    # n, c_in, h, w, c_out, kernel, kept, stride, padding, dilation, bias, gate
    pytest.param(2, 3, 17, 15, 20, 3, "prefix:12", 2, 1, 1, True, True, id="stem-3x3-s2-prefix-int"),
    pytest.param(2, 5, 11, 13, 70, 3, "perm:33", 1, 2, 2, True, True, id="dilated-index-set"),
    pytest.param(3, 4, 9, 9, 16, 1, "empty", 1, 0, 1, True, True, id="1x1-empty-kept"),
    pytest.param(1, 3, 20, 20, 24, 7, "all", 2, 3, 1, False, False, id="7x7-s2-full-no-bias-no-gate"),
    pytest.param(2, 6, 8, 8, 20, 3, "full_perm", 1, 1, 1, True, True, id="full-set-shuffled"),
    pytest.param(2, 5, 12, 7, 66, (3, 1), "perm32:40", (2, 1), (1, 0), 1, True, True, id="3x1-rect-int32"),
    pytest.param(1, 7, 6, 6, 130, 3, "prefix_tensor:65", 1, 1, 1, True, True, id="multi-tile-channels"),
]


@pytest.mark.parametrize("n,c_in,h,w,c_out,kernel,kept,stride,padding,dilation,bias,gate", CASES)
def test_dual_conv_fp32(n, c_in, h, w, c_out, kernel, kept, stride, padding, dilation, bias, gate):
    run_case(n, c_in, h, w, c_out, kernel, kept, stride, padding, dilation, bias, gate)


def test_dual_conv_bf16():
    run_case(2, 3, 13, 11, 24, 3, "perm:10", stride=2, padding=1, dtype=torch.bfloat16)


def test_channels_last_input():
    run_case(2, 8, 9, 10, 20, 3, "perm:9", padding=1, channels_last=True)


def test_mask_only_backward_skips_weight_gradient(monkeypatch):
    def no_weight_grad(*args, **kwargs):
        raise AssertionError("the mask-only backward must not compute a weight gradient")

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", no_weight_grad)
    grads = run_case(2, 6, 8, 8, 20, 3, "perm:7", padding=1, weight_grad=False)
    assert not grads["weight"].any() and not grads["bias"].any() and grads["gate"].abs().sum() > 0


@pytest.mark.parametrize("use", ["soft", "hard"])
def test_one_output_unused(use):
    grads = run_case(2, 4, 7, 9, 18, 3, "perm:6", padding=1, use=use)
    if use == "hard":
        assert not grads["gate"].any()


def test_outputs_are_channels_last_views():
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    y_soft, y_hard = dc.dual_conv(x, torch.randn(10, 3, 3, 3, device=DEVICE), kept_out=4, padding=1)
    assert y_soft.shape == (2, 10, 8, 8) and y_hard.shape == (2, 4, 8, 8)
    assert y_soft.is_contiguous(memory_format=torch.channels_last)


def test_groups_mismatch_is_rejected():
    with pytest.raises(ValueError):
        dc.dual_conv(torch.randn(1, 4, 5, 5, device=DEVICE), torch.randn(6, 2, 3, 3, device=DEVICE))
