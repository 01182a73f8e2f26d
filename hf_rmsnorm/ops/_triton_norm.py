"""Triton kernels and launchers shared by RMSNorm and LayerNorm.

One forward and one backward kernel serve both norms: LayerNorm is RMSNorm of the centred
row, so the difference is one compile-time flag (``IS_RMS``), not a second copy of the code.
This module imports Triton at the top and is therefore only imported once the Triton backend
has been chosen (see ``_norm.py``); the package itself never needs Triton.

Statistics and accumulation are always fp32. The weight/bias gradients are reduced
deterministically: every backward program owns a fixed set of rows, accumulates its partial
sums in registers and writes one fp32 row of them, weight's N then bias's N, to a
``(programs, N or 2N)`` buffer, which a second kernel sums in a fixed order. No atomics, so
two runs give bit-identical gradients.
"""

from __future__ import annotations

import collections
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._direct import launch as _launch  # a module global: tests replace it to record launches
from ._norm import _interpreting


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels with these versions, or None.

    Before Triton 3.7 the interpreter turns a program id into a Python int with ``int()`` of a
    one-element NumPy array, which NumPy 2.4 refuses: the backward kernel's loop over its tiles
    (``range(pid, ..., programs)``) then fails deep inside Triton with "only 0-dimensional
    arrays can be converted to Python scalars". Compiled kernels on a GPU are not affected."""
    from packaging.version import Version  # only asked under TRITON_INTERPRET=1

    if Version(triton_version).release < (3, 7) and Version(numpy_version).release >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run these kernels with "
            f"NumPy {numpy_version}: it converts one-element arrays with int(), which NumPy 2.4 refuses. "
            "Install triton>=3.7 or numpy<2.4, or unset HF_RMSNORM_BACKEND=triton to take the torch path."
        )
    return None


if _interpreting():  # decided here once: Triton picks the interpreter when a kernel is defined
    import numpy

    _problem = interpreter_problem(triton.__version__, numpy.__version__)
    if _problem:
        raise RuntimeError(_problem)

# Number of kernel launches per kernel name; lets tests prove that the Triton code really ran
# (under TRITON_INTERPRET=1 on a CPU the results alone cannot tell the two backends apart).
LAUNCHES: collections.Counter = collections.Counter()


