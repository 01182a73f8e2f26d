"""Are the same matmuls slower on what a normalised model multiplies? (issue 7's Llama gap)

In run 17 (benchmarks/NOTES.md) Llama-1B's matmuls took 1.9 ms longer a training step with our
norms than with the norms replaced by Identity, and 1.3 ms longer with HF's norms as shipped:
the same cuBLAS kernels on the same shapes, every kind of GEMM 1-4 % slower. Two explanations
fit. Either the GPU ran slower while those steps ran (its clock, held down by the power cap), or
the same GEMM takes longer on a normalised model's values than on the Identity model's: a
tensor core's power depends on its operands, and a GPU at its power cap pays for power with
clock.

This script separates the two. For each variant (the training benchmark's model, batch and
warm-up steps), one more training step records what the linear layers of one decoder layer
multiplied: each ``nn.Linear``'s input x, the gradient of its output dy, and its weight W, in the
dtype the GEMM got them (autocast's, where it is on). Then, on those tensors alone, it times the
three GEMMs a linear costs a step (forward x·Wᵀ, input gradient dy·W, weight gradient dyᵀ·x),
each variant's in turn, round after round, while NVML reads the GPU's clock and power. A control
per variant times the same GEMMs on Gaussian tensors with the captured ones' RMS: the same scale,
none of the structure.

How to read it: the patched variant's GEMMs slower than the Identity variant's by about the
step's share (≈ 3 % of the matmul time) means the data; the same within the rounds' spread means
the gap belongs to the step around the GEMMs, and the training benchmark's clock readings are
where to look next.

    python scripts/probe_gemm_data.py            # on a GPU: llama-1b, bf16 params
    python scripts/probe_gemm_data.py --quick    # tiny model on the CPU (CI): the plumbing only

Writes ``<out>/gemm_probe.json`` and ``<out>/gemm_probe.md``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmark_kernels import _bench, _versions
from benchmark_training import (DEFAULT_VARIANTS, MODELS, PRECISIONS, QUICK, SAMPLE_EVERY_S, GpuSampler, _release,
                                nvml_reader, prepare, write_results)

REFERENCE = "norms -> Identity"
DEFAULT_PROBE_VARIANTS = (REFERENCE, "as shipped", "layernorm")
GEMMS = ("forward x·Wᵀ", "input grad dy·W", "weight grad dyᵀ·x")
GAUSSIAN = " (Gaussian)"  # suffix of a control set's name


class ProbeError(Exception):
    """What the probe cannot do with the model or variant asked for (exit 2, the reason said)."""


def decoder_layers(model) -> nn.ModuleList:
    """The model's list of decoder layers: the ModuleList with one entry a hidden layer."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ProbeError(f"{type(model).__name__} has no list of {n} decoder layers")


def linears_of_layer(model, layer: int) -> dict:
    """{name within the layer: nn.Linear} of decoder layer ``layer``."""
    return {name: m for name, m in decoder_layers(model)[layer].named_modules() if isinstance(m, nn.Linear)}


def capture(run, batch, layer: int) -> dict:
    """One forward and backward of ``run`` (a ``benchmark_training.Run``; no optimizer step, the
    gradients left in place) recording, for each nn.Linear of decoder layer ``layer``, what its
    GEMMs multiplied: {name: {"x": (T, in), "dy": (T, out), "w": (out, in), "b": bias or None}},
    in the dtype the GEMMs got them (bf16 under the run's autocast)."""
    dtype = torch.bfloat16 if run.autocast else None
    seen, handles = {}, []

    def as_multiplied(t):
        t = t.detach()
        return t.to(dtype) if dtype is not None else t

    def record(name):
        def hook(module, args, output):
            x = args[0]
            entry = seen[name] = {"x": as_multiplied(x.reshape(-1, x.shape[-1])), "w": as_multiplied(module.weight),
                                  "b": None if module.bias is None else as_multiplied(module.bias)}
            output.register_hook(lambda g: entry.__setitem__("dy", g.detach().reshape(-1, g.shape[-1])))
        return hook

    for name, module in linears_of_layer(run.model, layer).items():
        handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
            loss = run.model(input_ids=batch, labels=batch).loss
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ProbeError(f"decoder layer {layer} has no nn.Linear (the probe times those; GPT-2's Conv1D is not one)")
    missing = [name for name, entry in seen.items() if "dy" not in entry]
    if missing:
        raise ProbeError(f"decoder layer {layer}: no gradient reached {', '.join(missing)}")
    return seen


def gaussian_like(tensors: dict, generator) -> dict:
    """The control: x and dy replaced by Gaussian values of their RMS (same shape, dtype, W)."""
    def like(t):
        rms = t.float().pow(2).mean().sqrt()
        return (torch.randn(t.shape, generator=generator, device=t.device) * rms).to(t.dtype)

    return {name: {**entry, "x": like(entry["x"]), "dy": like(entry["dy"])} for name, entry in tensors.items()}


