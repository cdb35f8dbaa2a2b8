"""Fused BatchNorm + per-channel gate + activation + residual add, forward and backward.

    y = act(BN(x) * w + residual),   BN(x) = (x - mean) * rstd * gamma + beta,   act in relu | hardswish | identity

for x of shape (N, C, *spatial) in NCHW (contiguous) or channels_last memory, without copies. Training mode
normalises with the batch statistics and updates the running statistics like ``F.batch_norm`` (unbiased
variance, ``momentum``); eval mode normalises with the running statistics. The soft path passes its gate
w; the hard path uses the same kernels with ``gate=None``.

Unfused, this is four or five passes over the activation tensor per direction (BN's statistics, BN's
normalisation, the gate multiply, the residual add, the activation; and their gradients, BN's backward
doing its own reductions). Fused, every direction is one reduction pass and one elementwise pass, the two
the batch statistics need anyway:

  forward   1. per (channel block, row chunk): shifted sums  sum(x - k_c), sum((x - k_c)^2)   (k_c = x[0, c, 0],
               so the variance does not cancel catastrophically when |mean| >> std)
            2. per (channel block, row chunk): finish mean / rstd from the chunk partials, update running
               stats (chunk 0), y = act(x * scale_c + shift_c + residual) with scale_c = gamma*rstd*w and
               shift_c = (beta - mean*gamma*rstd)*w (the gate folded into the affine parameters)
  backward  1. du = dy * act'(u) (u recomputed from x), per-chunk partials S1 = sum du, S2 = sum du * xhat;
               du is stored when there is a residual (it is the residual's gradient)
            2. finish S1, S2; dx = gamma*w*rstd * (du - (S1 + xhat*S2) / count) (training) or
               gamma*w*rstd * du (eval); chunk 0 stores dgamma = w*S2, dbeta = w*S1, dw = gamma*S2 + beta*S1
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import INTERPRETED, AotVariant, check_runnable, sm_count

__all__ = ["bn_gate_act", "bn_gate_act_reference", "bn_gate_act_forward", "bn_gate_act_backward",
           "BnGateActFunction", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "hardswish", "identity")


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(offs_c, offs_s, HW, stride_n, stride_c, stride_hw):
    """Element offsets of a (channel, position) tile; position s = n * HW + spatial index."""
    return offs_c[:, None] * stride_c + ((offs_s // HW) * stride_n + (offs_s % HW) * stride_hw)[None, :]


@triton.jit
def _per_channel(ptr, offs_c, c_ok, default, PRESENT: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-channel parameter as fp32, or ``default`` everywhere when it is absent."""
    if PRESENT:
        return tl.load(ptr + offs_c, mask=c_ok, other=default).to(tl.float32)
    else:
        return tl.full((BLOCK_C,), default, dtype=tl.float32)


@triton.jit
def _activate(u, ACT: tl.constexpr):
    if ACT == "relu":
        return tl.maximum(u, 0.0)
    elif ACT == "hardswish":
        return u * tl.minimum(tl.maximum(u + 3.0, 0.0), 6.0) / 6.0
    else:
        return u


@triton.jit
def _activation_grad(dy, u, ACT: tl.constexpr):
    """dy * act'(u), with torch's choices at the kinks (relu' (0) = 0, hardswish' = u/3 + 1/2 on [-3, 3])."""
    if ACT == "relu":
        return tl.where(u > 0.0, dy, 0.0)
    elif ACT == "hardswish":
        return dy * tl.where(u < -3.0, 0.0, tl.where(u <= 3.0, u / 3.0 + 0.5, 1.0))
    else:
        return dy


