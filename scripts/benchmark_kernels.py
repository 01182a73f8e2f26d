"""How close do the norm kernels get to the memory-bandwidth floor, next to their peers?

For each shape and mode (forward, forward+backward) every provider is timed (median of
``triton.testing.do_bench`` on a GPU, of a wall-clock loop on the CPU), and the time is turned
into achieved GB/s over the byte floor (each element of x and y read/written once forward; x
and dy read and dx written backward: 4 B and 10 B per element in bf16) and into the fraction
of the device's copy bandwidth measured in the same run (a large ``y.copy_(x)``, bytes read
plus written). See ../shared/PERF.md.

    python scripts/benchmark_kernels.py                  # full table on a GPU
    python scripts/benchmark_kernels.py --quick          # tiny shapes; runs anywhere (CI)
    python scripts/benchmark_kernels.py --gated          # the gated norms (Qwen3-Next's, Mamba2's) on their shapes

A gated norm also reads the gate forward and writes its gradient backward: 6 B and 16 B per
element in bf16.

Writes ``<out>/kernels.json`` (every number, device and versions) and ``<out>/kernels.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from hf_rmsnorm.ops import gated_rms_norm, layer_norm, rms_norm

FULL_SHAPES = [(65536, 768), (16384, 2048), (16384, 4096), (16384, 8192)]
QUICK_SHAPES = [(256, 768), (64, 2048)]
# the gated norms' rows: Qwen3.5's gated delta net (8 x 1024 tokens x 32 value heads of 128) and
# Mamba2-style mixers (an inner width of 4096 or 8192, in 8 groups)
GATED_SHAPES = [(262144, 128), (16384, 4096), (16384, 8192)]
QUICK_GATED_SHAPES = [(256, 128), (64, 512)]
MAMBA2_GROUPS = 8
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shapes_arg(text: str) -> list:
    """``--shapes`` of the GPU scripts: comma-separated MxN (rows x columns), e.g. 8192x1024."""
    shapes = []
    for item in (s.strip().lower() for s in text.split(",") if s.strip()):
        parts = item.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{item!r} is not a shape: write rows x columns as MxN, e.g. 8192x1024")
        shapes.append((int(parts[0]), int(parts[1])))
    if not shapes:
        raise argparse.ArgumentTypeError("no shape given: write rows x columns as MxN, e.g. 8192x1024")
    return shapes


# ---------------------------------------------------------------------------------- providers
# Each setup takes (x, w, b) and returns a function of x computing the norm (weights bound).


def _hf_rmsnorm_math(x, w, eps=1e-6):
    # the body of transformers' LlamaRMSNorm.forward, the eager baseline users start from
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _setup_hf_rmsnorm_rms(x, w, b):
    return lambda x: rms_norm(x, w)


def _setup_hf_rmsnorm_rms_bias(x, w, b):
    return lambda x: rms_norm(x, w, b)


def _setup_hf_rmsnorm_layer(x, w, b):
    return lambda x: layer_norm(x, w, b)


def _setup_torch_layer_norm(x, w, b):
    return lambda x: F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def _setup_torch_rms_norm(x, w, b):
    return lambda x: F.rms_norm(x, x.shape[-1:], w, 1e-6)


def _setup_hf_eager(x, w, b):
    return lambda x: _hf_rmsnorm_math(x, w)


def _compiled(setup):
    def compiled_setup(x, w, b):
        # dynamic=False: one specialised graph per shape, as a training loop would get
        return torch.compile(setup(x, w, b), dynamic=False)

    return compiled_setup


def _launched(setup, cpp: bool):
    """``setup``'s call with the C++ launch operator (``_cuda_launch``, the default on CUDA) on
    (``cpp``) or off (launched from Python) during it, and the setting as it was after it, so
    that the other providers of the same run keep the package's default."""
    def launched_setup(x, w, b):
        from hf_rmsnorm.ops import _cuda_launch

        fn, default = setup(x, w, b), _cuda_launch.ENABLED

        def call(x):
            _cuda_launch.ENABLED = cpp
            try:
                return fn(x)
            finally:
                _cuda_launch.ENABLED = default

        return call

    return launched_setup


