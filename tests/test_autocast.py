"""bf16 autocast, as GPU users train: every implementation, fused paths on and off, and each Triton kernel.

On a machine without a GPU this runs under CPU autocast (and Triton's CPU interpreter), so that a dtype
mistake in a path a GPU user takes under ``torch.autocast("cuda", dtype=torch.bfloat16)`` fails in CI; with a
GPU it runs the same checks under CUDA autocast on the compiled kernels.

What autocast gives, and so what is checked: convolutions and linear layers compute in bf16 from bf16 copies
of their fp32 inputs and weights and return bf16; BatchNorm is not cast (statistics and affine parameters stay
fp32, the output keeps the input's dtype); every parameter's gradient is fp32, its own dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import ResidualNet, randomise_norms
from s2hk import S2HPruner, dispatch, kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = torch.bfloat16

pytestmark = pytest.mark.usefixtures("full_float32", "clean_env")


def autocast():
    return torch.autocast(DEVICE.type, dtype=BF16)


def need_triton() -> None:
    """Skip unless the kernels run on DEVICE. (The kernel tests' helpers are imported inside the tests that
    need them: test_kernels_common skips the importing module where triton is missing.)"""
    pytest.importorskip("triton")
    reason = kernels.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(f"Triton kernels cannot run on {DEVICE.type} tensors here: {reason}")


def norm_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------------------
# S2HPruner.train_step under autocast
# ----------------------------------------------------------------------------------------------------------
#: S2HK_IMPL values: every op on one implementation, and the dual-path kernels alone on Triton (BatchNorm on
#: the composition, so Triton and PyTorch layers meet mid-network).
IMPLS = ["reference", "cpp", "triton", "cpp,dual_conv=triton,dual_linear=triton"]

#: bf16 against float32, one step of the same network. bf16 keeps 8 significant bits (relative rounding
#: 2**-9 per value). Norm-relative errors, so that near-zero entries do not decide; each bound is about twice
#: to three times the largest error measured over every case here:
#: the logits (four layers deep) stay within 0.6%,
OUTPUT_RTOL = 0.02
#: the weight gradients within 6%: BatchNorm's bias and weight gradients are sums over the batch that
#: largely cancel, so their bf16 rounding shows most,
GRAD_RTOL = 0.1
#: the running statistics (batch means and variances summed in fp32 from bf16 activations) within 0.05%,
STATS_RTOL = 2e-3
#: and the task loss (cross-entropy of the soft logits, about 1.6 here) within 0.001.
LOSS_ATOL = 5e-3


def _skip_unavailable(impl: str) -> None:
    if "triton" in impl:
        need_triton()
    if impl.startswith("cpp"):
        extension = dispatch.extension(warn=False)
        if extension is None:
            pytest.skip("the C++ extension s2hk._C is not built")
        if DEVICE.type == "cuda" and not getattr(extension, "WITH_CUDA", False):
            pytest.skip("s2hk._C was built without its CUDA kernels")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of each Triton kernel's entry point (all zero where triton is not installed)."""
    counts = dict.fromkeys(kernels.OPS, 0)
    if not kernels.triton_available():
        return counts
    for name in kernels.OPS:
        module = getattr(kernels, name)  # imports triton

        def spy(*args, _original=getattr(module, name), _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return counts


def _step(impl: str, fused: bool, cast: bool, monkeypatch) -> dict:
    """One S2HPruner step on a fresh copy of the same network and batch, a scattered and a prefix hard set;
    the step's soft and hard logits, metrics, gradients and BatchNorm statistics (soft and hard path)."""
    torch.manual_seed(0)
    model = randomise_norms(ResidualNet(width=8, inner=6, num_classes=5)).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, 6, generator=gen).to(DEVICE)
    y = torch.randint(0, 5, (4,), generator=gen).to(DEVICE)
    pruner = S2HPruner(model, x[:1], target_flops=0.5, granularity=1, fused_paths=fused)
    pruner.set_hard_widths({"stem": [0, 2, 3, 5, 7], "conv1": 4})
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)

    logits = []
    for name in ("run", "run_dual"):
        def spy(*args, _original=getattr(pruner, name), **kwargs):
            out = _original(*args, **kwargs)
            logits.extend(out if isinstance(out, tuple) else (out,))
            return out

        monkeypatch.setattr(pruner, name, spy)
    monkeypatch.setenv("S2HK_IMPL", impl)
    if cast:
        with autocast():
            metrics = pruner.train_step(x, y, opt)
    else:
        metrics = pruner.train_step(x, y, opt)
    monkeypatch.delenv("S2HK_IMPL")
    assert len(logits) == 2  # soft, hard
    grads = {n: p.grad for n, p in pruner.model.named_parameters()}
    buffers = {n: b for n, b in pruner.named_buffers() if b.is_floating_point()}
    return dict(logits=logits, metrics=metrics, grads=grads, buffers=buffers, widths=list(pruner.plan.widths))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_paths"])
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_under_autocast(impl, fused, kernel_calls, monkeypatch):
    _skip_unavailable(impl)
    want = _step(impl, fused, False, monkeypatch)
    for name in kernel_calls:
        kernel_calls[name] = 0
    got = _step(impl, fused, True, monkeypatch)

    # the Triton kernels ran where requested (a quiet fallback would test nothing)
    bn_on_triton = impl == "triton"
    duals_on_triton = "triton" in impl and fused
    assert (kernel_calls["bn_gate_act"] > 0) == bn_on_triton
    assert kernel_calls["dual_conv"] == kernel_calls["dual_linear"] == (1 if duals_on_triton else 0)

    assert got["widths"] == want["widths"] == [5, 4]
    for metric in ("loss", "kd_hard", "kd_soft", "flops_loss"):
        assert math.isfinite(got["metrics"][metric]), metric
    assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], abs=LOSS_ATOL)
    # the logits come from a linear layer: bf16 under autocast, on both paths
    for path, g, w in zip(("soft", "hard"), got["logits"], want["logits"]):
        assert w.dtype == torch.float32 and g.dtype == BF16, (path, g.dtype)
        assert norm_error(g, w) < OUTPUT_RTOL, path
    assert got["grads"].keys() == want["grads"].keys()
    for name, g in got["grads"].items():
        assert g is not None and g.dtype == torch.float32, (name, None if g is None else g.dtype)
        assert torch.isfinite(g).all(), name
        assert norm_error(g, want["grads"][name]) < GRAD_RTOL, name
    for name, b in got["buffers"].items():  # BatchNorm statistics stay fp32, as nn.BatchNorm keeps them
        assert b.dtype == torch.float32, name
        assert norm_error(b, want["buffers"][name]) < STATS_RTOL, name


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_evaluation_under_autocast(impl, kernel_calls, monkeypatch):
    """Both paths in eval mode (BatchNorm normalising with running statistics) under autocast."""
    _skip_unavailable(impl)
    torch.manual_seed(0)
    model = randomise_norms(ResidualNet(width=8, inner=6, num_classes=5)).to(DEVICE)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pruner = S2HPruner(model, x[:1], target_flops=0.5, granularity=1)
    pruner.set_hard_widths({"stem": [0, 2, 3, 5, 7], "conv1": 4})
    pruner.eval()
    keep, _ = pruner.gates()
    pruner.prepare_soft(keep)
    pruner.prepare_hard()
    monkeypatch.setenv("S2HK_IMPL", impl)
    with torch.no_grad():
        want = [pruner.run(path, x) for path in ("soft", "hard")]
        with autocast():
            got = [pruner.run(path, x) for path in ("soft", "hard")]
    assert kernel_calls["bn_gate_act"] == (12 if impl == "triton" else 0)  # 3 norms x 2 paths x 2 runs
    for g, w in zip(got, want):
        assert g.dtype == BF16 and w.dtype == torch.float32
        assert norm_error(g, w) < OUTPUT_RTOL