def gemm_calls(entry: dict) -> dict:
    """The three GEMMs of one linear in a training step, as autograd's linear issues them."""
    x, dy, w, b = entry["x"], entry["dy"], entry["w"], entry["b"]
    return {GEMMS[0]: lambda: torch.nn.functional.linear(x, w, b),
            GEMMS[1]: lambda: torch.mm(dy, w),
            GEMMS[2]: lambda: torch.mm(dy.t(), x)}


def gemm_shape(entry: dict, gemm: str) -> str:
    """M×N×K of one GEMM (K: the summed dimension)."""
    (t, k), out = entry["x"].shape, entry["w"].shape[0]
    return {GEMMS[0]: f"{t}×{out}×{k}", GEMMS[1]: f"{t}×{k}×{out}", GEMMS[2]: f"{out}×{k}×{t}"}[gemm]


def tensor_stats(t: torch.Tensor) -> dict:
    """RMS, the share of exact zeros, and (bf16) the share of mantissa bits set: the operands'
    bit activity, on which a tensor core's power depends."""
    stats = {"rms": t.float().pow(2).mean().sqrt().item(), "zeros": (t == 0).float().mean().item()}
    if t.dtype == torch.bfloat16:
        mantissa = t.view(torch.int16) & 0x7F
        ones = sum(((mantissa >> i) & 1).float().mean().item() for i in range(7))
        stats["mantissa_ones"] = ones / 7
    return stats