def _setup_liger_rms(x, w, b):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    m = LigerRMSNorm(x.shape[-1], eps=1e-6).to(device=x.device, dtype=w.dtype)
    m.weight = torch.nn.Parameter(w.detach())
    return m


def _setup_liger_layer(x, w, b):
    from liger_kernel.transformers.layer_norm import LigerLayerNorm

    m = LigerLayerNorm(x.shape[-1], eps=1e-5).to(device=x.device, dtype=w.dtype)
    m.weight, m.bias = torch.nn.Parameter(w.detach()), torch.nn.Parameter(b.detach())
    return m


# The gated providers' setups take (x, w, gate) and return a function of x (weight and gate bound).


def _hf_module(module: str, name: str, n: int, **kwargs):
    """transformers' ``name`` for rows of ``n``, given the arguments of ``kwargs`` it takes:
    releases before 5.23 (5.17 on the lent GPUs) built Mamba2's gated norm without groups (no
    ``group_size``), so the class is timed as the installed release has it (the same bytes
    moved, whole rows normalised)."""
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    return cls(n, **{k: v for k, v in kwargs.items() if k in inspect.signature(cls).parameters})


def _hf_gated(cls_module: str, cls_name: str, n: int, w, **kwargs):
    """The HF class itself, reading ``w`` as its weight (so that ``w``'s gradient is its)."""
    m = _hf_module(cls_module, cls_name, n, **kwargs).to(device=w.device, dtype=w.dtype)
    del m.weight
    m.weight = w
    return m


def _setup_ours_gate_after(x, w, z):
    return lambda x: gated_rms_norm(x, z, w, 1e-6, norm_before_gate=True)


