"""What do the norms cost in a training step, and how much does patching win back?

For a GPT-2-medium-sized model (24 x 1024, LayerNorm) and a Llama-style 1B model (16 x 2048,
RMSNorm), both random, times an AdamW training step (SDPA attention, batch 8 x 1024) as
shipped, patched (target="layernorm": fused same-function; target="rmsnorm": the exact
conversion, where the model has LayerNorms), and with every norm replaced by Identity (the
ceiling no norm implementation can beat). Two precisions: bf16 parameters, and fp32
parameters under bf16 autocast. See ../shared/PERF.md for the targets.

The variants of a model and precision are built side by side and timed in turn, one step
each per round, so that the ratios between them (the targets) are not moved by the host or
the GPU clock changing between one variant's steps and the next's; a group that does not fit
the device at once is timed one variant at a time, and the table says so. ``--variants`` adds
``layernorm+triton`` and ``rmsnorm+triton``: the same patches with the kernels launched
through Triton's own launch instead of the package's direct one (``_direct._DIRECT_LAUNCH``,
on by default since run 10), for the host-bound steps where the difference shows;
``layernorm+python`` and ``rmsnorm+python``: launched directly from Python, the C++ launch
operator off (the default before run 15); and ``layernorm+cpp`` and ``rmsnorm+cpp``: through the
C++ launch operator (``_cuda_launch``, the default on CUDA since run 15) whatever
``HF_RMSNORM_CPP_LAUNCH`` says.

    python scripts/benchmark_training.py            # on a GPU
    python scripts/benchmark_training.py --quick    # tiny configs, runs anywhere (CI)
    python scripts/benchmark_training.py --profile  # also: where each row's kernel time goes

On a GPU the SM clock, the power draw and whether the power cap held the clock down are sampled
(NVML, every few milliseconds, on a thread) while the variants take their timed steps, and each
row gets the medians over its own steps: where the same matmuls take longer in one row than in
another (the Llama rows against the Identity row, benchmarks/NOTES.md run 17), its clock says
whether the GPU ran them slower.

Writes ``<out>/training.json`` and ``<out>/training.md``. With ``--profile`` each row also runs
two steps under the profiler and the table gains the kernel time per step by kind, and, per
model and precision, the kernels whose time differs most from the Identity row: what a
variant costs beyond the ceiling, kernel by kernel.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

from benchmark_kernels import _versions
from hf_rmsnorm import patch_model
from hf_rmsnorm.patching.discovery import is_norm_like

MODELS = {
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)),
    "llama-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, vocab_size=32000, max_position_embeddings=2048)),
}
QUICK = {
    "gpt2-medium": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)),
    "llama-1b": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=256, max_position_embeddings=64)),
}
VARIANTS = ("as shipped", "layernorm", "rmsnorm", "norms -> Identity", "layernorm+triton", "rmsnorm+triton",
            "layernorm+python", "rmsnorm+python", "layernorm+cpp", "rmsnorm+cpp")
# the table's rows; the same patches launched another way only on request: "+triton" through
# Triton's own launch, "+python" directly from Python, "+cpp" through the C++ launch operator
LAUNCH_SUFFIXES = ("+triton", "+python", "+cpp")
DEFAULT_VARIANTS = VARIANTS[:4]
PRECISIONS = ("bf16 params", "fp32 params + bf16 autocast")
PROFILE_STEPS = 2  # steps a row runs under the profiler with --profile
# seconds between two readings of the GPU's clock and power while the steps run (--sample-ms;
# 0: none). Each reading takes the GIL from the thread issuing the steps for a few tens of µs:
# every 10 ms is ≈ 0.3 % of a host-paced step's host time, on every variant alike.
SAMPLE_EVERY_S = 0.01


def build(name, table, precision, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = table[name]
    config = AutoConfig.for_model(model_type, **kwargs)
    config.use_cache = False
    for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(config, attr):
            setattr(config, attr, 0.0)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's init on the CPU takes seconds
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    dtype = torch.bfloat16 if precision == "bf16 params" else torch.float32
    return model.to(device=device, dtype=dtype).train()


def converts_nothing(variant: str, summary: str) -> bool:
    """Whether ``variant`` is an ``rmsnorm`` one that converted nothing (a model without
    LayerNorms): its rows would be the ``layernorm`` variant's."""
    return variant.startswith("rmsnorm") and " 0 exact" in summary


