"""Dual linear layer: the soft and the hard path of one ``nn.Linear`` in one launch.

Forward, for a weight ``W`` (N, K), bias ``b`` (N,), gate ``w`` (N,) and kept sets ``kept_in`` (K_h
entries) and ``kept_out`` (N_h entries):

    y_soft = (x_soft @ W^T + b) * w                                  (M, N)
    y_hard = x_hard @ W[kept_out][:, kept_in]^T + b[kept_out]        (M_h, N_h), x_hard is (M_h, K_h)

Both problems are tiles of one generic "dual GEMM" kernel, ``C = A @ B^T`` with B read through an index
set on the hard side, so the hard problem only visits kept input channels (its reduction gathers
``kept_in``) and kept output tiles (its tile grid is sized by N_h). Tiles are launched weight-block-major:
for output block j, every soft tile and then every hard tile of that block run next to each other, so a
weight block read by the soft tiles is still in L2 when the hard tiles read it (exactly the same rows for
prefix kept sets, the usual case: channels are kept in importance order).

Backward (every GEMM in Triton; O(N) sums and dtype casts in torch):
    dz      = dy_soft * w                                  gradient of the pre-gate output z = x W^T + b
    dx_soft = dz @ W,   dx_hard = dy_hard @ W[kept_out][:, kept_in]
                        -> the same dual GEMM kernel, B transposed, the gate applied to A on load
    dgate   = sum_m dy_soft * z                            -> fused into the dx launch (z saved in forward)
    dW      = dz^T x_soft  +  scatter(dy_hard^T x_hard into rows kept_out, columns kept_in)
    db      = sum_m dz     +  scatter(sum_m dy_hard into kept_out)
                        -> one weight-gradient launch over soft and hard tiles; each adds its tile into a
                           zeroed fp32 buffer. Every element receives at most two additions (one soft, one
                           hard), and a + b == b + a in floating point, so the result does not depend on the
                           order the tiles finish in.
With ``weight_grad=False`` (the mask-only backward) the weight-gradient launch is skipped: only input
gradients and the gate gradient are computed, and weight and bias are treated as constants.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (WIDEN_DOT_OPERANDS, AotVariant, KeptSet, autocast_dtype, autocast_operands, check_runnable,
                      config_variants, configs, dot_precision, kept_count, kept_index, mma)

__all__ = ["dual_linear", "dual_linear_reference", "dual_linear_forward", "dual_linear_backward",
           "DualLinearFunction"]

# Tile configs for 16-bit operands; fp32 operands (TF32 or exact) halve the reduction step BR, since each
# element takes twice the shared memory and registers (the full step spills on sm_90).
_FORWARD_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BJ": 128, "BR": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BJ": 128, "BR": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BJ": 64, "BR": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BJ": 64, "BR": 64}, num_warps=4, num_stages=3),
]
# The input-gradient tiles scale A by the gate in registers, which costs registers: 64x128 tiles need 8 warps.
_INPUT_GRAD_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BJ": 128, "BR": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BJ": 128, "BR": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BJ": 64, "BR": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BJ": 64, "BR": 64}, num_warps=4, num_stages=3),
]
_GEMM_INTERPRETER_CONFIG = triton.Config({"BM": 64, "BJ": 64, "BR": 32})


def _fit_to_dtype(gpu_configs: List[triton.Config], element_size: int) -> List[triton.Config]:
    """The configs for operands of ``element_size`` bytes: BR halved for 4-byte operands."""
    if element_size < 4:
        return list(gpu_configs)
    return [triton.Config({**c.kwargs, "BR": c.kwargs["BR"] // 2}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in gpu_configs]


def _prune_for_dtype(configs_: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    return _fit_to_dtype(configs_, named_args["a_soft"].element_size())


# ----------------------------------------------------------------------------------------------------------
# Forward and input-gradient kernel: C[m, j] = sum_r A[m, r] * B[j, r] for a soft and a hard problem.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(pid, tiles_m_soft, tiles_m_hard, tiles_j_hard):
    """(is_hard, m-tile, j-tile) of program ``pid`` in weight-block-major order.

    Blocks j < tiles_j_hard hold tiles_m_soft soft tiles followed by tiles_m_hard hard tiles; the remaining
    blocks (output channels past the hard width) hold soft tiles only.
    """
    per_block = tiles_m_soft + tiles_m_hard
    shared_tiles = tiles_j_hard * per_block
    if pid < shared_tiles:
        pid_j = pid // per_block
        r = pid % per_block
        is_hard = r >= tiles_m_soft
        pid_m = tl.where(is_hard, r - tiles_m_soft, r)
    else:
        q = pid - shared_tiles
        pid_j = tiles_j_hard + q // tiles_m_soft
        pid_m = q % tiles_m_soft
        is_hard = False
    return is_hard, pid_m, pid_j


@triton.jit
def _original_index(idx_ptr, pos, n_valid, GATHER: tl.constexpr):
    """Channel indices of compact positions ``pos``: idx[pos] for an index set, pos itself for a prefix."""
    if GATHER:
        return tl.load(idx_ptr + pos, mask=pos < n_valid, other=0).to(tl.int32)
    else:
        return pos


@triton.jit
def _gemm_tile(a_ptr, stride_am, offs_m, m_ok, b_ptr, stride_bj, stride_br, b_j, j_ok,
               n_red, idx_r_ptr, gate_ptr,
               GATHER_R: tl.constexpr, GATE_IN: tl.constexpr,
               BM: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr,
               PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """acc[m, j] = sum over compact r < n_red of A[m, r] * (gate[r_orig]) * B[b_j, r_orig] (fp32)."""
    acc = tl.zeros((BM, BJ), dtype=tl.float32)
    offs_r = tl.arange(0, BR)
    for r0 in range(0, n_red, BR):
        r = r0 + offs_r
        r_ok = r < n_red
        r_orig = _original_index(idx_r_ptr, r, n_red, GATHER_R)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0)
        if GATE_IN:  # dz = dy * w, applied while the tile is in registers
            g = tl.load(gate_ptr + r_orig, mask=r_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * g[None, :]).to(a.dtype)
        b = tl.load(b_ptr + r_orig[:, None] * stride_br + b_j[None, :] * stride_bj,
                    mask=r_ok[:, None] & j_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, WIDEN)
    return acc


@triton.jit
def _gate_partial_sums(a_ptr, stride_am, z_ptr, part_ptr, pid_m, offs_m, m_ok, n_red,
                       BM: tl.constexpr, BR: tl.constexpr):
    """part[pid_m, r] = sum over this m-tile of A[m, r] * z[m, r]   (the gate gradient, per m-tile)."""
    offs_r = tl.arange(0, BR)
    for r0 in range(0, n_red, BR):
        r = r0 + offs_r
        ok = m_ok[:, None] & (r < n_red)[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + r[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_m[:, None] * n_red + r[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid_m * n_red + r, tl.sum(a * z, axis=0), mask=r < n_red)


@triton.jit
def _dual_gemm_kernel(
        a_soft, a_hard, b, bias, gate, preact, gate_part, idx_j, idx_r, c_soft, c_hard,
        M, M_h, J, J_h, R, R_h, stride_bj, stride_br,
        HAS_BIAS: tl.constexpr, GATE_OUT: tl.constexpr, STORE_PREACT: tl.constexpr, GATE_IN: tl.constexpr,
        GATE_PARTIAL: tl.constexpr, GATHER_J: tl.constexpr, GATHER_R: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
        BM: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr):
    """Soft:  C_s[m, j] = sum_r A_s[m, r] B[j, r]                     A_s (M, R), C_s (M, J), B (J, R)
       Hard:  C_h[m, j] = sum_r A_h[m, r] B[idx_j[j], idx_r[r]]      A_h (M_h, R_h), C_h (M_h, J_h)
    B[j, r] lives at b + j * stride_bj + r * stride_br, so the same kernel runs x W^T (forward, j = output
    channel) and dy W (input gradient, j = input channel). A and C are row-major with unit column stride.
    Soft epilogue: + bias[j], store z (STORE_PREACT), * gate[j] (GATE_OUT). Hard epilogue: + bias[idx_j[j]].
    GATE_IN scales A_s's columns by gate[r]; GATE_PARTIAL writes gate_part[m-tile, r] = sum_m A_s * z.
    """
    tiles_m_soft = tl.cdiv(M, BM)
    is_hard, pid_m, pid_j = _tile_coords(tl.program_id(0), tiles_m_soft, tl.cdiv(M_h, BM), tl.cdiv(J_h, BJ))
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_j = pid_j * BJ + tl.arange(0, BJ)
    if is_hard:
        m_ok = offs_m < M_h
        j_ok = offs_j < J_h
        b_j = _original_index(idx_j, offs_j, J_h, GATHER_J)
        acc = _gemm_tile(a_hard, R_h, offs_m, m_ok, b, stride_bj, stride_br, b_j, j_ok, R_h, idx_r, gate,
                         GATHER_R, False, BM, BJ, BR, PRECISION, WIDEN)
        if HAS_BIAS:
            acc += tl.load(bias + b_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(c_hard + offs_m[:, None] * J_h + offs_j[None, :], acc.to(c_hard.dtype.element_ty),
                 mask=m_ok[:, None] & j_ok[None, :])
    else:
        m_ok = offs_m < M
        j_ok = offs_j < J
        acc = _gemm_tile(a_soft, R, offs_m, m_ok, b, stride_bj, stride_br, offs_j, j_ok, R, idx_r, gate,
                         False, GATE_IN, BM, BJ, BR, PRECISION, WIDEN)
        out_ok = m_ok[:, None] & j_ok[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + offs_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        if STORE_PREACT:
            tl.store(preact + offs_m[:, None] * J + offs_j[None, :], acc.to(preact.dtype.element_ty),
                     mask=out_ok)
        if GATE_OUT:
            acc *= tl.load(gate + offs_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(c_soft + offs_m[:, None] * J + offs_j[None, :], acc.to(c_soft.dtype.element_ty), mask=out_ok)
        if GATE_PARTIAL:
            if pid_j == 0:  # one column of programs reduces dy * z; the dy rows were just read (L2)
                _gate_partial_sums(a_soft, R, preact, gate_part, pid_m, offs_m, m_ok, R, BM, BR)


def _autotuned(gpu_configs: List[triton.Config]):
    return triton.autotune(configs=configs(gpu_configs, _GEMM_INTERPRETER_CONFIG),
                           key=["M", "M_h", "J", "J_h", "R", "R_h"], reset_to_zero=["gate_part"],
                           prune_configs_by={"early_config_prune": _prune_for_dtype})(_dual_gemm_kernel)


# One kernel, tuned separately per direction (B = W in the forward, B = W^T for the input gradient).
_dual_gemm_forward = _autotuned(_FORWARD_GPU_CONFIGS)
_dual_gemm_input_grad = _autotuned(_INPUT_GRAD_GPU_CONFIGS)


def _launch_dual_gemm(a_soft: torch.Tensor, a_hard: torch.Tensor, b: torch.Tensor, stride_bj: int,
                      stride_br: int, c_soft: torch.Tensor, c_hard: torch.Tensor, idx_j: KeptSet, idx_r: KeptSet,
                      J: int, R: int, J_h: int, R_h: int, bias: Optional[torch.Tensor] = None,
                      gate: Optional[torch.Tensor] = None, preact: Optional[torch.Tensor] = None,
                      gate_part: Optional[torch.Tensor] = None, *, input_grad: bool = False,
                      gate_out: bool = False, store_preact: bool = False, gate_in: bool = False) -> None:
    """Launch :func:`_dual_gemm_kernel` (tuned for the forward or the input-gradient direction);
    ``idx_j`` / ``idx_r`` are index tensors or prefix lengths."""
    M, M_h = a_soft.shape[0], a_hard.shape[0]
    if M * J == 0 and M_h * J_h == 0:
        return
    unused = torch.empty(0, device=a_soft.device, dtype=torch.float32)  # for pointers a flag switches off
    gather_j, gather_r = isinstance(idx_j, torch.Tensor), isinstance(idx_r, torch.Tensor)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(J, meta["BJ"])
                + triton.cdiv(M_h, meta["BM"]) * triton.cdiv(J_h, meta["BJ"]),)

    kernel = _dual_gemm_input_grad if input_grad else _dual_gemm_forward
    kernel[grid](
        a_soft, a_hard, b, _or(bias, unused), _or(gate, unused), _or(preact, unused), _or(gate_part, unused),
        idx_j if gather_j else unused, idx_r if gather_r else unused, c_soft, c_hard,
        M, M_h, J, J_h, R, R_h, stride_bj, stride_br,
        HAS_BIAS=bias is not None, GATE_OUT=gate_out, STORE_PREACT=store_preact, GATE_IN=gate_in,
        GATE_PARTIAL=gate_part is not None, GATHER_J=gather_j, GATHER_R=gather_r,
        PRECISION=dot_precision(a_soft.dtype), WIDEN=WIDEN_DOT_OPERANDS)


def _or(t: Optional[torch.Tensor], default: torch.Tensor) -> torch.Tensor:
    return default if t is None else t


def _gate_partials_buffer(M: int, N: int, device: torch.device) -> torch.Tensor:
    """Zeroed (m-tiles, N) fp32 buffer for the gate partial sums, sized for the smallest BM of any config
    (tiles a larger BM does not produce stay zero and add nothing)."""
    bm = min(c.kwargs["BM"] for c in _dual_gemm_input_grad.configs)
    return torch.zeros((triton.cdiv(M, bm), N), device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Weight-gradient kernel: dW[n, k] = sum_m dz[m, n] x[m, k], soft tiles and scattered hard tiles.
# ----------------------------------------------------------------------------------------------------------
_WGRAD_GPU_CONFIGS = [
    triton.Config({"BN": 128, "BK": 128, "BM": 64}, num_warps=8, num_stages=3),
    triton.Config({"BN": 64, "BK": 128, "BM": 64}, num_warps=4, num_stages=4),
    triton.Config({"BN": 128, "BK": 64, "BM": 64}, num_warps=4, num_stages=4),
    triton.Config({"BN": 64, "BK": 64, "BM": 64}, num_warps=4, num_stages=3),
]
_WGRAD_INTERPRETER_CONFIG = triton.Config({"BN": 64, "BK": 64, "BM": 32})


@triton.jit
def _wgrad_tile(dy_ptr, x_ptr, gate_ptr, n_rows, dy_cols, x_cols, offs_n, n_ok, offs_k, k_ok,
                GATE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """(acc[n, k] = sum_m dy[m, n] g[n] x[m, k],  colsum[n] = sum_m dy[m, n] g[n]) over all n_rows rows."""
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    colsum = tl.zeros((BN,), dtype=tl.float32)
    offs_m = tl.arange(0, BM)
    if GATE:
        g = tl.load(gate_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    for m0 in range(0, n_rows, BM):
        m = m0 + offs_m
        m_ok = m < n_rows
        dy_t = tl.load(dy_ptr + m[None, :] * dy_cols + offs_n[:, None], mask=n_ok[:, None] & m_ok[None, :],
                       other=0.0)  # (BN, BM): dy transposed
        if GATE:
            dy_t = (dy_t.to(tl.float32) * g[:, None]).to(dy_t.dtype)
        colsum += tl.sum(dy_t.to(tl.float32), axis=1)
        x = tl.load(x_ptr + m[:, None] * x_cols + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = mma(dy_t, x, acc, PRECISION, WIDEN)
    return acc, colsum


@triton.autotune(configs=configs(_WGRAD_GPU_CONFIGS, _WGRAD_INTERPRETER_CONFIG),
                 key=["M", "M_h", "N", "K", "N_h", "K_h"], reset_to_zero=["dw", "db"])
@triton.jit
def _dual_weight_grad_kernel(
        dy_soft, x_soft, dy_hard, x_hard, gate, kept_in, kept_out, dw, db,
        M, M_h, N, K, N_h, K_h,
        HAS_BIAS: tl.constexpr, GATE: tl.constexpr, GATHER_IN: tl.constexpr, GATHER_OUT: tl.constexpr,
        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
    """dw (N, K) fp32 zeroed, += (dy_soft * gate)^T x_soft and += scatter(dy_hard^T x_hard); db likewise.
    dy_soft (M, N), x_soft (M, K), dy_hard (M_h, N_h), x_hard (M_h, K_h). Programs: soft tiles of the
    (N, K) grid first, then hard tiles of the (N_h, K_h) grid."""
    pid = tl.program_id(0)
    soft_tiles_k = tl.maximum(tl.cdiv(K, BK), 1)  # one k-tile even for K == 0: it carries the bias sums
    soft_tiles = tl.cdiv(N, BN) * soft_tiles_k
    if pid < soft_tiles:
        pid_n = pid // soft_tiles_k
        pid_k = pid % soft_tiles_k
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = pid_k * BK + tl.arange(0, BK)
        n_ok = offs_n < N
        k_ok = offs_k < K
        acc, colsum = _wgrad_tile(dy_soft, x_soft, gate, M, N, K, offs_n, n_ok, offs_k, k_ok,
                                  GATE, BN, BK, BM, PRECISION, WIDEN)
        rows = offs_n
        cols = offs_k
    else:
        hard_tiles_k = tl.maximum(tl.cdiv(K_h, BK), 1)
        pid_n = (pid - soft_tiles) // hard_tiles_k
        pid_k = (pid - soft_tiles) % hard_tiles_k
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = pid_k * BK + tl.arange(0, BK)
        n_ok = offs_n < N_h
        k_ok = offs_k < K_h
        acc, colsum = _wgrad_tile(dy_hard, x_hard, gate, M_h, N_h, K_h, offs_n, n_ok, offs_k, k_ok,
                                  False, BN, BK, BM, PRECISION, WIDEN)
        rows = _original_index(kept_out, offs_n, N_h, GATHER_OUT)
        cols = _original_index(kept_in, offs_k, K_h, GATHER_IN)
    tl.atomic_add(dw + rows[:, None] * K + cols[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.atomic_add(db + rows, colsum, mask=n_ok)


def _launch_weight_grad(dy_soft: torch.Tensor, x_soft: torch.Tensor, dy_hard: torch.Tensor,
                        x_hard: torch.Tensor, gate: Optional[torch.Tensor], kept_in: KeptSet, kept_out: KeptSet,
                        N: int, K: int, N_h: int, K_h: int, has_bias: bool
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dW (N, K) fp32, db (N,) fp32 or None) from both paths in one launch."""
    M, M_h = dy_soft.shape[0], dy_hard.shape[0]
    dw = torch.zeros((N, K), device=dy_soft.device, dtype=torch.float32)
    db = torch.zeros((N if has_bias else 0,), device=dy_soft.device, dtype=torch.float32)
    gather_in, gather_out = isinstance(kept_in, torch.Tensor), isinstance(kept_out, torch.Tensor)

    def grid(meta):
        hard = triton.cdiv(N_h, meta["BN"]) * max(triton.cdiv(K_h, meta["BK"]), 1) if M_h > 0 else 0
        return (triton.cdiv(N, meta["BN"]) * max(triton.cdiv(K, meta["BK"]), 1) + hard,)

    unused = torch.empty(0, device=dy_soft.device, dtype=torch.float32)
    _dual_weight_grad_kernel[grid](
        dy_soft, x_soft, dy_hard, x_hard, _or(gate, unused),
        kept_in if gather_in else unused, kept_out if gather_out else unused, dw, db,
        M, M_h, N, K, N_h, K_h,
        HAS_BIAS=has_bias, GATE=gate is not None, GATHER_IN=gather_in, GATHER_OUT=gather_out,
        PRECISION=dot_precision(dy_soft.dtype), WIDEN=WIDEN_DOT_OPERANDS)
    return dw, (db if has_bias else None)


