"""Fused BatchNorm + per-channel gate + activation (+ residual add), forward and backward.

    y = act(BN(x) * w + residual),   BN(x) = xhat * gamma + beta,   xhat = (x - mean) * rstd

The gate is folded into BN's affine parameters (spec/ALGORITHMS.md, "Where masks act"; exact), so that one
multiply-add per element does normalisation and gate:

    BN(x) * w = x * scale + shift,   scale = gamma * rstd * w,   shift = (beta - mean * gamma * rstd) * w

The residual comes after the gate: a gated block output BN(conv(..)) * w meets the skip connection, then the
activation (ResNet's ``relu(bn3(conv3(..)) + identity)``). The soft path passes its gate w; the hard path,
physically narrow, passes ``gate=None`` and simply has fewer channels. Training mode normalises with the batch
statistics (fp32, whatever x's dtype) and updates the running statistics as ``F.batch_norm`` does (unbiased
variance, ``momentum``); eval mode normalises with the running statistics.

The cost is memory traffic, so each direction is one reduction pass and one elementwise pass over the
activation, with a per-channel step between them (one small launch, so that no program of the elementwise
pass has to re-add every chunk's partial sums):

  forward   1. stats:         per (channel block, row chunk): sum (x - k_c), sum (x - k_c)^2 -> partials
                              (k_c = the channel's first value, so the variance does not cancel when
                              |mean| >> std)
            2. coefficients:  per channel: mean, rstd, scale, shift
            3. apply:         y = act(x * scale + shift [+ residual])
            (+ the running-statistics update, per channel: a separate op, see below)
  backward  1. reduce:        du = dy * act'(u) (u recomputed from x [and the residual]); partials of sum du
                              and sum du * xhat; du is stored when there is a residual (it is its gradient,
                              and pass 3 then reads du instead of dy, x and the residual again)
            2. coefficients:  per channel: dgamma = w S2, dbeta = w S1, dw = gamma S2 + beta S1, and the
                              batch statistics' share of dx: dx = scale du + a x + b
            3. apply:         dx = scale * du + a * x + b                      (eval: a = b = 0)

Memory layouts read without a copy: channels innermost (channels_last, or a 2-D (N, C) input) -- an
(N*H*W, C) row-major matrix, the layout GPU training uses -- and NCHW-contiguous; anything else is copied
to NCHW first.

Registered as custom ops with fake kernels -- ``torch.ops.s2hk.bn_gate_act_forward`` (functional, its
gradient ``bn_gate_act_backward``) and ``bn_update_running_stats`` (in place: torch.library lets no op with a
gradient mutate its inputs) -- so that :func:`bn_gate_act` works under ``torch.compile`` and
``torch.autocast``; a pure-PyTorch :func:`bn_gate_act_reference` sits beside it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRETED, AotVariant, check_runnable, sm_count

__all__ = ["bn_gate_act", "bn_gate_act_reference", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "hardswish", "identity")


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _offsets(rows, cols, C, HW, ROW_MAJOR: tl.constexpr):
    """Element offsets of a (positions ``rows``, channels ``cols``) tile; position = n * HW + spatial index."""
    if ROW_MAJOR:  # channels innermost: an (N*HW, C) row-major matrix
        return rows[:, None] * C + cols[None, :]
    else:  # NCHW: channel c of image n is the contiguous run [(n * C + c) * HW, + HW)
        return ((rows // HW) * (C * HW) + rows % HW)[:, None] + cols[None, :] * HW


@triton.jit
def _first_position(cols, HW, ROW_MAJOR: tl.constexpr):
    """Offsets of position 0 of channels ``cols`` (where the shift k_c is read)."""
    if ROW_MAJOR:
        return cols
    else:
        return cols * HW


@triton.jit
def _program_rows(C, rows_total, rows_per_chunk, BLOCK_C: tl.constexpr, REVERSED: tl.constexpr):
    """This program's channels (``cols``, ``c_ok``), its chunk and the chunk's rows ``[start, end)``.
    ``REVERSED`` walks the chunks last-first: the elementwise passes then start on the rows the reduction
    pass read last, the ones most likely still in L2."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    if REVERSED:
        chunk = tl.num_programs(1) - 1 - chunk
    start = chunk * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, rows_total)
    return cols, cols < C, chunk, start, end


