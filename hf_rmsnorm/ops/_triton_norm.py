"""Triton kernels and launchers shared by RMSNorm and LayerNorm.

One forward and one backward kernel serve both norms: LayerNorm is RMSNorm of the centred
row, so the difference is one compile-time flag (``IS_RMS``), not a second copy of the code.
This module imports Triton at the top and is therefore only imported once the Triton backend
has been chosen (see ``_norm.py``); the package itself never needs Triton.

Statistics and accumulation are always fp32. The weight/bias gradients are reduced
deterministically: every backward program owns a fixed contiguous range of rows, accumulates
its partial sums in registers and writes one fp32 row to a ``(programs, N)`` buffer, which
the caller sums in a fixed order. No atomics, so two runs give bit-identical gradients.
"""

from __future__ import annotations

import collections
import functools

import torch
import triton
import triton.language as tl

# Number of kernel launches per kernel name; lets tests prove that the Triton code really ran
# (under TRITON_INTERPRET=1 on a CPU the results alone cannot tell the two backends apart).
LAUNCHES: collections.Counter = collections.Counter()


@triton.jit
def _norm_fwd_kernel(
    X,  # input rows, (M, N), row stride stride_x, unit column stride
    Y,  # output rows, (M, N), contiguous
    W,  # weight (N,); unused when HAS_WEIGHT is False
    B,  # bias (N,); unused when HAS_BIAS is False
    Mean,  # per-row mean (M,) fp32; written only for LayerNorm
    Rstd,  # per-row 1 / sqrt(var + eps) (M,) fp32, saved for the backward
    stride_x,
    M,
    N,
    eps,
    offset,  # added to the weight: 1.0 gives Gemma's (1 + w)
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUNDING: tl.constexpr,  # round the normalised row before the affine: 0 no, 1 to X's dtype, 2 to W's
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    # int64 offsets: M * N can exceed 2**31 for large activations.
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        tl.store(Mean + rows, mean, mask=row_mask)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Rstd + rows, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    # HF orders of casts: Llama rounds the normalised row to the input dtype before the
    # affine, T5 to the weight's dtype; Gemma and torch's norms round only the output.
    if ROUNDING == 1:
        y = y.to(X.dtype.element_ty).to(tl.float32)
    if ROUNDING == 2:
        y = y.to(W.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X,  # saved input rows, (M, N), row stride stride_x
    W,  # weight (N,); unused when HAS_WEIGHT is False
    DY,  # output gradient, (M, N), row stride stride_dy
    DX,  # input gradient, (M, N), contiguous, X's dtype
    DW,  # weight-gradient partials, (programs, N) fp32, one row per program
    DB,  # bias-gradient partials, (programs, N) fp32, one row per program
    Mean,  # per-row mean (M,) fp32 (LayerNorm only)
    Rstd,  # per-row 1 / sqrt(var + eps) (M,) fp32
    stride_x,
    stride_dy,
    M,
    N,
    offset,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUNDING: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # row pointers advance by their strides; int64 because M * N can exceed 2**31
    start64 = row_start.to(tl.int64)
    x_ptr = X + start64 * stride_x
    dy_ptr = DY + start64 * stride_dy
    dx_ptr = DX + start64 * N
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            mean = tl.load(Mean + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            # the weight multiplied the rounded row, so its gradient sees the rounded row
            if ROUNDING == 1:
                dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
            elif ROUNDING == 2:
                dw += dy * xhat.to(W.dtype.element_ty).to(tl.float32)
            else:
                dw += dy * xhat
            wdy = dy * w
        else:
            wdy = dy
        if HAS_BIAS:
            db += dy
        # d/dx of (x - mean) * rstd, projected: dx = rstd * (g - mean(g * xhat) * xhat [- mean(g)])
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += N
    if HAS_WEIGHT:
        tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=mask)


def _warps(elements: int) -> int:
    # about 256 fp32 values per warp keeps a row in registers without spilling
    return max(1, min(32, triton.next_power_of_2(elements) // 256))


@functools.lru_cache(maxsize=None)
def _backward_programs(device: torch.device) -> int:
    # A fixed number of programs per device (not per run) keeps the partial-sum layout, and
    # therefore the weight gradient, identical from one run to the next.
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # TRITON_INTERPRET=1 on the CPU: a few programs still exercise the reduction


def fwd_config(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward kernel for rows of N elements."""
    block_n = triton.next_power_of_2(N)
    # several short rows per program so each program moves a useful amount of memory
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, _warps(block_m * block_n)


def bwd_config(N: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the backward kernel for rows of N elements."""
    block_n = triton.next_power_of_2(N)
    return block_n, _warps(block_n)


def norm_fwd(x, weight, bias, eps, offset, is_rms, rounding, out_dtype):
    """Launch the forward kernel on ``x`` (M, N) with unit column stride."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    mean = torch.empty((0 if is_rms else M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, mean, rstd
    block_m, block_n, warps = fwd_config(N)
    _norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, y, weight, bias, mean, rstd,
        x.stride(0), M, N, eps, offset,
        IS_RMS=is_rms,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        ROUNDING=rounding,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    LAUNCHES["norm_fwd"] += 1
    return y, mean, rstd


def norm_bwd(dy, x, weight, mean, rstd, offset, is_rms, rounding, has_bias):
    """Launch the backward kernel; returns dx and the fp32 (programs, N) partial sums."""
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    programs = max(1, min(_backward_programs(x.device), M))
    dw_part = torch.zeros((programs, N), dtype=torch.float32, device=x.device) if weight is not None else None
    db_part = torch.zeros((programs, N), dtype=torch.float32, device=x.device) if has_bias else None
    if M == 0:
        return dx, dw_part, db_part
    block_n, warps = bwd_config(N)
    _norm_bwd_kernel[(programs,)](
        x, weight, dy, dx, dw_part, db_part, mean, rstd,
        x.stride(0), dy.stride(0), M, N, offset, triton.cdiv(M, programs),
        IS_RMS=is_rms,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=has_bias,
        ROUNDING=rounding,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    LAUNCHES["norm_bwd"] += 1
    return dx, dw_part, db_part