# ----------------------------------------------------------------------------------------------------------
# Each kernel under autocast against the float64 reference
# ----------------------------------------------------------------------------------------------------------
def _leaves(values: dict, computed: dict, requires_grad) -> tuple[dict, dict]:
    """(float64 reference leaves, leaves as the caller passes them). ``values`` maps a name to its tensor in
    the dtype the caller holds it in; ``computed`` to the dtype the kernel computes with (autocast's cast),
    so the reference sees exactly the values the kernel multiplies."""
    ref, given = {}, {}
    for name, t in values.items():
        if t is None:
            ref[name] = given[name] = None
            continue
        t = t.to(DEVICE)
        ref[name] = t.to(computed.get(name, t.dtype)).double().requires_grad_(name in requires_grad)
        given[name] = t.clone().requires_grad_(name in requires_grad)
    return ref, given


def _compare(got_out, ref_out, got_grads, ref_grads, given, out_dtypes, compute_dtype) -> None:
    """Outputs in ``out_dtypes``; every gradient in its leaf's dtype; values within ``compute_dtype``'s
    tolerance of the float64 reference."""
    from test_kernels_common import assert_matches

    for i, (g, r, dtype) in enumerate(zip(got_out, ref_out, out_dtypes)):
        assert g.dtype == dtype, f"output {i}: {g.dtype}, autocast gives {dtype}"
        assert_matches(g, r.detach(), compute_dtype, f"output {i}")
    assert got_grads.keys() == ref_grads.keys()
    for name, g in got_grads.items():
        assert g.dtype == given[name].dtype, f"d{name}: {g.dtype}, the leaf is {given[name].dtype}"
        assert_matches(g, ref_grads[name], compute_dtype, f"d{name}")


#: The dtype of the activations reaching the layer: fp32 (the first layer sees the input batch) or bf16 (a
#: layer after another autocast layer).
INPUT_DTYPES = pytest.mark.parametrize("x_dtype", [torch.float32, BF16], ids=["fp32_input", "bf16_input"])