def apply_variant(model, variant, batch) -> str:
    if variant == "as shipped":
        return ""
    if variant == "norms -> Identity":
        for name, module in list(model.named_modules()):
            if is_norm_like(module) and name:
                model.set_submodule(name, nn.Identity())
        return ""
    target = variant
    for suffix in LAUNCH_SUFFIXES:
        target = target.removesuffix(suffix)
    report = patch_model(model, target=target, probe_inputs={"input_ids": batch[:1, :16]})
    return report.summary()


# Kernel kinds by name (lower-cased), first match wins: norms (ours, torch's, HF's on the CPU),
# attention (SDPA's kernels; before matmul, their names often say cutlass), matrix multiplies
# (cuBLAS/CUTLASS names), the fused AdamW.
KINDS = (
    ("norm", ("_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_rows_kernel", "layer_norm", "rms_norm", "layernorm", "rmsnorm")),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "splitk", "kernel2")),
    ("optimizer", ("adam", "multi_tensor")),
)


def kernel_kind(name: str) -> str:
    """The kind of a profiled kernel (or, on the CPU, top-level op) by its name; else "other"."""
    name = name.lower()
    for kind, marks in KINDS:
        if any(mark in name for mark in marks):
            return kind
    return "other"


def _launch_path(variant: str) -> None:
    """Set how the kernels launch for ``variant``'s step: "+triton", through Triton's own launch;
    "+python", directly from Python (``_direct._DIRECT_LAUNCH`` as the environment sets it, the
    C++ launch operator off); "+cpp", through the C++ launch operator; otherwise as the package
    launches them by default (through the operator on CUDA unless ``HF_RMSNORM_CPP_LAUNCH=0``,
    directly unless ``HF_RMSNORM_DIRECT_LAUNCH=0``)."""
    suffix = next((s for s in LAUNCH_SUFFIXES if variant.endswith(s)), "")
    direct = sys.modules.get("hf_rmsnorm.ops._direct")
    if direct is None and suffix == "+triton":
        from hf_rmsnorm.ops import _direct as direct
    if direct is not None:
        direct._DIRECT_LAUNCH = suffix != "+triton" and direct._direct_launch_default()
    launch = sys.modules.get("hf_rmsnorm.ops._cuda_launch")
    if launch is None and suffix:
        from hf_rmsnorm.ops import _cuda_launch as launch
    if launch is not None:
        launch.ENABLED = suffix == "+cpp" or (not suffix and launch._enabled_by_environment())


class _GcClock:
    """Milliseconds Python's garbage collector has run (a ``gc.callbacks`` entry): a step that
    allocates more Python objects than another triggers more collections, and each full one
    walks every object alive, the other variants' models included. On a host-bound step those
    pauses are step time; counting them says whether a slow step was the collector."""

    def __init__(self):
        self.ms, self._start = 0.0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.ms += (time.perf_counter() - self._start) * 1e3
            self._start = None


GC_CLOCK = _GcClock()
gc.callbacks.append(GC_CLOCK)

# The caching allocator's counters that mean a step waited on the device or the driver: memory
# taken from or given back to the device (cudaMalloc / cudaFree, or mappings), and a failed
# cudaMalloc that flushed the cache (synchronising every stream) before its retry. In steady
# state a training step should have none; a variant whose steps do would be slower for its
# memory pattern, not its kernels.
ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _allocator_events(device) -> Counter:
    stats = torch.cuda.memory_stats(device)
    return Counter({k: stats.get(k, 0) for k in ALLOCATOR_EVENTS})