def _setup_ours_gate_before(x, w, z):
    n = x.shape[-1]
    return lambda x: gated_rms_norm(x, z, w, 1e-5, group_size=n // MAMBA2_GROUPS)


def _setup_hf_gate_after(x, w, z):
    m = _hf_gated("qwen3_next", "Qwen3NextRMSNormGated", x.shape[-1], w, eps=1e-6)
    return lambda x: m(x, z)


def _setup_fla_gate_after(x, w, z):
    # flash-linear-attention's Triton kernel, which transformers' Qwen3-Next itself runs when
    # the package is installed: the peer for the gate after the norm
    from fla.modules import FusedRMSNormGated

    m = FusedRMSNormGated(x.shape[-1], eps=1e-6, activation="swish").to(device=w.device, dtype=w.dtype)
    del m.weight
    m.weight = w
    return lambda x: m(x, z)


def _setup_hf_gate_before(x, w, z):
    n = x.shape[-1]
    m = _hf_gated("mamba2", "MambaRMSNormGated", n, w, group_size=n // MAMBA2_GROUPS, eps=1e-5)
    return lambda x: m(x, z)


# name -> (setup, which norm it computes, needs)
PROVIDERS: dict[str, tuple[Callable, str, Optional[str]]] = {
    "hf_rmsnorm RMSNorm": (_setup_hf_rmsnorm_rms, "rms", None),
    "hf_rmsnorm RMSNorm+bias": (_setup_hf_rmsnorm_rms_bias, "rms", None),
    "hf_rmsnorm LayerNorm": (_setup_hf_rmsnorm_layer, "layer", None),
    "torch F.layer_norm": (_setup_torch_layer_norm, "layer", None),
    "torch F.rms_norm": (_setup_torch_rms_norm, "rms", None),
    "HF eager RMSNorm": (_setup_hf_eager, "rms", None),
    "Liger RMSNorm": (_setup_liger_rms, "rms", "liger_kernel"),
    "Liger LayerNorm": (_setup_liger_layer, "layer", "liger_kernel"),
    # last: compiling a graph per shape and mode takes longest
    "torch.compile LayerNorm": (_compiled(_setup_torch_layer_norm), "layer", "compile"),
    "torch.compile HF RMSNorm": (_compiled(_setup_hf_eager), "rms", "compile"),
    # only when named (--providers): the same calls launched through the C++ launch operator
    # whatever HF_RMSNORM_CPP_LAUNCH says, and launched from Python (the default before run 15)
    "hf_rmsnorm RMSNorm (C++ launch)": (_launched(_setup_hf_rmsnorm_rms, True), "rms", "cpp"),
    "hf_rmsnorm LayerNorm (C++ launch)": (_launched(_setup_hf_rmsnorm_layer, True), "layer", "cpp"),
    "hf_rmsnorm RMSNorm (Python launch)": (_launched(_setup_hf_rmsnorm_rms, False), "rms", "python"),
    "hf_rmsnorm LayerNorm (Python launch)": (_launched(_setup_hf_rmsnorm_layer, False), "layer", "python"),
    # --gated: the gated norms, gate after the norm (Qwen3-Next, Qwen3.5) and before it in groups (Mamba2)
    "hf_rmsnorm gated: gate after": (_setup_ours_gate_after, "gated", None),
    "HF eager Qwen3NextRMSNormGated": (_setup_hf_gate_after, "gated", None),
    "torch.compile Qwen3NextRMSNormGated": (_compiled(_setup_hf_gate_after), "gated", "compile"),
    "fla FusedRMSNormGated": (_setup_fla_gate_after, "gated", "fla"),
    "hf_rmsnorm gated: gate before in 8 groups": (_setup_ours_gate_before, "gated", None),
    "HF eager MambaRMSNormGated": (_setup_hf_gate_before, "gated", None),
    "torch.compile MambaRMSNormGated": (_compiled(_setup_hf_gate_before), "gated", "compile"),
}
GATED_PROVIDERS = [name for name, (_, kind, _) in PROVIDERS.items() if kind == "gated"]
# the run's providers unless --providers names others (or --gated)
DEFAULT_PROVIDERS = [name for name, (_, kind, need) in PROVIDERS.items() if need not in ("cpp", "python") and kind != "gated"]


# ------------------------------------------------------------------------------------ timing


def _bench(fn: Callable[[], object], device: torch.device, quick=False) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench`` on a GPU: the L2 is flushed
    before each call, and the time includes whatever the host adds)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    # --quick off a GPU is CI's dry run: the Triton kernels run in the interpreter, whose time
    # says nothing about a kernel's, so one timed call shows the step runs; the sweep's tests
    # spent most of their minutes on repeats
    reps = 1 if quick else 30
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], device: torch.device, quick=False, rep=50) -> float:
    """Median milliseconds of ``fn`` captured in a CUDA graph and replayed (``rep`` ms of calls a
    replay): GPU time alone, without the host's Python and launch cost, which a slow host adds
    to ``_bench``'s number when a call's kernels are shorter than its launches. ``_bench`` off
    a GPU."""
    if device.type != "cuda":
        return _bench(fn, device, quick=quick)
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """Device copy bandwidth, counting bytes read plus bytes written."""
    numel = (16 if quick else 512) * 2**20  # 512 Mi bf16 elements = 1 GiB each way
    src = torch.randn(numel, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device, quick=quick)
    return 2 * numel * src.element_size() / (ms * 1e-3) / 1e9


def floor_bytes(m: int, n: int, x_dtype: torch.dtype, mode: str, gated: bool = False) -> int:
    """Fewest bytes a norm moves: fwd reads x and writes y; bwd reads x and dy, writes dx. A
    gated norm also reads the gate forward, and reads it and writes its gradient backward."""
    e = torch.empty((), dtype=x_dtype).element_size()
    fwd = (3 if gated else 2) * m * n * e
    return fwd if mode == "fwd" else fwd + (5 if gated else 3) * m * n * e