# ----------------------------------------------------------------------------------------------------------
# Launchers, autograd, reference
# ----------------------------------------------------------------------------------------------------------
def _as_index(kept: Optional[KeptSet], full: int) -> KeptSet:
    """A kept set in the form the kernels take: an int prefix length, or a contiguous index tensor."""
    if kept is None:
        return full
    return kept if isinstance(kept, int) else kept.contiguous()


def dual_linear_forward(x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                        kept_in: Optional[KeptSet], kept_out: Optional[KeptSet], store_preact: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Both paths in one launch.

    Args:
        x_soft: (M, K). x_hard: (M_h, K_h), the compact hard input. weight: (N, K). bias: (N,) or None.
        gate: (N,) or None (no gate). kept_in / kept_out: index tensors or prefix lengths (None = all).
        store_preact: also return z = x_soft W^T + b (M, N), which the gate gradient needs.
    Returns:
        y_soft (M, N), y_hard (M_h, N_h), z or None -- all in the input dtype.
    """
    check_runnable(x_soft, x_hard, weight, bias, gate)
    N, K = weight.shape
    K_h, N_h = kept_count(kept_in, K), kept_count(kept_out, N)
    if x_soft.dim() != 2 or x_hard.dim() != 2 or x_soft.shape[1] != K or x_hard.shape[1] != K_h:
        raise ValueError(f"x_soft (M, {K}) and x_hard (M_h, {K_h}) expected, got {tuple(x_soft.shape)} "
                         f"and {tuple(x_hard.shape)}")
    if not x_soft.dtype == x_hard.dtype == weight.dtype:
        raise TypeError(f"x_soft, x_hard and weight must share a dtype, got {x_soft.dtype}, {x_hard.dtype}, "
                        f"{weight.dtype}")
    x_soft, x_hard, weight = x_soft.contiguous(), x_hard.contiguous(), weight.contiguous()
    M, M_h = x_soft.shape[0], x_hard.shape[0]
    new = dict(device=x_soft.device, dtype=x_soft.dtype)
    y_soft, y_hard = torch.empty((M, N), **new), torch.empty((M_h, N_h), **new)
    z = torch.empty((M, N), **new) if store_preact else None
    _launch_dual_gemm(x_soft, x_hard, weight, K, 1, y_soft, y_hard, _as_index(kept_out, N),
                      _as_index(kept_in, K), N, K, N_h, K_h, bias=bias, gate=gate, preact=z,
                      gate_out=gate is not None, store_preact=store_preact)
    return y_soft, y_hard, z


def dual_linear_backward(dy_soft: Optional[torch.Tensor], dy_hard: Optional[torch.Tensor],
                         x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                         gate: Optional[torch.Tensor], preact: Optional[torch.Tensor],
                         kept_in: Optional[KeptSet], kept_out: Optional[KeptSet],
                         needs: Tuple[bool, bool, bool, bool, bool]) -> List[Optional[torch.Tensor]]:
    """Gradients ``[dx_soft, dx_hard, dweight, dbias, dgate]``, None where not needed.

    Args:
        dy_soft: (M, N) or None (zero). dy_hard: (M_h, N_h) or None (zero). x_soft (M, K), x_hard (M_h, K_h):
            the forward inputs. preact: z = x_soft W^T + b (M, N), needed for the gate gradient.
        needs: which of (x_soft, x_hard, weight, bias, gate) need a gradient. With neither weight nor bias
            (the mask-only backward) no weight-gradient work is done at all.
    """
    N, K = weight.shape
    K_h, N_h = kept_count(kept_in, K), kept_count(kept_out, N)
    need_dxs, need_dxh, need_dw, need_db, need_dg = needs
    need_db, need_dg = need_db and has_bias, need_dg and gate is not None
    M, M_h = x_soft.shape[0], x_hard.shape[0]
    new = dict(device=x_soft.device, dtype=x_soft.dtype)
    # A missing output gradient is zero: run the problem with no rows instead of materialising zeros.
    dys = dy_soft.contiguous() if dy_soft is not None else torch.empty((0, N), **new)
    dyh = dy_hard.contiguous() if dy_hard is not None else torch.empty((0, N_h), **new)
    kin, kout = _as_index(kept_in, K), _as_index(kept_out, N)
    dx_soft = dx_hard = dw = db = dgate = None
    if need_dxs or need_dxh:
        # Both input gradients in one launch: j runs over input channels, r over output channels (B = W).
        a_soft = dys if need_dxs else dys[:0]
        a_hard = dyh if need_dxh else dyh[:0]
        c_soft, c_hard = torch.empty((a_soft.shape[0], K), **new), torch.empty((a_hard.shape[0], K_h), **new)
        part = _gate_partials_buffer(a_soft.shape[0], N, x_soft.device) if need_dg and need_dxs else None
        _launch_dual_gemm(a_soft, a_hard, weight.contiguous(), 1, K, c_soft, c_hard, kin, kout, K, N, K_h, N_h,
                          gate=gate, preact=preact if part is not None else None, gate_part=part,
                          input_grad=True, gate_in=gate is not None)
        if part is not None:
            dgate = part.sum(0)
        if need_dxs:
            dx_soft = c_soft if dy_soft is not None else torch.zeros((M, K), **new)
        if need_dxh:
            dx_hard = c_hard if dy_hard is not None else torch.zeros((M_h, K_h), **new)
    if need_dg and dgate is None:  # no soft input-gradient launch to fuse the reduction into
        dgate = (dys.float() * preact[:dys.shape[0]].float()).sum(0)
    if need_dw or need_db:
        dw, db = _launch_weight_grad(dys, x_soft[:dys.shape[0]].contiguous(), dyh,
                                     x_hard[:dyh.shape[0]].contiguous(), gate, kin, kout, N, K, N_h, K_h,
                                     has_bias=need_db)
        dw = dw.to(weight.dtype) if need_dw else None
    return [dx_soft, dx_hard, dw, db, dgate.to(gate.dtype) if dgate is not None else None]


class DualLinearFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x_soft, x_hard, weight, bias, gate, kept_in, kept_out) -> (y_soft, y_hard)``
    with 2-D inputs. Weight and bias get gradients only if they require grad, so passing them detached
    gives the mask-only backward (input and gate gradients only)."""

    @staticmethod
    def forward(ctx, x_soft, x_hard, weight, bias, gate, kept_in, kept_out):
        need_gate_grad = gate is not None and ctx.needs_input_grad[4]
        y_soft, y_hard, z = dual_linear_forward(x_soft, x_hard, weight, bias, gate, kept_in, kept_out,
                                                store_preact=need_gate_grad)
        ctx.set_materialize_grads(False)
        kept = [_as_index(kept_in, weight.shape[1]), _as_index(kept_out, weight.shape[0])]
        ctx.prefix = [k if isinstance(k, int) else None for k in kept]  # None: saved as a tensor
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x_soft, x_hard, weight, gate, z, *[k for k in kept if isinstance(k, torch.Tensor)])
        return y_soft, y_hard

    @staticmethod
    def backward(ctx, dy_soft, dy_hard):
        x_soft, x_hard, weight, gate, z, *index_sets = ctx.saved_tensors
        kept = [p if p is not None else index_sets.pop(0) for p in ctx.prefix]
        grads = dual_linear_backward(dy_soft, dy_hard, x_soft, x_hard, weight, ctx.has_bias, gate, z,
                                     kept[0], kept[1], tuple(ctx.needs_input_grad[:5]))
        if grads[3] is not None:
            grads[3] = grads[3].to(ctx.bias_dtype)
        return (*grads, None, None)


