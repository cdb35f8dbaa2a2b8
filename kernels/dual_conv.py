"""Dual convolution over a shared input: the soft and the hard path of one ``nn.Conv2d`` whose input is the
same tensor on both paths (the stem sees the same image twice).

    z      = conv2d(x, W, b)                      (N, C_out, Ho, Wo), any stride / padding / dilation, groups=1
    y_soft = z * gate[c]                          all C_out channels
    y_hard = z[:, kept_out]                       (N, N_h, Ho, Wo), compact

Because the input is shared, the hard output is a channel subset of z: one implicit-GEMM pass reads the
input once and its epilogue writes both outputs (the hard path costs no extra FLOPs and no extra input
traffic). The GEMM runs in NHWC: rows are output pixels (N*Ho*Wo), columns output channels, and the
reduction runs over (kh, kw, c_in) flattened, so a small C_in (3 for an image) wastes little of a K tile.
Outputs come back as NCHW-shaped tensors in channels_last memory (what the GEMM writes, no copy).

Backward (the merge in Triton, the convolutions in torch):
    dz = dy_soft * gate + scatter(dy_hard into kept_out)      both paths meet in one gradient of z
    dgate = sum_{n,h,w} dy_soft * z,  db = sum_{n,h,w} dz     -> one Triton pass over dy_soft / dy_hard / z
    dx = conv2d_input(dz), dW = conv2d_weight(x, dz)          -> torch.nn.grad (cuDNN on a GPU)
Once the two paths' gradients are merged, what is left is exactly one dense convolution backward: there is
no pruned work for a custom kernel to skip, and cuDNN's tuned kernels (channels_last, bf16) are the fast
choice for it.
With ``weight_grad=False`` (the mask-only backward) conv2d_weight and the bias sum are skipped.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (INTERPRETED, WIDEN_DOT_OPERANDS, AotVariant, KeptSet, autocast_dtype, autocast_operands,
                      check_runnable, config_variants, configs, dot_precision, kept_count, kept_index, mma,
                      sm_count)

__all__ = ["dual_conv", "dual_conv_reference", "dual_conv_forward", "dual_conv_backward", "DualConvFunction"]

IntPair = Union[int, Sequence[int]]

_CONV_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_CONV_INTERPRETER_CONFIG = triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 4})


@triton.jit
def _grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(m-tile, n-tile) in groups of GROUP_M row tiles, so that neighbouring programs share input rows
    and weight columns in L2 (the Triton matmul tutorial's order)."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _hard_position(hard_pos, offs_n, n_ok, N_h, GATHER_OUT: tl.constexpr):
    """Column of each output channel in the compact hard output, -1 for a pruned channel."""
    if GATHER_OUT:
        return tl.load(hard_pos + offs_n, mask=n_ok, other=-1)
    else:
        return tl.where(offs_n < N_h, offs_n, -1)


@triton.autotune(configs=configs(_CONV_GPU_CONFIGS, _CONV_INTERPRETER_CONFIG), key=["M", "C_out", "K_total"])
@triton.jit
def _dual_conv_fwd_kernel(
        x, wmat, bias, gate, hard_pos, y_soft, y_hard, preact,
        M, C_out, K_total, N_h, C_in, H, W, Ho, Wo, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, STORE_PREACT: tl.constexpr, GATHER_OUT: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """x: NHWC (N, H, W, C_in). wmat: (C_out, KH*KW*C_in), k = (kh*KW + kw)*C_in + c. y_soft, preact:
    (M, C_out) = NHWC output rows. y_hard: (M, N_h). hard_pos: (C_out,) compact column or -1."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(C_out, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < C_out

    # Output pixel -> image and the top-left input pixel its receptive field starts at.
    wo = offs_m % Wo
    ho = (offs_m // Wo) % Ho
    image = offs_m // (Wo * Ho)
    h0 = ho * stride_h - pad_h
    w0 = wo * stride_w - pad_w
    row_base = image * (H * W * C_in)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K_total, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K_total
        c = k % C_in  # reduction index -> (kernel row, kernel column, input channel)
        tap = k // C_in
        h = h0[:, None] + (tap // KW)[None, :] * dil_h
        w = w0[:, None] + (tap % KW)[None, :] * dil_w
        in_image = (h >= 0) & (h < H) & (w >= 0) & (w < W)  # zero padding = masked load
        a = tl.load(x + row_base[:, None] + (h * W + w) * C_in + c[None, :],
                    mask=m_ok[:, None] & k_ok[None, :] & in_image, other=0.0)
        b = tl.load(wmat + offs_n[None, :] * K_total + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, WIDEN)

    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if STORE_PREACT:
        tl.store(preact + offs_m[:, None] * C_out + offs_n[None, :], acc.to(preact.dtype.element_ty), mask=out_ok)
    # Hard output first: it is the pre-gate value of the kept channels.
    pos = _hard_position(hard_pos, offs_n, n_ok, N_h, GATHER_OUT)
    tl.store(y_hard + offs_m[:, None] * N_h + pos[None, :], acc.to(y_hard.dtype.element_ty),
             mask=m_ok[:, None] & (pos >= 0)[None, :])
    if HAS_GATE:
        acc *= tl.load(gate + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_soft + offs_m[:, None] * C_out + offs_n[None, :], acc.to(y_soft.dtype.element_ty), mask=out_ok)


@triton.jit
def _conv_grad_merge_kernel(
        dy_soft, dy_hard, preact, gate, hard_pos, dz, gate_part, bias_part,
        M, C_out, N_h, rows_per_chunk,
        HAS_SOFT: tl.constexpr, HAS_HARD: tl.constexpr, HAS_GATE: tl.constexpr, GATE_GRAD: tl.constexpr,
        BIAS_GRAD: tl.constexpr, GATHER_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = dy_soft * gate + scatter(dy_hard), all (M, C_out) NHWC rows except dy_hard (M, N_h).
    Per row chunk: gate_part[chunk, c] = sum dy_soft * z, bias_part[chunk, c] = sum dz."""
    chunk = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C_out
    if HAS_GATE:
        g = tl.load(gate + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_HARD:
        pos = _hard_position(hard_pos, offs_c, c_ok, N_h, GATHER_OUT)
    gate_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    bias_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_end = tl.minimum((chunk + 1) * rows_per_chunk, M)
    for m0 in range(chunk * rows_per_chunk, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ok = (offs_m < row_end)[:, None] & c_ok[None, :]
        grad = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        if HAS_SOFT:
            grad = tl.load(dy_soft + offs_m[:, None] * C_out + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
            if GATE_GRAD:
                z = tl.load(preact + offs_m[:, None] * C_out + offs_c[None, :], mask=ok, other=0.0)
                gate_sum += tl.sum(grad * z.to(tl.float32), axis=0)
            if HAS_GATE:
                grad *= g[None, :]
        if HAS_HARD:
            hard_ok = ok & (pos >= 0)[None, :]
            grad += tl.load(dy_hard + offs_m[:, None] * N_h + pos[None, :], mask=hard_ok, other=0.0).to(tl.float32)
        bias_sum += tl.sum(grad, axis=0)
        tl.store(dz + offs_m[:, None] * C_out + offs_c[None, :], grad.to(dz.dtype.element_ty), mask=ok)
    if GATE_GRAD:
        tl.store(gate_part + chunk * C_out + offs_c, gate_sum, mask=c_ok)
    if BIAS_GRAD:
        tl.store(bias_part + chunk * C_out + offs_c, bias_sum, mask=c_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers, autograd, reference
# ----------------------------------------------------------------------------------------------------------
def _pair(v: IntPair) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _nhwc_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) row-major view of its channels_last copy (no copy if already so)."""
    n, c, h, w = t.shape
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * w, c)


def _nchw_view(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, C) rows -> NCHW-shaped tensor with channels_last strides (a view)."""
    return rows.view(n, h, w, rows.shape[1]).permute(0, 3, 1, 2)


def _hard_positions(kept_out: KeptSet, c_out: int, device: torch.device) -> Optional[torch.Tensor]:
    """Inverse of an index set: pos[c] = column of channel c in the compact output, -1 if pruned (no sync)."""
    if isinstance(kept_out, int):
        return None
    pos = torch.full((c_out,), -1, device=device, dtype=torch.int32)
    pos[kept_out.long()] = torch.arange(kept_out.numel(), device=device, dtype=torch.int32)
    return pos


def dual_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      gate: Optional[torch.Tensor], kept_out: Optional[KeptSet], stride: IntPair = 1,
                      padding: IntPair = 0, dilation: IntPair = 1, store_preact: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One implicit-GEMM launch for both paths.

    Args:
        x: (N, C_in, H, W), any memory format. weight: (C_out, C_in, KH, KW). bias, gate: (C_out,) or None.
        kept_out: index tensor, prefix length or None (all). store_preact: also return z (for dgate).
    Returns:
        y_soft (N, C_out, Ho, Wo), y_hard (N, N_h, Ho, Wo), z or None: channels_last memory, input dtype.
    """
    check_runnable(x, weight, bias, gate)
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    n, c_in, h, w = x.shape
    c_out, c_in_w, kh, kw = weight.shape
    if c_in_w != c_in:
        raise ValueError(f"weight expects {c_in_w} input channels (groups=1), input has {c_in}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if x.numel() >= 2 ** 31 or n * ho * wo * c_out >= 2 ** 31:
        raise ValueError("tensors of 2**31 elements or more are not supported (32-bit offsets)")
    n_h = kept_count(kept_out, c_out)
    kept = c_out if kept_out is None else kept_out
    m = n * ho * wo
    new = dict(device=x.device, dtype=x.dtype)
    y_soft, y_hard = torch.empty((m, c_out), **new), torch.empty((m, n_h), **new)
    z = torch.empty((m, c_out), **new) if store_preact else None
    if m > 0 and c_out > 0:
        x_rows = x.contiguous(memory_format=torch.channels_last)
        wmat = weight.permute(0, 2, 3, 1).reshape(c_out, kh * kw * c_in).contiguous()
        pos = _hard_positions(kept, c_out, x.device)
        unused = torch.empty(0, device=x.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(c_out, meta["BN"]),)  # noqa: E731
        _dual_conv_fwd_kernel[grid](
            x_rows, wmat, bias if bias is not None else unused, gate if gate is not None else unused,
            pos if pos is not None else unused, y_soft, y_hard, z if z is not None else unused,
            m, c_out, kh * kw * c_in, n_h, c_in, h, w, ho, wo, kw, sh, sw, ph, pw, dh, dw,
            HAS_BIAS=bias is not None, HAS_GATE=gate is not None, STORE_PREACT=store_preact,
            GATHER_OUT=pos is not None, PRECISION=dot_precision(x.dtype), WIDEN=WIDEN_DOT_OPERANDS)
    return (_nchw_view(y_soft, n, ho, wo), _nchw_view(y_hard, n, ho, wo),
            _nchw_view(z, n, ho, wo) if z is not None else None)


def _merge_grads(dy_soft: Optional[torch.Tensor], dy_hard: Optional[torch.Tensor], z: Optional[torch.Tensor],
                 gate: Optional[torch.Tensor], kept_out: KeptSet, shape: Tuple[int, int, int, int],
                 gate_grad: bool, bias_grad: bool
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dz NCHW-shaped channels_last, dgate (C,) fp32 or None, dbias (C,) fp32 or None) in one pass."""
    n, c_out, ho, wo = shape
    m = n * ho * wo
    ref = dy_soft if dy_soft is not None else dy_hard
    n_h = kept_count(kept_out, c_out)
    dz = torch.empty((m, c_out), device=ref.device, dtype=ref.dtype)
    block_c = min(64, triton.next_power_of_2(max(c_out, 1)))
    block_m = 64 if INTERPRETED else max(16, 4096 // block_c)
    tiles_c = triton.cdiv(c_out, block_c)
    chunks = max(1, min(triton.cdiv(m, block_m), triton.cdiv(4 * sm_count(ref.device), tiles_c)))
    rows_per_chunk = triton.cdiv(triton.cdiv(m, chunks), block_m) * block_m
    chunks = triton.cdiv(m, rows_per_chunk) if m > 0 else 0
    part = torch.empty((2, chunks, c_out), device=ref.device, dtype=torch.float32)
    unused = torch.empty(0, device=ref.device, dtype=torch.float32)
    pos = _hard_positions(kept_out, c_out, ref.device)
    if chunks > 0 and c_out > 0:
        _conv_grad_merge_kernel[(chunks, tiles_c)](
            _nhwc_rows(dy_soft) if dy_soft is not None else unused,
            _nhwc_rows(dy_hard) if dy_hard is not None else unused,
            _nhwc_rows(z) if gate_grad else unused, gate if gate is not None else unused,
            pos if pos is not None else unused, dz, part[0], part[1], m, c_out, n_h, rows_per_chunk,
            HAS_SOFT=dy_soft is not None, HAS_HARD=dy_hard is not None and n_h > 0, HAS_GATE=gate is not None,
            GATE_GRAD=gate_grad, BIAS_GRAD=bias_grad, GATHER_OUT=pos is not None, BLOCK_M=block_m,
            BLOCK_C=block_c)
    return (_nchw_view(dz, n, ho, wo), part[0].sum(0) if gate_grad else None,
            part[1].sum(0) if bias_grad else None)


def dual_conv_backward(dy_soft: Optional[torch.Tensor], dy_hard: Optional[torch.Tensor], x: torch.Tensor,
                       weight: torch.Tensor, has_bias: bool, gate: Optional[torch.Tensor],
                       preact: Optional[torch.Tensor], kept_out: Optional[KeptSet], stride: IntPair,
                       padding: IntPair, dilation: IntPair, needs: Tuple[bool, bool, bool, bool]
                       ) -> List[Optional[torch.Tensor]]:
    """Gradients ``[dx, dweight, dbias, dgate]``, None where not needed; dbias in fp32 (the bias's own dtype
    is the caller's: it need not be the weight's).

    Args:
        dy_soft: (N, C_out, Ho, Wo) or None (zero). dy_hard: (N, N_h, Ho, Wo) or None. preact: z, needed for
            the gate gradient. needs: which of (x, weight, bias, gate) need a gradient.
    """
    need_dx, need_dw, need_db, need_dg = needs
    need_db, need_dg = need_db and has_bias, need_dg and gate is not None and dy_soft is not None
    if dy_soft is None and dy_hard is None:
        return [None] * 4
    ref = dy_soft if dy_soft is not None else dy_hard
    shape = (ref.shape[0], weight.shape[0], ref.shape[2], ref.shape[3])
    kept = weight.shape[0] if kept_out is None else kept_out
    dz, dgate, db = _merge_grads(dy_soft, dy_hard, preact, gate, kept, shape, need_dg, need_db)
    conv = dict(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation))
    dx = torch.nn.grad.conv2d_input(x.shape, weight, dz, **conv) if need_dx else None
    dw = torch.nn.grad.conv2d_weight(x, weight.shape, dz, **conv) if need_dw else None
    if dgate is None and needs[3] and gate is not None:
        dgate = torch.zeros_like(gate, dtype=torch.float32)  # no soft gradient: the gate did not matter
    return [dx, dw, db, dgate.to(gate.dtype) if dgate is not None else None]


class DualConvFunction(torch.autograd.Function):
    """``apply(x, weight, bias, gate, kept_out, stride, padding, dilation) -> (y_soft, y_hard)``. Weight and
    bias get gradients only if they require grad (pass them detached for the mask-only backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, kept_out, stride, padding, dilation):
        need_gate_grad = gate is not None and ctx.needs_input_grad[3]
        y_soft, y_hard, z = dual_conv_forward(x, weight, bias, gate, kept_out, stride, padding, dilation,
                                              store_preact=need_gate_grad)
        ctx.set_materialize_grads(False)
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.prefix = kept_out if not isinstance(kept_out, torch.Tensor) else None
        index = [kept_out] if isinstance(kept_out, torch.Tensor) else []
        ctx.save_for_backward(x, weight, gate, z, *index)
        return y_soft, y_hard

    @staticmethod
    def backward(ctx, dy_soft, dy_hard):
        x, weight, gate, z, *index = ctx.saved_tensors
        kept = index[0] if index else ctx.prefix
        grads = dual_conv_backward(dy_soft, dy_hard, x, weight, ctx.has_bias, gate, z, kept, *ctx.conv,
                                   needs=tuple(ctx.needs_input_grad[:4]))
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.bias_dtype)
        return (*grads, None, None, None, None)


def dual_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              gate: Optional[torch.Tensor] = None, kept_out: Optional[KeptSet] = None, stride: IntPair = 1,
              padding: IntPair = 0, dilation: IntPair = 1, weight_grad: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft and hard path of a conv on a shared input, one read of the input (differentiable).

    Args:
        x: (N, C_in, H, W). weight: (C_out, C_in, KH, KW) (groups=1). bias: (C_out,) or None.
        gate: (C_out,) soft-path keep-probabilities or None. kept_out: the hard path's output channels: an
            int32/int64 index tensor (unique entries), an int k (prefix 0..k-1) or None (all).
        weight_grad: False gives the mask-only backward (gradients reach x and gate only).
    Returns:
        y_soft = conv(x, W, b) * gate (N, C_out, Ho, Wo) and y_hard = conv(x, W, b)[:, kept_out]
        (N, N_h, Ho, Wo), channels_last memory, input dtype (fp32 accumulation).

    Under ``torch.autocast`` on the input's device it computes as autocast runs ``F.conv2d``: x and weight
    cast to the autocast dtype (the weight's gradient returns through the cast in its own dtype), outputs in
    that dtype. Bias and gate stay as given: the kernels read them in fp32 either way.
    """
    if not weight_grad:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
    x, weight = autocast_operands(autocast_dtype(x.device), x, weight)
    return DualConvFunction.apply(x, weight, bias, gate, kept_out, stride, padding, dilation)


def dual_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        gate: Optional[torch.Tensor] = None, kept_out: Optional[KeptSet] = None,
                        stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                        weight_grad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch :func:`dual_conv`: two convolutions, the hard one with the sliced weight."""
    if not weight_grad:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
    conv = dict(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation))
    z = F.conv2d(x, weight, bias, **conv)
    y_soft = z * gate.view(1, -1, 1, 1) if gate is not None else z
    kept = kept_index(kept_out, weight.shape[0], weight.device)
    if kept.numel() == 0:  # conv2d rejects an empty weight
        return y_soft, z[:, kept]
    y_hard = F.conv2d(x, weight[kept], bias[kept] if bias is not None else None, **conv)
    return y_soft, y_hard


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time specialisations
# ----------------------------------------------------------------------------------------------------------
def aot_variants() -> List[AotVariant]:
    """The GPU specialisations of this file: the forward GEMM in bf16 and fp32 (TF32), every config with
    an index set and the largest config with a prefix, and the gradient merge pass."""
    out: List[AotVariant] = []
    ints = {k: "i32" for k in ("M", "C_out", "K_total", "N_h", "C_in", "H", "W", "Ho", "Wo", "KW", "stride_h",
                               "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")}
    for dt in ("bf16", "fp32"):
        ptrs = dict(x=f"*{dt}", wmat=f"*{dt}", bias="*fp32", gate="*fp32", hard_pos="*i32", y_soft=f"*{dt}",
                    y_hard=f"*{dt}", preact=f"*{dt}")
        for gather in (False, True):  # every config with an index set, the largest with a prefix
            out += config_variants(
                f"dual_conv_fwd_{dt}_{'gathered' if gather else 'prefix'}", _dual_conv_fwd_kernel,
                {**ptrs, **ints},
                dict(HAS_BIAS=True, HAS_GATE=True, STORE_PREACT=True, GATHER_OUT=gather, PRECISION="tf32",
                     WIDEN=False), _CONV_GPU_CONFIGS if gather else _CONV_GPU_CONFIGS[:1],
                aligned=("C_out", "K_total", "C_in"), uses_dot=True)
        out.append(AotVariant(
            f"dual_conv_grad_merge_{dt}", _conv_grad_merge_kernel,
            dict(dy_soft=f"*{dt}", dy_hard=f"*{dt}", preact=f"*{dt}", gate="*fp32", hard_pos="*i32",
                 dz=f"*{dt}", gate_part="*fp32", bias_part="*fp32", M="i32", C_out="i32", N_h="i32",
                 rows_per_chunk="i32"),
            dict(HAS_SOFT=True, HAS_HARD=True, HAS_GATE=True, GATE_GRAD=True, BIAS_GRAD=True, GATHER_OUT=True,
                 BLOCK_M=64, BLOCK_C=64), num_warps=4, num_stages=1, aligned=("C_out", "rows_per_chunk")))
    return out