class Run:
    """One variant's model and AdamW optimizer, stepped and timed by ``time_in_turn``."""

    def __init__(self, variant, model, precision, device, summary):
        self.variant, self.model, self.device, self.summary = variant, model, device, summary
        self.patch_s = None  # patch_model's wall time, seconds (prepare sets it where it patched)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.autocast = precision != "bf16 params"
        self.times = []  # ms of each timed step
        self.spans = []  # (start, end) of each timed step, perf_counter seconds (GpuSampler.summary)
        self.host_ms = []  # ms of each timed step until the host had issued all of it (before its synchronize)
        self.gc_ms = []  # ms of each timed step the garbage collector ran
        self.allocator = Counter()  # the CUDA caching allocator's event counters over the timed steps
        self.phases = defaultdict(lambda: {"host": [], "gpu": []})  # phase -> ms since the step began, each step
        self.resident = 0  # bytes this run keeps between steps: parameters and optimizer state
        self.transient = 0  # the most bytes a timed step allocated on top of what was resident
        self.error = None  # why a step failed, if one did

    def step(self, batch, synchronize=True, mark=lambda phase: None):
        """One training step; ``mark(phase)`` is called as the host finishes issuing each phase."""
        _launch_path(self.variant)  # the variants step in turn: each sets it for its own step
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=batch, labels=batch).loss
        mark("forward")
        loss.backward()
        mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        mark("optimizer")
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_step(self, batch):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            events = _allocator_events(self.device)
            begun = torch.cuda.Event(enable_timing=True)
        marks = {}  # phase -> (host seconds, the CUDA event recorded as the host finished issuing it)

        def mark(phase):
            marks[phase] = time.perf_counter(), torch.cuda.Event(enable_timing=True) if cuda else None
            if cuda:
                marks[phase][1].record()

        gc_before, start = GC_CLOCK.ms, time.perf_counter()
        if cuda:
            begun.record()
        self.step(batch, synchronize=False, mark=mark)
        # The host is done issuing the step here; the GPU may still be working. A step whose
        # host time is close to its step time is paced by the host (or by a full launch queue:
        # the host then waits inside a launch, so a close pair alone does not say which).
        issued = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        self.spans.append((start, end))
        self.times.append((end - start) * 1e3)
        self.host_ms.append((issued - start) * 1e3)
        self.gc_ms.append(GC_CLOCK.ms - gc_before)
        # Per phase, since the step began: when the host had issued it, and (CUDA) when the GPU
        # had run it. A phase whose GPU end follows its host end closely kept the GPU waiting on
        # the host; one whose GPU end lags far behind was paced by the GPU.
        for phase, (host, event) in marks.items():
            self.phases[phase]["host"].append((host - start) * 1e3)
            if cuda:
                self.phases[phase]["gpu"].append(begun.elapsed_time(event))
        if cuda:
            self.transient = max(self.transient, torch.cuda.max_memory_allocated(self.device) - before)
            self.allocator.update(_allocator_events(self.device) - events)

    def peak_bytes(self) -> int:
        """Peak memory of a step as if this model were alone on the device: what it keeps
        resident plus what its steps allocate on top (the other variants' resident bytes
        excluded); 0 off CUDA, where the allocator keeps no such count."""
        return self.resident + self.transient

    def profile(self, batch, steps) -> dict:
        """Time per step (µs) of each kernel over ``steps`` profiled steps (on the CPU: of each top-level op)."""
        cuda = self.device.type == "cuda"
        activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        kernels = defaultdict(float)
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(steps):
                self.step(batch)
        for e in prof.events():
            if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name] += e.time_range.elapsed_us() / steps
            elif not cuda and e.cpu_parent is None:
                kernels[e.name] += e.cpu_time_total / steps
        return dict(kernels)