def _available(need: Optional[str], device: torch.device) -> Optional[str]:
    """None when the provider can run here, else the reason it cannot."""
    if need == "python" and device.type != "cuda":
        return "off CUDA the norms launch from Python anyway: the same row as the provider without '(Python launch)'"
    if need == "cpp":
        if device.type != "cuda":
            return "the C++ launch operator launches on CUDA GPUs only"
        from hf_rmsnorm.ops import _cuda_launch

        if _cuda_launch.ops() is None:
            return f"the C++ launch operator is unavailable: {_cuda_launch.unavailable_reason()}"
    if need == "fla":
        try:
            import fla  # noqa: F401
        except ImportError:
            return "flash-linear-attention (fla-core) not installed"
        if device.type != "cuda":
            return "flash-linear-attention's kernels need a GPU"
    if need == "liger_kernel":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
        if device.type != "cuda":
            return "Liger kernels need a GPU"
    return None


def make_step(name, m, n, mode, x_dtype, w_dtype, device) -> Callable[[], object]:
    """One call of provider ``name`` on fresh random (m, n) inputs: the forward under
    no_grad (``"fwd"``), the forward with autograd recording it as a training forward does,
    nothing differentiated (``"fwd, grad"``), or the forward and every gradient (``"fwd+bwd"``)."""
    setup, kind, _ = PROVIDERS[name]
    g = torch.Generator(device=device).manual_seed(0)
    # random data, never zeros; each tensor here is larger than a GPU's L2 at full size, so
    # repeated calls read from memory rather than cache
    x = torch.randn(m, n, device=device, generator=g).to(x_dtype)
    w = (1 + 0.1 * torch.randn(n, device=device, generator=g)).to(w_dtype).requires_grad_(mode != "fwd")
    if kind == "gated":  # the gate takes the bias's place: an input with a gradient
        b = (2 * torch.randn(m, n, device=device, generator=g)).to(x_dtype).requires_grad_(mode != "fwd")
    else:
        b = (0.1 * torch.randn(n, device=device, generator=g)).to(w_dtype).requires_grad_(mode != "fwd")
    fn = setup(x, w, b)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x)
    elif mode == "fwd, grad":
        x.requires_grad_(True)

        def step():
            return fn(x)
    else:
        x.requires_grad_(True)
        dy = torch.randn(m, n, device=device, generator=g).to(fn(x).dtype)
        # every gradient the norm has (a module's own parameters included); autograd.grad, not
        # backward(), so no provider pays for accumulating into .grad
        inputs = [x, *(fn.parameters() if isinstance(fn, torch.nn.Module) else (w, b))]

        def step():
            return torch.autograd.grad(fn(x), inputs, dy, allow_unused=True)

    return step