@INPUT_DTYPES
def test_dual_linear_under_autocast(x_dtype):
    need_triton()
    from test_kernels_common import gradients, poisoned_allocations
    from s2hk.kernels import dual_linear as dl

    gen = torch.Generator().manual_seed(2)
    kept_in = torch.randperm(24, generator=gen)[:10].to(DEVICE)
    values = dict(x_soft=torch.randn(6, 24, generator=gen).to(x_dtype),
                  x_hard=torch.randn(5, 10, generator=gen).to(x_dtype),
                  weight=torch.randn(40, 24, generator=gen) / 24 ** 0.5, bias=torch.randn(40, generator=gen),
                  gate=torch.rand(40, generator=gen))
    # autocast's cast of the GEMM operands; bias and gate are read in fp32 by the kernels
    ref_in, given = _leaves(values, dict(x_soft=BF16, x_hard=BF16, weight=BF16), requires_grad=list(values))
    ref_out = dl.dual_linear_reference(**ref_in, kept_in=kept_in, kept_out=17)
    upstream = [torch.randn(r.shape, generator=gen).to(DEVICE) for r in ref_out]
    ref_grads = gradients(ref_out, upstream, ref_in)
    with autocast(), poisoned_allocations():
        got_out = dl.dual_linear(**given, kept_in=kept_in, kept_out=17)
        got_grads = gradients(got_out, upstream, given)
    _compare(got_out, ref_out, got_grads, ref_grads, given, (BF16, BF16), BF16)


@INPUT_DTYPES
def test_dual_conv_under_autocast(x_dtype):
    need_triton()
    from test_kernels_common import gradients, poisoned_allocations
    from s2hk.kernels import dual_conv as dc

    gen = torch.Generator().manual_seed(3)
    kept_out = torch.randperm(12, generator=gen)[:5].to(DEVICE)
    values = dict(x=torch.randn(2, 3, 9, 7, generator=gen).to(x_dtype),
                  weight=torch.randn(12, 3, 3, 3, generator=gen) / 27 ** 0.5, bias=torch.randn(12, generator=gen),
                  gate=torch.rand(12, generator=gen))
    ref_in, given = _leaves(values, dict(x=BF16, weight=BF16), requires_grad=list(values))
    conv = dict(kept_out=kept_out, stride=2, padding=1)
    ref_out = dc.dual_conv_reference(**ref_in, **conv)
    upstream = [torch.randn(r.shape, generator=gen).to(DEVICE) for r in ref_out]
    ref_grads = gradients(ref_out, upstream, ref_in)
    with autocast(), poisoned_allocations():
        got_out = dc.dual_conv(**given, **conv)
        got_grads = gradients(got_out, upstream, given)
    _compare(got_out, ref_out, got_grads, ref_grads, given, (BF16, BF16), BF16)


@INPUT_DTYPES
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_gate_act_under_autocast(x_dtype, training):
    """Nothing is cast, as for nn.BatchNorm: fp32 statistics and parameters, the output in the input's dtype
    (the dtype F.batch_norm gives under the same autocast)."""
    need_triton()
    from test_kernels_common import assert_matches, gradients, poisoned_allocations
    from s2hk.kernels import bn_gate_act as bga

    gen = torch.Generator().manual_seed(4)
    shape, c = (3, 6, 5, 4), 6
    values = dict(x=(torch.randn(*shape, generator=gen) * 2 + 1).to(x_dtype),
                  weight=torch.rand(c, generator=gen) + 0.5, bias=torch.randn(c, generator=gen),
                  gate=torch.rand(c, generator=gen), residual=torch.randn(*shape, generator=gen).to(x_dtype))
    ref_in, given = _leaves(values, {}, requires_grad=list(values))
    stats = [torch.randn(c, generator=gen).to(DEVICE), (torch.rand(c, generator=gen) + 0.5).to(DEVICE)]
    ref_stats, got_stats = [s.double() for s in stats], [s.clone() for s in stats]
    args = dict(activation="relu", momentum=0.1, eps=1e-5, training=training)
    ref_out = bga.bn_gate_act_reference(**ref_in, running_mean=ref_stats[0], running_var=ref_stats[1], **args)
    upstream = [torch.randn(shape, generator=gen).to(DEVICE)]
    ref_grads = gradients([ref_out], upstream, ref_in)
    with autocast():
        torch_dtype = F.batch_norm(given["x"], stats[0].clone(), stats[1].clone(), given["weight"], given["bias"],
                                   training).dtype
        with poisoned_allocations():
            got_out = bga.bn_gate_act(**given, running_mean=got_stats[0], running_var=got_stats[1], **args)
            got_grads = gradients([got_out], upstream, given)
    assert torch_dtype == x_dtype
    _compare([got_out], [ref_out], got_grads, ref_grads, given, (x_dtype,), x_dtype)
    for got, ref, name in zip(got_stats, ref_stats, ("running_mean", "running_var")):
        assert got.dtype == torch.float32, name
        assert_matches(got, ref, torch.float32, name)
