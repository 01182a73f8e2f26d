"""The launchers' choices (tile shape, tiles per program, pipeline stages, programs per SM,
register cap, the partial-sum tiles) and that every choice computes the same norm: the
launch parameters are tuned per GPU, so each variant the sweep can pick must stay correct."""

import pytest
import torch

from conftest import FNS, needs_interpreter
from hf_rmsnorm.ops import layer_norm, rms_norm
from reference import assert_close_to_fp64, fwd_bwd, norm_fp64, norm_inputs, norm_torch_same_dtype


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_m,warps,tiles,stream,reload_w,stages", [
    (1, 1, 1, "", False, 1), (2, 4, 1, "", False, 1), (4, 2, 1, "", False, 1), (16, 4, 1, "", False, 1),
    (1, 2, 4, "", False, 2), (2, 4, 3, "evict_first", False, 3), (4, 2, 1, "", True, 1), (1, 2, 5, "", False, 3),
])
def test_every_launch_configuration_computes_the_same_norm(kind, dtype, block_m, warps, tiles, stream, reload_w, stages):
    """The launch parameters are tuned per GPU (scripts/tune_kernels.py sweeps them); every
    tile shape must compute the norm and its gradients, masked rows and columns included, and
    so must a forward program that takes several tiles (the last program's partly past M), the
    loads with a cache hint, a backward that loads the weight per tile and tile loops
    software-pipelined over 2 or 3 stages (the interpreter runs a pipelined loop as a plain
    one: what it checks here is the launch; tests/test_gpu.py compares the compiled bits)."""
    needs_interpreter("calls the launchers on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    is_rms, eps = kind == "rms", 1e-5
    x, w, b, dy = norm_inputs(m=37, n=40, dtype=dtype)
    x, w, b = x.detach() * 2 + 0.5, w.detach(), b.detach()
    config = (block_m, 64, warps)  # 40 columns in a 64-wide tile, 37 rows in tiles of block_m
    y, mean, rstd = _triton_norm.norm_fwd(x, w, b, eps, 0.0, is_rms, 0, dtype, config=config, tiles=tiles, stream=stream,
                                          stages=stages)
    dx, part = _triton_norm.norm_bwd(dy, x, w, mean, rstd, 0.0, is_rms, 0, True, config=config, stream=stream,
                                     reload_w=reload_w, stages=stages)
    ours = [y, dx, *_triton_norm.sum_partials(part, [torch.float32, torch.float32])]
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), b.double(), dy.double())
    yardstick = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    for name, got, ref, truth_ in zip(("y", "dx", "dw", "db"), ours, yardstick, truth):
        assert_close_to_fp64(got.to(dtype) if name in ("dw", "db") else got, ref, truth_, dtype, f"{name} with tile {config}")