def _time_ms(fn, device, quick) -> float:
    """Median ms of ``fn``: ``do_bench`` on a GPU (the L2 flushed before each call), shorter than
    the kernel benchmark's so that every GEMM of every set fits a few rounds; the CPU loop off it."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    return _bench(fn, device, quick=quick)


def time_sets(sets: dict, rounds: int, device, quick, sample_s) -> tuple:
    """µs of each set's GEMMs, {set: {linear: {gemm: [per round]}}}, and each set's GPU readings.
    Within a round every GEMM is timed for every set in turn, the order rotating by round, so a
    change of clock falls on every set alike."""
    names = list(sets)
    calls = {s: {linear: gemm_calls(entry) for linear, entry in tensors.items()} for s, tensors in sets.items()}
    times = {s: {linear: {g: [] for g in GEMMS} for linear in sets[s]} for s in names}
    spans = {s: [] for s in names}
    with GpuSampler(nvml_reader(device) if sample_s > 0 else None, sample_s) as sampler:
        for r in range(rounds):
            for linear in sets[names[0]]:
                for gemm in GEMMS:
                    for k in range(len(names)):
                        s = names[(r + k) % len(names)]
                        start = time.perf_counter()
                        ms = _time_ms(calls[s][linear][gemm], device, quick)
                        spans[s].append((start, time.perf_counter()))
                        times[s][linear][gemm].append(ms * 1e3)
    return times, {s: sampler.summary(spans[s]) for s in names}


def probe(name, table, precision, variants, batch, device, layer, rounds, warmup, sample_s, quick=False) -> dict:
    sets, stats, reports = {}, {}, {}
    generator = torch.Generator(device=device).manual_seed(1)
    for variant in variants:
        run = prepare(name, table, precision, variant, batch, device, warmup)
        if run is None:
            raise ProbeError(f"the {variant!r} variant converts nothing in {name}: it would be the 'layernorm' one")
        tensors = capture(run, batch, layer)
        n_layers = len(decoder_layers(run.model))
        reports[variant] = run.summary
        del run
        _release(device)
        sets[variant] = tensors
        sets[variant + GAUSSIAN] = gaussian_like(tensors, generator)
        stats[variant] = {linear: {k: tensor_stats(e[k]) for k in ("x", "dy")} for linear, e in tensors.items()}
    any_set = sets[variants[0]]
    times, gpu = time_sets(sets, rounds, device, quick, sample_s)
    return {
        "model": name, "precision": precision, "layer": layer, "layers": n_layers,
        "rounds": rounds, "variants": list(variants), "reports": reports, "tensor_stats": stats,
        "shapes": {linear: {g: gemm_shape(entry, g) for g in GEMMS} for linear, entry in any_set.items()},
        "us": {s: {linear: {g: statistics.median(v) for g, v in per.items()} for linear, per in t.items()} for s, t in times.items()},
        "us_each": times, "gpu_while_timed": gpu,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (CI, CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--precision", default=PRECISIONS[0], help=f"one of: {', '.join(PRECISIONS)}")
    parser.add_argument("--variants", default=",".join(DEFAULT_PROBE_VARIANTS),
                        help=f"comma-separated, {REFERENCE!r} among them (the reference); of: {', '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--layer", type=int, default=None, help="which decoder layer (default: the middle one)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of timing every GEMM of every set (default 3; --quick 1)")
    parser.add_argument("--sample-ms", type=float, default=SAMPLE_EVERY_S * 1e3, help="NVML reading interval on a GPU (0: off)")
    args = parser.parse_args(argv)
    table = QUICK if args.quick else MODELS
    if args.model not in table:
        parser.error(f"--model takes one of {', '.join(table)}, got {args.model!r}")
    if args.precision not in PRECISIONS:
        parser.error(f"--precision takes one of {', '.join(map(repr, PRECISIONS))}, got {args.precision!r}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if REFERENCE not in variants or any(v not in DEFAULT_VARIANTS for v in variants) or len(set(variants)) < len(variants):
        parser.error(f"--variants takes distinct names of {', '.join(DEFAULT_VARIANTS)}, {REFERENCE!r} among them "
                     f"(the reference); got {args.variants!r}")
    config = table[args.model][1]
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    layer = args.layer if args.layer is not None else n_layers // 2
    if not 0 <= layer < n_layers:
        parser.error(f"--layer must be in [0, {n_layers}) for {args.model}, got {layer}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1 or not args.sample_ms >= 0:
        parser.error("--rounds must be at least 1 and --sample-ms 0 or more")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_shape = (2, 32) if args.quick else (8, 1024)
    # the training benchmark's batch for this model: its generator draws one batch a model, in table order
    g = torch.Generator().manual_seed(0)
    for name in table:
        batch = torch.randint(0, table[name][1]["vocab_size"], batch_shape, generator=g)
        if name == args.model:
            break
    try:
        result = probe(args.model, table, args.precision, variants, batch.to(device), device, layer, rounds,
                       1 if args.quick else 3, args.sample_ms / 1e3, quick=args.quick)
    except ProbeError as exc:
        print(f"probe_gemm_data.py: {args.model}: {exc}", file=sys.stderr)
        return 2
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "batch": list(batch_shape),
           "quick": args.quick, "sample_ms": args.sample_ms,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **_versions()}
    print(write_results(args.out, "gemm_probe", env, [result], _markdown))
    return 0


def _markdown(env, results) -> str:
    r = results[0]
    variants = r["variants"]
    others = [s for s in r["us"] if s != REFERENCE]
    lines = [f"# The same GEMMs on each variant's data: {r['model']}, {r['precision']}, {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; {env['date']}. "
             f"Decoder layer {r['layer']} of {r['layers']}, batch {env['batch'][0]} × {env['batch'][1]}: what each linear "
             "multiplied in one training step after the warm-up, timed alone (do_bench median µs; the median over "
             f"{r['rounds']} rounds, the sets in turn). Ratios against the {REFERENCE!r} variant's own tensors; "
             "(Gaussian): the same GEMM on Gaussian x and dy of that variant's RMS.", "",
             f"| linear | GEMM | M×N×K | {REFERENCE} µs | " + " | ".join(others) + " |",
             "|---|---|---|---|" + "---|" * len(others)]
    ref = r["us"][REFERENCE]
    totals = {s: 0.0 for s in r["us"]}
    for linear, per in ref.items():
        for gemm, us in per.items():
            for s in totals:
                totals[s] += r["us"][s][linear][gemm]
            lines.append(f"| {linear} | {gemm} | {r['shapes'][linear][gemm]} | {us:.1f} | "
                         + " | ".join(f"{r['us'][s][linear][gemm] / us:.3f}×" for s in others) + " |")
    lines.append(f"| **the layer** | all | | {totals[REFERENCE]:.1f} | " + " | ".join(f"{totals[s] / totals[REFERENCE]:.3f}×" for s in others) + " |")
    lines += ["", f"× {r['layers']} layers (if every layer were like this one), ms a step more than {REFERENCE}'s tensors: "
              + "; ".join(f"{s} {(totals[s] - totals[REFERENCE]) * r['layers'] / 1e3:+.2f}" for s in others)
              + ". Run 17's training profile: +1.90 ms (ours), +1.31 ms (as shipped), all matmuls of the step."]
    lines += ["", "What was multiplied: RMS / share of exact zeros / share of bf16 mantissa bits set.", "",
              "| linear | tensor | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for linear in r["tensor_stats"][variants[0]]:
        for k in ("x", "dy"):
            cells = []
            for v in variants:
                st = r["tensor_stats"][v][linear][k]
                cells.append(f"{st['rms']:.3g} / {st['zeros']:.1%} / " + (f"{st['mantissa_ones']:.3f}" if "mantissa_ones" in st else "–"))
            lines.append(f"| {linear} | {k} | " + " | ".join(cells) + " |")
    sampled = {s: g for s, g in r["gpu_while_timed"].items() if g}
    if sampled:
        lines += ["", f"The GPU while each set's GEMMs ran (NVML every {env['sample_ms']:g} ms, medians):", "",
                  "| set | SM clock MHz | power W | power-capped | readings |", "|---|---|---|---|---|"]
        lines += [f"| {s} | {g['sm_clock_mhz']:.0f} | {g['power_w']:.0f} | {g['power_capped_share']:.0%} | {g['samples']} |"
                  for s, g in sampled.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