@triton.jit
def _chunk_totals(part, n_chunks, C, offs_c, c_ok, BLOCK_C: tl.constexpr):
    """Column sums over chunks of part (2, n_chunks, C): the two per-channel totals."""
    t0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, n_chunks):
        t0 += tl.load(part + i * C + offs_c, mask=c_ok, other=0.0)
        t1 += tl.load(part + (n_chunks + i) * C + offs_c, mask=c_ok, other=0.0)
    return t0, t1


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bn_stats_kernel(x, part, C, HW, count, rows_per_chunk, stride_n, stride_c, stride_hw,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """part[0, chunk, c] = sum (x - k_c), part[1, chunk, c] = sum (x - k_c)^2 over the chunk's positions."""
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    shift = tl.load(x + offs_c * stride_c, mask=c_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    end = tl.minimum((chunk + 1) * rows_per_chunk, count)
    for s0 in range(chunk * rows_per_chunk, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = c_ok[:, None] & (offs_s < end)[None, :]
        v = tl.load(x + _tile_offsets(offs_c, offs_s, HW, stride_n, stride_c, stride_hw), mask=ok, other=0.0)
        d = tl.where(ok, v.to(tl.float32) - shift[:, None], 0.0)
        acc += d
        acc_sq += d * d
    tl.store(part + chunk * C + offs_c, tl.sum(acc, axis=1), mask=c_ok)
    tl.store(part + (n_chunks + chunk) * C + offs_c, tl.sum(acc_sq, axis=1), mask=c_ok)


@triton.jit
def _bn_forward_kernel(x, residual, y, weight, bias, gate, part, mean, rstd, running_mean, running_var,
                       C, HW, count, rows_per_chunk, stride_n, stride_c, stride_hw, momentum, eps,
                       ACT: tl.constexpr, TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                       HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = act(x * scale_c + shift_c + residual). Training: mean / rstd from the chunk partials (stored
    by chunk 0, with the running-stat update); eval: mean / rstd are inputs."""
    chunk = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    if TRAINING:
        total, total_sq = _chunk_totals(part, tl.num_programs(1), C, offs_c, c_ok, BLOCK_C)
        shift = tl.load(x + offs_c * stride_c, mask=c_ok, other=0.0).to(tl.float32)
        mean_shifted = total / count
        var = tl.maximum(total_sq / count - mean_shifted * mean_shifted, 0.0)
        mu = shift + mean_shifted
        inv_std = 1.0 / tl.sqrt(var + eps)
        if chunk == 0:
            tl.store(mean + offs_c, mu, mask=c_ok)
            tl.store(rstd + offs_c, inv_std, mask=c_ok)
            if UPDATE_RUNNING:
                rm = tl.load(running_mean + offs_c, mask=c_ok, other=0.0)
                rv = tl.load(running_var + offs_c, mask=c_ok, other=0.0)
                new_rm = (1.0 - momentum) * rm.to(tl.float32) + momentum * mu
                new_rv = (1.0 - momentum) * rv.to(tl.float32) + momentum * var * (count / (count - 1.0))
                tl.store(running_mean + offs_c, new_rm.to(rm.dtype), mask=c_ok)
                tl.store(running_var + offs_c, new_rv.to(rv.dtype), mask=c_ok)
    else:
        mu = tl.load(mean + offs_c, mask=c_ok, other=0.0)
        inv_std = tl.load(rstd + offs_c, mask=c_ok, other=0.0)
    gamma = _per_channel(weight, offs_c, c_ok, 1.0, HAS_WEIGHT, BLOCK_C)
    beta = _per_channel(bias, offs_c, c_ok, 0.0, HAS_BIAS, BLOCK_C)
    w = _per_channel(gate, offs_c, c_ok, 1.0, HAS_GATE, BLOCK_C)
    scale = gamma * inv_std * w  # the gate folded into BN's affine parameters
    offset = (beta - mu * gamma * inv_std) * w

    end = tl.minimum((chunk + 1) * rows_per_chunk, count)
    for s0 in range(chunk * rows_per_chunk, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = c_ok[:, None] & (offs_s < end)[None, :]
        offs = _tile_offsets(offs_c, offs_s, HW, stride_n, stride_c, stride_hw)
        u = tl.load(x + offs, mask=ok, other=0.0).to(tl.float32) * scale[:, None] + offset[:, None]
        if HAS_RES:
            u += tl.load(residual + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y + offs, _activate(u, ACT).to(y.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _upstream_grad(dy, x, residual, offs, ok, scale, offset, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """du = dy * act'(u) on a tile, recomputing u = x * scale + offset + residual where act needs it."""
    g = tl.load(dy + offs, mask=ok, other=0.0).to(tl.float32)
    if ACT == "identity":
        return g
    else:
        u = tl.load(x + offs, mask=ok, other=0.0).to(tl.float32) * scale[:, None] + offset[:, None]
        if HAS_RES:
            u += tl.load(residual + offs, mask=ok, other=0.0).to(tl.float32)
        return _activation_grad(g, u, ACT)


@triton.jit
def _bn_backward_reduce_kernel(dy, x, residual, du_out, weight, bias, gate, mean, rstd, part,
                               C, HW, count, rows_per_chunk, stride_n, stride_c, stride_hw,
                               ACT: tl.constexpr, HAS_RES: tl.constexpr, STORE_DU: tl.constexpr,
                               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """part[0, chunk, c] = sum du, part[1, chunk, c] = sum du * xhat; du stored to du_out if STORE_DU."""
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mu = tl.load(mean + offs_c, mask=c_ok, other=0.0)
    inv_std = tl.load(rstd + offs_c, mask=c_ok, other=0.0)
    gamma = _per_channel(weight, offs_c, c_ok, 1.0, HAS_WEIGHT, BLOCK_C)
    w = _per_channel(gate, offs_c, c_ok, 1.0, HAS_GATE, BLOCK_C)
    scale = gamma * inv_std * w
    offset = (_per_channel(bias, offs_c, c_ok, 0.0, HAS_BIAS, BLOCK_C) - mu * gamma * inv_std) * w
    s1 = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    end = tl.minimum((chunk + 1) * rows_per_chunk, count)
    for s0 in range(chunk * rows_per_chunk, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = c_ok[:, None] & (offs_s < end)[None, :]
        offs = _tile_offsets(offs_c, offs_s, HW, stride_n, stride_c, stride_hw)
        du = _upstream_grad(dy, x, residual, offs, ok, scale, offset, ACT, HAS_RES)
        xhat = (tl.load(x + offs, mask=ok, other=0.0).to(tl.float32) - mu[:, None]) * inv_std[:, None]
        s1 += du
        s2 += du * xhat
        if STORE_DU:
            tl.store(du_out + offs, du.to(du_out.dtype.element_ty), mask=ok)
    tl.store(part + chunk * C + offs_c, tl.sum(s1, axis=1), mask=c_ok)
    tl.store(part + (n_chunks + chunk) * C + offs_c, tl.sum(s2, axis=1), mask=c_ok)


@triton.jit
def _bn_backward_apply_kernel(dy, x, residual, du_in, dx, weight, bias, gate, mean, rstd, part,
                              dweight, dbias, dgate, C, HW, count, rows_per_chunk, stride_n, stride_c, stride_hw,
                              ACT: tl.constexpr, TRAINING: tl.constexpr, HAS_RES: tl.constexpr,
                              DU_STORED: tl.constexpr, NEED_DX: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx from du and the per-channel totals; chunk 0 also writes dweight, dbias, dgate (fp32, (C,))."""
    chunk = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    s1, s2 = _chunk_totals(part, tl.num_programs(1), C, offs_c, c_ok, BLOCK_C)
    mu = tl.load(mean + offs_c, mask=c_ok, other=0.0)
    inv_std = tl.load(rstd + offs_c, mask=c_ok, other=0.0)
    gamma = _per_channel(weight, offs_c, c_ok, 1.0, HAS_WEIGHT, BLOCK_C)
    beta = _per_channel(bias, offs_c, c_ok, 0.0, HAS_BIAS, BLOCK_C)
    w = _per_channel(gate, offs_c, c_ok, 1.0, HAS_GATE, BLOCK_C)
    if chunk == 0:
        if HAS_WEIGHT:
            tl.store(dweight + offs_c, w * s2, mask=c_ok)
        if HAS_BIAS:
            tl.store(dbias + offs_c, w * s1, mask=c_ok)
        if HAS_GATE:
            tl.store(dgate + offs_c, gamma * s2 + beta * s1, mask=c_ok)
    if NEED_DX:
        scale = gamma * inv_std * w
        offset = (beta - mu * gamma * inv_std) * w
        mean_du = s1 / count
        mean_du_xhat = s2 / count
        end = tl.minimum((chunk + 1) * rows_per_chunk, count)
        for s0 in range(chunk * rows_per_chunk, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            ok = c_ok[:, None] & (offs_s < end)[None, :]
            offs = _tile_offsets(offs_c, offs_s, HW, stride_n, stride_c, stride_hw)
            if DU_STORED:
                du = tl.load(du_in + offs, mask=ok, other=0.0).to(tl.float32)
            else:
                du = _upstream_grad(dy, x, residual, offs, ok, scale, offset, ACT, HAS_RES)
            if TRAINING:  # the batch statistics depend on x: subtract their share of the gradient
                xhat = (tl.load(x + offs, mask=ok, other=0.0).to(tl.float32) - mu[:, None]) * inv_std[:, None]
                du = du - mean_du[:, None] - xhat * mean_du_xhat[:, None]
            tl.store(dx + offs, (du * scale[:, None]).to(dx.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _layout(x: torch.Tensor) -> Tuple[torch.Tensor, torch.memory_format, Tuple[int, int, int], int]:
    """x in a layout the kernels read without copying (NCHW-contiguous or channels_last), its memory format,
    (stride_n, stride_c, stride_hw) of the (N, C, HW) view, and HW."""
    if x.dim() < 2:
        raise ValueError(f"expected (N, C, *spatial), got shape {tuple(x.shape)}")
    c, hw = x.shape[1], math.prod(x.shape[2:])
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last, (hw * c, 1, c), hw
    x = x.contiguous()
    return x, torch.contiguous_format, (c * hw, hw, 1), hw


def _blocks(c: int, stride_c: int, interpreted: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_S): long runs along whichever of channels / positions is contiguous in memory."""
    elems = 2048 if interpreted else 4096
    if stride_c == 1:  # channels_last: channels are contiguous
        block_c = min(64, triton.next_power_of_2(max(c, 1)))
    else:
        block_c = min(16 if interpreted else 4, triton.next_power_of_2(max(c, 1)))
    return block_c, elems // block_c


def _chunking(count: int, c_blocks: int, block_s: int, device: torch.device) -> Tuple[int, int]:
    """(rows_per_chunk, n_chunks): enough programs to fill the device, each chunk a multiple of BLOCK_S."""
    chunks = max(1, min(triton.cdiv(count, block_s), triton.cdiv(4 * sm_count(device), c_blocks)))
    rows = triton.cdiv(triton.cdiv(count, chunks), block_s) * block_s
    return rows, triton.cdiv(count, rows)


def _check_activation(activation: Optional[str]) -> str:
    activation = "identity" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def bn_gate_act_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                        gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                        activation: Optional[str] = "relu", momentum: float = 0.1, eps: float = 1e-5,
                        training: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward pass; updates the running statistics in place when training.

    Args:
        x: (N, C, *spatial). weight, bias, gate, running_mean, running_var: (C,) or None. residual: like x
            or None. activation: "relu" | "hardswish" | "identity" (None = identity).
        momentum: a float (the cumulative-average mode ``momentum=None`` is the caller's to resolve).
    Returns:
        y (like x, same memory format), mean (C,) fp32, rstd (C,) fp32 (what normalised x).
    """
    activation = _check_activation(activation)
    check_runnable(x, weight, bias, gate, residual, running_mean, running_var)
    if momentum is None:
        raise ValueError("momentum=None (cumulative average) is not supported: pass the factor as a float")
    x, fmt, (sn, sc, shw), hw = _layout(x)
    n, c = x.shape[:2]
    count = n * hw
    if x.numel() >= 2 ** 31:
        raise ValueError("tensors of 2**31 elements or more are not supported (32-bit offsets)")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        residual = residual.contiguous(memory_format=fmt)
    y = torch.empty_like(x, memory_format=fmt)
    mean = torch.empty(c, device=x.device, dtype=torch.float32)
    rstd = torch.empty(c, device=x.device, dtype=torch.float32)
    if training:
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(x.shape)}")
    else:
        if running_mean is None or running_var is None:
            raise ValueError("eval mode needs running_mean and running_var")
        mean.copy_(running_mean)
        rstd.copy_(torch.rsqrt(running_var.float() + eps))
    if c == 0 or count == 0:
        return y, mean, rstd
    block_c, block_s = _blocks(c, sc, INTERPRETED)
    c_blocks = triton.cdiv(c, block_c)
    rows, chunks = _chunking(count, c_blocks, block_s, x.device)
    part = torch.empty((2, chunks, c), device=x.device, dtype=torch.float32)
    unused = torch.empty(0, device=x.device, dtype=torch.float32)
    layout = (c, hw, count, rows, sn, sc, shw)
    if training:
        _bn_stats_kernel[(c_blocks, chunks)](x, part, *layout, BLOCK_C=block_c, BLOCK_S=block_s)
    update = training and running_mean is not None and running_var is not None
    opt = lambda t: t if t is not None else unused  # noqa: E731
    _bn_forward_kernel[(c_blocks, chunks)](
        x, opt(residual), y, opt(weight), opt(bias), opt(gate), part, mean, rstd,
        running_mean if update else unused, running_var if update else unused, *layout,
        float(momentum), float(eps), ACT=activation, TRAINING=training, UPDATE_RUNNING=update,
        HAS_RES=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, BLOCK_C=block_c, BLOCK_S=block_s)
    return y, mean, rstd


def bn_gate_act_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                         activation: Optional[str], training: bool, needs: Tuple[bool, bool, bool, bool, bool]
                         ) -> List[Optional[torch.Tensor]]:
    """Gradients ``[dx, dweight, dbias, dgate, dresidual]`` (None where ``needs`` is False).

    Args:
        dy: like x. mean, rstd: what :func:`bn_gate_act_forward` returned. needs: which of
            (x, weight, bias, gate, residual) need a gradient.
    """
    activation = _check_activation(activation)
    x, fmt, (sn, sc, shw), hw = _layout(x)
    dy = dy.contiguous(memory_format=fmt)
    residual = residual.contiguous(memory_format=fmt) if residual is not None else None
    n, c = x.shape[:2]
    count = n * hw
    need_dx, need_dw, need_db, need_dg, need_dr = needs
    f32 = dict(device=x.device, dtype=torch.float32)
    dweight, dbias, dgate = torch.empty(c, **f32), torch.empty(c, **f32), torch.empty(c, **f32)
    # With a residual, du is the residual's gradient: store it in pass 1 and read it back in pass 2 (one
    # tensor) instead of re-reading dy and the residual. With identity, du is dy itself.
    store_du = residual is not None and activation != "identity"
    du = torch.empty_like(x, memory_format=fmt) if store_du else None
    dx = torch.empty_like(x, memory_format=fmt) if need_dx else None
    if c > 0 and count > 0:
        block_c, block_s = _blocks(c, sc, INTERPRETED)
        c_blocks = triton.cdiv(c, block_c)
        rows, chunks = _chunking(count, c_blocks, block_s, x.device)
        part = torch.empty((2, chunks, c), **f32)
        unused = torch.empty(0, **f32)
        opt = lambda t: t if t is not None else unused  # noqa: E731
        layout = (c, hw, count, rows, sn, sc, shw)
        params = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_GATE=gate is not None,
                      BLOCK_C=block_c, BLOCK_S=block_s)
        _bn_backward_reduce_kernel[(c_blocks, chunks)](
            dy, x, opt(residual), opt(du), opt(weight), opt(bias), opt(gate), mean, rstd, part, *layout,
            ACT=activation, HAS_RES=residual is not None, STORE_DU=store_du, **params)
        _bn_backward_apply_kernel[(c_blocks, chunks)](
            dy, x, opt(residual), opt(du), opt(dx), opt(weight), opt(bias), opt(gate), mean, rstd, part,
            dweight, dbias, dgate, *layout, ACT=activation, TRAINING=training, HAS_RES=residual is not None,
            DU_STORED=store_du, NEED_DX=need_dx, **params)
    else:
        for t in (dweight, dbias, dgate):
            t.zero_()
        if dx is not None:
            dx.zero_()
        if du is not None:
            du.zero_()
    dres = None
    if need_dr and residual is not None:
        dres = du if store_du else (dy if activation == "identity" else None)
    cast = lambda g, p: g.to(p.dtype) if (g is not None and p is not None) else None  # noqa: E731
    return [dx, cast(dweight, weight) if need_dw else None, cast(dbias, bias) if need_db else None,
            cast(dgate, gate) if need_dg else None, dres]


class BnGateActFunction(torch.autograd.Function):
    """``apply(x, weight, bias, running_mean, running_var, gate, residual, activation, momentum, eps,
    training) -> y``; the running statistics are updated in place (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, gate, residual, activation, momentum, eps,
                training):
        y, mean, rstd = bn_gate_act_forward(x, weight, bias, running_mean, running_var, gate, residual,
                                            activation, momentum, eps, training)
        ctx.activation, ctx.training = activation, training
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, weight, bias, gate, residual, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, gate, residual, mean, rstd = ctx.saved_tensors
        n = ctx.needs_input_grad
        dx, dweight, dbias, dgate, dres = bn_gate_act_backward(
            dy, x, weight, bias, gate, residual, mean, rstd, ctx.activation, ctx.training,
            (n[0], n[1], n[2], n[5], n[6]))
        return dx, dweight, dbias, None, None, dgate, dres, None, None, None, None


def bn_gate_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                activation: Optional[str] = "relu", momentum: float = 0.1, eps: float = 1e-5,
                training: bool = True) -> torch.Tensor:
    """y = act(batch_norm(x) * gate + residual), differentiable, one reduction pass and one elementwise
    pass per direction.

    Args:
        x: (N, C, *spatial), NCHW-contiguous or channels_last (kept as is; other layouts are copied).
        weight, bias: BN's affine parameters (C,) or None. running_mean, running_var: (C,) or None; updated
            in place when training, like ``F.batch_norm``. gate: (C,) soft-path keep-probabilities or None
            (the hard path). residual: like x or None. activation: "relu" | "hardswish" | "identity".
    Returns:
        y, same shape, dtype and memory format as x (fp32 arithmetic inside).

    Under ``torch.autocast`` nothing is cast, as autocast leaves ``F.batch_norm``: x may be bf16 (a convolution's
    autocast output) while the parameters and running statistics stay fp32; statistics are computed and kept
    in fp32, y has x's dtype and every gradient its input's dtype.
    """
    return BnGateActFunction.apply(x, weight, bias, running_mean, running_var, gate, residual, activation,
                                   momentum, eps, training)


def bn_gate_act_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                          gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                          activation: Optional[str] = "relu", momentum: float = 0.1, eps: float = 1e-5,
                          training: bool = True) -> torch.Tensor:
    """Pure-PyTorch :func:`bn_gate_act` (F.batch_norm, multiply, add, activation)."""
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
    """The four kernels in bf16 and fp32, NCHW (unit position stride) and channels_last (unit channel
    stride), with gate, residual and hardswish (the most code), as the launcher would specialise them."""
    out: List[AotVariant] = []
    for dt in ("bf16", "fp32"):
        for layout, unit in (("nchw", "stride_hw"), ("nhwc", "stride_c")):
            block_c, block_s = _blocks(64, 1 if layout == "nhwc" else 4096, interpreted=False)
            ints = {k: "i32" for k in ("C", "HW", "count", "rows_per_chunk", "stride_n", "stride_c",
                                       "stride_hw") if k != unit}
            blocks = {unit: 1, "BLOCK_C": block_c, "BLOCK_S": block_s}
            flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_GATE=True)
            tag = f"{dt}_{layout}"
            out.append(AotVariant(f"bn_stats_{tag}", _bn_stats_kernel, dict(x=f"*{dt}", part="*fp32", **ints),
                                  blocks, num_warps=4, num_stages=1))
            out.append(AotVariant(
                f"bn_forward_{tag}", _bn_forward_kernel,
                dict(x=f"*{dt}", residual=f"*{dt}", y=f"*{dt}", weight="*fp32", bias="*fp32", gate="*fp32",
                     part="*fp32", mean="*fp32", rstd="*fp32", running_mean="*fp32", running_var="*fp32",
                     momentum="fp32", eps="fp32", **ints),
                dict(ACT="hardswish", TRAINING=True, UPDATE_RUNNING=True, HAS_RES=True, **flags, **blocks),
                num_warps=4, num_stages=1))
            out.append(AotVariant(
                f"bn_backward_reduce_{tag}", _bn_backward_reduce_kernel,
                dict(dy=f"*{dt}", x=f"*{dt}", residual=f"*{dt}", du_out=f"*{dt}", weight="*fp32",
                     bias="*fp32", gate="*fp32", mean="*fp32", rstd="*fp32", part="*fp32", **ints),
                dict(ACT="hardswish", HAS_RES=True, STORE_DU=True, **flags, **blocks), num_warps=4,
                num_stages=1))
            out.append(AotVariant(
                f"bn_backward_apply_{tag}", _bn_backward_apply_kernel,
                dict(dy=f"*{dt}", x=f"*{dt}", residual=f"*{dt}", du_in=f"*{dt}", dx=f"*{dt}", weight="*fp32",
                     bias="*fp32", gate="*fp32", mean="*fp32", rstd="*fp32", part="*fp32", dweight="*fp32",
                     dbias="*fp32", dgate="*fp32", **ints),
                dict(ACT="hardswish", TRAINING=True, HAS_RES=True, DU_STORED=True, NEED_DX=True, **flags,
                     **blocks), num_warps=4, num_stages=1))
    return out