def test_forward_tiles_per_program_follow_the_parameter_dtype():
    """Several tiles per forward program exactly where the parameters' elements are wider than
    the rows' (the mixed-precision forward) on one-row tiles, or on LayerNorm's two-row tile of
    1024 columns with a bias, eight rows a program either way, and only while the grid keeps
    enough programs to fill the GPU."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    many = 1 << 20  # rows: enough programs at any tile
    rows = _triton_norm._FWD_ROWS
    assert rows > 2
    # (rows per tile, columns per tile, bytes of an x element, bytes of the widest parameter
    # element, RMSNorm, with a bias) -> tiles per program
    cases = {
        (1, 8192, 2, 2, False, True): 1,  # bf16 rows, bf16 parameters
        (1, 8192, 2, 4, False, True): rows,  # bf16 (or fp16) rows, fp32 parameters: the mixed-precision forward
        (1, 8192, 2, 4, True, False): rows,  # ... whatever the norm
        (2, 1024, 2, 4, False, True): rows // 2,  # LayerNorm with a bias on its two-row 1024-column tile
        (2, 1024, 2, 2, False, True): 1,  # ... with bf16 parameters
        (2, 1024, 2, 4, False, False): 1,  # ... without a bias (not measured)
        (2, 1024, 2, 4, True, True): 1,  # RMSNorm with a bias there (no gain at 768 columns)
        (2, 2048, 2, 4, False, True): 1,  # other several-row tiles share their parameter loads already
        (4, 512, 2, 4, False, True): 1,
        (1, 8192, 4, 4, False, True): 1,  # fp32 rows and parameters
        (1, 8192, 4, 2, False, True): 1,  # fp32 rows, narrower parameters
        (1, 8192, 2, 0, False, False): 1,  # no parameters
    }
    for (block_m, block_n, x_size, p_size, is_rms, has_bias), expected in cases.items():
        got = _triton_norm.fwd_tiles(many, block_m, block_n, x_size, p_size, is_rms, has_bias)
        assert got == expected, (block_m, block_n, x_size, p_size, is_rms, has_bias)
    # a short batch keeps one tile a program: too few programs otherwise
    smallest = _triton_norm._MIN_FWD_PROGRAMS * rows
    for block_m, block_n in ((1, 8192), (2, 1024)):
        assert _triton_norm.fwd_tiles(smallest, block_m, block_n, 2, 4, False, True) == rows // block_m
        assert _triton_norm.fwd_tiles(smallest - 1, block_m, block_n, 2, 4, False, True) == 1
    # what the launcher reads off the tensors: the widest parameter element
    bf16, fp32 = (torch.empty(3, dtype=d) for d in (torch.bfloat16, torch.float32))
    assert [_triton_norm.param_size(*p) for p in ((bf16, None), (fp32, None), (bf16, fp32), (None, None))] == [2, 4, 4, 0]


def test_forward_tile_shares_wide_parameters_between_two_rows():
    """With parameters wider than the rows, the one-row forward tiles become two-row tiles of
    32 values a thread (RMSNorm without a bias to 8192 columns, with one or LayerNorm to 4096);
    bf16 parameters keep the one-row tiles, and several-row tiles (up to 1024 columns) stay as
    they are."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for is_rms, has_bias, widest in ((True, False, 8192), (True, True, 4096), (False, True, 4096), (False, False, 4096)):
        for n in (768, 1100, 2048, 4096, 8192, 16384):
            narrow = _triton_norm.fwd_config(n, is_rms, False, has_bias)
            wide = _triton_norm.fwd_config(n, is_rms, True, has_bias)
            if narrow[0] == 1 and n <= widest:
                assert wide[:2] == (2, narrow[1]) and 2 * wide[1] == 32 * 32 * wide[2], (is_rms, n, wide)
            else:
                assert wide == narrow, (is_rms, n)


def test_layernorm_forward_takes_two_row_tiles_at_4096_columns():
    """LayerNorm with a bias on 2049-4096 columns (the 4096-wide tile) shares a
    two-row tile of 32 values a thread with bf16 parameters too (measured faster on an H200,
    runs 8 and 9); RMSNorm, LayerNorm without a bias, and the other widths keep their tiles."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for n in (3000, 4096):
        assert _triton_norm.fwd_config(n, False, False, True) == (2, 4096, 8)
        assert _triton_norm.fwd_config(n, False, True, True) == (2, 4096, 8)  # fp32 parameters: the same
        assert _triton_norm.fwd_config(n, True, False, True)[0] == 1
        assert _triton_norm.fwd_config(n, False, False, False)[0] == 1
    assert [_triton_norm.fwd_config(n, False, False, True)[0] for n in (2048, 8192)] == [1, 1]


def test_backward_tile_with_a_wide_weight():
    """A weight wider than the rows changes only the two-row 8192-column RMSNorm backward tile
    (32 warps instead of 16: the 16-warp one spills with an fp32 weight under Triton 3.6)."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for n in (768, 2048, 4096, 8192):
        for has_bias in (False, True):
            narrow, wide = (_triton_norm.bwd_config(n, has_bias, w) for w in (False, True))
            if n == 8192 and not has_bias:
                assert narrow == (2, 8192, 16) and wide == (2, 8192, 32)
            else:
                assert wide == narrow, (n, has_bias)