def prepare(name, table, precision, variant, batch, device, warmup):
    """Build, patch and warm up one variant; None where there is nothing to time (the
    ``rmsnorm`` variant of a model without LayerNorms is the ``layernorm`` one)."""
    model = build(name, table, precision, device)
    start = time.perf_counter()
    summary = apply_variant(model, variant, batch)
    patch_s = time.perf_counter() - start
    if converts_nothing(variant, summary):
        return None
    run = Run(variant, model, precision, device, summary)
    run.patch_s = patch_s if summary else None
    for _ in range(warmup):  # compiles the kernels and creates the optimizer state
        run.step(batch)
    if device.type == "cuda":
        run.resident = _resident_bytes(run)
    return run


def _resident_bytes(run) -> int:
    """Bytes of the tensors a run keeps between steps: parameters, buffers, optimizer state.
    Counted tensor by tensor rather than as the allocator's growth while the run was built: the
    first model to run a matmul would also be charged cuBLAS's workspace."""
    tensors = [*run.model.parameters(), *run.model.buffers()]
    tensors += [v for state in run.opt.state.values() for v in state.values() if torch.is_tensor(v)]
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}  # tied weights once
    return sum(t.numel() * t.element_size() for t in unique.values())


class GpuSampler:
    """Readings of ``read()`` every ``interval`` seconds on a thread while the ``with`` block runs,
    each kept with its time; nothing where ``read`` is None. A reading is (SM clock MHz, power W,
    whether the power cap held the clock down) (``nvml_reader``); a reading that fails ends the
    sampling and keeps what was read."""

    def __init__(self, read, interval: float = SAMPLE_EVERY_S):
        self.read, self.interval = read, interval
        self.samples: list = []  # (perf_counter seconds, reading)
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.read is not None:
            self._thread = threading.Thread(target=self._sample, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _sample(self):
        while not self._stop.wait(self.interval):
            try:
                reading = self.read()
            except Exception:
                return
            self.samples.append((time.perf_counter(), reading))

    def summary(self, spans) -> dict:
        """Over the readings taken within any of ``spans`` ((start, end), perf_counter seconds):
        the median SM clock and power, the share of readings with the power cap holding the clock,
        and how many readings; {} where there are none."""
        inside = [r for t, r in self.samples if any(a <= t <= b for a, b in spans)]
        if not inside:
            return {}
        return {"sm_clock_mhz": statistics.median(r[0] for r in inside), "power_w": statistics.median(r[1] for r in inside),
                "power_capped_share": sum(bool(r[2]) for r in inside) / len(inside), "samples": len(inside)}


def nvml_reader(device):
    """() -> (SM clock MHz, power W, whether the power cap is holding the clock down) of
    ``device`` through NVML (nvidia-ml-py, which torch.cuda's own clock_rate uses), or None where
    that cannot be read (not CUDA, no nvidia-ml-py, no NVML)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        handle = torch.cuda._get_pynvml_handler(device)  # NVML's index for torch's device
        reasons = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                   or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        power_cap = getattr(pynvml, "nvmlClocksEventReasonSwPowerCap", 0x4)

        def read():
            return (pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                    pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, bool(reasons(handle) & power_cap))

        read()  # fails here rather than on the sampling thread
        return read
    except Exception:
        return None


def time_in_turn(runs, batch, steps) -> None:
    """``steps`` timed steps of every run, one step each in turn, each round starting one run
    later: a slow moment of the host or a change of GPU clock falls on every variant alike,
    where timing one variant's steps after another's put it on whichever ran then. A run whose
    step fails is left out of the later rounds, with its error kept (out of memory is raised:
    see ``time_group``)."""
    for i in range(steps):
        for k in range(len(runs)):
            run = runs[(i + k) % len(runs)]
            if run.error is None:
                try:
                    run.timed_step(batch)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:
                    run.error = f"{type(exc).__name__}: {exc}"


def time_group(name, table, precision, variants, batch, device, warmup, steps, profile_steps=0,
               sample_s=SAMPLE_EVERY_S) -> list:
    """The rows of one model and precision: its variants built side by side and timed in
    turn; where they do not fit the device together (a 1B model's fp32 variants on an 80 GB
    GPU), each one alone, as the rows then say. ``sample_s``: the GPU sampler's interval (0: off)."""
    try:
        return _time_together(name, table, precision, variants, batch, device, warmup, steps, profile_steps, sample_s, True)
    except torch.cuda.OutOfMemoryError:
        pass  # out of the except clause: the traceback, and with it every model built, is dropped
    rows = []
    for variant in variants:
        _release(device)
        rows += _time_together(name, table, precision, [variant], batch, device, warmup, steps, profile_steps, sample_s, False)
    return rows


def _release(device) -> None:
    """Hand the memory of the models dropped so far back to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_together(name, table, precision, variants, batch, device, warmup, steps, profile_steps, sample_s, together) -> list:
    rows, runs = {}, []
    out_of_memory = "OutOfMemoryError: the model does not fit the device"
    for variant in variants:
        try:
            run = prepare(name, table, precision, variant, batch, device, warmup)
        except torch.cuda.OutOfMemoryError:
            if together:
                raise
            rows[variant] = _error_row(name, precision, variant, out_of_memory)
            continue
        except Exception as exc:  # keep the other rows
            rows[variant] = _error_row(name, precision, variant, f"{type(exc).__name__}: {exc}")
            continue
        if run is not None:
            runs.append(run)
    try:
        with GpuSampler(nvml_reader(device) if sample_s > 0 else None, sample_s) as sampler:
            time_in_turn(runs, batch, steps)
    except torch.cuda.OutOfMemoryError:
        if together:
            raise
        runs[0].error = out_of_memory  # alone, one run
    for run in runs:
        if run.error is None and profile_steps:
            try:
                kernels = run.profile(batch, profile_steps)
            except Exception as exc:
                run.error = f"profiling: {type(exc).__name__}: {exc}"
        if run.error is not None:
            rows[run.variant] = _error_row(name, precision, run.variant, run.error)
            continue
        ms = statistics.median(run.times)
        rows[run.variant] = {
            "model": name, "precision": precision, "variant": run.variant, "step_ms": ms,
            # the spread shows steps disturbed by the host (each step ends in a synchronize,
            # so a slow moment of the host's Python shows up as a slow step)
            "step_ms_min": min(run.times), "step_ms_max": max(run.times), "steps": len(run.times),
            "gc_ms_per_step": statistics.mean(run.gc_ms), "gc_ms_max": max(run.gc_ms),
            "host_ms": statistics.median(run.host_ms), "host_ms_each": [round(t, 2) for t in run.host_ms],
            # medians over the timed steps, ms since each step began (gpu: CUDA only)
            "phase_ms": {phase: {k: statistics.median(v) for k, v in times.items() if v} for phase, times in run.phases.items()},
            # over all timed steps; empty off CUDA
            "allocator_events": {k: run.allocator[k] for k in ALLOCATOR_EVENTS} if run.device.type == "cuda" else {},
            # every step in the order taken (round i: this run's i-th step), to tell a slow start,
            # a slow stretch of the host and a run's own outliers apart
            "step_ms_each": [round(t, 2) for t in run.times],
            # how many variants took their steps in turn; 1 and not together: its group did not fit at once
            "timed_with": len(runs), "did_not_fit_together": not together,
            "tokens_per_second": batch.numel() / (ms / 1e3), "peak_memory_bytes": run.peak_bytes(), "report": run.summary,
            # patch_model's wall time, probes and conversion included (None: not patched). On a
            # GPU the first variant patched in a process also compiles the Triton kernels its
            # probes run (Triton's cache is cold on a fresh machine); later ones find them built
            "patch_seconds": run.patch_s,
            # the GPU's clock and power while this row's steps ran ({} off CUDA or without NVML)
            "gpu_while_timed": sampler.summary(run.spans),
            **({"kernel_us_per_step": kernels} if profile_steps else {}),
        }
    return [rows[v] for v in variants if v in rows]


def _error_row(name, precision, variant, message) -> dict:
    return {"model": name, "precision": precision, "variant": variant, "error": message[:300]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs, few steps (CI, CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS) + " (e.g. to re-time one row; "
                             "default: the first four)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also profile two steps a row: kernel time by kind, and what differs from the Identity row")
    parser.add_argument("--sample-ms", type=float, default=SAMPLE_EVERY_S * 1e3,
                        help="on a GPU, read its SM clock and power every this many ms while the steps run "
                             "(NVML; 0: not at all)")
    args = parser.parse_args(argv)
    if not args.sample_ms >= 0:
        parser.error(f"--sample-ms must be 0 (off) or a positive number of milliseconds, got {args.sample_ms}")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(n not in MODELS for n in names):
        parser.error(f"--models takes a subset of {', '.join(MODELS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants takes a subset of {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = QUICK if args.quick else MODELS
    batch_shape = (2, 32) if args.quick else (8, 1024)
    warmup, steps = (1, args.steps or 2) if args.quick else (3, args.steps or 10)
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "batch": list(batch_shape), "quick": args.quick, "profile": args.profile, "sample_ms": args.sample_ms,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **_versions(),
    }
    g = torch.Generator().manual_seed(0)
    results = []
    for name in names:
        vocab = table[name][1]["vocab_size"]
        batch = torch.randint(0, vocab, batch_shape, generator=g).to(device)
        for precision in PRECISIONS:
            results += time_group(name, table, precision, variants, batch, device, warmup, steps,
                                  PROFILE_STEPS if args.profile else 0, args.sample_ms / 1e3)
            _write(args.out, env, results)  # after each group: a run cut short keeps what it measured
            _release(device)
    print(_write(args.out, env, results))
    return 1 if any("error" in r for r in results) else 0


def write_results(out: Path, stem: str, env: dict, results: list, to_markdown) -> str:
    """``<out>/<stem>.json`` (the environment, every row) and ``<out>/<stem>.md``; the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    md = to_markdown(env, results)
    (out / f"{stem}.md").write_text(md)
    return md


def _write(out: Path, env: dict, results: list) -> str:
    return write_results(out, "training", env, results, _markdown)


def _markdown(env, results) -> str:
    lines = [
        f"# Training step: {env['device']}, batch {env['batch'][0]} x {env['batch'][1]}, AdamW, SDPA",
        "", f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; {env['date']}. "
        "A model's variants are timed in turn, one step each per round, on the same device at once; "
        "peak memory is each variant's own (its parameters, buffers and optimizer state, plus what its steps "
        "allocate); host ms = until the host had issued the step (median); GC = Python's garbage collector, ms a step "
        "on average (the most in one step); device allocs = memory taken from or given back to the device during "
        "the timed steps (cudaMalloc, cudaFree), and the caching allocator's flush-and-retry after a failed cudaMalloc.", "",
        "| model | precision | variant | step ms (median) | min–max ms | vs as shipped | vs Identity | tokens/s | peak memory GiB "
        "| host ms | GC ms | device allocs (retries) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["model"], r["precision"]): r.get("step_ms") for r in results if r["variant"] == "as shipped"}
    ceiling = {(r["model"], r["precision"]): r.get("step_ms") for r in results if r["variant"] == "norms -> Identity"}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        key = (r["model"], r["precision"])
        rel = lambda ref: f"{r['step_ms'] / ref:.3f}×" if ref else "—"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['variant']} | {r['step_ms']:.1f} | {r['step_ms_min']:.1f}–{r['step_ms_max']:.1f} | "
            f"{rel(base.get(key))} | {rel(ceiling.get(key))} | "
            f"{r['tokens_per_second']:.0f} | {r['peak_memory_bytes'] / 2**30:.2f} | "
            f"{r['host_ms']:.1f} | {r['gc_ms_per_step']:.1f} ({r['gc_ms_max']:.1f}) | {_allocs(r['allocator_events'])} |"
        )
    alone = [f"{r['model']}, {r['precision']}, {r['variant']}" for r in results if r.get("did_not_fit_together")]
    if alone:
        lines += ["", "Timed alone, after its group did not fit the device at once: " + "; ".join(alone) + "."]
    phased = [r for r in results if "error" not in r and r.get("phase_ms")]
    if phased:
        lines += ["", "Each phase's end, ms since the step began (medians): when the host had issued it / when the GPU had "
                  "run it. GPU close behind host: the GPU waited on the host in that phase.", "",
                  "| model | precision | variant | forward | backward | optimizer |", "|---|---|---|---|---|---|"]
        for r in phased:
            ends = [r["phase_ms"].get(p, {}) for p in ("forward", "backward", "optimizer")]
            lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | "
                         + " | ".join(f"{e.get('host', 0):.1f} / " + (f"{e['gpu']:.1f}" if "gpu" in e else "–") for e in ends)
                         + " |")
    sampled = [r for r in results if r.get("gpu_while_timed")]
    if sampled:
        lines += ["", f"The GPU while each row's steps ran (NVML, every {env.get('sample_ms', 10):g} ms; medians over the readings within the row's "
                  "own steps): SM clock, power draw, and the share of readings with the power cap holding the clock "
                  "down. The same kernels run slower at a lower clock.", "",
                  "| model | precision | variant | SM clock MHz | power W | power-capped | readings |", "|---|---|---|---|---|---|---|"]
        for r in sampled:
            g = r["gpu_while_timed"]
            lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {g['sm_clock_mhz']:.0f} | {g['power_w']:.0f} | "
                         f"{g['power_capped_share']:.0%} | {g['samples']} |")
    profiled = [r for r in results if "kernel_us_per_step" in r]
    if profiled:
        lines += _profile_markdown(profiled)
    return "\n".join(lines) + "\n"