def dual_linear(x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                kept_in: Optional[KeptSet] = None, kept_out: Optional[KeptSet] = None,
                weight_grad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft and hard path of a linear layer in one launch (differentiable).

    Args:
        x_soft: (..., K) soft-path input. x_hard: (..., K_h) compact hard-path input, K_h = len(kept_in).
        weight: (N, K). bias: (N,) or None. gate: (N,) keep-probabilities of the soft path, or None.
        kept_in / kept_out: kept input / output channels of the hard path: an int32/int64 index tensor
            (unique entries, any order), an int k (the prefix 0..k-1, no index loads), or None (all).
        weight_grad: False gives the mask-only backward: gradients reach x_soft, x_hard and gate only.
    Returns:
        y_soft (..., N) = (x_soft W^T + b) * gate,  y_hard (..., N_h) = x_hard W[kept_out][:, kept_in]^T
        + b[kept_out]; same dtype as the inputs (fp32 accumulation).

    Under ``torch.autocast`` on the inputs' device it computes as autocast runs ``F.linear``: x_soft, x_hard
    and weight cast to the autocast dtype (the weight's gradient returns through the cast in its own dtype),
    outputs in that dtype. Bias and gate stay as given: the kernels read them in fp32 either way.
    """
    if not weight_grad:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
    x_soft, x_hard, weight = autocast_operands(autocast_dtype(x_soft.device), x_soft, x_hard, weight)
    N, K = weight.shape
    lead_s, lead_h = x_soft.shape[:-1], x_hard.shape[:-1]
    y_soft, y_hard = DualLinearFunction.apply(x_soft.reshape(math.prod(lead_s), x_soft.shape[-1]),
                                              x_hard.reshape(math.prod(lead_h), x_hard.shape[-1]), weight, bias,
                                              gate, kept_in, kept_out)
    return y_soft.reshape(*lead_s, N), y_hard.reshape(*lead_h, y_hard.shape[-1])


def dual_linear_reference(x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                          kept_in: Optional[KeptSet] = None, kept_out: Optional[KeptSet] = None,
                          weight_grad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch :func:`dual_linear` (the ground truth; any device and dtype)."""
    if not weight_grad:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
    N, K = weight.shape
    kin, kout = kept_index(kept_in, K, weight.device), kept_index(kept_out, N, weight.device)
    y_soft = torch.nn.functional.linear(x_soft, weight, bias)
    if gate is not None:
        y_soft = y_soft * gate
    y_hard = torch.nn.functional.linear(x_hard, weight[kout][:, kin], bias[kout] if bias is not None else None)
    return y_soft, y_hard


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time specialisations
# ----------------------------------------------------------------------------------------------------------
def aot_variants() -> List[AotVariant]:
    """The specialisations this file launches on a GPU, for compiling ahead of time (sm_90 check):
    forward and input gradient of the dual GEMM and the weight gradient in bf16 and fp32 (TF32), every GPU
    config with gathered kept sets, the largest config with prefix sets."""
    out: List[AotVariant] = []
    ints = {k: "i32" for k in ("M", "M_h", "J", "J_h", "R", "R_h", "stride_bj", "stride_br")}
    for dt, prec in (("bf16", "tf32"), ("fp32", "tf32")):
        ptrs = dict(a_soft=f"*{dt}", a_hard=f"*{dt}", b=f"*{dt}", bias="*fp32", gate="*fp32",
                    preact=f"*{dt}", gate_part="*fp32", idx_j="*i32", idx_r="*i32", c_soft=f"*{dt}",
                    c_hard=f"*{dt}")
        flags = dict(PRECISION=prec, WIDEN=False)
        forward = dict(HAS_BIAS=True, GATE_OUT=True, STORE_PREACT=True, GATE_IN=False, GATE_PARTIAL=False,
                       stride_br=1, **flags)
        input_grad = dict(HAS_BIAS=False, GATE_OUT=False, STORE_PREACT=False, GATE_IN=True, GATE_PARTIAL=True,
                          stride_bj=1, **flags)
        for gather in (False, True):
            kind = "gathered" if gather else "prefix"
            sets = dict(GATHER_J=gather, GATHER_R=gather)
            size = 2 if dt == "bf16" else 4
            # Gathered sets need the most registers: every config; the prefix path: the largest config.
            pick = slice(None) if gather else slice(0, 1)
            out += config_variants(f"dual_linear_fwd_{dt}_{kind}", _dual_gemm_kernel, {**ptrs, **ints},
                                   {**forward, **sets}, _fit_to_dtype(_FORWARD_GPU_CONFIGS, size)[pick],
                                   aligned=("R", "R_h", "stride_bj"), uses_dot=True)
            out += config_variants(f"dual_linear_dx_{dt}_{kind}", _dual_gemm_kernel, {**ptrs, **ints},
                                   {**input_grad, **sets}, _fit_to_dtype(_INPUT_GRAD_GPU_CONFIGS, size)[pick],
                                   aligned=("J", "J_h", "stride_br"), uses_dot=True)
        out += config_variants(
            f"dual_linear_wgrad_{dt}", _dual_weight_grad_kernel,
            dict(dy_soft=f"*{dt}", x_soft=f"*{dt}", dy_hard=f"*{dt}", x_hard=f"*{dt}", gate="*fp32",
                 kept_in="*i32", kept_out="*i32", dw="*fp32", db="*fp32",
                 **{k: "i32" for k in ("M", "M_h", "N", "K", "N_h", "K_h")}),
            dict(HAS_BIAS=True, GATE=True, GATHER_IN=True, GATHER_OUT=True, **flags), _WGRAD_GPU_CONFIGS,
            aligned=("N", "K", "N_h", "K_h"), uses_dot=True)
    return out
