"""dual_linear: both outputs and every gradient against the float64 PyTorch reference."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_common import (DEVICE, compare_all, gradients, kept_len, make_kept,  # noqa: E402
                                 poisoned_allocations, rounded_leaves)

from s2hk.kernels import dual_linear as dl  # noqa: E402


# fp32 cases compare against float64 at fp32 tolerances: on a GPU tl.dot must not use TF32
pytestmark = pytest.mark.usefixtures("full_float32")


def run_case(M: int, M_h: int, N: int, K: int, kin_spec: str, kout_spec: str, bias: bool, gate: bool,
             dtype: torch.dtype, weight_grad: bool = True, use: str = "both", lead: tuple = ()):
    kin, kout = make_kept(kin_spec, K), make_kept(kout_spec, N)
    K_h, N_h = kept_len(kin, K), kept_len(kout, N)
    g = torch.rand(N) if gate else None
    if g is not None:
        g[0] = 0.0  # a closed gate still has a gradient: dgate needs z, not y / w
    values = dict(x_soft=torch.randn(*lead, M, K), x_hard=torch.randn(*lead, M_h, K_h),
                  weight=torch.randn(N, K) / K ** 0.5, bias=torch.randn(N) if bias else None, gate=g)
    ref_in, low_in = rounded_leaves(values, dtype, requires_grad=list(values))
    ref_out = dl.dual_linear_reference(**ref_in, kept_in=kin, kept_out=kout, weight_grad=weight_grad)
    upstream = [torch.randn_like(ref_out[0]) if use in ("both", "soft") else None,
                torch.randn_like(ref_out[1]) if use in ("both", "hard") else None]
    ref_grads = gradients(ref_out, upstream, ref_in)
    with poisoned_allocations():
        got_out = dl.dual_linear(**low_in, kept_in=kin, kept_out=kout, weight_grad=weight_grad)
        got_grads = gradients(got_out, upstream, low_in)
    assert got_out[0].shape == (*lead, M, N) and got_out[1].shape == (*lead, M_h, N_h)
    compare_all(list(got_out), list(ref_out), got_grads, ref_grads, dtype, ["y_soft", "y_hard"])
    return got_grads


CASES = [
    # M, M_h, N, K, kept_in, kept_out, bias, gate
    pytest.param(6, 6, 123, 42, "prefix:20", "prefix:77", True, True, id="6x42x123-prefix-int"),
    pytest.param(42, 42, 70, 123, "perm:61", "perm32:33", True, True, id="42x123x70-index-sets"),
    pytest.param(42, 17, 123, 6, "prefix_tensor:5", "perm:100", True, True, id="prefix-as-tensor"),
    pytest.param(33, 33, 90, 130, "all", "empty", True, True, id="empty-kept-out"),
    pytest.param(33, 20, 90, 130, "empty", "perm:40", True, True, id="empty-kept-in"),
    pytest.param(70, 70, 129, 65, "full_perm", "full_perm", True, True, id="full-sets-shuffled"),
    pytest.param(70, 70, 129, 65, "all", "all", False, False, id="full-sets-no-bias-no-gate"),
    pytest.param(130, 130, 200, 150, "perm32:97", "prefix:130", False, True, id="multi-tile"),
    pytest.param(5, 0, 64, 64, "prefix:32", "prefix:32", True, True, id="empty-hard-batch"),
]


@pytest.mark.parametrize("M,M_h,N,K,kin,kout,bias,gate", CASES)
def test_dual_linear_fp32(M, M_h, N, K, kin, kout, bias, gate):
    run_case(M, M_h, N, K, kin, kout, bias, gate, torch.float32)


@pytest.mark.parametrize("M,M_h,N,K,kin,kout", [(6, 6, 123, 42, "prefix:20", "perm:77"),
                                                (42, 30, 70, 123, "perm32:61", "prefix:33")])
def test_dual_linear_bf16(M, M_h, N, K, kin, kout):
    run_case(M, M_h, N, K, kin, kout, True, True, torch.bfloat16)


def test_mask_only_backward_skips_weight_gradient(monkeypatch):
    def no_weight_grad(*args, **kwargs):
        raise AssertionError("the mask-only backward must not compute a weight gradient")

    monkeypatch.setattr(dl, "_launch_weight_grad", no_weight_grad)
    grads = run_case(42, 42, 70, 123, "perm:61", "prefix:33", True, True, torch.float32, weight_grad=False)
    assert not grads["weight"].any() and not grads["bias"].any() and grads["gate"].abs().sum() > 0


@pytest.mark.parametrize("use", ["soft", "hard"])
def test_one_output_unused(use):
    grads = run_case(20, 20, 50, 40, "perm:30", "perm:25", True, True, torch.float32, use=use)
    if use == "hard":
        assert not grads["gate"].any()


def test_leading_dimensions_flatten():
    run_case(7, 7, 33, 21, "prefix:10", "perm:12", True, True, torch.float32, lead=(2,))


def test_gate_gradient_without_soft_input_gradient():
    """x_soft needs no gradient (a first layer): the gate gradient comes from z without the dx launch."""
    x = torch.randn(30, 40, device=DEVICE)
    xh = torch.randn(30, 10, device=DEVICE)
    w = torch.randn(50, 40, device=DEVICE, requires_grad=True)
    g = torch.rand(50, device=DEVICE, requires_grad=True)
    ys, yh = dl.dual_linear(x, xh, w, None, g, 10, 20)
    dys = torch.randn_like(ys)
    got = torch.autograd.grad((ys * dys).sum() + yh.sum(), [w, g])
    ys_r, yh_r = dl.dual_linear_reference(x.double(), xh.double(), w.double(), None, g.double(), 10, 20)
    ref = torch.autograd.grad((ys_r * dys.double()).sum() + yh_r.sum(), [w, g])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_forward_returns_preactivation():
    x, w, b, g = (torch.randn(9, 31, device=DEVICE), torch.randn(45, 31, device=DEVICE),
                  torch.randn(45, device=DEVICE), torch.rand(45, device=DEVICE))
    with poisoned_allocations():
        ys, yh, z = dl.dual_linear_forward(x, x[:, :7], w, b, g, 7, 11, store_preact=True)
    z_ref = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(z.double(), z_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ys.double(), z_ref * g.double(), atol=1e-4, rtol=1e-4)
    assert yh.shape == (9, 11)


def test_shape_mismatch_is_rejected():
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ValueError):
        dl.dual_linear(x, torch.randn(4, 5, device=DEVICE), w, kept_in=4, kept_out=3)
    with pytest.raises(TypeError):
        dl.dual_linear(x, x[:, :4].double(), w, kept_in=4, kept_out=3)