def _allocs(events: dict) -> str:
    if not events:
        return "–"  # not CUDA: the CPU allocator keeps no such counters
    return f"{events['num_device_alloc'] + events['num_device_free']} ({events['num_alloc_retries']})"


def _profile_markdown(rows) -> list:
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = ["", "Kernel time per step by kind (ms; two profiled steps a row; on a CPU, top-level ops):", "",
             "| model | precision | variant | " + " | ".join(kinds) + " | all kernels | step ms |",
             "|---|---|---|" + "---|" * (len(kinds) + 2)]
    for r in rows:
        by_kind = defaultdict(float)
        for name, us in r["kernel_us_per_step"].items():
            by_kind[kernel_kind(name)] += us
        lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | "
                     + " | ".join(f"{by_kind[k] / 1e3:.2f}" for k in kinds)
                     + f" | {sum(by_kind.values()) / 1e3:.2f} | {r['step_ms']:.1f} |")
    identity = {(r["model"], r["precision"]): r["kernel_us_per_step"] for r in rows if r["variant"] == "norms -> Identity"}
    for r in rows:
        ref = identity.get((r["model"], r["precision"]))
        if ref is None or r["variant"] == "norms -> Identity":
            continue
        ours = r["kernel_us_per_step"]
        diff = {k: ours.get(k, 0.0) - ref.get(k, 0.0) for k in set(ours) | set(ref)}
        ranked = sorted(diff.items(), key=lambda kv: -abs(kv[1]))
        # the largest, then every norm kernel that is not among them: on a loaded host (or the
        # CPU, where these are operator times) other differences can be noise larger than the norms
        shown = ranked[:8] + [kv for kv in ranked[8:] if kernel_kind(kv[0]) == "norm"]
        lines += ["", f"{r['model']}, {r['precision']}, {r['variant']}: {sum(diff.values()) / 1e3:+.2f} ms of kernels a step "
                  "against the Identity row; the largest differences, then the other norm kernels' (µs a step):", ""]
        lines += [f"- {us:+.0f} {kernel_kind(name)}: `{name[:110]}`" for name, us in shown]
    return lines


if __name__ == "__main__":
    sys.exit(main())
