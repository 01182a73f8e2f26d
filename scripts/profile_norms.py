"""Where does a norm call's time go: the host (Python, allocations, launches) or the kernels?

For a few providers of ``benchmark_kernels.py`` at one shape, measures per call:
- host: the Python thread's time to issue the call (no synchronisation inside the loop);
- wall: the same loop's time including the wait for the GPU to finish;
- kernels: the sum of the kernel durations the profiler records, and each kernel's share;
- for this package's providers, the host time of the Python path with every kernel launch a
  no-op: this package's Python alone, so that the direct launch's time minus it is what
  Triton's launcher costs on this host; and with Triton's launch, the direct launch from Python
  (``_direct._DIRECT_LAUNCH``, which skips Triton's ``JITFunction.run`` on every call after a
  key's first) and the C++ launch operator (the default on CUDA since run 15) in turn, five
  times each;
- an empty ``autograd.Function`` (forward allocates, backward returns the gradient): the host
  time any Python-defined norm pays for autograd on this host, whatever its kernels;
- for every forward+backward, the host time again with autograd's backward run on the calling
  thread (``torch.autograd.set_multithreading_enabled(False)``) instead of handed to the
  engine's CUDA device thread: what that handoff costs per call on this host.
When host ≥ kernels, a ``do_bench`` number measures the launches, not the kernels.

    python scripts/profile_norms.py --shapes 65536x768,16384x8192    # on a GPU
    python scripts/profile_norms.py --shapes 262144x128 --providers "hf_rmsnorm gated: gate after"

Writes ``<out>/profile.json`` and ``<out>/profile.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

from benchmark_cpu import EmptyFunction, launches_ab, launches_stubbed
from benchmark_kernels import PROVIDERS, _available, _versions, make_step, shapes_arg

DEFAULT_PROVIDERS = "hf_rmsnorm RMSNorm,hf_rmsnorm LayerNorm,torch F.rms_norm,torch F.layer_norm,Liger RMSNorm,Liger LayerNorm"


def host_us(step, iters: int, warmup: int = 5) -> float:
    """The Python thread's time per call to issue ``step``, after ``warmup`` calls, nothing
    synchronised inside the loop."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters * 1e6


def measure(step, iters: int) -> dict:
    for _ in range(5):
        step()
    torch.cuda.synchronize()  # the warm-up's kernels finished: the loop below starts idle
    start = time.perf_counter()
    host = host_us(step, iters, warmup=0)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / iters * 1e6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = defaultdict(list)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name].append(e.time_range.elapsed_us())
    per_kernel = {k: {"calls_per_step": len(v) / iters, "us_per_call": sum(v) / len(v)} for k, v in kernels.items()}
    return {
        "host_us": host,
        "wall_us": wall,
        "kernel_us": sum(sum(v) for v in kernels.values()) / iters,
        "launches_per_step": sum(len(v) for v in kernels.values()) / iters,
        "kernels": per_kernel,
    }


def launch_ab_host_us(step, iters: int, rounds: int = 5, cpp: bool = False) -> tuple:
    """``host_us`` with Triton's launch and with the direct launch (and with ``cpp`` through the
    C++ launch operator), timed alternately (``launches_ab``; its warm-up calls fill the direct
    launch's cache and the operator's plans): run 10 timed the direct launch once, after the
    other columns, and one cell of eight came out above Triton's."""
    return launches_ab(lambda: host_us(step, iters), rounds, cpp=cpp)


def one_thread_host_us(step, iters: int) -> float:
    """``host_us`` with autograd's backward on the calling thread, not the device's."""
    with torch.autograd.set_multithreading_enabled(False):
        return host_us(step, iters)


