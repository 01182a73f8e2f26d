"""Triton kernels and launchers of the gated RMSNorm (``gated_rms_norm.py`` has the maths).

Imported the first time the Triton backend runs a gated norm, never at package import.

Layout: a row of N = G·S elements holds G groups of S; the kernels see the input as R = M·G
*group rows* of S elements (contiguous), each normalised on its own, with the weight slice
of its group. A program takes a tile of TILE = k·G consecutive group rows (k whole rows of
the input; BLOCK_R = the power of two ≥ TILE): tiles start at multiples of G, so the i-th
row of every tile belongs to group i mod G, and a program's weight-gradient partial sums
stay per position of its tile. The partials are summed afterwards in a fixed order:
deterministic, no atomics (DESIGN.md §5).
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from .gated_rms_norm import pow2

# launches per pass, for tests that must know the kernels ran (as ``_triton_norm.LAUNCHES``)
LAUNCHES: collections.Counter = collections.Counter()


@triton.jit
def _gate(z, SIGMOID: tl.constexpr):
    """act(z) and act'(z): sigmoid, or silu(z) = z·σ(z) with silu' = σ(z)·(1 + z·(1 − σ(z)))."""
    s = tl.sigmoid(z)
    if SIGMOID:
        g = s
        dg = s * (1.0 - s)
    else:
        g = z * s
        dg = s * (1.0 + z * (1.0 - s))
    return g, dg


@triton.jit
def _tile(t, R, S, G, TILE, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets of tile ``t``: into the activations, into the weight, the element mask, the
    group-row indices and their mask."""
    i = tl.arange(0, BLOCK_R)
    s = tl.arange(0, BLOCK_S)
    r = (t * TILE + i).to(tl.int64)  # R < 2**31 group rows; their element offsets may not be
    row_mask = (i < TILE) & (r < R)
    mask = row_mask[:, None] & (s < S)[None, :]
    offs = r[:, None] * S + s[None, :]
    w_offs = (i % G)[:, None] * S + s[None, :]
    return offs, w_offs, mask, r, row_mask


