"""Benchmarks: each fused Triton kernel against the cuBLAS / cuDNN composition it replaces (GPU only).

Run:  python -m pytest bench/test_bench_kernels.py --benchmark-only --benchmark-json bench/results/kernels.json

Every benchmark records in ``benchmark.extra_info`` the achieved TFLOP/s (GEMM-like ops) or GB/s (memory-
bound ops) and the percentage of the device's peak: dense bf16 tensor-core FLOP/s or HBM bandwidth from
the table below (H100 SXM figures unless the device name says otherwise). Modes: ``forward``, ``backward``
(the backward of a retained graph), ``full`` (forward + backward). Shapes, bf16, channels_last:
  * dual_linear: 4096 x 4096 weights at M = 4096 and at M = 256 (a batch through a classifier-like layer),
    half the channels kept, as a prefix and as a scattered index set.
  * dual_conv: ResNet-like 3x3 convolutions at 32x32 and 56x56, batch 64-256, a shared input (stem).
    Baseline: ONE cuDNN convolution, the gate multiply and an index_select of the kept channels.
  * bn_gate_act: ResNet-like activations at 32x32 and 56x56, batch 64-256, relu + gate + residual.
    Baseline: F.batch_norm, multiply, add, relu. Bytes counted: the minimum an op must move (each input
    read once, each output written once), so GB/s is an effective rate.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODES = ("forward", "backward", "full")

# name substring -> (dense bf16 TFLOP/s, HBM GB/s); first match wins.
PEAKS = [("H200", (989.4, 4800.0)), ("H100 PCIe", (756.0, 2000.0)), ("H100", (989.4, 3350.0)),
         ("A100", (312.0, 2039.0))]


def device_peaks() -> tuple:
    name = torch.cuda.get_device_name()
    return next((p for key, p in PEAKS if key in name), PEAKS[2][1])


def bench(benchmark, run: Callable[[], object], mode: str, flops: Optional[Dict[str, float]] = None,
          bytes_moved: Optional[Dict[str, float]] = None, **info) -> None:
    """Time ``run`` (forward: returns outputs; backward is taken through them) in ``mode``; fill extra_info."""
    grads = {}

    def forward():
        return run()

    def backward_of(outs):
        outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs]) if o.requires_grad]
        if "g" not in grads:
            grads["g"] = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads["g"], retain_graph=(mode == "backward"))

    if mode == "forward":
        def step():
            with torch.no_grad():
                forward()
            torch.cuda.synchronize()
    elif mode == "backward":
        outs = forward()

        def step():
            backward_of(outs)
            torch.cuda.synchronize()
    else:
        def step():
            backward_of(forward())
            torch.cuda.synchronize()

    step()  # compile / autotune outside the measurement
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    tflops_peak, gbps_peak = device_peaks()
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None and getattr(stats, "stats", None) else None
    benchmark.extra_info.update(mode=mode, device=torch.cuda.get_device_name(), **info)
    if seconds:
        if flops is not None:
            tflops = flops[mode] / seconds / 1e12
            benchmark.extra_info.update(tflops=round(tflops, 2), percent_of_peak=round(100 * tflops / tflops_peak, 1))
        if bytes_moved is not None:
            gbps = bytes_moved[mode] / seconds / 1e9
            benchmark.extra_info.update(gbps=round(gbps, 1), percent_of_peak=round(100 * gbps / gbps_peak, 1))


def kept_set(kind: str, full: int, keep: int, device) -> object:
    """'prefix' -> an int (the prefix fast path); 'scattered' -> a sorted random index tensor."""
    if kind == "prefix":
        return keep
    return torch.randperm(full, device=device)[:keep].sort().values.int()


# ----------------------------------------------------------------------------------------------------------
# dual_linear
# ----------------------------------------------------------------------------------------------------------
LINEAR_SHAPES = [(4096, 4096, 4096), (256, 4096, 4096)]  # (M, N, K)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kept", ["prefix", "scattered"])
@pytest.mark.parametrize("M,N,K", LINEAR_SHAPES)
@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_dual_linear(benchmark, impl, M, N, K, kept, mode):
    from s2hk.kernels.dual_linear import dual_linear, dual_linear_reference

    dev, dt = "cuda", torch.bfloat16
    kin, kout = kept_set(kept, K, K // 2, dev), kept_set(kept, N, N // 2, dev)
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    xh = torch.randn(M, K // 2, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5).requires_grad_()
    b = torch.randn(N, device=dev, dtype=dt, requires_grad=True)
    g = torch.rand(N, device=dev, dtype=dt, requires_grad=True)
    fn = dual_linear if impl == "triton" else dual_linear_reference
    fwd = 2.0 * M * N * K + 2.0 * M * (N // 2) * (K // 2)
    bench(benchmark, lambda: fn(x, xh, w, b, g, kin, kout), mode,
          flops=dict(forward=fwd, backward=2 * fwd, full=3 * fwd), impl=impl, op="dual_linear",
          shape=f"M{M} N{N} K{K} keep50% {kept}")


# ----------------------------------------------------------------------------------------------------------
# dual_conv
# ----------------------------------------------------------------------------------------------------------
CONV_SHAPES = [  # (batch, C_in, H, W, C_out, kernel, stride)
    (256, 3, 32, 32, 16, 3, 1),     # CIFAR ResNet stem
    (256, 32, 32, 32, 32, 3, 1),    # CIFAR-width 3x3 at 32x32
    (128, 64, 56, 56, 64, 3, 1),    # ImageNet ResNet stage-1 3x3 at 56x56
    (64, 64, 56, 56, 128, 3, 2),    # strided 3x3 into stage 2
]


def _conv_baseline(x, w, b, g, kept, stride, padding):
    """One cuDNN convolution shared by both paths: gate multiply, and the kept channels sliced out."""
    z = F.conv2d(x, w, b, stride=stride, padding=padding)
    idx = torch.arange(kept, device=x.device) if isinstance(kept, int) else kept.long()
    return z * g.view(1, -1, 1, 1), z.index_select(1, idx)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["triton", "cudnn"])
def test_dual_conv(benchmark, impl, shape, mode):
    from s2hk.kernels.dual_conv import dual_conv

    n, c_in, h, w_, c_out, k, stride = shape
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(n, c_in, h, w_, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.randn(c_out, c_in, k, k, device=dev, dtype=dt) / (c_in * k * k) ** 0.5).requires_grad_()
    b = torch.randn(c_out, device=dev, dtype=dt, requires_grad=True)
    g = torch.rand(c_out, device=dev, dtype=dt, requires_grad=True)
    kept = kept_set("scattered", c_out, c_out // 2, dev)
    pad = k // 2
    if impl == "triton":
        run = lambda: dual_conv(x, w, b, g, kept, stride, pad)  # noqa: E731
    else:
        run = lambda: _conv_baseline(x, w, b, g, kept, stride, pad)  # noqa: E731
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
    fwd = 2.0 * n * ho * wo * c_out * c_in * k * k
    bench(benchmark, run, mode, flops=dict(forward=fwd, backward=2 * fwd, full=3 * fwd), impl=impl,
          op="dual_conv", shape="x".join(map(str, shape)))


# ----------------------------------------------------------------------------------------------------------
# bn_gate_act
# ----------------------------------------------------------------------------------------------------------
BN_SHAPES = [(256, 64, 32, 32), (128, 64, 56, 56), (64, 256, 56, 56)]


def _bn_baseline(x, weight, bias, rm, rv, gate, residual):
    return F.relu(F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5) * gate.view(1, -1, 1, 1) + residual)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bn_gate_act(benchmark, impl, shape, layout, mode):
    from s2hk.kernels.bn_gate_act import bn_gate_act

    dev, dt = "cuda", torch.bfloat16
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(*shape, device=dev, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
    res = torch.randn(*shape, device=dev, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
    c = shape[1]
    weight = torch.rand(c, device=dev, requires_grad=True)
    bias = torch.randn(c, device=dev, requires_grad=True)
    gate = torch.rand(c, device=dev, requires_grad=True)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    if impl == "triton":
        run = lambda: bn_gate_act(x, weight, bias, rm, rv, gate, res, "relu")  # noqa: E731
    else:
        run = lambda: _bn_baseline(x, weight, bias, rm, rv, gate, res)  # noqa: E731
    t = x.numel() * x.element_size()
    moved = dict(forward=3 * t, backward=5 * t, full=8 * t)  # fwd: x, res -> y; bwd: dy, x, res -> dx, dres
    bench(benchmark, run, mode, bytes_moved=moved, impl=impl, op="bn_gate_act",
          shape="x".join(map(str, shape)), layout=layout)