def test_tile_loops_pipelined_only_where_measured_faster():
    """3 stages (runs 9, 10 and 12, H200: the backward with a bias 6-28 % faster at 768-8192
    columns, with fp32 parameters on bf16 rows too; the mixed-precision forward with a bias at
    8192 11-14 %) for norms with a bias: the backward on tiles of 1024-8192 columns of bf16/fp16
    rows, parameters of either width, the forward where a program has several tiles. Nowhere
    else (RMSNorm's backward without a bias was level or slower; fp32 rows and tiles under 1024
    columns were not timed pipelined), never past 8192 columns, and only where
    the tile's buffers fit the shared memory one block may use: on a 64 KiB GPU (Turing, AMD's)
    the 8192-column backward stays plain."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    h100 = 227 * 1024
    # parameters as wide as the rows or wider (fp32 on bf16 rows: bwd_config's tile for them)
    piped = {(n, has_bias, wide) for n in (768, 2048, 4096, 4100, 8192, 16384) for has_bias in (True, False)
             for wide in (False, True)
             if _triton_norm.bwd_stages(h100, *_triton_norm.bwd_config(n, has_bias, wide)[:2], has_bias, 2) > 1}
    assert piped == {(n, True, wide) for n in (768, 2048, 4096, 4100, 8192) for wide in (False, True)}
    assert _triton_norm.bwd_stages(None, 1, 8192, True, 2) == 3  # the interpreter: no shared memory to count
    assert _triton_norm.bwd_stages(h100, 1, 8192, True, 4) == 1  # fp32 rows
    # 2 tiles in flight x (x, dy) x 8192 bf16 columns = 64 KiB, + 16 KiB for the reductions
    assert [_triton_norm.bwd_stages(kib * 1024, 1, 8192, True, 2) for kib in (64, 79, 80, 99)] == [1, 1, 3, 3]
    assert _triton_norm.bwd_stages(64 * 1024, 1, 4096, True, 2) == 3  # 48 KiB
    assert _triton_norm.bwd_stages(h100, 2, 1024, True, 2) == 3  # the two-row tile (513-1024 columns)
    assert _triton_norm.bwd_stages(h100, 4, 512, True, 2) == 1  # narrower tiles: never timed pipelined
    # forward: several tiles a program (fwd_tiles), a norm with a bias only (LayerNorm or
    # RMSNorm: the kind is not an input)
    assert [_triton_norm.fwd_stages(h100, t, 1, n, True, 2) for t, n in ((1, 8192), (8, 4096), (8, 8192), (8, 16384))] == [1, 3, 3, 1]
    assert _triton_norm.fwd_stages(h100, 8, 1, 8192, False, 2) == 1  # without one
    # 2 tiles in flight x 8192 bf16 columns = 32 KiB, + 16 KiB for the reductions
    assert [_triton_norm.fwd_stages(kib * 1024, 8, 1, 8192, True, 2) for kib in (47, 48)] == [1, 3]


def test_programs_per_sm_count_registers_threads_and_shared_memory():
    """The backward's persistent grid launches as many programs per SM as fit at once; a
    pipelined kernel's shared memory can be what limits them (1 KiB a program held by the
    system)."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    per_sm = _triton_norm._programs_per_sm
    assert per_sm(128, 16) == 1  # 512 threads x 128 registers: all 65536
    assert per_sm(113, 8) == 2  # 113 -> 120 registers a thread: 2 x 256 x 120 = 61440
    assert per_sm(32, 4) == 8 and per_sm(32, 4, cap=32) == 16  # threads: 2048 / 128
    # registers allow 4 programs of 4 warps at 128 registers; 100 KiB of shared memory holds 3
    # programs of 32 KiB (+1 KiB each), 228 KiB all 4
    assert per_sm(128, 4, shared=32768) == 4  # no SM size given: registers and threads only
    assert per_sm(128, 4, shared=32768, sm_shared=100 * 1024) == 3
    assert per_sm(128, 4, shared=32768, sm_shared=228 * 1024) == 4
    assert per_sm(64, 4, shared=100 * 1024, sm_shared=100 * 1024) == 1  # never fewer than one


