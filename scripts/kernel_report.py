"""Compile the norm kernels for a GPU architecture without a GPU and report what the compiler
made of them: registers, stack, local memory (spills), shared memory, and how wide the global
loads and stores are. Same launch parameters as the launchers pick for the benchmark shapes.

    python scripts/kernel_report.py [--arch 90] [--out benchmarks/results]

Needs Triton with its NVIDIA backend (it ships ptxas and cuobjdump); no CUDA device. This is
the cheap half of tuning (see benchmarks/NOTES.md): what to expect before a GPU is lent.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # FMA contraction, Triton's default until 3.10

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from hf_rmsnorm.ops import _triton_gated as gated  # noqa: E402
from hf_rmsnorm.ops import _triton_norm as kernels  # noqa: E402

# the most blocks one SM holds (sm_80 to sm_90); the report shows what registers and threads
# allow up to that, not the backward launcher's own cap of 8
_HW_BLOCKS_PER_SM = 32
# shared memory of one SM by compute capability (CUDA programming guide; the launcher reads the
# device's own from torch); 100 KiB on the others Triton supports (sm_86, sm_89, sm_120)
_SM_SHARED_KIB = {80: 164, 87: 164, 90: 228, 100: 228, 103: 228}
# SMs of the GPU the sum rows assume (H100 SXM and H200: 132), for the backward's partial rows
_SMS = 132


def _sm_shared_kib(arch: int) -> int:
    return _SM_SHARED_KIB.get(arch, 100)


SHAPES = [(65536, 768), (16384, 2048), (16384, 4096), (16384, 8192), (8, 65536)]
VARIANTS = {  # name -> (IS_RMS, HAS_WEIGHT, HAS_BIAS, parameter dtype); activations bf16
    "RMSNorm": (True, True, False, "bf16"),
    "RMSNorm+bias": (True, True, True, "bf16"),
    "LayerNorm": (False, True, True, "bf16"),
    # mixed precision: two-row forward tiles from 2048 columns (several one-row tiles a program
    # for LayerNorm at 8192), and RMSNorm's 32-warp backward tile at 8192
    "RMSNorm, fp32 w": (True, True, False, "fp32"),
    "LayerNorm, fp32 w+b": (False, True, True, "fp32"),
    # and the RMSNorm+bias forward past 4096 columns: several pipelined one-row tiles a program
    "RMSNorm+bias, fp32 w+b": (True, True, True, "fp32"),
}


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, arch: int, aligned: set, maxnreg=None):
    """Compile as a launch would: at run time Triton specialises pointers that are 16-byte
    aligned and integers divisible by 16 (``aligned``), which is what lets it vectorise."""
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _resources(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def _vector_widths(ptx: str) -> str:
    # qualifiers such as .L1::evict_first.L2::cache_hint (cache hints) may precede the width
    loads = re.findall(r"ld\.global[\w.:]*?(\.v[248])?\.b(\d+)\s", ptx)
    stores = re.findall(r"st\.global[\w.:]*?(\.v[248])?\.b(\d+)\s", ptx)

    def widest(ops):
        bits = [int(b) * (int(v[2:]) if v else 1) for v, b in ops]
        return f"{max(bits) // 8} B" if bits else "—"

    # a pipelined loop's row loads are asynchronous copies into shared memory instead
    copies = len(re.findall(r"cp\.async\.(?:ca|cg)\.shared\.global", ptx))
    return (f"{len(loads)} loads (≤{widest(loads)}), {len(stores)} stores (≤{widest(stores)})"
            + (f", {copies} async copies" if copies else ""))


def _row(kernel: str, norm: str, m: int, n: int, tile: str, warps: int, compiled, cap: int, arch: int) -> dict:
    """One table row; programs per SM as the launcher counts them, up to ``cap`` (the backward's
    persistent grid launches at most 8 an SM; a forward grid is held only by the hardware)."""
    resources = _resources(compiled.asm["cubin"])
    # the shared memory a program asks for at launch (reductions' scratch, pipeline buffers);
    # cuobjdump's static count leaves it out
    shared = compiled.metadata.shared
    per_sm = kernels._programs_per_sm(resources["reg"], warps, cap=cap, shared=shared,
                                      sm_shared=_sm_shared_kib(arch) * 1024)
    return {"kernel": kernel, "norm": norm, "shape": f"{m}×{n}", "tile": tile, "warps": warps, **resources,
            "shared": shared, "per_sm": per_sm, "memory ops": _vector_widths(compiled.asm["ptx"])}


def _stages(stages: int) -> str:
    return f" {stages} stages" if stages > 1 else ""


def report(arch: int) -> list[dict]:
    rows = []
    # shared memory one block may use (what the launchers' pipelining rule reads from torch):
    # the SM's, less the 1 KiB the system holds
    shared = (_sm_shared_kib(arch) - 1) * 1024
    for name, (is_rms, has_w, has_b, p_dtype) in VARIANTS.items():
        pointers = {"X": "*bf16", "Y": "*bf16", "W": f"*{p_dtype}", "B": f"*{p_dtype}", "Mean": "*fp32", "Rstd": "*fp32"}
        p_size = {"bf16": 2, "fp32": 4}[p_dtype]
        for m, n in SHAPES:
            block_m, block_n, warps = kernels.fwd_config(n, is_rms, p_size > 2, has_b)
            sig = {**pointers, "stride_x": "i32", "M": "i32", "N": "i32", "eps": "fp32", "offset": "fp32"}
            tiles = kernels.fwd_tiles(m, block_m, block_n, 2, p_size if has_w or has_b else 0, is_rms, has_b)  # what the launcher picks
            stages = kernels.fwd_stages(shared, tiles, block_m, block_n, has_b, 2)
            const = {"IS_RMS": is_rms, "HAS_WEIGHT": has_w, "HAS_BIAS": has_b, "ROUNDING": 0, "BLOCK_M": block_m, "BLOCK_N": block_n,
                     "TILES": tiles, "STREAM": "", "STAGES": stages}
            aligned = {a for a, t in sig.items() if t.startswith("*")} | ({"stride_x", "N"} if n % 16 == 0 else set())
            c = _compile(kernels._norm_fwd_kernel, sig, const, warps, arch, aligned)
            tile = f"{block_m}×{block_n}" + (f" ×{tiles}" if tiles > 1 else "") + _stages(stages)
            rows.append(_row("fwd", name, m, n, tile, warps, c, cap=_HW_BLOCKS_PER_SM, arch=arch))
            block_m, block_n, warps = kernels.bwd_config(n, has_b, has_w and p_size > 2)
            sig = {"X": "*bf16", "W": f"*{p_dtype}", "DY": "*bf16", "DX": "*bf16", "Part": "*fp32", "Mean": "*fp32", "Rstd": "*fp32",
                   "stride_x": "i32", "stride_dy": "i32", "M": "i32", "N": "i32", "offset": "fp32"}
            stages = kernels.bwd_stages(shared, block_m, block_n, has_b, 2)
            const = {"IS_RMS": is_rms, "HAS_WEIGHT": has_w, "HAS_BIAS": has_b, "ROUNDING": 0, "BLOCK_M": block_m, "BLOCK_N": block_n,
                     "STREAM": "", "RELOAD_W": False, "STAGES": stages}
            aligned = {a for a, t in sig.items() if t.startswith("*")} | ({"stride_x", "stride_dy", "N"} if n % 16 == 0 else set())
            maxnreg = kernels.bwd_maxnreg(block_m, is_rms, has_b, stages)  # the launcher's register cap
            c = _compile(kernels._norm_bwd_kernel, sig, const, warps, arch, aligned, maxnreg)
            tile = f"{block_m}×{block_n}" + (f" ≤{maxnreg} regs" if maxnreg else "") + _stages(stages)
            rows.append(_row("bwd", name, m, n, tile, warps, c, cap=kernels._MAX_PROGRAMS_PER_SM, arch=arch))
            # the weight-gradient sums over that backward's partial rows: one per program
            partials, cols = _SMS * rows[-1]["per_sm"], n * (has_w + has_b)
            block_r, block_c, warps = kernels._sum_config(partials, cols)
            sig = {"Part": "*fp32", "OutW": f"*{p_dtype}", "OutB": f"*{p_dtype}", "rows": "i32", "cols": "i32", "N": "i32"}
            aligned = {"Part", "OutW", "OutB"} | ({"cols", "N"} if n % 16 == 0 else set())
            c = _compile(kernels._sum_rows_kernel, sig, {"BLOCK_R": block_r, "BLOCK_C": block_c}, warps, arch, aligned)
            rows.append(_row("sum", name, partials, cols, f"{block_r}×{block_c}", warps, c, cap=_HW_BLOCKS_PER_SM, arch=arch))
    return rows


# the gated norm (ops/_triton_gated.py) at the --gated benchmark's shapes:
# (rows, columns, group size, gate after the norm, weight dtype, every row stride N)
GATED = [
    (262144, 128, 128, True, "bf16", True),  # Qwen3.5's value heads, the gate after the norm
    (16384, 4096, 512, False, "bf16", True),  # Mamba2's order, 8 groups
    (16384, 8192, 1024, False, "bf16", True),
    (16384, 8192, 1024, False, "bf16", False),  # as Mamba2's mixer calls it: the gate a slice of a projection
    (16384, 8192, 1024, False, "fp32", True),  # mixed precision
]


def gated_report(arch: int) -> list[dict]:
    rows = []
    for m, n, size, after, p_dtype, dense in GATED:
        groups = n // size
        label = f"gated, gate {'after' if after else 'before'}" + (f", {groups} groups" if groups > 1 else "") + \
            (", fp32 w" if p_dtype == "fp32" else "") + ("" if dense else ", strided gate")
        const = {"HAS_GATE": True, "HAS_WEIGHT": True, "NORM_BEFORE_GATE": after, "SIGMOID": False,
                 "ROUND_N": True, "ROUND_M": after and p_dtype == "bf16", "DENSE": dense}
        for kernel, target in (("fwd", gated._FWD_TILE), ("bwd", gated._BWD_TILE)):
            block_r, block_s = gated.layout(size, target)
            warps = gated._warps(block_r * block_s)
            ints = {"M": "i32", "N": "i32", "S": "i32", "G": "i32"}
            if kernel == "fwd":
                sig = {"X": "*bf16", "Z": "*bf16", "W": f"*{p_dtype}", "Y": "*bf16", "RSTD": "*fp32",
                       "stride_x": "i32", "stride_z": "i32", **ints, "eps": "fp32", "offset": "fp32"}
                fn, cap = gated._gated_fwd_kernel, _HW_BLOCKS_PER_SM
            else:
                sig = {"DY": "*bf16", "X": "*bf16", "Z": "*bf16", "W": f"*{p_dtype}", "RSTD": "*fp32", "DX": "*bf16",
                       "DZ": "*bf16", "DW_PART": "*fp32", "stride_dy": "i32", "stride_x": "i32", "stride_z": "i32",
                       **ints, "n_tiles": "i32", "offset": "fp32"}
                fn, cap = gated._gated_bwd_kernel, gated._BWD_PROGRAMS_PER_SM
            aligned = {a for a, t in sig.items() if t.startswith("*")} | (
                {a for a in sig if a.startswith("stride")} | {"N", "S"} if size % 16 == 0 else set())
            c = _compile(fn, sig, {**const, "BLOCK_R": block_r, "BLOCK_S": block_s}, warps, arch, aligned)
            rows.append(_row(kernel, label, m, n, f"{block_r}×{block_s}", warps, c, cap=cap, arch=arch))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--out", type=Path, default=None, help="also write kernel_report_sm<arch>_triton<version>.md into this folder")
    args = parser.parse_args(argv)
    if tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) < (3, 6):
        # the compile API it calls (ASTSource's constexprs, the backends' options) is 3.6's to 3.9's
        parser.error(f"needs Triton 3.6 or newer (the lent GPUs run 3.6); this is Triton {triton.__version__}")
    rows = report(args.arch) + gated_report(args.arch)
    lines = [
        f"# Kernel compiler report: sm_{args.arch}, bf16 activations, triton {triton.__version__}", "",
        "Tile = BLOCK_M×BLOCK_N (×T: T tiles per forward program; ≤R regs: the launcher caps the registers "
        "at R; S stages: the tile loop software-pipelined, the next tile's loads into shared memory); spilled "
        "registers show as stack bytes; shared = bytes of shared memory a program asks for at launch. "
        f"`sum` rows: the weight-gradient sums over the backward's partial rows, one per program on {_SMS} SMs "
        "(shape = partial rows × columns). Gated rows: tile = rows × one group's columns; "
        "their backward launches at most 4 programs an SM. "
        f"Programs per SM: how many fit at once by registers, threads and shared memory "
        f"({_sm_shared_kib(args.arch)} KiB an SM, 1 KiB a program held by the system; the backward's "
        "persistent grid launches that many per SM, at most 8). Register counts differ between Triton releases: "
        "compile with the Triton the GPU runs.", "",
        "| kernel | norm | shape | tile | warps | registers | programs per SM | stack (spills) | local | shared (B) | global memory ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['norm']} | {r['shape']} | {r['tile']} | {r['warps']} | {r.get('reg')} | {r['per_sm']} | "
                     f"{r.get('stack')} | {r.get('local')} | {r.get('shared')} | {r['memory ops']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"kernel_report_sm{args.arch}_triton{triton.__version__}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