def run_case(name, m, n, mode, x_dtype, w_dtype, device, quick):
    kind = PROVIDERS[name][1]
    step = make_step(name, m, n, mode, x_dtype, w_dtype, device)
    ms = _bench(step, device, quick=quick)
    floor = floor_bytes(m, n, x_dtype, mode, gated=kind == "gated")
    out = {"time_us": ms * 1e3, "gbps": floor / (ms * 1e-3) / 1e9, "kind": kind}
    if device.type == "cuda":
        # the same step captured in a CUDA graph and replayed: GPU time alone
        try:
            ms = graph_ms(step, device)
            out["graph_time_us"] = ms * 1e3
            out["graph_gbps"] = floor / (ms * 1e-3) / 1e9
        except Exception as exc:  # a provider that cannot be captured keeps its do_bench number
            out["graph_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return out


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("triton", "transformers", "liger-kernel", "hf_rmsnorm"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def to_markdown(result: dict) -> str:
    env = result["environment"]
    shapes = [tuple(s) for s in result["shapes"]]
    lines = [
        f"# Norm kernels: {env['device']} — {env['x_dtype']} x, {env['w_dtype']} weights",
        "",
        f"copy bandwidth {env['copy_gbps']:.0f} GB/s (read + write); torch {env['torch']}, "
        f"triton {env['triton']}, transformers {env['transformers']}, liger-kernel {env['liger-kernel']}; "
        f"{env['date']}. Percent = achieved GB/s over the byte floor / copy bandwidth.",
        "",
    ]
    header = "| impl | " + " | ".join(f"{m}×{n} {mode}" for m, n in shapes for mode in result["modes"]) + " |"
    tables = [("", "time_us", "frac_copy")]
    if any("graph_time_us" in r for per in result["results"].values() for s in per.values() for r in s.values()):
        tables = [("`do_bench` (median; includes the host's Python and launch time)", "time_us", "frac_copy"),
                  ("CUDA-graph replay (`do_bench_cudagraph`, median): GPU time alone", "graph_time_us", "graph_frac_copy")]
    for title, time_key, frac_key in tables:
        if title:
            lines += [title, ""]
        lines += [header, "|---" * (1 + len(shapes) * len(result["modes"])) + "|"]
        for name, per in result["results"].items():
            cells = []
            for m, n in shapes:
                for mode in result["modes"]:
                    r = per.get(f"{m}x{n}", {}).get(mode)
                    if r is None:
                        cells.append("—")
                    elif "error" in r:
                        cells.append("error")
                    elif time_key not in r:
                        cells.append("not captured" if "graph_error" in r else "—")
                    else:
                        cells.append(f"{r[time_key]:.0f} µs ({100 * r[frac_key]:.0f}%)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()) + "."]
    if result["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (CI, CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--x-dtype", choices=DTYPES, default="bf16", help="activation dtype")
    parser.add_argument("--w-dtype", choices=DTYPES, default=None, help="weight/bias dtype (default: the x dtype)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of: " + ", ".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd or both")
    parser.add_argument("--name", default="kernels", help="basename of the JSON and markdown files")
    parser.add_argument("--gated", action="store_true",
                        help="the gated norms' providers (unless --providers names others) on their own shapes")
    args = parser.parse_args(argv)

    names = (GATED_PROVIDERS if args.gated else DEFAULT_PROVIDERS) if args.providers is None else [
        p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROVIDERS]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown or not names:
        parser.error(f"unknown provider(s) {unknown}; choose from: {', '.join(PROVIDERS)}")
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes {' and/or '.join(MODES)}, got {args.modes!r}")

    # every (provider, shape, mode) compiles its own graph; the default limit (8) would
    # silently fall back to eager for the later shapes
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_dtype = DTYPES[args.x_dtype]
    w_dtype = DTYPES[args.w_dtype or args.x_dtype]
    if args.gated:
        shapes = QUICK_GATED_SHAPES if args.quick else GATED_SHAPES
    else:
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    copy_gbps = copy_bandwidth_gbps(device, args.quick)
    result = {
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "copy_gbps": copy_gbps,
            "x_dtype": args.x_dtype,
            "w_dtype": args.w_dtype or args.x_dtype,
            "quick": args.quick,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **_versions(),
        },
        "shapes": shapes,
        "modes": modes,
        "results": {},
        "skipped": {},
        "errors": {},
    }
    for name in names:
        reason = _available(PROVIDERS[name][2], device)
        if reason:
            result["skipped"][name] = reason
            continue
        per = result["results"].setdefault(name, {})
        for m, n in shapes:
            for mode in modes:
                try:
                    r = run_case(name, m, n, mode, x_dtype, w_dtype, device, args.quick)
                    r["frac_copy"] = r["gbps"] / copy_gbps
                    if "graph_gbps" in r:
                        r["graph_frac_copy"] = r["graph_gbps"] / copy_gbps
                except Exception as exc:  # one provider failing must not lose the others' numbers
                    # the whole message on one line: torch.compile's first line ("backend='inductor'
                    # raised:") says nothing of the cause
                    r = {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:600]}
                    result["errors"][f"{name} {m}x{n} {mode}"] = r["error"]
                per.setdefault(f"{m}x{n}", {})[mode] = r
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        _write(args.out, args.name, result)  # after each provider: a run cut short keeps what it measured
    print(_write(args.out, args.name, result))
    # a peer that cannot run a case (e.g. F.layer_norm with bf16 x and fp32 weights) is
    # reported in the table; only our own providers failing fails the run
    return 1 if any(k.startswith("hf_rmsnorm") for k in result["errors"]) else 0


def _write(out: Path, name: str, result: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    (out / f"{name}.md").write_text(markdown)
    return markdown


if __name__ == "__main__":
    sys.exit(main())