def test_backward_register_cap_only_where_measured():
    """The launcher caps the backward's registers for LayerNorm with a bias on several-row tiles
    (up to 1024 columns), the one case the sweep measured faster, and nowhere else: a cap above
    a kernel's own register count would raise it."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    capped = {(n, is_rms, has_bias) for n in (64, 768, 1024, 1025, 2048, 8192) for is_rms in (True, False)
              for has_bias in (True, False) if _triton_norm.bwd_maxnreg(_triton_norm.bwd_config(n, has_bias)[0], is_rms, has_bias)}
    assert capped == {(64, False, True), (768, False, True), (1024, False, True)}
    # pipelined, that tile runs uncapped (capped it spills under Triton 3.9)
    assert _triton_norm.bwd_maxnreg(2, False, True, stages=3) is None


@pytest.mark.parametrize(
    "kind,n,bias,block_m,tiles,bwd_warps",
    [("rms", 1100, True, 2, 1, 4), ("layer", 1100, True, 2, 1, 4), ("layer", 4100, True, 1, 8, 16), ("rms", 4100, False, 2, 1, 32),
     ("layer", 1000, True, 2, 4, 4), ("layer", 1000, False, 2, 1, 4), ("rms", 1000, True, 2, 1, 4)],
)
@pytest.mark.slow
def test_mixed_precision_parameters_share_their_loads_between_rows(kind, n, bias, block_m, tiles, bwd_warps, monkeypatch, launches):
    """bf16 rows with an fp32 weight (and bias), through the public function: the forward puts
    two rows in a tile (1100 columns; RMSNorm to 8192), or, for LayerNorm past 4096 columns,
    several one-row tiles in a program, and for LayerNorm with a bias at 513-1024 columns four
    two-row tiles a program, pipelined (the grid minimum lowered so that 17 rows qualify); the
    RMSNorm backward past 4096 columns without a bias takes its 32-warp two-row tile. Either way
    the result is still the norm, forward and gradients."""
    needs_interpreter("calls the launchers on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    monkeypatch.setattr(_triton_norm, "_PLANS", {})  # the choices patched below are made on a plan's first call
    monkeypatch.setattr(_triton_norm, "_MIN_FWD_PROGRAMS", 1)
    picked = []  # (rows a tile, tiles a program) of each forward launch
    fwd_tiles = _triton_norm.fwd_tiles
    monkeypatch.setattr(_triton_norm, "fwd_tiles", lambda *a: picked.append((a[1], fwd_tiles(*a))) or picked[-1][1])
    bwd_tiles = []  # the backward's (BLOCK_M, BLOCK_N, warps)
    bwd_config = _triton_norm.bwd_config
    monkeypatch.setattr(_triton_norm, "bwd_config", lambda *a: bwd_tiles.append(bwd_config(*a)) or bwd_tiles[-1])
    x, _, _, dy = norm_inputs(m=17, n=n, dtype=torch.bfloat16)
    _, w, b, _ = norm_inputs(m=1, n=n, dtype=torch.float32, seed=1)
    b = b if bias else None
    x = (x.detach() * 2 + 0.5).requires_grad_(True)
    eps = 1e-5
    ours = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps), x, w, b, dy)
    assert picked == [(block_m, tiles)] and launches() == 2
    assert tiles == 1 or tiles * block_m == _triton_norm._FWD_ROWS
    assert [t[2] for t in bwd_tiles] == [bwd_warps]
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), None if b is None else b.double(), dy.double())
    yardstick = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    for name, got, ref, truth_ in zip(("y", "dx", "dw", "db"), ours, yardstick, truth):
        if truth_ is None:  # no bias
            assert got is None, name
            continue
        assert got.dtype == ref.dtype, name
        assert_close_to_fp64(got, ref, truth_, torch.bfloat16, name)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.slow
def test_pipelined_backward_through_the_public_function(kind, p_dtype, monkeypatch, launches):
    """bf16 rows of 4100 columns (an 8192-wide one-row tile) take the pipelined backward (3
    stages) for LayerNorm and RMSNorm with a bias, parameters bf16 or fp32 (the mixed-precision
    training of an fp32 model under autocast), through the public function: forward and
    gradients are the norm's (the interpreter runs the loop unpipelined; the GPU tests compare
    the compiled pipelined kernel's bits with the plain one's)."""
    needs_interpreter("calls the launchers on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    monkeypatch.setattr(_triton_norm, "_PLANS", {})  # bwd_stages is asked on a plan's first call
    stages = []
    bwd_stages = _triton_norm.bwd_stages
    monkeypatch.setattr(_triton_norm, "bwd_stages", lambda *a: stages.append(bwd_stages(*a)) or stages[-1])
    # 9 rows: the interpreter's 4 programs loop over two or three rows each
    x, w, b, dy = norm_inputs(m=9, n=4100, dtype=torch.bfloat16)
    x = (x.detach() * 2 + 0.5).requires_grad_(True)
    w, b = (t.detach().to(p_dtype) for t in (w, b))
    eps = 1e-5
    ours = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps), x, w, b, dy)
    assert stages == [3] and launches() == 2
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), b.double(), dy.double())
    yardstick = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    for name, got, ref, truth_ in zip(("y", "dx", "dw", "db"), ours, yardstick, truth):
        assert got.dtype == ref.dtype, name
        assert_close_to_fp64(got, ref, truth_, torch.bfloat16, name)


def test_a_kept_launch_plan_never_stands_in_for_another_signature(monkeypatch):
    """Each launch's choices (tile, tiles a program, stages, register cap, grid) come from a plan
    made on its signature's first call and kept (``_PLANS``). A kept plan must serve only the
    signature it was made for: every call below, made after all the others (so every plan it
    could wrongly reuse exists), launches exactly what it launches in a fresh process (no plans).
    The calls differ from one another in one thing each: width, row count class, dtypes of x,
    parameters and output (and so gradient), bias or none, RMSNorm or LayerNorm, rounding, an unaligned or
    strided input. Launches are recorded, not run (their outputs are not read). (The backward's
    program count, which on CUDA also depends on the gradient's dtype, is 4 on the CPU.)"""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors to the launchers; nothing is launched
    monkeypatch.setattr(_triton_norm, "_MIN_FWD_PROGRAMS", 2)  # 16 rows reach the forward's several-tile class
    recorded = []
    monkeypatch.setattr(_triton_norm, "_launch", lambda kernel, grid, args, meta, meta_key=None: recorded.append(
        (getattr(kernel, "__name__", str(kernel)), grid, dict(meta), meta_key)))
    bf16, fp32, fp16 = torch.bfloat16, torch.float32, torch.float16
    cases = [  # (kind, rows, width, x dtype, parameter dtype, bias, cast_mode, layout)
        ("rms", 8, 1024, bf16, bf16, False, "float32", ""),
        ("rms", 8, 1000, bf16, bf16, False, "float32", ""),
        ("rms", 8, 4100, bf16, fp32, False, "float32", ""),
        ("rms", 40, 4100, bf16, fp32, False, "float32", ""),
        ("rms", 8, 4100, fp32, fp32, False, "float32", ""),
        ("rms", 8, 1024, bf16, fp32, False, "float32", ""),
        ("rms", 8, 1024, fp16, fp16, False, "float32", ""),
        ("rms", 8, 1024, fp32, fp32, False, "float32", ""),
        ("rms", 8, 1024, bf16, bf16, True, "float32", ""),
        ("rms", 8, 1024, bf16, bf16, False, "input", ""),
        ("rms", 8, 1024, bf16, fp32, False, "weight", ""),
        ("rms", 8, 1024, fp16, fp32, False, "input", ""),
        ("layer", 8, 1024, bf16, bf16, True, "float32", ""),
        ("layer", 8, 4100, bf16, fp32, True, "float32", ""),
        ("layer", 40, 4100, bf16, fp32, True, "float32", ""),
        ("layer", 8, 4100, bf16, bf16, True, "float32", ""),
        ("layer", 8, 1024, bf16, bf16, False, "float32", ""),
        ("layer", 8, 1024, bf16, bf16, True, "float32", "unaligned"),
        ("layer", 8, 1024, bf16, bf16, True, "float32", "strided"),
        ("layer", 1, 1024, bf16, bf16, True, "float32", ""),
    ]

    def launches_of(kind, m, n, x_dtype, p_dtype, bias, cast_mode, layout):
        flat = torch.randn(1 + m * (n + 8), dtype=x_dtype)
        x = {"": flat[: m * n].view(m, n), "unaligned": flat[1: 1 + m * n].view(m, n),
             "strided": flat[: m * (n + 8)].view(m, n + 8)[:, :n]}[layout].requires_grad_(True)
        w = torch.randn(n, dtype=p_dtype, requires_grad=True)
        b = torch.randn(n, dtype=p_dtype, requires_grad=True) if bias else None
        fn = rms_norm if kind == "rms" else layer_norm
        y = fn(x, w, b, cast_mode=cast_mode)
        start = len(recorded)
        params = (w,) if b is None else (w, b)
        torch.autograd.grad(y, (x, *params), torch.zeros_like(y))  # y's dtype: fp32 for cast_mode="weight" here
        return recorded[start - 1:]

    for case in cases:
        launches_of(*case)
    kept = [launches_of(*case) for case in reversed(cases)]
    for case, launched in zip(reversed(cases), kept):
        monkeypatch.setattr(_triton_norm, "_PLANS", {})
        assert launched == launches_of(*case), case
    assert all(len(launched) == 3 for launched in kept)
    # the cases are told apart: their plans are not all one
    assert len({str(launched) for launched in kept}) > len(cases) // 2


@pytest.mark.parametrize("rows,n,config", [
    (1, 5, None), (37, 13, None), (300, 40, None), (5, 1100, None),
    (1000, 12, None),  # the whole strip in one tile of 1024 rows
    (1100, 12, None),  # one tile and a partial second
    (300, 40, (64, 8, 1)), (300, 40, (16, 32, 4)),  # other tile shapes (the tuning sweep's)
])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str)
def test_partial_sums_are_column_sums_in_each_parameters_dtype(rows, n, config, dtypes):
    """The backward's second kernel: column sums of the (programs, N or 2N) fp32 partials,
    the weight's half and the bias's half each in its parameter's dtype, strips that straddle
    the boundary between the halves (N not a multiple of the strip) included, with the tile
    the launcher picks or another."""
    needs_interpreter("calls the launcher on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    part = torch.randn(rows, n * len(dtypes), generator=torch.Generator().manual_seed(rows + n))
    if config is None and rows >= 1000:
        assert _triton_norm._sum_config(rows, n * len(dtypes))[0] == 1024
    sums = _triton_norm.sum_partials(part, list(dtypes), config=config)
    truth = part.double().sum(0).split(n)
    # Higham's bound for fp32 summation in any order, (rows - 1) u sum|x| with u = 2**-24,
    # plus one rounding to the parameter's dtype (at most half its eps, relative)
    bound = ((rows - 1) * 2.0**-24 * part.double().abs().sum(0)).split(n)
    for got, truth_, bound_, dtype in zip(sums, truth, bound, dtypes):
        assert got.dtype == dtype and got.shape == (n,)
        err = (got.double() - truth_).abs()
        # the fp32 sum is within bound_ of the truth; rounding it moves it by half an eps at most
        assert (err <= bound_ + torch.finfo(dtype).eps / 2 * (truth_.abs() + bound_)).all(), f"column sums of {rows}x{n}: error {err.max():.3g}"


# (weight, bias, offset, cast_mode) for the CPU path's hand-written backward


def test_host_side_tile_arithmetic_matches_triton():
    """The launchers size grids with plain-Python integer helpers (Triton's are slow to call
    from host code); they must agree with Triton's own."""
    triton = pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for n in [1, 2, 3, 5, 8, 9, 100, 767, 768, 1024, 1025, 4097, 65535, 65536]:
        assert _triton_norm._pow2_at_least(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16):
            assert _triton_norm._ceil_div(n, d) == triton.cdiv(n, d), (n, d)