@triton.jit
def _per_channel(ptr, cols, c_ok, default, PRESENT: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-channel parameter as fp32, or ``default`` everywhere when it is absent."""
    if PRESENT:
        return tl.load(ptr + cols, mask=c_ok, other=default).to(tl.float32)
    else:
        return tl.full((BLOCK_C,), default, dtype=tl.float32)


@triton.jit
def _chunk_totals(partials, n_chunks, C, cols, c_ok, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Both per-channel totals of ``partials`` (2, n_chunks, C): BLOCK_K chunks per load, so that the hundreds
    of chunks of a short, wide-grid pass cost a few L2 round trips, not one each; a fixed order (deterministic)."""
    t0 = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = (ks < n_chunks)[:, None] & c_ok[None, :]
        offs = ks[:, None] * C + cols[None, :]
        t0 += tl.load(partials + offs, mask=ok, other=0.0)
        t1 += tl.load(partials + n_chunks * C + offs, mask=ok, other=0.0)
    return tl.sum(t0, axis=0), tl.sum(t1, axis=0)


@triton.jit
def _activate(u, ACT: tl.constexpr):
    if ACT == "relu":
        return tl.maximum(u, 0.0)
    elif ACT == "hardswish":
        return u * tl.minimum(tl.maximum(u + 3.0, 0.0), 6.0) * (1.0 / 6.0)  # a multiply, not a division
    else:
        return u


@triton.jit
def _upstream_grad(g, xv, residual, offs, ok, scale, shift, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """du = dy * act'(u) for the tile's dy ``g`` and x ``xv``, recomputing u = x * scale + shift [+ residual]
    where act' needs it; torch's choices at the kinks (relu'(0) = 0, hardswish' = u/3 + 1/2 on [-3, 3])."""
    if ACT == "identity":
        return g
    else:
        u = xv * scale[None, :] + shift[None, :]
        if HAS_RES:
            u += tl.load(residual + offs, mask=ok, other=0.0).to(tl.float32)
        if ACT == "relu":
            return tl.where(u > 0.0, g, 0.0)
        else:
            return g * tl.where(u < -3.0, 0.0, tl.where(u <= 3.0, u * (1.0 / 3.0) + 0.5, 1.0))


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
#: Integer arguments of the streaming kernels that are not specialised on (divisibility by 16, == 1): their
#: alignment buys nothing (C's gives the 16-byte loads), and each specialisation is one more compile per shape.
_UNSPECIALISED = ["HW", "rows_total", "rows_per_chunk"]


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _stats_kernel(x, partials, C, HW, rows_total, rows_per_chunk,
                  ROW_MAJOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partials[0, chunk, c] = sum (x - k_c), partials[1, chunk, c] = sum (x - k_c)^2 over the chunk."""
    cols, c_ok, chunk, start, end = _program_rows(C, rows_total, rows_per_chunk, BLOCK_C, False)
    k = tl.load(x + _first_position(cols, HW, ROW_MAJOR), mask=c_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        v = tl.load(x + _offsets(rows, cols, C, HW, ROW_MAJOR), mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, v - k[None, :], 0.0)
        acc += d
        acc_sq += d * d
    n_chunks = tl.num_programs(1)
    tl.store(partials + chunk * C + cols, tl.sum(acc, axis=0), mask=c_ok)
    tl.store(partials + (n_chunks + chunk) * C + cols, tl.sum(acc_sq, axis=0), mask=c_ok)


@triton.jit
def _forward_coefficients_kernel(x, partials, n_chunks, weight, bias, gate, running_mean, running_var, stats,
                                 C, HW, rows_total, eps, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, ROW_MAJOR: tl.constexpr,
                                 BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """stats[:, c] = (mean, rstd, scale, shift, var) of channel c: the batch statistics from the chunk
    partials (training) or the running statistics (eval)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if TRAINING:
        total, total_sq = _chunk_totals(partials, n_chunks, C, cols, c_ok, BLOCK_K, BLOCK_C)
        k = tl.load(x + _first_position(cols, HW, ROW_MAJOR), mask=c_ok, other=0.0).to(tl.float32)
        shifted_mean = total / rows_total
        var = tl.maximum(total_sq / rows_total - shifted_mean * shifted_mean, 0.0)
        mean = k + shifted_mean
    else:
        mean = tl.load(running_mean + cols, mask=c_ok, other=0.0).to(tl.float32)
        var = tl.load(running_var + cols, mask=c_ok, other=1.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = _per_channel(weight, cols, c_ok, 1.0, HAS_WEIGHT, BLOCK_C)
    beta = _per_channel(bias, cols, c_ok, 0.0, HAS_BIAS, BLOCK_C)
    w = _per_channel(gate, cols, c_ok, 1.0, HAS_GATE, BLOCK_C)
    tl.store(stats + cols, mean, mask=c_ok)
    tl.store(stats + C + cols, rstd, mask=c_ok)
    tl.store(stats + 2 * C + cols, gamma * rstd * w, mask=c_ok)
    tl.store(stats + 3 * C + cols, (beta - mean * gamma * rstd) * w, mask=c_ok)
    tl.store(stats + 4 * C + cols, var, mask=c_ok)


@triton.jit
def _running_stats_kernel(running_mean, running_var, stats, C, rows_total, momentum, BLOCK_C: tl.constexpr):
    """running = (1 - momentum) running + momentum batch, in the statistics' own dtype; the variance unbiased,
    as torch's BatchNorm does."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    rm = tl.load(running_mean + cols, mask=c_ok, other=0.0)
    rv = tl.load(running_var + cols, mask=c_ok, other=0.0)
    mean = tl.load(stats + cols, mask=c_ok, other=0.0)
    unbiased = tl.load(stats + 4 * C + cols, mask=c_ok, other=0.0) * (rows_total / (rows_total - 1.0))
    tl.store(running_mean + cols, ((1.0 - momentum) * rm.to(tl.float32) + momentum * mean).to(rm.dtype), mask=c_ok)
    tl.store(running_var + cols, ((1.0 - momentum) * rv.to(tl.float32) + momentum * unbiased).to(rv.dtype),
             mask=c_ok)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _forward_apply_kernel(x, residual, y, stats, C, HW, rows_total, rows_per_chunk,
                          ACT: tl.constexpr, HAS_RES: tl.constexpr, ROW_MAJOR: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(x * scale + shift [+ residual])."""
    cols, c_ok, chunk, start, end = _program_rows(C, rows_total, rows_per_chunk, BLOCK_C, True)
    scale = tl.load(stats + 2 * C + cols, mask=c_ok, other=0.0)
    shift = tl.load(stats + 3 * C + cols, mask=c_ok, other=0.0)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        offs = _offsets(rows, cols, C, HW, ROW_MAJOR)
        u = tl.load(x + offs, mask=ok, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
        if HAS_RES:
            u += tl.load(residual + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y + offs, _activate(u, ACT).to(y.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _backward_reduce_kernel(dy, x, residual, du_out, stats, partials, C, HW, rows_total, rows_per_chunk,
                            ACT: tl.constexpr, HAS_RES: tl.constexpr, STORE_DU: tl.constexpr,
                            ROW_MAJOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """partials[0, chunk, c] = sum du, partials[1, chunk, c] = sum du * xhat; du stored if STORE_DU."""
    cols, c_ok, chunk, start, end = _program_rows(C, rows_total, rows_per_chunk, BLOCK_C, False)
    mean = tl.load(stats + cols, mask=c_ok, other=0.0)
    rstd = tl.load(stats + C + cols, mask=c_ok, other=0.0)
    scale = tl.load(stats + 2 * C + cols, mask=c_ok, other=0.0)
    shift = tl.load(stats + 3 * C + cols, mask=c_ok, other=0.0)
    s1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        offs = _offsets(rows, cols, C, HW, ROW_MAJOR)
        xv = tl.load(x + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(dy + offs, mask=ok, other=0.0).to(tl.float32)
        du = _upstream_grad(g, xv, residual, offs, ok, scale, shift, ACT, HAS_RES)  # 0 outside the tile
        s1 += du
        s2 += du * ((xv - mean[None, :]) * rstd[None, :])
        if STORE_DU:
            tl.store(du_out + offs, du.to(du_out.dtype.element_ty), mask=ok)
    n_chunks = tl.num_programs(1)
    tl.store(partials + chunk * C + cols, tl.sum(s1, axis=0), mask=c_ok)
    tl.store(partials + (n_chunks + chunk) * C + cols, tl.sum(s2, axis=0), mask=c_ok)


@triton.jit
def _backward_coefficients_kernel(partials, n_chunks, weight, bias, gate, stats, dweight, dbias, dgate,
                                  dx_coefficients, C, rows_total,
                                  TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  HAS_GATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-channel gradients (in the parameters' dtypes) and, training, dx's coefficients a, b:
    dx = scale * (du - S1/n - xhat * S2/n) = scale * du + a * x + b."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    s1, s2 = _chunk_totals(partials, n_chunks, C, cols, c_ok, BLOCK_K, BLOCK_C)
    gamma = _per_channel(weight, cols, c_ok, 1.0, HAS_WEIGHT, BLOCK_C)
    beta = _per_channel(bias, cols, c_ok, 0.0, HAS_BIAS, BLOCK_C)
    w = _per_channel(gate, cols, c_ok, 1.0, HAS_GATE, BLOCK_C)
    if HAS_WEIGHT:
        tl.store(dweight + cols, (w * s2).to(dweight.dtype.element_ty), mask=c_ok)
    if HAS_BIAS:
        tl.store(dbias + cols, (w * s1).to(dbias.dtype.element_ty), mask=c_ok)
    if HAS_GATE:
        tl.store(dgate + cols, (gamma * s2 + beta * s1).to(dgate.dtype.element_ty), mask=c_ok)
    if TRAINING:  # the batch statistics depend on x: their share of the gradient, per channel
        mean = tl.load(stats + cols, mask=c_ok, other=0.0)
        rstd = tl.load(stats + C + cols, mask=c_ok, other=0.0)
        scale = tl.load(stats + 2 * C + cols, mask=c_ok, other=0.0)
        a = -scale * rstd * (s2 / rows_total)
        tl.store(dx_coefficients + cols, a, mask=c_ok)
        tl.store(dx_coefficients + C + cols, -a * mean - scale * (s1 / rows_total), mask=c_ok)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _backward_apply_kernel(dy, x, du_in, dx, stats, dx_coefficients, C, HW, rows_total, rows_per_chunk,
                           ACT: tl.constexpr, TRAINING: tl.constexpr, DU_STORED: tl.constexpr,
                           ROW_MAJOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = scale * du [+ a * x + b]. du is read back where pass 1 stored it (with a residual), else
    recomputed from dy and x (no residual: u needs x only)."""
    cols, c_ok, chunk, start, end = _program_rows(C, rows_total, rows_per_chunk, BLOCK_C, True)
    scale = tl.load(stats + 2 * C + cols, mask=c_ok, other=0.0)
    shift = tl.load(stats + 3 * C + cols, mask=c_ok, other=0.0)
    if TRAINING:
        a = tl.load(dx_coefficients + cols, mask=c_ok, other=0.0)
        b = tl.load(dx_coefficients + C + cols, mask=c_ok, other=0.0)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        offs = _offsets(rows, cols, C, HW, ROW_MAJOR)
        xv = 0.0
        if TRAINING or (ACT != "identity" and not DU_STORED):  # x read once, and only where it is needed
            xv = tl.load(x + offs, mask=ok, other=0.0).to(tl.float32)
        if DU_STORED:
            du = tl.load(du_in + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            g = tl.load(dy + offs, mask=ok, other=0.0).to(tl.float32)
            du = _upstream_grad(g, xv, x, offs, ok, scale, shift, ACT, False)  # no residual to read
        grad = du * scale[None, :]
        if TRAINING:
            grad += xv * a[None, :] + b[None, :]
        tl.store(dx + offs, grad.to(dx.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
# Launch configuration. Not autotuned: the hard path's widths change while a network is pruned, and tuning
# every new channel count would stall training the way cuDNN's autotuning does (DESIGN.md). bench/kernels_gpu.py
# sweeps the three streaming-pass knobs on the GPU.
#: Elements per tile of the streaming kernels (16 per thread at 8 warps: two 16-byte loads of 16-bit data);
#: small under the interpreter, so that the tests' tiny shapes still span several tiles, chunks and blocks.
_TILE = 256 if INTERPRETED else 4096
#: Warps per program of the streaming kernels.
_WARPS = 8
#: Programs per SM of the streaming kernels' grid: enough bytes in flight, and few chunk partials.
_PROGRAMS_PER_SM = 4
#: Channels per program, and chunk partials per load, of the per-channel kernels.
_COEFF_BLOCK = 32
_CHUNK_BLOCK = 4 if INTERPRETED else 64


def _layout(x: Tensor) -> Tuple[Tensor, bool, int]:
    """``(x as the kernels read it, row_major, HW)``: row-major (an (N*HW, C) matrix) when channels are
    innermost in memory (channels_last, 2-D), else NCHW-contiguous -- a copy only if x is neither."""
    if x.dim() < 2:
        raise ValueError(f"expected (N, C, *spatial), got shape {tuple(x.shape)}")
    hw = math.prod(x.shape[2:])
    if x.movedim(1, -1).is_contiguous():
        return x, True, hw
    return x.contiguous(), False, hw


def _in_layout(t: Tensor, row_major: bool) -> Tensor:
    """``t`` (shaped like x) in the memory layout the kernels read x in (no copy if it already is)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if row_major else t.contiguous()


def _grid(rows: int, c: int, row_major: bool, device: torch.device) -> Tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_C, rows_per_chunk, n_chunks)`` of the streaming kernels: tiles long along the
    dimension that is contiguous in memory (coalesced loads), and about ``_PROGRAMS_PER_SM`` programs per SM,
    so that one wave covers the tensor and the partials stay few."""
    block_c = min(triton.next_power_of_2(c), 64 if row_major else 4)
    block_r = _TILE // block_c
    c_blocks = triton.cdiv(c, block_c)
    chunks = max(1, min(triton.cdiv(rows, block_r), triton.cdiv(_PROGRAMS_PER_SM * sm_count(device), c_blocks)))
    rows_per_chunk = max(1, triton.cdiv(triton.cdiv(rows, chunks), block_r)) * block_r
    return block_r, block_c, rows_per_chunk, triton.cdiv(rows, rows_per_chunk)  # no chunk when rows == 0


def _check_activation(activation: Optional[str]) -> str:
    activation = "identity" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _validate(x: Tensor, per_channel: dict, residual: Optional[Tensor], training: bool,
              has_running: bool) -> None:
    """Raise ValueError for inputs the op does not take (also run by the fake kernel, so that torch.compile
    raises the same errors)."""
    if x.dim() < 2:
        raise ValueError(f"expected (N, C, *spatial), got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in per_channel.items():
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
    if x.numel() >= 2 ** 31:
        raise ValueError("tensors of 2**31 elements or more are not supported (32-bit offsets)")
    if training and x.shape[0] * math.prod(x.shape[2:]) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    if not training and not has_running:
        raise ValueError("eval mode needs running_mean and running_var")


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
             running_var: Optional[Tensor], gate: Optional[Tensor], residual: Optional[Tensor], activation: str,
             eps: float, training: bool) -> Tuple[Tensor, Tensor]:
    """``(y, stats)``, stats = (mean, rstd, scale, shift, var) as a (5, C) fp32 tensor. Reads the running
    statistics in eval mode only; :func:`_update_running_stats` updates them."""
    activation = _check_activation(activation)
    check_runnable(x, weight, bias, gate, residual, running_mean, running_var)
    _validate(x, dict(weight=weight, bias=bias, gate=gate, running_mean=running_mean, running_var=running_var),
              residual, training, running_mean is not None and running_var is not None)
    x, row_major, hw = _layout(x)
    n, c = x.shape[:2]
    rows = n * hw
    residual = _in_layout(residual, row_major) if residual is not None else None
    weight, bias, gate, running_mean, running_var = (
        t.contiguous() if t is not None else None for t in (weight, bias, gate, running_mean, running_var))
    y = torch.empty_like(x)
    stats = torch.empty((5, c), device=x.device, dtype=torch.float32)
    if c == 0:
        return y, stats
    block_r, block_c, rows_per_chunk, chunks = _grid(rows, c, row_major, x.device)
    grid = (triton.cdiv(c, block_c), chunks)
    tiles = dict(ROW_MAJOR=row_major, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS)
    unused = torch.empty(0, device=x.device, dtype=torch.float32)
    opt = lambda t: unused if t is None else t  # noqa: E731  (absent tensors: never read, flags say so)
    partials = torch.empty((2, chunks, c), device=x.device, dtype=torch.float32) if training else unused
    if training:
        _stats_kernel[grid](x, partials, c, hw, rows, rows_per_chunk, **tiles)
    _forward_coefficients_kernel[(triton.cdiv(c, _COEFF_BLOCK),)](
        x, partials, chunks, opt(weight), opt(bias), opt(gate), opt(running_mean), opt(running_var), stats,
        c, hw, rows, float(eps), TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, ROW_MAJOR=row_major, BLOCK_K=_CHUNK_BLOCK, BLOCK_C=_COEFF_BLOCK)
    if rows > 0:
        _forward_apply_kernel[grid](x, opt(residual), y, stats, c, hw, rows, rows_per_chunk, ACT=activation,
                                    HAS_RES=residual is not None, **tiles)
    return y, stats


def _update_running_stats(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float,
                          rows: int) -> None:
    """The running statistics moved towards the batch's (``stats`` of a training-mode forward), in place."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    c = running_mean.numel()
    if c > 0:
        _running_stats_kernel[(triton.cdiv(c, _COEFF_BLOCK),)](running_mean, running_var, stats, c, rows,
                                                               float(momentum), BLOCK_C=_COEFF_BLOCK)


def _backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate: Optional[Tensor],
              residual: Optional[Tensor], stats: Tensor, activation: str, training: bool,
              need_dx: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dgate, du)``; each an empty tensor where it is not computed: dx unless
    ``need_dx``, a parameter's gradient where the parameter is None, du unless there is a residual and a
    non-identity activation (du is then the residual's gradient; with the identity it is dy itself)."""
    x, row_major, hw = _layout(x)
    n, c = x.shape[:2]
    rows = n * hw
    dy = _in_layout(dy, row_major)
    store_du = residual is not None and activation != "identity"
    residual = _in_layout(residual, row_major) if store_du else None
    weight, bias, gate = (t.contiguous() if t is not None else None for t in (weight, bias, gate))
    # distinct empty tensors: a custom op's outputs must not alias one another
    like = lambda t: torch.empty_like(t) if t is not None else x.new_empty(0)  # noqa: E731
    du, dx = like(x if store_du else None), like(x if need_dx else None)
    dweight, dbias, dgate = like(weight), like(bias), like(gate)
    if c == 0:
        return dx, dweight, dbias, dgate, du
    block_r, block_c, rows_per_chunk, chunks = _grid(rows, c, row_major, x.device)
    grid = (triton.cdiv(c, block_c), chunks)
    tiles = dict(ROW_MAJOR=row_major, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS)
    unused = torch.empty(0, device=x.device, dtype=torch.float32)
    opt = lambda t: unused if t is None else t  # noqa: E731
    partials = torch.empty((2, chunks, c), device=x.device, dtype=torch.float32)
    dx_coefficients = torch.empty((2, c), device=x.device, dtype=torch.float32) if training else unused
    if rows > 0:
        _backward_reduce_kernel[grid](dy, x, opt(residual), du, stats, partials, c, hw, rows, rows_per_chunk,
                                      ACT=activation, HAS_RES=residual is not None, STORE_DU=store_du, **tiles)
    _backward_coefficients_kernel[(triton.cdiv(c, _COEFF_BLOCK),)](
        partials, chunks, opt(weight), opt(bias), opt(gate), stats, opt(dweight), opt(dbias), opt(dgate),
        dx_coefficients, c, rows, TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, BLOCK_K=_CHUNK_BLOCK, BLOCK_C=_COEFF_BLOCK)
    if need_dx and rows > 0:
        _backward_apply_kernel[grid](dy, x, du, dx, stats, dx_coefficients, c, hw, rows, rows_per_chunk,
                                     ACT=activation, TRAINING=training, DU_STORED=store_du, **tiles)
    return dx, dweight, dbias, dgate, du


# ----------------------------------------------------------------------------------------------------------
# Custom ops (torch.compile, torch.library.opcheck) and autograd
# ----------------------------------------------------------------------------------------------------------
# The running-statistics update is an op of its own: an op with a gradient must not mutate its inputs
# (torch.library), and this one costs a single small launch.
@torch.library.custom_op("s2hk::bn_gate_act_forward", mutates_args=())
def _forward_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], gate: Optional[Tensor], residual: Optional[Tensor], activation: str,
                eps: float, training: bool) -> Tuple[Tensor, Tensor]:
    return _forward(x, weight, bias, running_mean, running_var, gate, residual, activation, eps, training)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, running_mean, running_var, gate, residual, activation, eps, training):
    _check_activation(activation)
    _validate(x, dict(weight=weight, bias=bias, gate=gate, running_mean=running_mean, running_var=running_var),
              residual, training, running_mean is not None and running_var is not None)
    x = _layout(x)[0]
    return torch.empty_like(x), x.new_empty((5, x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("s2hk::bn_update_running_stats", mutates_args=("running_mean", "running_var"))
def _running_stats_op(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float, rows: int) -> None:
    _update_running_stats(running_mean, running_var, stats, momentum, rows)


@_running_stats_op.register_fake
def _running_stats_fake(running_mean, running_var, stats, momentum, rows):
    return None


@torch.library.custom_op("s2hk::bn_gate_act_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate: Optional[Tensor],
                 residual: Optional[Tensor], stats: Tensor, activation: str, training: bool,
                 need_dx: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(dy, x, weight, bias, gate, residual, stats, activation, training, need_dx)


@_backward_op.register_fake
def _backward_fake(dy, x, weight, bias, gate, residual, stats, activation, training, need_dx):
    x = _layout(x)[0]
    like = lambda t: torch.empty_like(t) if t is not None else x.new_empty(0)  # noqa: E731
    store_du = residual is not None and activation != "identity"
    return like(x if need_dx else None), like(weight), like(bias), like(gate), like(x if store_du else None)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, _, gate, residual, activation, _, training = inputs
    ctx.activation, ctx.training = activation, training
    # the residual is needed again only to recompute u for the activation's derivative
    ctx.save_for_backward(x, weight, bias, gate, residual if activation != "identity" else None, output[1])
    ctx.mark_non_differentiable(output[1])


def _autograd_backward(ctx, dy: Tensor, _dstats: Tensor):
    x, weight, bias, gate, residual, stats = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dweight, dbias, dgate, du = _backward_op(dy, x, weight, bias, gate, residual, stats, ctx.activation,
                                                 ctx.training, needs[0])
    dresidual = (dy if ctx.activation == "identity" else du) if needs[6] else None
    chosen = lambda g, i: g if needs[i] else None  # noqa: E731
    return (chosen(dx, 0), chosen(dweight, 1), chosen(dbias, 2), None, None, chosen(dgate, 5), dresidual,
            None, None, None)


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def bn_gate_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], gate: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                activation: Optional[str] = "relu", momentum: float = 0.1, eps: float = 1e-5,
                training: bool = True) -> Tensor:
    """y = act(batch_norm(x) * gate + residual), differentiable; one reduction pass and one elementwise pass
    over the activation per direction.

    Args:
        x: (N, C, *spatial); channels_last (or 2-D) and NCHW-contiguous are read as they are, other layouts
            copied. weight, bias: BN's affine parameters (C,) or None. running_mean, running_var: (C,),
            contiguous, or None; updated in place when training, as ``F.batch_norm`` does. gate: (C,) soft-path
            keep-probabilities, or None (the hard path). residual: like x, or None. activation: "relu" |
            "hardswish" | "identity" (None = identity). momentum: a float (the caller resolves the cumulative
            average, ``momentum=None``).
    Returns:
        y: x's shape, dtype and memory layout (NCHW for a copied x); fp32 arithmetic inside.

    Under ``torch.autocast`` nothing is cast, as autocast leaves ``F.batch_norm``: x may be bf16 (a convolution's
    autocast output) while the parameters and running statistics stay fp32; statistics are computed and kept
    in fp32, y has x's dtype and every gradient its input's dtype.
    """
    activation = _check_activation(activation)
    if momentum is None:
        raise ValueError("momentum=None (cumulative average) is not supported: pass the factor as a float")
    y, stats = _forward_op(x, weight, bias, running_mean, running_var, gate, residual, activation, float(eps),
                           bool(training))
    if training and running_mean is not None and running_var is not None:
        _running_stats_op(running_mean, running_var, stats, float(momentum), x.shape[0] * math.prod(x.shape[2:]))
    return y


def bn_gate_act_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          gate: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                          activation: Optional[str] = "relu", momentum: float = 0.1, eps: float = 1e-5,
                          training: bool = True) -> Tensor:
    """Pure-PyTorch :func:`bn_gate_act`: F.batch_norm, gate multiply, residual add, activation."""
    activation = _check_activation(activation)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if gate is not None:
        y = y * gate.view(1, -1, *([1] * (x.dim() - 2)))
    if residual is not None:
        y = y + residual
    if activation == "relu":
        return F.relu(y)
    if activation == "hardswish":
        return F.hardswish(y)
    return y


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time specialisations
# ----------------------------------------------------------------------------------------------------------
def aot_variants() -> List[AotVariant]:
    """Every kernel as the GPU launcher specialises it, with gate, residual and hardswish (the most code):
    the four streaming kernels in bf16, fp16 and fp32, row-major (channels_last; C a multiple of 16, so
    16-byte loads) and NCHW; the per-channel kernels once (per x dtype where they
    read x)."""
    out: List[AotVariant] = []
    ints = {k: "i32" for k in ("C", "HW", "rows_total", "rows_per_chunk", "n_chunks")}
    flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_GATE=True)
    for dt in ("bf16", "fp16", "fp32"):
        for row_major in (True, False):
            block_r, block_c, _, _ = _grid(2 ** 20, 256, row_major, torch.device("cpu"))
            tiles = dict(ROW_MAJOR=row_major, BLOCK_R=block_r, BLOCK_C=block_c)
            aligned = ("C",) if row_major else ()  # NCHW: contiguity is lost to the per-position division anyway
            tag = f"{dt}_{'rows' if row_major else 'nchw'}"

            def variant(name, kernel, types, constexprs):
                out.append(AotVariant(f"bn_{name}_{tag}", kernel, {**types, **ints},
                                      {**constexprs, **tiles}, num_warps=_WARPS, num_stages=1, aligned=aligned))

            variant("stats", _stats_kernel, dict(x=f"*{dt}", partials="*fp32"), {})
            variant("forward_apply", _forward_apply_kernel,
                    dict(x=f"*{dt}", residual=f"*{dt}", y=f"*{dt}", stats="*fp32"),
                    dict(ACT="hardswish", HAS_RES=True))
            variant("backward_reduce", _backward_reduce_kernel,
                    dict(dy=f"*{dt}", x=f"*{dt}", residual=f"*{dt}", du_out=f"*{dt}", stats="*fp32",
                         partials="*fp32"), dict(ACT="hardswish", HAS_RES=True, STORE_DU=True))
            variant("backward_apply", _backward_apply_kernel,
                    dict(dy=f"*{dt}", x=f"*{dt}", du_in=f"*{dt}", dx=f"*{dt}", stats="*fp32",
                         dx_coefficients="*fp32"), dict(ACT="hardswish", TRAINING=True, DU_STORED=False))
        out.append(AotVariant(
            f"bn_forward_coefficients_{dt}", _forward_coefficients_kernel,
            dict(x=f"*{dt}", partials="*fp32", weight="*fp32", bias="*fp32", gate="*fp32", running_mean="*fp32",
                 running_var="*fp32", stats="*fp32", eps="fp32", **ints),
            dict(TRAINING=True, ROW_MAJOR=True, BLOCK_K=_CHUNK_BLOCK, BLOCK_C=_COEFF_BLOCK, **flags), num_warps=4,
            num_stages=1))
    out.append(AotVariant(
        "bn_backward_coefficients", _backward_coefficients_kernel,
        dict(partials="*fp32", weight="*fp32", bias="*fp32", gate="*fp32", stats="*fp32", dweight="*fp32",
             dbias="*fp32", dgate="*fp32", dx_coefficients="*fp32", **ints),
        dict(TRAINING=True, BLOCK_K=_CHUNK_BLOCK, BLOCK_C=_COEFF_BLOCK, **flags), num_warps=4, num_stages=1))
    out.append(AotVariant(
        "bn_running_stats", _running_stats_kernel,
        dict(running_mean="*fp32", running_var="*fp32", stats="*fp32", momentum="fp32", **ints),
        dict(BLOCK_C=_COEFF_BLOCK), num_warps=4, num_stages=1))
    return out
