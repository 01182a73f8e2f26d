"""Triton kernels and launchers of the gated RMSNorm (``gated_rms_norm.py`` has the maths).

Imported the first time the Triton backend runs a gated norm, never at package import.

Layout: a row of N = G·S elements holds G groups of S, each normalised on its own with the
weight slice of its group. A program works on one group g: a tile is BLOCK_R consecutive input
rows of that group (a BLOCK_R × S block, rows N apart), so its weight slice is one vector for
the whole tile, and a backward program, which loops over the tiles of its group, keeps one row
of weight-gradient sums per tile position. Those are summed afterwards by torch in a fixed
order: deterministic, no atomics (DESIGN.md §5), and pairwise (a sum over a tile's rows inside
the kernel doubled the fp32 error, measured in the interpreter). With one group this is the
usual tiling of rows.
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from ._direct import launch as _launch  # a module global: tests replace it to record launches

# plain-Python host helpers: Triton's own (triton.cdiv, next_power_of_2) cost ≈ 5 µs a call
# from host code in Triton 3.9 (_triton_norm's note)
from ._triton_norm import _ceil_div, _pow2_at_least, _programs_per_sm, _sm_count, _sm_shared

# launches per pass, for tests that must know the kernels ran (as ``_triton_norm.LAUNCHES``)
LAUNCHES: collections.Counter = collections.Counter()
# a list while _cuda_launch wants to see the launches of one call, as ``_triton_norm.record``:
# (kernel, compiled kernel, rows a tile, the most tiles a group's programs take or 0, the arguments)
record = None


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
def _tile(t, g, M, S, G, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Tile ``t`` of group ``g``: its rows (to be scaled by each tensor's row stride), its
    columns, the element mask, the indices of its group rows' statistics (row·G + g) and their
    mask, and the column mask (the weight slice's)."""
    s = tl.arange(0, BLOCK_S)
    rows = (t * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # M < 2**31 rows; their offsets may not be
    row_mask = rows < M
    col_mask = s < S
    mask = row_mask[:, None] & col_mask[None, :]
    return rows[:, None], (g * S + s)[None, :], mask, rows * G + g, row_mask, col_mask


@triton.jit
def _gated_fwd_kernel(
    X,  # input, (M, N) rows of unit column stride, stride_x apart
    Z,  # gate, (M, N) rows stride_z apart (unused without HAS_GATE)
    W,  # weight, (N,) (unused without HAS_WEIGHT)
    Y,  # output, (M, N) contiguous, in the output dtype
    RSTD,  # (M·G,) fp32: 1/sqrt(mean(h²) + eps) per row and group, for the backward
    stride_x, stride_z, M, N, S, G, eps,
    offset,  # added to the weight (Gemma-style weights stored as w - 1)
    HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, SIGMOID: tl.constexpr,
    ROUND_N: tl.constexpr,  # round the normalised row to x's dtype before the weight (cast_mode "input")
    ROUND_M: tl.constexpr,  # round the weighted row to x's dtype before the gate (Qwen3-Next's order)
    DENSE: tl.constexpr,  # every row stride is N: one offset serves every tensor (fewer registers)
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    if DENSE:
        stride_x = N
        stride_z = N
    pid = tl.program_id(0)
    rows, cols, mask, r, row_mask, col_mask = _tile(pid // G, pid % G, M, S, G, BLOCK_R, BLOCK_S)
    h = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g, _ = _gate(tl.load(Z + rows * stride_z + cols, mask=mask, other=0.0).to(tl.float32), SIGMOID)
        if not NORM_BEFORE_GATE:
            h = h * g
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / S + eps)
    tl.store(RSTD + r, rstd, mask=row_mask)
    m = h * rstd[:, None]
    if ROUND_N:
        m = m.to(X.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        m = m * (tl.load(W + cols, mask=col_mask[None, :], other=0.0).to(tl.float32) + offset)
    if HAS_GATE:
        if NORM_BEFORE_GATE:
            if ROUND_M:
                m = m.to(X.dtype.element_ty).to(tl.float32)
            m = m * g
    tl.store(Y + rows * N + cols, m.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DY,  # gradient of the output, (M, N) rows stride_dy apart
    X, Z, W, RSTD,  # as in the forward
    DX, DZ,  # gradients of x and of the gate, (M, N) contiguous (DZ unused without HAS_GATE)
    DW_PART,  # (programs, BLOCK_R·BLOCK_S) fp32: each program's weight-gradient sums per tile position
    stride_dy, stride_x, stride_z, M, N, S, G, n_tiles,
    offset,  # added to the weight
    HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, SIGMOID: tl.constexpr,
    ROUND_N: tl.constexpr, ROUND_M: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    if DENSE:
        stride_dy = N
        stride_x = N
        stride_z = N
    # programs are launched G at a time: program p works on group p mod G, on every
    # (programs / G)-th tile of it
    pid = tl.program_id(0)
    grp = pid % G
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    s = tl.arange(0, BLOCK_S)
    if HAS_WEIGHT:
        w = (tl.load(W + grp * S + s, mask=s < S, other=0.0).to(tl.float32) + offset)[None, :]
    for t in range(pid // G, n_tiles, tl.num_programs(0) // G):
        rows, cols, mask, r, row_mask, _ = _tile(t, grp, M, S, G, BLOCK_R, BLOCK_S)
        offs = rows * N + cols  # of the gradients written
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=row_mask, other=0.0)
        h = x
        if HAS_GATE:
            g, dg = _gate(tl.load(Z + rows * stride_z + cols, mask=mask, other=0.0).to(tl.float32), SIGMOID)
            if not NORM_BEFORE_GATE:
                h = x * g
        n = h * rstd[:, None]
        # the normalised row as the forward multiplied it (rounded where the forward rounds)
        nr = n
        if ROUND_N:
            nr = n.to(X.dtype.element_ty).to(tl.float32)
        dm = dy
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
        tl.store(DW_PART + pid.to(tl.int64) * (BLOCK_R * BLOCK_S) + i[:, None] * BLOCK_S + s[None, :], acc)


# Elements a program's tile holds: registers for the forward's few fp32 arrays, and enough
# rows a tile for a narrow group (Qwen3.5's head_dim 128: 32 rows a forward tile).
_FWD_TILE = 4096
_BWD_TILE = 2048
# Backward programs per SM at most (persistent: each loops over its group's tiles, keeping its
# sums), fewer where the compiled kernel's registers allow fewer (``_per_sm``).
_BWD_PROGRAMS_PER_SM = 4


def layout(S: int, target: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_S) for groups of S: rows of the group a tile, about ``target`` elements."""
    block_s = _pow2_at_least(S)
    return _pow2_at_least(max(1, target // block_s)), block_s


def _warps(elements: int) -> int:
    return min(16, max(1, elements // 256))


def _dense(n: int, *rows) -> bool:
    """Whether every one of the (M, N) inputs ``rows`` (None: absent) has rows N apart."""
    return all(t is None or t.stride(0) == n or t.shape[0] <= 1 for t in rows)


def _stride(t) -> int:
    return t.stride(0) if t is not None else 0


# Launch plans, one per kind of call, so that a call past its first does no more host work than
# its launch: (pass, the call's settings) -> (BLOCK_R, meta, meta key[, programs per group]).
# ``meta`` holds the kernels' constexprs in declaration order and the launch options, as
# ``_direct.launch`` takes them.
_PLANS: dict = {}


def _meta(target: int, S: int, has_gate, has_weight, norm_before_gate, sigmoid, round_n, round_m, dense) -> tuple:
    """(BLOCK_R, meta) of a kernel whose tile holds about ``target`` elements, groups of S."""
    block_r, block_s = layout(S, target)
    return block_r, dict(HAS_GATE=has_gate, HAS_WEIGHT=has_weight, NORM_BEFORE_GATE=norm_before_gate, SIGMOID=sigmoid,
                         ROUND_N=round_n, ROUND_M=round_m, DENSE=dense, BLOCK_R=block_r, BLOCK_S=block_s,
                         num_warps=_warps(block_r * block_s))


def gated_fwd(x, z, w, eps, offset, S, norm_before_gate, sigmoid, round_n, round_m, out_dtype):
    """x, z: (M, N) with unit column stride; returns y (M, N) in ``out_dtype`` and rstd (M·G,) fp32."""
    M, N = x.shape
    G = N // S
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty((M * G,), dtype=torch.float32, device=x.device)
    if M:
        key = ("fwd", S, z is not None, w is not None, norm_before_gate, sigmoid, round_n, round_m, _dense(N, x, z))
        plan = _PLANS.get(key)
        if plan is None:
            block_r, meta = _meta(_FWD_TILE, *key[1:])
            plan = _PLANS[key] = block_r, meta, tuple(meta.items())
        block_r, meta, meta_key = plan
        # an absent gate or weight: x in its place, never read (HAS_GATE, HAS_WEIGHT)
        args = (x, z if z is not None else x, w if w is not None else x, y, rstd, _stride(x), _stride(z), M, N, S, G,
                eps, offset)
        compiled = _launch(_gated_fwd_kernel, (_ceil_div(M, block_r) * G,), args, meta, meta_key)
        LAUNCHES["gated_fwd"] += 1
        if record is not None:
            record.append(("gfwd", compiled, block_r, 0, args))
    return y, rstd


# backward programs an SM read from a compiled kernel (the GPU tests look at it), by plan, and
# why where that could not be read (the GPU tests assert there is no such entry)
_PER_SM: dict = {}
PER_SM_FAILED: dict = {}


def _per_sm(key, dy, x, z, w, meta: dict) -> int:
    """How many backward programs of this compile fit on one SM at once, at most
    ``_BWD_PROGRAMS_PER_SM``: a persistent program that must wait for another to finish leaves
    its tiles to a second wave. Read from the kernel compiled (or fetched from Triton's cache)
    without a launch, as the plain norms' backward grid is (``_triton_norm._backward_specimen``),
    once per plan, ``key``, which holds the dtypes: they change the registers (Mamba2's
    1024-element groups compile to 96 in bf16 and 80 in fp32 under Triton 3.9, 2 programs an SM
    against 3). The same stand-ins whatever call comes first, so the grid, the partial sums'
    layout and the weight gradient's bits do not depend on call order. 2 if that fails."""
    def stand_in(t, dtype=None):
        return torch.empty((0,), dtype=dtype or (t.dtype if t is not None else x.dtype), device=x.device)

    try:
        f32 = torch.float32
        compiled = _gated_bwd_kernel.warmup(
            stand_in(dy), stand_in(x), stand_in(z), stand_in(w), stand_in(x, f32), stand_in(x), stand_in(z),
            stand_in(x, f32), 4096, 4096, 4096, 4096, 4096, 1024, 4, 16, 0.0, grid=(1,), **meta,
        )
        compiled._init_handles()
        _PER_SM[key] = _programs_per_sm(compiled.n_regs, meta["num_warps"], cap=_BWD_PROGRAMS_PER_SM,
                                        shared=compiled.metadata.shared, sm_shared=_sm_shared(x.device))
    except Exception as exc:  # noqa: BLE001 - a Triton without warmup: fewer programs, never wrong
        _PER_SM[key] = 2
        PER_SM_FAILED[key] = f"{type(exc).__name__}: {exc}"
    return _PER_SM[key]


def _per_group(key, dy, x, z, w, meta: dict, G: int) -> int:
    """Backward programs a group at most: as many as fit on the SMs at once (2·4 in all on the
    CPU, where the interpreter runs them one after another)."""
    if x.device.type != "cuda":
        return max(1, 2 * _BWD_PROGRAMS_PER_SM // G)
    return max(1, _sm_count(x.device) * _per_sm(key, dy, x, z, w, meta) // G)


def gated_bwd(dy, x, z, w, rstd, offset, S, norm_before_gate, sigmoid, round_n, round_m):
    """dy, x, z: (M, N) with unit column stride. Returns dx and dz (contiguous; dz None without a
    gate), dw (fp32, or None)."""
    M, N = x.shape
    G = N // S
    key = ("bwd", S, z is not None, w is not None, norm_before_gate, sigmoid, round_n, round_m, _dense(N, dy, x, z),
           N, dy.dtype, x.dtype, z.dtype if z is not None else None, w.dtype if w is not None else None, x.get_device())
    plan = _PLANS.get(key)
    if plan is None:
        block_r, meta = _meta(_BWD_TILE, *key[1:9])
        plan = _PLANS[key] = block_r, meta, tuple(meta.items()), _per_group(key, dy, x, z, w, meta, G)
    block_r, meta, meta_key, per_group = plan
    block_s = meta["BLOCK_S"]
    n_tiles = _ceil_div(M, block_r)
    # a multiple of G (program p works on group p mod G), at most one a tile
    programs = G * max(1, min(n_tiles, per_group))
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dz = torch.empty((M, N), dtype=z.dtype, device=z.device) if z is not None else None
    # every program writes its whole row of sums, so only an empty input needs them zeroed
    part = (torch.empty if M else torch.zeros)((programs, block_r * block_s) if w is not None else (0,),
                                              dtype=torch.float32, device=x.device)
    if M:
        args = (dy, x, z if z is not None else x, w if w is not None else x, rstd, dx, dz if dz is not None else dx,
                part if w is not None else dx, _stride(dy), _stride(x), _stride(z), M, N, S, G, n_tiles, offset)
        compiled = _launch(_gated_bwd_kernel, (programs,), args, meta, meta_key)
        LAUNCHES["gated_bwd"] += 1
        if record is not None:
            record.append(("gbwd", compiled, block_r, per_group, args))
    # program p summed group p mod G: fold the programs of each group and the tile's rows
    dw = part.view(programs // G, G, block_r, block_s)[..., :S].sum((0, 2)).reshape(N) if w is not None else None
    return dx, dz, dw