@triton.jit
def _load_f32(P, cols, col_mask):
    return tl.load(P + cols, mask=col_mask, other=0.0).to(tl.float32)


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
    TILES: tl.constexpr,  # tiles per program
    STREAM: tl.constexpr,  # cache eviction policy of the row loads: "" (default) or "evict_first"
    STAGES: tl.constexpr,  # software pipelining of the tiles' row loads (see fwd_stages); 1: none
):
    # A program normalises TILES consecutive tiles of BLOCK_M rows and, with several, loads the
    # weight and bias once for all of them: with parameters wider than the activations (bf16
    # rows, fp32 weight and bias) a one-row program reads 4x more parameter bytes from L2 than
    # row bytes from memory. A loop rather than unrolled tiles: the unrolled ones kept more
    # registers (LayerNorm at 8192 columns, fp32 parameters: 136 against 121, half the programs
    # per SM). TILES = 1 compiles to the one-tile kernel, which loads the parameters after the
    # row's statistics: loaded first they would be live across the row's load and reduction
    # (RMSNorm at 768 columns: 32 -> 39 registers a thread).
    if TILES > 1:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        if HAS_WEIGHT:
            w = _load_f32(W, cols, col_mask) + offset
        if HAS_BIAS:
            b = _load_f32(B, cols, col_mask)
    for t in tl.range(TILES, num_stages=STAGES):
        # (this order of the index lines and the parameters loaded where they are used make the
        # one-tile kernel what it was before TILES: other orders cost registers, e.g. RMSNorm at
        # 8192 columns 34 instead of 32, 3 programs per SM instead of 4)
        rows = (tl.program_id(0) * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < M
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        # int64 offsets: M * N can exceed 2**31 for large activations.
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                    eviction_policy=STREAM).to(tl.float32)
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
            if TILES == 1:
                w = _load_f32(W, cols, col_mask) + offset
            y = y * w[None, :]
        if HAS_BIAS:
            if TILES == 1:
                b = _load_f32(B, cols, col_mask)
            y = y + b[None, :]
        tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _norm_bwd_kernel(
    X,  # saved input rows, (M, N), row stride stride_x
    W,  # weight (N,); unused when HAS_WEIGHT is False
    DY,  # output gradient, (M, N), row stride stride_dy
    DX,  # input gradient, (M, N), contiguous, X's dtype
    Part,  # gradient partials, (programs, [N weight][N bias]) fp32, one row per program
    Mean,  # per-row mean (M,) fp32 (LayerNorm only)
    Rstd,  # per-row 1 / sqrt(var + eps) (M,) fp32
    stride_x,
    stride_dy,
    M,
    N,
    offset,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUNDING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STREAM: tl.constexpr,  # cache eviction policy of the x and dy loads (see the forward)
    RELOAD_W: tl.constexpr,  # load the weight per tile (from cache) instead of holding it in registers
    STAGES: tl.constexpr,  # software pipelining of the x and dy loads (see bwd_stages); 1: none
):
    # A persistent grid: program p takes the tiles p, p + P, p + 2P, ... of BLOCK_M rows each
    # (P = the number of programs, fixed per device and shape), so the weight gradient needs
    # one partial row per program instead of one per tile, and every SM keeps several
    # independent tiles in flight.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # The gradient accumulators hold one row, not a (BLOCK_M, BLOCK_N) tile: every thread owns
    # the same columns of all BLOCK_M rows, so summing a tile's rows first costs no exchange and
    # halves the accumulators' registers with two-row tiles (LayerNorm at 768 columns: 109 -> 96
    # registers a thread with Triton 3.6, 115 -> 96 with 3.9: 5 programs per SM instead of 4;
    # scripts/kernel_report.py).
    if HAS_WEIGHT:
        if not RELOAD_W:
            w = _load_f32(W, cols, col_mask) + offset
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in tl.range(pid, tl.cdiv(M, BLOCK_M), programs, num_stages=STAGES):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)  # M * N can exceed 2**31
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                    eviction_policy=STREAM).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0,
                     eviction_policy=STREAM).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            # the weight multiplied the rounded row, so its gradient sees the rounded row
            if ROUNDING == 1:
                dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
            elif ROUNDING == 2:
                dw += tl.sum(dy * xhat.to(W.dtype.element_ty).to(tl.float32), axis=0)
            else:
                dw += tl.sum(dy * xhat, axis=0)
            if RELOAD_W:
                w = _load_f32(W, cols, col_mask) + offset
            wdy = dy * w[None, :]
        else:
            wdy = dy
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
        # d/dx of (x - mean) * rstd, projected: dx = rstd * (g - mean(g * xhat) * xhat [- mean(g)])
        if IS_RMS:
            c1 = tl.sum(xhat * wdy, axis=1) / N
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            # both row sums in one reduction: one exchange between warps instead of two
            s1, s2 = tl.reduce((xhat * wdy, wdy), 1, _add_pair)
            dx = (wdy - (xhat * (s1 / N)[:, None] + (s2 / N)[:, None])) * rstd[:, None]
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT or HAS_BIAS:
        part = Part + pid * (HAS_WEIGHT + HAS_BIAS) * N + cols  # this program's row: weight's N, then bias's N
        if HAS_WEIGHT:
            tl.store(part, dw, mask=col_mask)
        if HAS_BIAS:
            tl.store(part + HAS_WEIGHT * N, db, mask=col_mask)


