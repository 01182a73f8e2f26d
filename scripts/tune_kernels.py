"""Sweep the launch parameters of the norm kernels on a GPU, next to the shipped heuristic.

For each benchmark shape (bf16), times the raw launchers (GPU time: CUDA-graph replay; no
autograd, no partial-sum reduction) with the configuration ``fwd_config``/``bwd_config`` picks
and with its neighbours: half and twice the rows per tile, more or fewer elements per thread;
for the forward, with bf16 and with fp32 parameters on the bf16 rows, and 1 to 8 tiles per
program; for the backward, on the shipped tile 1 to 8 programs per SM instead of the occupancy
the compiler's register and shared-memory counts allow, registers capped (or uncapped where the
launcher caps them) and the weight loaded per tile, and RMSNorm's with an fp32 weight on its
shipped and its one-row tile; for both, the row loads with an evict-first cache hint and the
tile loop software-pipelined over 1 to 3 stages; and the partial-row sums alone over a few
tile shapes. The result says whether the heuristic leaves time on the table and which way to
move it (benchmarks/NOTES.md keeps the decisions). The shipped code never reads this output.

    python scripts/tune_kernels.py            # on a GPU
    python scripts/tune_kernels.py --quick    # tiny shapes under TRITON_INTERPRET=1 (CI)

Writes ``<out>/tuning.json`` and ``<out>/tuning.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from benchmark_kernels import FULL_SHAPES, _versions, copy_bandwidth_gbps, floor_bytes, graph_ms, shapes_arg
from hf_rmsnorm.ops._norm import _interpreting

ELEMENTS_PER_THREAD = (8, 16, 32)
PROGRAMS_PER_SM = (None, 1, 2, 4, 8)  # None: what the launcher computes from the registers
# registers a thread may use in the backward (ptxas `maxnreg`): the LayerNorm/bias backward
# compiles to 96-128 with the H200's Triton 3.6 (benchmarks/results/kernel_report_sm90_*.md);
# capped at 96 its one-row tiles spill 0-8 B, at 80 56-72 B (64 left out, it only spilled). A
# cap above a kernel's own count raises it, so only caps below the shipped count tell anything.
REGISTER_CAPS = (0, 96, 80)  # 0: none, for a kernel the launcher caps (``bwd_maxnreg``)
# GPU time alone (CUDA-graph replay, ``rep`` ms of calls a replay): with ``do_bench`` the host's
# launch time hid the kernels at 2048 columns (run 7: RMSNorm forward 43 us against 34 us replayed)
REP_MS = 10
# tiles per forward program (the weight and bias loaded once for all of them); the shipped rule
# takes several only for parameters wider than the rows (``fwd_tiles``), swept
# here on the shipped tile with bf16 parameters and with fp32 ones (bf16 rows: the
# mixed-precision forward)
FWD_TILES = (1, 2, 4, 8)
# software-pipeline stages of the tile loops (``tl.range(num_stages=S)``: the next S - 1 tiles'
# loads in flight through a tile's reductions): the backward's on the shipped tile, the forward's
# on the shipped tile with the most tiles a program; 1 = not pipelined. Not 2: slower than 1 or
# 3 on nearly every tile in run 9, whose sweep timed 1-3.
STAGES = (1, 3)
QUICK_SHAPES = [(40, 96)]  # interpreted: small enough for CI


def _candidates(default: tuple[int, int, int], max_tile: int, warps_floor: int) -> list[tuple[int, int, int]]:
    """The default (BLOCK_M, BLOCK_N, warps) first, then its neighbours, without repeats."""
    block_m, block_n, _ = default
    out = [default]
    for bm in (block_m, max(1, block_m // 2), block_m * 2):
        tile = bm * block_n
        if tile > max_tile:
            continue
        for per_thread in ELEMENTS_PER_THREAD:
            warps = tile // (32 * per_thread)
            if warps_floor <= warps <= 32 and (bm, block_n, warps) not in out:
                out.append((bm, block_n, warps))
    return out


def _row(pass_, kind, m, n, config, programs_per_sm, ms, copy_gbps, x_dtype, maxnreg=None, tiles=None, stream="",
         reload_w=False, stages=1):
    bytes_ = floor_bytes(m, n, x_dtype, "fwd")
    if pass_ != "fwd":  # the backward: read x and dy, write dx
        bytes_ = floor_bytes(m, n, x_dtype, "fwd+bwd") - bytes_
    gbps = bytes_ / (ms * 1e-3) / 1e9
    return {"pass": pass_, "kind": kind, "shape": f"{m}x{n}", "config": list(config), "programs_per_sm": programs_per_sm,
            "maxnreg": maxnreg, "tiles": tiles, "stream": stream, "reload_w": reload_w, "stages": stages, "time_us": ms * 1e3, "gbps": gbps,
            "frac_copy": gbps / copy_gbps}


def sweep(shapes, device, quick, copy_gbps):
    from hf_rmsnorm.ops import _triton_norm as k

    x_dtype = torch.bfloat16
    shared = k.block_shared(device)  # what the launchers' pipelining rule reads
    rows = []
    for m, n in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(m, n, device=device, generator=g).to(x_dtype)
        dy = torch.randn(m, n, device=device, generator=g).to(x_dtype)
        w = (1 + 0.1 * torch.randn(n, device=device, generator=g)).to(x_dtype)
        b = (0.1 * torch.randn(n, device=device, generator=g)).to(x_dtype)
        norms = (("rms", True, None), ("layer", False, b))  # RMSNorm with a weight, LayerNorm with both
        # forward: RMSNorm and LayerNorm. Nearly the same memory traffic, but LayerNorm's two row
        # reductions (mean, then variance) each cross the warps that share a row, so the best
        # tile can differ (run 4 on the H200: 62 vs 52 us at 768). First the shipped tile and its
        # neighbours; then variants of the shipped tile: 1-8 tiles per program with bf16
        # parameters (rows joining the same group) and with fp32 ones (groups of their own,
        # "/fp32w": the weight, or weight and bias, in fp32 on bf16 rows), the shipped number
        # first; and the row loads hinted evict_first, as torch.compile's generated kernels load them.
        # RMSNorm with a bias and fp32 parameters: only its shipped tile and the stage counts of
        # its several-tile program, which it runs past 4096 columns like LayerNorm, with the same
        # loop less the mean (pipelined since run 10's sweep: 158 -> 140 us at 8192)
        fwd_staged_only = ("rms+bias", True, b)
        for kind, is_rms, bias in (*norms, fwd_staged_only):
            for p_dtype in ((torch.float32,) if kind == fwd_staged_only[0] else (x_dtype, torch.float32)):
                wp, bp = w.to(p_dtype), None if bias is None else bias.to(p_dtype)
                group = kind if p_dtype == x_dtype else f"{kind}/fp32w"
                config = k.fwd_config(n, is_rms, p_dtype.itemsize > x_dtype.itemsize, bias is not None)

                def fwd_stages_of(config, tiles):
                    return k.fwd_stages(shared, tiles, *config[:2], bias is not None, x.element_size())

                def fwd(config, tiles, stream="", stages=None):
                    if stages is None:  # what the launcher picks
                        stages = fwd_stages_of(config, tiles)
                    ms = graph_ms(lambda: k.norm_fwd(x, wp, bp, 1e-6, 0.0, is_rms, 0, x_dtype, config=config, tiles=tiles,
                                                     stream=stream, stages=stages), device, quick=quick, rep=REP_MS)
                    rows.append(_row("fwd", group, m, n, config, None, ms, copy_gbps, x_dtype, tiles=tiles, stream=stream,
                                     stages=stages))

                shipped = _fwd_tiles(k, x, wp, bp, config, is_rms)
                most = FWD_TILES[-1]
                if kind == fwd_staged_only[0]:
                    fwd(config, shipped)
                    if most != shipped:
                        fwd(config, most)
                else:
                    for c in _candidates(config, 16384, 1):  # each tile with the tiles the launcher gives it
                        fwd(c, _fwd_tiles(k, x, wp, bp, c, is_rms))
                    for tiles in FWD_TILES:
                        if tiles != shipped:
                            fwd(config, tiles)
                for stages in STAGES:
                    if stages != fwd_stages_of(config, most):
                        fwd(config, most, stages=stages)
                if p_dtype == x_dtype:
                    fwd(config, shipped, "evict_first")
        # backward: RMSNorm (weight) and LayerNorm (weight + bias) over the whole neighbourhood,
        # LayerNorm's with the best RMSNorm configuration too (each tile pipelined where the
        # launcher would pipeline it: LayerNorm's one-row 8192 tile at 32 warps compiles to 64
        # registers without a spill, a different balance of threads and bytes in flight);
        # RMSNorm with an fp32 weight on the shipped and the one-row tile (at 8192 columns the
        # shipped tile is 32 warps wide with an fp32 weight, because 16 spill under Triton 3.6:
        # bwd_config); and on the shipped tile at each pipeline stage count, the backwards with a
        # bias: RMSNorm's, LayerNorm's with fp32 weight and bias (both pipelined since run 10's
        # sweep) and RMSNorm's with fp32 weight and bias (since run 12's)
        staged_only = (("rms+bias", True, b), ("layer/fp32w", False, b), ("rms+bias/fp32w", True, b))
        staged_kinds = {name for name, _, _ in staged_only}
        for kind, is_rms, bias in (*norms, ("rms/fp32w", True, None), *staged_only):
            wk = w.float() if kind.endswith("fp32w") else w

            def bwd_stages_of(config):  # what the launcher picks
                return k.bwd_stages(shared, *config[:2], bias is not None, x.element_size())

            _, mean, rstd = k.norm_fwd(x, wk, bias, 1e-5, 0.0, is_rms, 0, x_dtype)
            configs = _candidates(k.bwd_config(n, bias is not None, wk.dtype.itemsize > x_dtype.itemsize), 16384, 4)
            if kind == "layer":
                rms_rows = [r for r in rows if r["pass"] == "bwd" and r["kind"] == "rms" and r["shape"] == f"{m}x{n}"]
                best = tuple(min(rms_rows, key=lambda r: r["time_us"])["config"])
                configs = list(dict.fromkeys([*configs, best]))
            # (config, programs per SM, register cap, cache hint, weight per tile, pipeline
            # stages): every occupancy for each config; the shipped config with its registers
            # capped (more programs per SM, maybe spills), with the x and dy loads hinted
            # evict_first, with the weight loaded per tile instead of held in registers, alone
            # and capped at 96 (kernel_report: LayerNorm's one-row tiles 127 -> 118 registers,
            # 8 B of spill at 96; RMSNorm+bias 95 -> 80, no spill), and with its tile loop
            # pipelined or not (None: what the launcher picks)
            if kind in staged_kinds:  # the launcher's stage count first: the table's "shipped" row
                picked = bwd_stages_of(configs[0])
                variants = [(configs[0], None, None, "", False, s) for s in (picked, *(s for s in STAGES if s != picked))]
            elif kind.endswith("fp32w"):  # the shipped tile, the one a bf16 weight gets, the one-row tile
                one_row = (1, configs[0][1], k._tile(n)[2]) if configs[0][0] > 1 else configs[0]
                variants = [(c, None, None, "", False, None) for c in dict.fromkeys([configs[0], k.bwd_config(n), one_row])]
            else:
                # every occupancy on the shipped tile only: runs 1-8 never found one better than
                # the launcher's on a neighbour, and those rows were half the sweep's time
                pps_all = PROGRAMS_PER_SM if device.type == "cuda" else (None,)
                variants = [(c, None, None, "", False, None) for c in configs]
                variants += [(configs[0], p, None, "", False, None) for p in pps_all if p is not None]
                shipped_cap = k.bwd_maxnreg(configs[0][0], is_rms, bias is not None, bwd_stages_of(configs[0])) or 0
                variants += [(configs[0], None, cap, "", False, None) for cap in REGISTER_CAPS if cap != shipped_cap]
                variants += [(configs[0], None, None, "evict_first", False, None), (configs[0], None, None, "", True, None),
                             (configs[0], None, 96, "", True, None)]
                variants += [(configs[0], None, None, "", False, s) for s in STAGES if s != bwd_stages_of(configs[0])]
                if shipped_cap:  # LayerNorm's two-row tile pipelined spills under Triton 3.9 when capped
                    variants += [(configs[0], None, 0, "", False, s) for s in STAGES if s > 1]
            for config, pps, cap, stream, reload_w, stages in variants:
                # what the launcher picks where the variant leaves it open, so the row names what ran
                stages = bwd_stages_of(config) if stages is None else stages
                cap = k.bwd_maxnreg(config[0], is_rms, bias is not None, stages) if cap is None else cap

                def run(sums):
                    dx, part = k.norm_bwd(dy, x, wk, mean, rstd, 0.0, is_rms, 0, bias is not None, config=config,
                                          programs_per_sm=pps, maxnreg=cap, stream=stream, reload_w=reload_w, stages=stages)
                    if sums:  # what autograd also pays: the partial rows summed in w's dtype
                        part = k.sum_partials(part, [wk.dtype] * (1 if bias is None else 2))
                    return dx, part

                # "bwd": the kernel alone; "bwd+sums": with the partial-row reduction, whose
                # cost grows with the number of programs
                for pass_, sums in (("bwd", False), ("bwd+sums", True)):
                    try:
                        ms = graph_ms(lambda: run(sums), device, quick=quick, rep=REP_MS)
                    except Exception as exc:  # a configuration that does not compile or fit
                        rows.append({"pass": pass_, "kind": kind, "shape": f"{m}x{n}", "config": list(config),
                                     "programs_per_sm": pps, "maxnreg": cap, "stream": stream, "reload_w": reload_w,
                                     "stages": stages, "error": f"{type(exc).__name__}: {exc}"[:200]})
                        continue
                    rows.append(_row(pass_, kind, m, n, config, pps, ms, copy_gbps, x_dtype, cap, stream=stream,
                                     reload_w=reload_w, stages=stages))
            if kind in ("rms", "layer"):
                # the partial-row sums alone, on the shipped backward's partials
                _, part = k.norm_bwd(dy, x, wk, mean, rstd, 0.0, is_rms, 0, bias is not None)
                dtypes = [wk.dtype] * (1 if bias is None else 2)
                for config in _sum_candidates(k, *part.shape):
                    ms = graph_ms(lambda: k.sum_partials(part, dtypes, config=config), device, quick=quick, rep=REP_MS)
                    gbps = (part.numel() * 4 + part.shape[1] * wk.element_size()) / (ms * 1e-3) / 1e9
                    rows.append({"pass": "sums", "kind": kind, "shape": f"{m}x{n}", "config": list(config),
                                 "partials": list(part.shape), "programs_per_sm": None, "time_us": ms * 1e3,
                                 "gbps": gbps, "frac_copy": gbps / copy_gbps})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _sum_candidates(k, rows: int, cols: int) -> list[tuple[int, int, int]]:
    """(BLOCK_R, BLOCK_C, warps) of the partial-sum kernel: the shipped one first, then tiles
    of 2048 elements on 4 warps (what the sum used up to v7) and of 4096 on 4 and 8 warps,
    on the shipped strip width."""
    shipped = k._sum_config(rows, cols)
    block_c, tall = shipped[1], k._pow2_at_least(rows)
    others = [(min(elements // block_c, tall), block_c, warps) for elements, warps in ((2048, 4), (4096, 4), (4096, 8))]
    return list(dict.fromkeys([shipped, *others]))


def _fwd_tiles(k, x, w, b, config, is_rms) -> int:
    """The tiles per program the shipped rule gives this forward."""
    return k.fwd_tiles(x.shape[0], config[0], config[1], x.element_size(), k.param_size(w, b), is_rms, b is not None)


def _label(r) -> str:
    cap, tiles, stream, stages = r.get("maxnreg"), r.get("tiles"), r.get("stream"), r.get("stages", 1)
    return (f"{tuple(r['config'])}" + (f" ≤{cap} regs" if cap else " no reg cap" if cap == 0 else "") + (f" ×{tiles} tiles" if tiles and tiles > 1 else "")
            + (f" {stream}" if stream else "") + (" w per tile" if r.get("reload_w") else "")
            + (f" {stages} stages" if stages > 1 else ""))


def to_markdown(env, rows) -> str:
    lines = [
        f"# Launch-parameter sweep: {env['device']}, bf16", "",
        f"copy bandwidth {env['copy_gbps']:.0f} GB/s; torch {env['torch']}, triton {env['triton']}; {env['date']}. "
        "GPU time of the raw launchers (CUDA-graph replay, median); backward = read x, dy and write dx (6 B/element), "
        "alone (bwd) and with the partial-row sums autograd also runs (bwd+sums); sums = the partial-row sums "
        "alone, config (BLOCK_R, BLOCK_C, warps), % of copy over the partials' bytes; "
        "config = (BLOCK_M, BLOCK_N, warps), `≤R regs` = registers capped at R (ptxas maxnreg; `no reg cap` "
        "where the launcher caps them), "
        "`×T tiles` = T tiles per forward program, `evict_first` = row loads hinted to leave the cache, "
        "`w per tile` = the backward loads the weight per tile instead of holding it; "
        "`S stages` = the tile loop software-pipelined (the next S - 1 tiles' loads in flight); "
        "norm `/fp32w` = fp32 weight (and bias) on bf16 rows; "
        "programs/SM `auto` = from the compiled register count.", "",
        "| pass | norm | shape | shipped config | time | % copy | best config | programs/SM | time | % copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["pass"], r["kind"], r["shape"]), []).append(r)
    runners_up = []
    # narrowest rows first, as in the kernel benchmark's tables (the sweep runs the widest first)
    for (pass_, kind, shape), rs in sorted(groups.items(), key=lambda group: int(group[0][2].split("x")[1])):
        shipped = rs[0]  # the first candidate is always the shipped configuration, auto programs
        ranked = sorted(rs, key=lambda r: r["time_us"])
        best = ranked[0]
        fmt = lambda r: f"{r['time_us']:.0f} µs | {100 * r['frac_copy']:.0f}%"  # noqa: E731
        lines.append(f"| {pass_} | {kind} | {shape} | {_label(shipped)} | {fmt(shipped)} | {_label(best)} | "
                     f"{best['programs_per_sm'] or 'auto'} | {fmt(best)} |")
        runners_up.append(f"- {pass_} {kind} {shape}: " + ", ".join(
            f"{_label(r)}/{r['programs_per_sm'] or 'auto'} {100 * r['frac_copy']:.0f}%" for r in ranked[1:5]))
    lines += ["", "Next best (config/programs per SM, % copy):", *runners_up]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", f"{len(errors)} configurations failed, e.g. {errors[0]['config']}: {errors[0]['error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI; CPU needs TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--shapes", type=shapes_arg, default=None,
                        help="comma-separated MxN to sweep instead of the benchmark's shapes (e.g. a model's own, "
                             "8192x1024 for GPT-2-medium at batch 8 x 1024)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not (args.quick and _interpreting()):
        parser.error("the sweep times GPU kernels: run it on a GPU, or with --quick under TRITON_INTERPRET=1")
    copy_gbps = copy_bandwidth_gbps(device, args.quick)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)",
           "copy_gbps": copy_gbps, "quick": args.quick,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **_versions()}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    # written after every shape: a sweep cut short by a time limit still leaves what it measured,
    # the widest rows first (where the open questions are: the pipelined backward at 4096-8192
    # columns, LayerNorm's forward+backward at 8192)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    for shape in sorted(shapes, key=lambda shape: -shape[1]):
        rows += sweep([shape], device, args.quick, copy_gbps)
        (args.out / "tuning.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
        md = to_markdown(env, rows)
        (args.out / "tuning.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