@triton.jit
def _gated_fwd_kernel(
    X,  # input, (R, S) group rows, contiguous
    Z,  # gate, like X (unused without HAS_GATE)
    W,  # weight, (G·S,) (unused without HAS_WEIGHT)
    Y,  # output, like X, in the output dtype
    RSTD,  # (R,) fp32: 1/sqrt(mean(h²) + eps) per group row, for the backward
    R, S, G, TILE, eps,
    HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, SIGMOID: tl.constexpr,
    ROUND_N: tl.constexpr,  # round the normalised row to x's dtype before the weight (cast_mode "input")
    ROUND_M: tl.constexpr,  # round the weighted row to x's dtype before the gate (Qwen3-Next's order)
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    offs, w_offs, mask, r, row_mask = _tile(tl.program_id(0), R, S, G, TILE, BLOCK_R, BLOCK_S)
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g, _ = _gate(tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32), SIGMOID)
        if not NORM_BEFORE_GATE:
            h = h * g
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / S + eps)
    tl.store(RSTD + r, rstd, mask=row_mask)
    m = h * rstd[:, None]
    if ROUND_N:
        m = m.to(X.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        m = m * tl.load(W + w_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        if NORM_BEFORE_GATE:
            if ROUND_M:
                m = m.to(X.dtype.element_ty).to(tl.float32)
            m = m * g
    tl.store(Y + offs, m.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DY,  # gradient of the output, (R, S) contiguous
    X, Z, W, RSTD,  # as in the forward
    DX, DZ,  # gradients of x and of the gate, like X (DZ unused without HAS_GATE)
    DW_PART,  # (programs, BLOCK_R·BLOCK_S) fp32: each program's weight-gradient sums per tile position
    R, S, G, TILE, n_tiles,
    HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, SIGMOID: tl.constexpr,
    ROUND_N: tl.constexpr, ROUND_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        offs, w_offs, mask, r, row_mask = _tile(t, R, S, G, TILE, BLOCK_R, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=row_mask, other=0.0)
        h = x
        if HAS_GATE:
            g, dg = _gate(tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32), SIGMOID)
            if not NORM_BEFORE_GATE:
                h = x * g
        n = h * rstd[:, None]
        # the normalised row as the forward multiplied it (rounded where the forward rounds)
        nr = n
        if ROUND_N:
            nr = n.to(X.dtype.element_ty).to(tl.float32)
        dm = dy
        if HAS_WEIGHT:
            w = tl.load(W + w_offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            if NORM_BEFORE_GATE:
                # y = m·act(z), m = w·n
                m = nr
                if HAS_WEIGHT:
                    m = m * w
                if ROUND_M:
                    m = m.to(X.dtype.element_ty).to(tl.float32)
                tl.store(DZ + offs, (dy * m * dg).to(DZ.dtype.element_ty), mask=mask)
                dm = dy * g
        dn = dm
        if HAS_WEIGHT:
            acc += dm * nr
            dn = dm * w
        # d/dh of n = h·rstd: rstd·(dn − n·mean(dn·n)) per group row
        c = tl.sum(dn * n, axis=1) / S
        dh = (dn - n * c[:, None]) * rstd[:, None]
        dx = dh
        if HAS_GATE:
            if not NORM_BEFORE_GATE:
                # h = x·act(z)
                dx = dh * g
                tl.store(DZ + offs, (dh * x * dg).to(DZ.dtype.element_ty), mask=mask)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        i = tl.arange(0, BLOCK_R)
        s = tl.arange(0, BLOCK_S)
        tl.store(DW_PART + pid.to(tl.int64) * (BLOCK_R * BLOCK_S) + i[:, None] * BLOCK_S + s[None, :], acc)


# Elements a program's tile holds: registers for the forward's few fp32 arrays, and enough
# rows per program for a narrow group (Qwen3.5's head_dim 128: 32 rows a tile).
_FWD_TILE = 4096
_BWD_TILE = 2048
# Backward programs per SM (persistent: each loops over tiles, keeping its partial sums).
_BWD_PROGRAMS_PER_SM = 4


def layout(N: int, S: int, target: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_S, TILE) for rows of N = G·S: whole input rows per tile, about
    ``target`` elements."""
    G = N // S
    block_s = pow2(S)
    block_r = max(pow2(G), pow2(max(1, target // block_s)))
    return block_r, block_s, (block_r // G) * G


def _warps(elements: int) -> int:
    return min(16, max(1, elements // 256))


def _flags(z, w, norm_before_gate, sigmoid, round_n, round_m):
    return dict(HAS_GATE=z is not None, HAS_WEIGHT=w is not None, NORM_BEFORE_GATE=norm_before_gate,
                SIGMOID=sigmoid, ROUND_N=round_n, ROUND_M=round_m)


def gated_fwd(x, z, w, eps, S, norm_before_gate, sigmoid, round_n, round_m, out_dtype):
    """x, z: (M, N) contiguous; returns y (M, N) in ``out_dtype`` and rstd (M·G,) fp32."""
    M, N = x.shape
    G = N // S
    R = M * G
    block_r, block_s, tile = layout(N, S, _FWD_TILE)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R:
        LAUNCHES["gated_fwd"] += 1
        _gated_fwd_kernel[(triton.cdiv(R, tile),)](
            x, z if z is not None else x, w if w is not None else x, y, rstd, R, S, G, tile, eps,
            **_flags(z, w, norm_before_gate, sigmoid, round_n, round_m),
            BLOCK_R=block_r, BLOCK_S=block_s, num_warps=_warps(block_r * block_s),
        )
    return y, rstd


def _programs(device: torch.device, n_tiles: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_tiles, sms * _BWD_PROGRAMS_PER_SM))


def gated_bwd(dy, x, z, w, rstd, S, norm_before_gate, sigmoid, round_n, round_m):
    """dy, x, z: (M, N) contiguous. Returns dx, dz (None without a gate), dw (fp32, or None)."""
    M, N = x.shape
    G = N // S
    R = M * G
    block_r, block_s, tile = layout(N, S, _BWD_TILE)
    n_tiles = triton.cdiv(R, tile)
    programs = _programs(x.device, n_tiles)
    dx = torch.empty_like(x)
    dz = torch.empty_like(z) if z is not None else None
    part = torch.zeros((programs, block_r * block_s) if w is not None else (0,), dtype=torch.float32, device=x.device)
    if R:
        LAUNCHES["gated_bwd"] += 1
        _gated_bwd_kernel[(programs,)](
            dy, x, z if z is not None else x, w if w is not None else x, rstd,
            dx, dz if dz is not None else dx, part if w is not None else dx, R, S, G, tile, n_tiles,
            **_flags(z, w, norm_before_gate, sigmoid, round_n, round_m),
            BLOCK_R=block_r, BLOCK_S=block_s, num_warps=_warps(block_r * block_s),
        )
    dw = None
    if w is not None:
        # position i of every tile is group i mod G: fold the k rows of G, then the programs
        k = tile // G
        dw = part.view(programs, block_r, block_s)[:, :tile, :S].reshape(programs, k, G, S).sum((0, 1)).reshape(N)
    return dx, dz, dw