@triton.jit
def _sum_rows_kernel(Part, OutW, OutB, rows, cols, N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Column sums of the (rows, cols) fp32 partials in a fixed order: columns [0, N) into OutW,
    # [N, 2N) into OutB (when given), each in its own dtype. Narrow column strips give many
    # programs: the buffer is small (rows = SMs x occupancy), so its sum is bound by the loads
    # in flight, not by bandwidth; torch's ``sum(0)`` of it ran 10-15 us on an H200
    # (results/h200/earlier/run3_fbad916/profile.md), 10 % of a forward+backward at 768 columns.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < cols
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(Part + r[:, None] * cols + c[None, :], mask=(r < rows)[:, None] & c_mask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(OutW + c, total.to(OutW.dtype.element_ty), mask=c < N)
    if OutB is not None:
        tl.store(OutB + (c - N), total.to(OutB.dtype.element_ty), mask=(c >= N) & c_mask)


# Host-side integer helpers in plain Python: in recent Triton (3.9 in CI) ``triton.cdiv`` and
# ``triton.next_power_of_2`` are constexpr functions whose call from host code costs ≈ 5 µs
# each on the CI CPU, and a launch needed several.
def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _warps(elements: int, per_thread: int) -> int:
    # per_thread fp32 values per thread keeps the tile in registers without spilling
    return max(1, min(32, _pow2_at_least(elements) // (32 * per_thread)))


def _tile(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of N elements: at least 2048 elements per program
    (two rows of ≤ 1024), 16 fp32 values per thread. Measured on an H200 (benchmarks/NOTES.md,
    sweeps of runs 1–3): v1's 4096-element tiles at 8 values a thread were 1–28 % slower in the
    forward, and no neighbour of these tiles was more than 2 % faster at any benchmark shape."""
    block_n = _pow2_at_least(N)
    block_m = max(1, min(16, 2048 // block_n))
    return block_m, block_n, _warps(block_m * block_n, 16)


@functools.lru_cache(maxsize=None)
def fwd_config(N: int, is_rms: bool = True, wide_params: bool = False, has_bias: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward kernel for rows of N elements; ``wide_params``:
    the weight (or bias) has wider elements than the rows (fp32 parameters on bf16/fp16 rows)."""
    block_m, block_n, warps = _tile(N)
    if block_m > 1 or (not is_rms and block_n != 2048):
        # 32 values a thread rather than 16. LayerNorm's two row reductions (mean, then
        # variance) each exchange values between the warps that share a row (Triton lays warps
        # out along the row), so fewer warps pay less: measured on an H200 (run 5 sweep), 77 -> 86 %
        # of the copy bandwidth at 768 and 85 -> 94 % at 8192, level at 4096; at 2048 the 16-value
        # tile stays (84 vs 80 %). RMSNorm's several-row tiles too (run 8 sweep, GPU time, 768
        # columns: 52 -> 50 us with a bf16 weight, 53 -> 50 with an fp32 one); its one-row tiles
        # were level either way.
        warps = max(1, warps // 2)
    wide_pair = wide_params and block_n <= (4096 if has_bias or not is_rms else 8192)
    layer_norm_pair = not is_rms and has_bias and block_n == 4096
    if block_m == 1 and (wide_pair or layer_norm_pair):
        # two rows a tile at 32 values a thread. With wide parameters the rows share each
        # parameter load. Measured on an H200 (run 8 sweep, GPU time, bf16 rows; against four
        # tiles a program of one row, the v5 rule): RMSNorm with an fp32 weight 37 -> 35 us at
        # 2048, 72 -> 67 at 4096, 156 -> 135 at 8192 (95 % of the copy bandwidth, as with a bf16
        # weight); LayerNorm with fp32 weight and bias 43 -> 37 us at 2048, 81 -> 77 at 4096.
        # LayerNorm's 2x8192 tile took 245 us: 86 registers with Triton 3.6, so one program of
        # 16 warps per SM (RMSNorm's: 63, two). A bias takes RMSNorm's there too (84), so with a
        # bias or LayerNorm's reductions the 8192-column rows keep the tiles (fwd_tiles).
        # LayerNorm with a bias takes the pair at 4096 columns with bf16 parameters too (sweeps
        # of runs 8 and 9: 68.8 -> 67.6 and 69.6 -> 67.4 us); not at 2048 (the one-row tile
        # stayed best) or 8192 (91 against 96 % of the copy bandwidth).
        return 2, block_n, _warps(2 * block_n, 32)
    return block_m, block_n, warps


@functools.lru_cache(maxsize=None)
def bwd_config(N: int, has_bias: bool = False, wide_params: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward kernel for rows of N elements;
    ``wide_params``: the weight has wider elements than the rows (as in ``fwd_config``)."""
    block_m, block_n, warps = _tile(N)
    if block_n == 8192 and not has_bias:
        # measured (v1 sweep, H200, twice): two rows at 32 values a thread beat one row at 16
        # by 5 % (run 8 sweep: 203 against 253 us). With a bias-gradient accumulator as well
        # that tile spills (kernel_report.py), and wider rows would need 64 values a thread.
        # With an fp32 weight on bf16 rows it spills 56 B under the H200's Triton 3.6 (none
        # under 3.9): 32 warps of 16 values a thread compile to 64 registers without a spill,
        # and with a bf16 weight took 206 against 203 us (run 8 sweep).
        return 2, block_n, 32 if wide_params else 16
    return block_m, block_n, warps


def bwd_maxnreg(block_m: int, is_rms: bool, has_bias: bool, stages: int = 1) -> int | None:
    """Registers a thread of the backward kernel may use (ptxas ``maxnreg``), None: no cap.

    LayerNorm with a bias on tiles of several rows (up to 1024 columns), plain loop: 80 instead
    of the 96 Triton 3.6 and 3.9 allocate, so 6 programs fit an SM instead of 5, at no spill with
    the H200's Triton 3.6 and bf16 parameters, 8 B with fp32 ones or Triton 3.9
    (scripts/kernel_report.py). Measured on an H200 (run 7 sweep, 65536x768, bf16): 99 -> 93 us.
    Pipelined (``stages`` > 1), no cap: it spills there under Triton 3.9, and uncapped it was the
    fastest (run 10 sweep: 90 us plain and capped, 80 pipelined and uncapped).
    Only where measured: a cap above a kernel's own count raises it (RMSNorm at 768: 72 -> 96),
    and the one-row tiles spill 56-72 B at 80."""
    if not is_rms and has_bias and block_m >= 2 and stages == 1:
        return 80
    return None


# Software pipelining (Triton's loop pipeliner, ``tl.range(num_stages=S)``): a program issues
# the row loads of the next S - 1 tiles (cp.async, into shared memory) before it reduces and
# stores the current one, so loads stay in flight through the reductions and the store.
# Shipped only where measured faster (H200, Triton 3.6, bf16 rows, GPU time of the raw kernels
# on the shipped tile, 1 / 3 stages; runs 9, 10 and 12 of benchmarks/results/h200):
# - the backward with a bias-gradient accumulator, 768 to 8192 columns. LayerNorm (run 9):
#   2048 columns 59 / 52 us, 4096 124 / 104, 8192 275 / 198 (97 % of the copy bandwidth, was
#   70 %); its two-row tile at 768, 90 capped at 80 registers / 80 uncapped (run 10; capped
#   and pipelined it spills under Triton 3.9, see bwd_maxnreg). RMSNorm with a bias (run 10):
#   768 85 / 80, 2048 55 / 52, 4096 120 / 106, 8192 256 / 194. LayerNorm with fp32 weight and
#   bias on bf16 rows (run 10): 90 / 82, 62 / 53, 125 / 105, 274 / 198; RMSNorm with fp32
#   weight and bias on bf16 rows (run 12): 84 / 75, 59 / 54, 118 / 108, 258 / 195.
# - the forward with a bias and fp32 parameters on bf16 rows past 4096 columns (8 one-row tiles
#   a program): LayerNorm 166 / 143 us at 8192 (run 9), RMSNorm+bias 158 / 140 (run 10; 64
#   registers under Triton 3.6, two programs an SM, but 75 under 3.9, one: time it again on a
#   GPU running 3.9).
# Not elsewhere: two stages lost everywhere (run 9's benchmark with them: forward+backward at
# 8192 columns 412 -> 443 us for LayerNorm, 399 -> 441 for RMSNorm+bias); RMSNorm's backward
# without a bias was level or slower with 3 (run 9, 8192: 202 / 255 us; 4096: 101 / 105); its
# forward with bf16 parameters ships one tile a program, where the stage rows do not apply;
# RMSNorm's backward with fp32 parameters and no bias, fp32 rows and tiles under 1024 columns
# were not timed with stages.
_PIPELINE_STAGES = 3
# ... on rows up to this wide (wider rows spill registers anyway), and only where the tile's
# buffers fit the shared memory one block may use (``_pipeline_fits``)
_PIPELINE_MAX_N = 8192
# ... and this wide at least: narrower tiles (rows up to 512) hold several rows, never timed
# pipelined
_PIPELINE_MIN_N = 1024
# shared memory a program may need besides the pipelined row buffers: reduction scratch and
# layout conversions (kernel_report.py, Triton 3.6 and 3.9: up to 16 KiB, the fp32-parameter
# backward at 8192 columns; the pipelined kernels' own under 300 B)
_REDUCTION_SHARED = 16 * 1024


@functools.lru_cache(maxsize=None)
def block_shared(device: torch.device) -> int | None:
    """Bytes of shared memory one block may use on ``device``; None off CUDA (the interpreter
    runs CPU tensors and has no shared memory to count)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def _pipeline_fits(shared: int | None, rows: int, x_size: int) -> bool:
    """Whether ``rows`` elements of ``x_size`` bytes per stage, for the S - 1 tiles in flight,
    fit ``shared`` bytes, the shared memory one block may use (227 KiB on an H100/H200, 163 on
    an A100, 99 on sm_86/89 GPUs, 64 on Turing and AMD's: the 8192-column backward's buffers
    take 64 KiB, with the margin 80, and it runs unpipelined there)."""
    return shared is None or (_PIPELINE_STAGES - 1) * rows * x_size + _REDUCTION_SHARED <= shared


@functools.lru_cache(maxsize=None)
def bwd_stages(shared: int | None, block_m: int, block_n: int, has_bias: bool, x_size: int) -> int:
    """Pipeline stages of the backward's tile loop (1: none): LayerNorm and RMSNorm with a bias
    on bf16/fp16 rows, with parameters of either width, tiles of 1024 to 8192 columns (rows of
    513 to 8192 elements), where its x and dy buffers fit ``shared`` (``block_shared``; see
    above)."""
    if (has_bias and x_size <= 2 and _PIPELINE_MIN_N <= block_n <= _PIPELINE_MAX_N
            and _pipeline_fits(shared, 2 * block_m * block_n, x_size)):
        return _PIPELINE_STAGES
    return 1


@functools.lru_cache(maxsize=None)
def fwd_stages(shared: int | None, tiles: int, block_m: int, block_n: int, has_bias: bool, x_size: int) -> int:
    """Pipeline stages of the forward's tile loop (1: none): LayerNorm and RMSNorm with a bias
    where a program has several tiles (``fwd_tiles``: parameters wider than the rows, past 4096
    columns, and LayerNorm's two-row tiles of 1024 columns), where its x buffers fit ``shared``
    (``block_shared``)."""
    if (tiles > 1 and has_bias and block_n <= _PIPELINE_MAX_N
            and _pipeline_fits(shared, block_m * block_n, x_size)):
        return _PIPELINE_STAGES
    return 1


# Registers, threads and blocks of one SM on every NVIDIA GPU Triton supports (sm_80 to
# sm_120); shared memory per SM differs between them (torch reports it), and each block holds
# 1 KiB of it for the system besides what the kernel asks for.
_SM_REGISTERS = 65536
_SM_THREADS = 2048
_BLOCK_RESERVED_SHARED = 1024
_MAX_PROGRAMS_PER_SM = 8
# Launch plans: what a launch derives from its signature (row width, dtypes, flags, device, the
# tuning overrides), worked out on its first call and kept: the tile, tiles, stages, register
# cap, the constexprs and launch options with their key tuple, the backward's programs on CUDA.
# One lookup per launch instead of five to seven calls, host time the GPU waits for
# (benchmarks/NOTES.md, session 21). Keyed by kernel ("fwd", "bwd", "sum") and signature.
_PLANS: dict = {}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _sm_shared(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor


def _programs_per_sm(n_regs: int, num_warps: int, cap: int = _MAX_PROGRAMS_PER_SM, shared: int = 0,
                     sm_shared: int | None = None) -> int:
    """How many programs of a kernel compiled to ``n_regs`` registers a thread and ``shared``
    bytes of shared memory fit on one SM at once (registers, threads, and shared memory when
    the SM's ``sm_shared`` is given), at most ``cap`` (the backward's persistent grid uses 8;
    the hardware's own limit is 32 blocks an SM)."""
    threads = 32 * num_warps
    # the hardware hands out registers in blocks of 8 per thread (256 per warp)
    regs = -(-max(1, n_regs) // 8) * 8
    fits = min(_SM_REGISTERS // (regs * threads), _SM_THREADS // threads, cap)
    if sm_shared is not None:
        fits = min(fits, sm_shared // (shared + _BLOCK_RESERVED_SHARED))
    return max(1, fits)


# Tiles per forward program where the parameters' elements are wider than the rows' (fp32
# weight, or weight and bias, on bf16/fp16 rows: the mixed-precision forward): the tiles of a
# program load the parameters once. Eight rows a program, in two cases:
# - one-row tiles (fwd_config gives two-row tiles up to 8192 columns for RMSNorm without a bias,
#   4096 with one or for LayerNorm): 8 tiles. Measured on an H200 (Triton 3.6, bf16 rows,
#   LayerNorm with fp32 weight and bias at 8192 columns): 213 us with one tile, 172 with 4, 166
#   with 8 (run 8 sweep, GPU time; run 7's do_bench: 216, 174, 168). Not the bytes the
#   parameters cost: bf16 weight and bias read as many bytes a column and run at 96 % of the
#   copy bandwidth with one tile at 8192, where 8 tiles took 160 us against 133.
# - LayerNorm with a bias on its two-row tile of 1024 columns (rows of 513 to 1024 elements,
#   GPT-2's and BERT's widths): 4 tiles, pipelined (fwd_stages). Measured on an H200 (GPU time,
#   fp32 weight and bias, 1 tile / 4 tiles 3 stages): 65536x768 58.3 / 53.9 us and 8192x1024
#   9.1 / 8.1 in one sweep (run 14b), 57.9 / 53.6 at 768 in run 12's, 9.2 / 8.0 at 1024 in run
#   14's; 2 or 8 tiles were slower than 4 (58.7 and 57.0 us at 768). Not RMSNorm with a bias
#   there: 53.6 / 53.7 us at 768 with 8 tiles 3 stages (run 14b), though 8.6 / 7.4 at 1024.
# Consecutive tiles rather than a persistent grid, which lost in bf16 by capping the programs per
# SM (runs 4 and 6).
_FWD_ROWS = 8
# ... but only while the grid keeps this many programs (≈ 8 per SM of an H100/H200): a short
# batch needs programs to spread over the SMs more than it needs fewer parameter loads
_MIN_FWD_PROGRAMS = 1024


def param_size(weight, bias) -> int:
    """Bytes of the widest parameter element (0 without parameters)."""
    return max((p.element_size() for p in (weight, bias) if p is not None), default=0)


def fwd_tiles(M: int, block_m: int, block_n: int, x_size: int, p_size: int, is_rms: bool, has_bias: bool) -> int:
    """Tiles of ``block_m`` x ``block_n`` per forward program for M rows of ``x_size``-byte
    elements and parameters whose widest element has ``p_size`` bytes (see ``_FWD_ROWS``)."""
    if p_size <= x_size or M < _MIN_FWD_PROGRAMS * _FWD_ROWS:
        return 1
    if block_m == 1 or (block_m == 2 and block_n == 1024 and not is_rms and has_bias):
        return _FWD_ROWS // block_m
    return 1


def _empty(x, like, dtype):
    """A contiguous output for the rows ``x``: shaped like ``like`` where given, else like x.
    (``empty_like`` with contiguous format: the cheapest allocation to call, host time per launch.)"""
    return torch.empty_like(x if like is None else like, dtype=dtype, memory_format=torch.contiguous_format)


def _row_layout(t) -> tuple[int, int, int]:
    """(M, N, row stride) of the rows of ``t``: 2-D with unit column stride, or contiguous of any
    rank (``_norm._rows`` hands the launchers nothing else), whose rows are then N apart."""
    if t.dim() == 2:
        M, N = t.shape
        return M, N, t.stride(0)
    N = t.shape[-1]
    return (t.numel() // N if N else 0), N, N


# a list while _cuda_launch wants to see the launches of one call (never kept longer: it holds the
# call's tensors): (kernel, compiled kernel, rows or columns a program, the most programs or 0,
# the arguments) each
record = None


def norm_fwd(x, weight, bias, eps, offset, is_rms, rounding, out_dtype, config=None, tiles=None, stream="",
             stages=None, like=None):
    """Launch the forward kernel on the rows of ``x`` (2-D with unit column stride, or contiguous
    of any rank); returns y, contiguous, in the shape of ``like`` (default x's), and the fp32
    statistics per row: mean (None for RMSNorm, which has none) and rstd.

    ``config`` overrides ``fwd_config(N, is_rms, wide_params, has_bias)``, ``tiles`` the tiles per program
    ``fwd_tiles`` picks, ``stream`` (``"evict_first"``) hints the cache to drop the rows
    after reading them, as torch.compile's kernels do, and ``stages`` the pipeline stages of the
    tile loop ``fwd_stages`` picks; the tuning sweep uses all four."""
    M, N, stride = _row_layout(x)
    y = _empty(x, like, out_dtype)
    rstd = x.new_empty((M,), dtype=torch.float32)
    mean = None if is_rms else x.new_empty((M,), dtype=torch.float32)
    if M == 0:
        return y, mean, rstd
    # fwd_tiles depends on M only through this comparison
    key = ("fwd", N, x.dtype, weight.dtype if weight is not None else None, bias.dtype if bias is not None else None,
           is_rms, rounding, M >= _MIN_FWD_PROGRAMS * _FWD_ROWS, x.get_device(), config, tiles, stream, stages)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _fwd_plan(x, M, N, weight, bias, is_rms, rounding, config, tiles, stream, stages)
    rows_per_program, meta, meta_key = plan
    args = (x, y, weight, bias, mean, rstd, stride, M, N, eps, offset)  # mean None (RMS): no pointer for the launcher to check
    compiled = _launch(_norm_fwd_kernel, (_ceil_div(M, rows_per_program),), args, meta, meta_key)
    LAUNCHES["norm_fwd"] += 1
    if record is not None:  # _cuda_launch.learn's source: what was launched, for which rows
        record.append(("fwd", compiled, rows_per_program, 0, args))
    return y, mean, rstd


def _fwd_plan(x, M, N, weight, bias, is_rms, rounding, config, tiles, stream, stages):
    """(rows a program, meta, meta key) of ``norm_fwd``'s launches for this signature."""
    p_size = param_size(weight, bias)
    block_m, block_n, warps = config or fwd_config(N, is_rms, p_size > x.element_size(), bias is not None)
    if tiles is None:
        tiles = fwd_tiles(M, block_m, block_n, x.element_size(), p_size, is_rms, bias is not None)
    if stages is None:
        stages = fwd_stages(block_shared(x.device), tiles, block_m, block_n, bias is not None, x.element_size())
    meta = dict(IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ROUNDING=rounding,
                BLOCK_M=block_m, BLOCK_N=block_n, TILES=tiles, STREAM=stream, STAGES=stages, num_warps=warps)
    return block_m * tiles, meta, tuple(meta.items())


def norm_bwd(dy, x, weight, mean, rstd, offset, is_rms, rounding, has_bias, config=None, programs_per_sm=None,
             maxnreg=None, stream="", reload_w=False, stages=None, like=None):
    """Launch the backward kernel; returns dx (contiguous, shaped like ``like``, default x's)
    and the fp32 ``(programs, C)`` partial sums of the parameter gradients: C = N for one
    parameter, 2N for weight and bias (weight first), None without parameters. ``sum_partials``
    reduces them. ``x`` and ``dy`` are rows as ``norm_fwd`` takes them, the same number.

    ``config`` overrides ``bwd_config(N, has_bias, wide_params)``, ``programs_per_sm`` the
    occupancy the compiled kernel allows, ``maxnreg`` caps the registers a thread may use (ptxas spills beyond it;
    fewer registers, more programs per SM; default ``bwd_maxnreg``'s cap, 0 for none),
    ``stream`` is the forward's cache hint for the x and dy loads, ``reload_w`` loads the
    weight for every tile instead of keeping it in registers (fewer registers, more loads), and
    ``stages`` the pipeline stages of the tile loop ``bwd_stages`` picks. The tuning
    sweep uses all six."""
    M, N, stride_x = _row_layout(x)
    stride_dy = _row_layout(dy)[2]
    dx = _empty(x, like, x.dtype)
    columns = ((weight is not None) + has_bias) * N
    if M == 0:
        return dx, x.new_zeros((1, columns), dtype=torch.float32) if columns else None
    key = ("bwd", N, x.dtype, dy.dtype, weight.dtype if weight is not None else None, has_bias, is_rms, rounding,
           x.get_device(), config, programs_per_sm, maxnreg, stream, reload_w, stages)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _bwd_plan(x, dy, weight, N, is_rms, rounding, has_bias, columns, config, programs_per_sm,
                                       maxnreg, stream, reload_w, stages)
    block_m, meta, meta_key, programs = plan
    # A fixed number of programs per device and shape keeps the partial-sum layout, and so
    # the weight gradient, identical from one run to the next. Every program owns at least
    # one tile, so every partial row is written.
    cap, programs = programs, min(programs, _ceil_div(M, block_m))
    part = x.new_empty((programs, columns), dtype=torch.float32) if columns else None
    # Absent buffers go to the kernel as None: Triton's launcher asks the driver about every
    # pointer argument, which costs host time on each launch.
    args = (x, weight, dy, dx, part, None if is_rms else mean, rstd, stride_x, stride_dy, M, N, offset)
    compiled = _launch(_norm_bwd_kernel, (programs,), args, meta, meta_key)
    LAUNCHES["norm_bwd"] += 1
    if record is not None:
        record.append(("bwd", compiled, block_m, cap, args))
    return dx, part


def _bwd_plan(x, dy, weight, N, is_rms, rounding, has_bias, columns, config, programs_per_sm, maxnreg, stream,
              reload_w, stages):
    """(BLOCK_M, meta, meta key, programs on the device) of ``norm_bwd``'s launches for this
    signature; the programs before the cap at one tile each."""
    block_m, block_n, warps = config or bwd_config(N, has_bias, param_size(weight, None) > x.element_size())
    if stages is None:
        stages = bwd_stages(block_shared(x.device), block_m, block_n, has_bias, x.element_size())
    if maxnreg is None:
        maxnreg = bwd_maxnreg(block_m, is_rms, has_bias, stages)
    meta = dict(IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, ROUNDING=rounding,
                BLOCK_M=block_m, BLOCK_N=block_n, STREAM=stream, RELOAD_W=reload_w, STAGES=stages, num_warps=warps)
    if maxnreg:
        meta["maxnreg"] = maxnreg
    if x.device.type != "cuda":
        return block_m, meta, tuple(meta.items()), 4  # TRITON_INTERPRET=1 on the CPU: a few programs still exercise the reduction
    if programs_per_sm is None:
        compiled = _backward_specimen(x, dy, weight, is_rms, columns, meta)
        programs_per_sm = _programs_per_sm(compiled.n_regs, warps, shared=compiled.metadata.shared,
                                           sm_shared=_sm_shared(x.device))
    return block_m, meta, tuple(meta.items()), _sm_count(x.device) * programs_per_sm


def _backward_specimen(x, dy, weight, is_rms, columns, meta):
    """The backward kernel compiled (or fetched from Triton's cache) for ``meta`` without a
    launch, to read the registers and shared memory one program needs. Always the same
    specialisation for a plan, whatever call made it (empty stand-ins for the buffers, so
    aligned pointers; the strides of contiguous rows; a row count divisible by 16): the
    programs, and with them the partial-sum layout and the weight gradient's bits, do not depend
    on which call of a process came first."""
    def stand_in(t, dtype=None):
        return None if t is None else t.new_empty((0,), dtype=dtype or t.dtype)

    N = x.shape[-1]
    stats = stand_in(x, torch.float32)
    compiled = _norm_bwd_kernel.warmup(stand_in(x), stand_in(weight), stand_in(dy), stand_in(x), stats if columns else None,
                                       None if is_rms else stats, stats, N, N, 4096, N, 0.0, grid=(1,), **meta)
    compiled._init_handles()
    return compiled


@functools.lru_cache(maxsize=None)
def _sum_config(rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the partial-sum kernel for a (rows, cols) buffer."""
    # Strips of 8 to 64 columns: ≈ 100-250 programs at the benchmark widths, one wave. A
    # strip's rows in tiles of up to 8192 elements, 32 values a thread: the backward writes
    # SMs x programs per SM rows (132-1056 on an H200), so one round of loads takes a whole
    # strip at up to 2048 columns, where 2048-element tiles took 4-5 dependent rounds (the loop
    # issues a tile's loads after the previous tile's adds). The sum took 3-5 us of every
    # backward (run 8 sweep: bwd against bwd+sums) for 1-7 MB of partials (≈ 1.5 us of bytes).
    block_c = max(8, min(64, _pow2_at_least(cols) // 256))
    block_r = min(8192 // block_c, _pow2_at_least(rows))
    return block_r, block_c, _warps(block_r * block_c, 32)


def sum_partials(part, dtypes, config=None):
    """Column sums of ``norm_bwd``'s fp32 partials in a fixed order: one tensor of N sums per
    parameter, in that parameter's dtype (``dtypes``: one or two, weight first). ``config``
    overrides ``_sum_config``'s (BLOCK_R, BLOCK_C, num_warps); the tuning sweep uses it."""
    rows, cols = part.shape
    n = cols // len(dtypes)
    outs = [part.new_empty((n,), dtype=dtype) for dtype in dtypes]
    key = ("sum", rows, cols, config)
    plan = _PLANS.get(key)
    if plan is None:
        block_r, block_c, warps = config or _sum_config(rows, cols)
        meta = dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
        plan = _PLANS[key] = block_c, meta, tuple(meta.items())
    block_c, meta, meta_key = plan
    args = (part, outs[0], outs[1] if len(outs) > 1 else None, rows, cols, n)
    compiled = _launch(_sum_rows_kernel, (_ceil_div(cols, block_c),), args, meta, meta_key)
    LAUNCHES["sum_partials"] += 1
    if record is not None:
        record.append(("sum", compiled, block_c, 0, args))
    return outs