def empty_function_step(m: int, n: int, device):
    x = torch.randn(m, n, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    return lambda: torch.autograd.grad(EmptyFunction.apply(x), (x,), dy)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=shapes_arg, default=[(16384, 2048)], help="comma-separated MxN")
    parser.add_argument("--providers", default=DEFAULT_PROVIDERS)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this profiles GPU kernels; run it on a GPU")
    shapes = args.shapes
    device = torch.device("cuda")
    with_cpp = _available("cpp", device) is None  # the C++ launch operator built and loaded here
    rows = []
    for m, n in shapes:
        for name in [p.strip() for p in args.providers.split(",") if p.strip()]:
            if _available(PROVIDERS[name][2], device):
                continue
            # the forward with grad too: in a training step the call records an autograd node,
            # and where the host paces the forward (GPT-2-medium, run 14b) that is its cost
            for mode in ("fwd", "fwd, grad", "fwd+bwd"):
                step = make_step(name, m, n, mode, torch.bfloat16, torch.bfloat16, device)
                r = measure(step, args.iters)
                if name.startswith("hf_rmsnorm"):
                    # after the real calls above, which compiled the kernels and cached the
                    # backward's occupancy: the same calls with every launch a no-op
                    with launches_stubbed():
                        r["host_stubbed_us"] = host_us(step, args.iters)
                    r["host_triton_ab_us"], r["host_direct_us"], *cpp = launch_ab_host_us(step, args.iters, cpp=with_cpp)
                    r["host_cpp_us"] = cpp[0] if cpp else None
                if mode == "fwd+bwd":
                    r["host_one_thread_us"] = one_thread_host_us(step, args.iters)
                rows.append({"shape": f"{m}x{n}", "provider": name, "mode": mode, **r})
        step = empty_function_step(m, n, device)
        rows.append({"shape": f"{m}x{n}", "provider": "empty autograd.Function", "mode": "fwd+bwd",
                     **measure(step, args.iters), "host_one_thread_us": one_thread_host_us(step, args.iters)})
    md = to_markdown(rows, torch.cuda.get_device_name(), _versions())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "profile.md").write_text(md)
    print(md)
    return 0


def to_markdown(rows: list[dict], device: str, versions) -> str:
    lines = [f"# Host vs kernel time per call, {device}, bf16", "", f"{versions}", "",
             "host = the Python thread's time to issue a call (this package's: as it launches by default); stubbed = "
             "the Python path with every kernel launch a no-op (this package's Python alone), launcher = direct − "
             "stubbed (Triton's launcher, for this package's calls); Triton / direct / C++ = host with Triton's launch "
             "/ with the direct launch from Python (`_DIRECT_LAUNCH`) / through the C++ launch operator (the default "
             "on CUDA; – where it cannot be built), timed "
             "alternately, median of 5 each; 1 thread = host with autograd's backward "
             "on the calling thread (`torch.autograd.set_multithreading_enabled(False)`).", "",
             "| shape | provider | mode | host µs | stubbed µs | launcher µs | Triton / direct / C++ µs | 1 thread µs | wall µs | kernels µs | launches | kernels (µs each) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ks = "; ".join(f"{k[:40]} ×{v['calls_per_step']:.0f} {v['us_per_call']:.1f}" for k, v in
                       sorted(r["kernels"].items(), key=lambda kv: -kv[1]["us_per_call"] * kv[1]["calls_per_step"]))
        stubbed = r.get("host_stubbed_us")
        cpp = r.get("host_cpp_us")
        split = (f"{stubbed:.0f} | {r['host_direct_us'] - stubbed:.0f} | {r['host_triton_ab_us']:.0f} / {r['host_direct_us']:.0f} / "
                 + (f"{cpp:.0f}" if cpp is not None else "–") if stubbed is not None else "– | – | –")
        one = r.get("host_one_thread_us")
        split += f" | {one:.0f}" if one is not None else " | –"
        lines.append(f"| {r['shape']} | {r['provider']} | {r['mode']} | {r['host_us']:.0f} | {split} | {r['wall_us']:.0f} | "
                     f"{r['kernel_us']:.0f} | {r['launches_per_step']:.0f} | {ks} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
