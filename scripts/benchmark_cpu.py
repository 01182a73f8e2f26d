"""On the CPU, is each patched module at least as fast as the module it replaces?

PERF.md's CPU target: without a GPU a patched model runs the torch path, and every swapped
module must be no slower than the one it replaced. For each HF norm class the replacement is
the module ``patch_model`` would install, found by the same probe
(``hf_rmsnorm.patching.discovery.match_norm``; for the exact LayerNorm conversion, the
RMSNorm-with-bias it builds). Both are timed on the same input, alternately, in inference
(forward under ``no_grad``) and training (forward, then the gradients of the input and every
parameter); the time is the median of ``torch.utils.benchmark``'s blocked measurements.

``--host`` adds a second table: the host time of the *Triton* path per call, with the kernel
launches replaced by no-ops, i.e. the Python this package runs around every GPU launch (the
time Triton's own launcher takes comes on top and needs a GPU: ``profile_norms.py``).
``--launcher`` (a run of its own) times the same calls through Triton's launch path, kernels
compiled for sm_90 and the driver's launch a no-op, with and without the direct launch and
through the C++ launch operator, and a norm call's host time inside a GPT-2-shaped training
forward against the same call in a loop.

    python scripts/benchmark_cpu.py --host               # full table
    python scripts/benchmark_cpu.py --launcher --no-modules --out benchmarks/results/cpu/launcher
    python scripts/benchmark_cpu.py --quick              # tiny shapes, short timings (tests)

Writes ``<out>/cpu.json`` (every number, the machine and versions) and ``<out>/cpu.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark as tbench

from benchmark_kernels import _hf_module, _versions

FULL_SHAPES = [(1, 768), (128, 768), (2048, 768), (512, 2048)]
QUICK_SHAPES = [(1, 64), (32, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("inference", "training")
# Small on purpose: the host cost of a GPU call does not depend on the shape, while on the CPU
# allocating (and freeing) large stand-in tensors would add malloc time no GPU run has. Three
# dimensions, (batch, sequence, hidden), as a model's norms are called.
HOST_SHAPE = (2, 8, 1024)


# name -> (builds the original module for a hidden size, whether the replacement is the exact
# LayerNorm -> RMSNorm conversion rather than the same-function fused module, whether it is
# called with a gate of x's shape)
CASES = {
    "LayerNorm → FusedLayerNorm": (lambda n: nn.LayerNorm(n), False, False),
    "LayerNorm → RMSNorm+bias (exact conversion)": (lambda n: nn.LayerNorm(n), True, False),
    "LlamaRMSNorm → FusedRMSNorm": (lambda n: _hf_module("llama", "LlamaRMSNorm", n, eps=1e-6), False, False),
    "GemmaRMSNorm → FusedRMSNorm": (lambda n: _hf_module("gemma", "GemmaRMSNorm", n, eps=1e-6), False, False),
    "T5LayerNorm → FusedRMSNorm": (lambda n: _hf_module("t5", "T5LayerNorm", n, eps=1e-6), False, False),
    # Mamba2's (gate before the norm, in 4 groups) and Qwen3-Next's (gate after it)
    "MambaRMSNormGated → FusedGatedRMSNorm": (
        lambda n: _hf_module("mamba2", "MambaRMSNormGated", n, group_size=n // 4, eps=1e-5), False, True),
    "Qwen3NextRMSNormGated → FusedGatedRMSNorm": (
        lambda n: _hf_module("qwen3_next", "Qwen3NextRMSNormGated", n, eps=1e-6), False, True),
    # Qwen4-Exp's hyper-connection norm: four streams, each normalised on its own (no gate)
    "Qwen4ExpTextRMSNorm (grouped) → FusedGatedRMSNorm": (
        lambda n: _hf_module("qwen4_exp", "Qwen4ExpTextRMSNorm", n, group_size=n // 4, eps=1e-6), False, False),
}


def replacement(original: nn.Module, convert: bool) -> nn.Module:
    """What patch_model puts in ``original``'s place (sharing its parameters)."""
    from hf_rmsnorm.patching.discovery import _param_signature, build_fused, match_norm

    match = match_norm(original)
    if match.spec is None:
        raise RuntimeError(f"{type(original).__name__}: no fused replacement ({match.reason})")
    spec = dataclasses.replace(match.spec, kind="rms") if convert else match.spec
    return build_fused(spec, original, _param_signature(original)[0])


def _median_us(fn, min_run_time: float) -> float:
    return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def _step(module: nn.Module, args: tuple, dy: torch.Tensor, mode: str):
    """One call on ``args`` (x, or x and a gate): under no_grad, or with the gradients of every
    argument and parameter."""
    if mode == "inference":
        def run():
            with torch.no_grad():
                module(*args)
    else:
        inputs = (*args, *module.parameters())

        def run():
            torch.autograd.grad(module(*args), inputs, dy)
    return run


def time_pair(original, patched, args, dy, mode, rounds: int, min_run_time: float) -> tuple[float, float]:
    """Medians over ``rounds`` alternating measurements, so that drift hits both alike; the
    order flips every round, so that going first or second is no advantage either."""
    steps = (_step(original, args, dy, mode), _step(patched, args, dy, mode))
    for step in steps:
        step()  # first-call work (allocator, lazy init) outside the timing
    return alternating_medians([lambda step=step: _median_us(step, min_run_time) for step in steps], rounds)


def alternating_medians(measures, rounds: int, flip_order: bool = True) -> tuple:
    """The medians of ``rounds`` calls each of the ``measures``, called in turn, so that drift
    hits all alike; ``flip_order``: the order reversed every other round, so that going first
    or last is no advantage either."""
    times: tuple = tuple([] for _ in measures)
    order = list(range(len(measures)))
    for i in range(rounds):
        for j in (order[::-1] if flip_order and i % 2 else order):
            times[j].append(measures[j]())
    return tuple(statistics.median(t) for t in times)


def module_rows(shapes, dtypes, rounds: int, min_run_time: float, cases: str, skipped: dict) -> list[dict]:
    """The rows of every case (or those named like ``cases``); a case whose class the installed
    transformers lacks goes into ``skipped`` with the reason."""
    rows = []
    for case, (build, convert, gated) in CASES.items():
        if cases and cases.lower() not in case.lower():
            continue
        try:
            build(8)
        except (ImportError, AttributeError) as e:
            reason = f"transformers {importlib.metadata.version('transformers')} has no such class ({e})"
            print(f"{case}: skipped, {reason}", flush=True)
            skipped[case] = reason
            continue
        for dname in dtypes:
            dtype = DTYPES[dname]
            for m, n in shapes:
                torch.manual_seed(0)
                original = build(n).to(dtype)
                with torch.no_grad():
                    for p in original.parameters():
                        p.normal_(1.0, 0.1)
                patched = replacement(original, convert)
                x = torch.randn(m, n, dtype=dtype)
                if convert:
                    x = x - x.float().mean(-1, keepdim=True).to(dtype)  # what a converted model's norms see
                x.requires_grad_(True)
                args = (x, torch.randn(m, n, dtype=dtype).requires_grad_(True)) if gated else (x,)
                dy = torch.randn(m, n, dtype=dtype)
                for mode in MODES:
                    base, ours = time_pair(original, patched, args, dy, mode, rounds, min_run_time)
                    rows.append({
                        "case": case, "dtype": dname, "shape": [m, n], "mode": mode,
                        "original_us": base, "patched_us": ours, "ratio": ours / base,
                    })
                    print(f"{case:45s} {dname} {m}x{n} {mode:9s} {base:9.1f} {ours:9.1f} µs  ×{ours / base:.2f}",
                          flush=True)
    return rows


@contextlib.contextmanager
def launches_stubbed():
    """Run the Triton path from Python with every kernel launch a no-op (host time only): on CPU
    tensors, and on CUDA ones once a real call of the same shape has run (the backward then takes
    its programs from the launch plan that call made instead of compiling; ``profile_norms.py``).
    The C++ launch operator is off meanwhile: it would launch the real kernels."""
    from hf_rmsnorm.ops import _cuda_launch, _triton_norm

    def nop(*args, **kwargs):
        return None

    class Stub:
        def __getitem__(self, grid):
            return nop

    saved = {k: os.environ.get(k) for k in ("HF_RMSNORM_BACKEND", "TRITON_INTERPRET")}
    os.environ.update(HF_RMSNORM_BACKEND="triton", TRITON_INTERPRET="1")
    from hf_rmsnorm.ops import _triton_gated  # imported with the interpreter's variable set, as the op imports it

    kernels = {(module, name): getattr(module, name) for module, names in (
        (_triton_norm, ("_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_rows_kernel")),
        (_triton_gated, ("_gated_fwd_kernel", "_gated_bwd_kernel"))) for name in names}
    operator = _cuda_launch.ENABLED
    _cuda_launch.ENABLED = False
    for module, name in kernels:
        setattr(module, name, Stub())
    try:
        yield
    finally:
        _cuda_launch.ENABLED = operator
        for (module, name), kernel in kernels.items():
            setattr(module, name, kernel)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _NoLaunch:
    """Stands in for Triton's launcher of one compiled kernel: launches nothing, and records
    the arguments of each call in ``calls`` when that is a list (``tests/test_direct_launch.py``)."""

    calls: list | None = None

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, *args):
        if _NoLaunch.calls is not None:
            _NoLaunch.calls.append((self, args))


class _NoGpuDriver:
    """Triton's active driver on a machine without a GPU: the current target is an NVIDIA GPU
    of compute capability ``arch``, so kernels compile for it with Triton's own compiler (as in
    kernel_report.py); loading a compiled kernel and launching it do nothing."""

    loaded = 0

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = self
        self.launcher_cls = _NoLaunch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def load_binary(self, name, kernel, shared, device):
        # module, function, registers, spills, most threads a block; the function an integer
        # handle of its own per kernel, as the driver's are (the C++ launch keeps it)
        _NoGpuDriver.loaded += 1
        return 0, 0x1000 + _NoGpuDriver.loaded, 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}  # an H100/H200's


@contextlib.contextmanager
def triton_without_gpu(arch: int = 90):
    """Run this package's Triton path on CPU tensors through Triton's own JIT launch path
    (binding, specialisation, cache lookup, the package's direct launch), with the kernels
    compiled for sm_``arch`` and every launch a no-op: the host time of a GPU call short of the
    driver's own launch, and the launcher's arguments, on a machine without a GPU. The kernels
    must be compiled ones, so the process must not have imported them for the interpreter."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default until 3.10, set to silence its warning
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from hf_rmsnorm.ops import _norm, _triton_norm

    if type(_triton_norm._norm_fwd_kernel) is not JITFunction:
        raise RuntimeError("triton_without_gpu needs compiled kernels, and this process defined them for Triton's "
                           "interpreter (TRITON_INTERPRET=1): run it in a process without that variable")

    saved_driver, saved_gate, saved_backend = driver._active, _norm._interpreting, os.environ.get("HF_RMSNORM_BACKEND")
    driver.set_active(_NoGpuDriver(arch))
    # the package sends CPU tensors to Triton only for its interpreter; here they go to compiled
    # kernels whose launches do nothing
    _norm._interpreting = lambda: True
    os.environ["HF_RMSNORM_BACKEND"] = "triton"
    try:
        yield
    finally:
        driver._active = saved_driver
        _norm._interpreting = saved_gate
        if saved_backend is None:
            os.environ.pop("HF_RMSNORM_BACKEND", None)
        else:
            os.environ["HF_RMSNORM_BACKEND"] = saved_backend


class EmptyFunction(torch.autograd.Function):
    """What autograd alone costs a Python-defined op with one saved tensor: the forward only
    allocates its output, the backward passes the gradient on. The floor of any
    ``autograd.Function`` norm's forward + backward, whatever its kernels."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


# host_steps' calls of the gated norm: the gate after the norm in heads of 128 (Qwen3-Next's
# order), and a patched Mamba2 mixer's module (the gate first, 8 groups)
GATED_CALLS = ("gated_rms_norm(x, z, w, heads of 128)", "FusedGatedRMSNorm module, 8 groups")


def host_steps(shape) -> dict:
    """(call, mode) -> one call of this package's public ops on bf16 input of ``shape``: the
    forward without and with gradients, and the forward + backward."""
    from hf_rmsnorm import FusedGatedRMSNorm, FusedLayerNorm
    from hf_rmsnorm.ops import gated_rms_norm, layer_norm, rms_norm

    n = shape[-1]
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.bfloat16)
    module = FusedLayerNorm(n, dtype=torch.bfloat16)
    gated = FusedGatedRMSNorm(n, group_size=n // 8, norm_before_gate=False, dtype=torch.bfloat16)
    calls = {
        "rms_norm(x, w)": (lambda: rms_norm(x, w), (x, w)),
        "rms_norm(x, w, b)": (lambda: rms_norm(x, w, b), (x, w, b)),
        "layer_norm(x, w, b)": (lambda: layer_norm(x, w, b), (x, w, b)),
        # the call a patched model makes: past the functional op's per-call checks
        "FusedLayerNorm module": (lambda: module(x), (x, module.weight, module.bias)),
        GATED_CALLS[0]: (lambda: gated_rms_norm(x, z, w, group_size=128, norm_before_gate=True), (x, z, w)),
        GATED_CALLS[1]: (lambda: gated(x, z), (x, z, gated.weight)),
    }
    steps = {}
    for name, (call, inputs) in calls.items():
        def inference(call=call):
            with torch.no_grad():
                call()

        steps[name, "forward, no grad"] = inference
        steps[name, "forward, with grad"] = call
        steps[name, "forward + backward"] = lambda call=call, inputs=inputs: torch.autograd.grad(call(), inputs, dy)
    steps["empty autograd.Function", "forward + backward"] = lambda: torch.autograd.grad(EmptyFunction.apply(x), (x,), dy)
    return steps


def host_rows(shape, min_run_time: float) -> list[dict]:
    rows = []
    with launches_stubbed():
        for (name, mode), step in host_steps(shape).items():
            step()
            rows.append({"call": name, "mode": mode, "shape": list(shape), "host_us": _median_us(step, min_run_time)})
            print(f"{name:24s} {mode:20s} {rows[-1]['host_us']:7.1f} µs", flush=True)
    return rows


def launches_ab(measure, rounds: int, flip_order: bool = False, cpp: bool = False) -> tuple:
    """(through Triton's launch, launched directly[, through the C++ launch operator]): the
    medians of ``rounds`` calls each of ``measure()`` with ``_direct._DIRECT_LAUNCH`` off and on
    (and with ``_cuda_launch``'s operator on, ``cpp``) in turn, so that a slow stretch of the
    host falls on all (``flip_order``: the order reversed every other round); the settings as
    they were afterwards."""
    from hf_rmsnorm.ops import _cuda_launch, _direct

    def launched(direct, operator=False):
        def run():
            _direct._DIRECT_LAUNCH = direct
            _cuda_launch.ENABLED = _cuda_launch.cpu_stub = operator
            return measure()
        return run

    saved = _direct._DIRECT_LAUNCH, _cuda_launch.ENABLED, _cuda_launch.cpu_stub
    try:
        return alternating_medians((launched(False), launched(True), *([launched(True, True)] if cpp else [])), rounds,
                                   flip_order)
    finally:
        _direct._DIRECT_LAUNCH, _cuda_launch.ENABLED, _cuda_launch.cpu_stub = saved


def launcher_rows(shape, min_run_time: float, rounds: int) -> list[dict]:
    """Host time per call through Triton's own launch path (``triton_without_gpu``: compiled
    kernels, the driver's launch a no-op), with Triton's ``JITFunction.run`` on every launch,
    with the direct launch, and through the C++ launch operator (its launch function a no-op;
    where it can be built), timed alternately."""
    rows = []
    with triton_without_gpu():
        from hf_rmsnorm.ops import _cuda_launch, _direct

        if not _direct._DIRECT_TRITON:
            raise SystemExit(f"--launcher compares the direct launch, which Triton {_direct.triton.__version__} does not take "
                             "(it is written for Triton 3.6 to 3.9); install one of those to run it")
        operator = _cuda_launch.ops()
        if operator is None:
            print(f"the C++ launch operator is not timed: {_cuda_launch.unavailable_reason()}", flush=True)
        else:
            operator.set_launch_function(operator.noop_launch_address())
        for (name, mode), step in host_steps(shape).items():
            if name == "empty autograd.Function":
                continue  # no launch: host_rows has it

            def measure(step=step):
                step()  # compiles, and fills the direct cache (and the operator's plans)
                return _median_us(step, min_run_time)

            triton_us, direct_us, *cpp = launches_ab(measure, rounds, flip_order=True, cpp=operator is not None)
            rows.append({"call": name, "mode": mode, "shape": list(shape), "triton_us": triton_us, "direct_us": direct_us,
                         "cpp_us": cpp[0] if cpp else None})
            print(f"{name:24s} {mode:20s} {triton_us:7.1f} {direct_us:7.1f} {cpp[0] if cpp else float('nan'):7.1f} µs",
                  flush=True)
    return rows


def in_model_rows(quick: bool, rounds: int) -> list[dict]:
    """Host time of a norm call inside a model's training forward against the same call made 49
    times in a row: GPT-2-medium's 24 blocks and 49 LayerNorms, 128 wide on 4 tokens (so that the
    rest of the model is cheap on a CPU), in bf16, each norm module's forward timed on its own;
    torch's nn.LayerNorm, and FusedLayerNorm launched from Python, through the C++ launch
    operator by the general way, and by its settled call (``_module_calls.kernels_settled``, the
    default), each kernel launch a no-op (``triton_without_gpu``). In the model the same code meets
    cold caches between attention and MLP calls: the gap between the columns is what a call's
    code costs there (on a GPU the host time GPT-2-medium's bf16 step waits for)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_rmsnorm import FusedLayerNorm, modules, patch_model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=128, n_layer=2 if quick else 24, n_head=2, vocab_size=256, n_positions=64)
    batch = torch.randint(0, 256, (1, 4))
    shipped = GPT2LMHeadModel(config).to(torch.bfloat16)
    fused = GPT2LMHeadModel(config).to(torch.bfloat16)
    fused.load_state_dict(shipped.state_dict())
    patch_model(fused, target="layernorm", probe_inputs={"input_ids": batch})  # probed on the torch path, here
    spent: list = []

    def timed(module):
        forward = module.forward

        def timed_forward(x):
            start = time.perf_counter()
            y = forward(x)
            spent.append(time.perf_counter() - start)
            return y

        module.forward = timed_forward

    norms = {model: [m for m in model.modules() if isinstance(m, (nn.LayerNorm, FusedLayerNorm))]
             for model in (shipped, fused)}
    for found in norms.values():
        for m in found:
            timed(m)
    x = torch.randn(1, 4, 128, dtype=torch.bfloat16, requires_grad=True)
    reps = 2 if quick else 30

    def per_call_us(call) -> float:
        per = []
        for _ in range(reps):
            spent.clear()
            call()
            per.append(sum(spent) / len(spent) * 1e6)
        return statistics.median(per)

    rows = []
    with triton_without_gpu():
        from hf_rmsnorm.ops import _cuda_launch

        operator = _cuda_launch.ops()
        if operator is None:
            print(f"the C++ launch operator is not timed in the model: {_cuda_launch.unavailable_reason()}", flush=True)
        else:
            operator.set_launch_function(operator.noop_launch_address())
        settled = modules.kernels_settled
        # (name, model, C++ operator on, settled calls on)
        ways = [("torch nn.LayerNorm", shipped, False, False), ("FusedLayerNorm, launched from Python", fused, False, False)]
        if operator is not None:
            ways += [("FusedLayerNorm, C++ operator by the general way", fused, True, False),
                     ("FusedLayerNorm, C++ operator, settled (the default)", fused, True, True)]
        saved = _cuda_launch.ENABLED, _cuda_launch.cpu_stub
        try:
            for name, model, on, settle in ways:
                _cuda_launch.ENABLED = _cuda_launch.cpu_stub = on
                modules.kernels_settled = settled if settle else (lambda *args: None)
                loop_module = norms[model][0]
                for _ in range(3):  # the plans learnt, the modules settled
                    model(input_ids=batch, labels=batch)
                    loop_module(x)
                launches = _cuda_launch.launches()
                model(input_ids=batch, labels=batch)
                launched = _cuda_launch.launches() - launches  # by the operator, in one forward
                in_model, in_loop = alternating_medians(
                    (lambda: per_call_us(lambda: model(input_ids=batch, labels=batch)),
                     lambda: per_call_us(lambda: [loop_module(x) for _ in range(49)])), rounds)
                rows.append({"call": name, "norms": len(norms[model]), "operator_launches": launched,
                             "in_model_us": in_model, "in_loop_us": in_loop})
                print(f"{name:52s} in the model {in_model:7.1f} µs   in a loop {in_loop:7.1f} µs", flush=True)
        finally:
            _cuda_launch.ENABLED, _cuda_launch.cpu_stub = saved
            modules.kernels_settled = settled
    return rows


def _rms_norm_path() -> str:
    """What this package's RMSNorm and gated RMSNorm run on the CPU in this process (float32 and
    bfloat16): the compiled kernel or torch ops."""
    from hf_rmsnorm.ops import _cpu_kernel

    reason = _cpu_kernel.torch_ops_reason()
    return "the compiled CPU kernel" if reason is None else f"torch ops ({reason})"


def _machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "rms_norm_path": _rms_norm_path(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_versions(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# CPU: patched modules vs the modules they replace — {env['cpu_model']}, {env['threads']} threads",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}; {env['date']}. "
        f"RMSNorm and the gated norm run {env.get('rms_norm_path', 'torch ops')}. "
        "Median µs per call (torch.utils.benchmark), the two modules timed alternately; "
        "ratio = patched / original (target ≤ 1).",
        "",
    ]
    if result["modules"]:
        lines += ["| replacement | dtype | shape | mode | original µs | patched µs | ratio |", "|---|---|---|---|---|---|---|"]
    for r in result["modules"]:
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['shape'][0]}×{r['shape'][1]} | {r['mode']} | "
            f"{r['original_us']:.1f} | {r['patched_us']:.1f} | {r['ratio']:.2f} |"
        )
    if result.get("skipped_cases"):
        lines += ["", "Not timed: " + "; ".join(f"{case}: {why}" for case, why in result["skipped_cases"].items())]
    if result.get("host"):
        lines += [
            "",
            "## Host time of the Triton path per call, kernel launches stubbed (bf16)",
            "",
            "What this package's Python costs around each GPU launch; Triton's launcher comes on top.",
            "",
            "| call | mode | shape | host µs |",
            "|---|---|---|---|",
        ]
        for r in result["host"]:
            lines.append(f"| {r['call']} | {r['mode']} | {'×'.join(map(str, r['shape']))} | {r['host_us']:.1f} |")
    if result.get("launcher"):
        lines += [
            "",
            "## Host time per call through Triton's launch path, the driver's launch a no-op (bf16)",
            "",
            "Kernels compiled for sm_90; every launch through Triton's `JITFunction.run`, or through the "
            "direct launch (`_direct._DIRECT_LAUNCH`) after a key's first call, or through the "
            "C++ launch operator (`_cuda_launch`, the default on CUDA; its launch function a no-op); timed "
            "alternately, medians. The driver's own launch (and its pointer checks) comes on top, on a GPU only.",
            "",
            "| call | mode | shape | Triton's run µs | direct µs | saved µs | C++ launch µs |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["launcher"]:
            cpp = f"{r['cpp_us']:.1f}" if r.get("cpp_us") is not None else "–"
            lines.append(f"| {r['call']} | {r['mode']} | {'×'.join(map(str, r['shape']))} | {r['triton_us']:.1f} | "
                         f"{r['direct_us']:.1f} | {r['triton_us'] - r['direct_us']:.1f} | {cpp} |")
    if result.get("in_model"):
        lines += [
            "",
            "## Host time per norm call inside a model's training forward and in a loop (bf16)",
            "",
            "A GPT-2-medium-shaped model (24 blocks, 49 LayerNorms; 128 wide, 4 tokens), each norm module's "
            "forward timed on its own, median over forwards of the mean per call; against the same module "
            "called 49 times in a row. FusedLayerNorm's kernels compiled for sm_90, every launch a no-op "
            "(torch's nn.LayerNorm computes on the CPU, a few µs of its time here).",
            "",
            "| call | norms | in the model µs | in a loop µs |",
            "|---|---|---|---|",
        ]
        for r in result["in_model"]:
            lines.append(f"| {r['call']} | {r['norms']} | {r['in_model_us']:.1f} | {r['in_loop_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and short timings (for tests)")
    parser.add_argument("--host", action="store_true", help="also time the Triton path's host code, launches stubbed")
    parser.add_argument("--launcher", action="store_true",
                        help="also time the Triton path's host code through Triton's own launch path (kernels compiled "
                             "for sm_90, launches no-ops), with and without the direct launch; not with --host")
    parser.add_argument("--no-modules", action="store_true", help="skip the module table (host times only)")
    parser.add_argument("--cases", default="", help="only the replacements whose name contains this (e.g. RMSNormGated)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {sorted(DTYPES)}")
    parser.add_argument("--rounds", type=int, default=None, help="alternating measurements per pair (default 5, quick 1)")
    parser.add_argument("--out", default="benchmarks/results/cpu", help="output folder")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        parser.error(f"--dtypes: unknown {unknown or 'empty list'}; choose from {sorted(DTYPES)}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.cases and not any(args.cases.lower() in case.lower() for case in CASES):
        parser.error(f"--cases {args.cases!r} names none of: {', '.join(CASES)}")
    if args.host and args.launcher:
        parser.error("--host and --launcher need separate runs: one defines the kernels for Triton's interpreter, "
                     "the other compiles them")
    if args.host or args.launcher:
        try:
            import triton  # noqa: F401
        except ImportError:
            parser.error("--host and --launcher time the Triton path's host code and need Triton installed")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    min_run_time = 0.01 if args.quick else 0.2

    result = {"environment": _machine(), "shapes": shapes, "rounds": rounds}
    if args.no_modules and not (args.host or args.launcher):
        parser.error("--no-modules leaves nothing to measure without --host or --launcher")
    result["skipped_cases"] = {}
    result["modules"] = [] if args.no_modules else module_rows(shapes, dtypes, rounds, min_run_time, args.cases,
                                                                result["skipped_cases"])
    if args.host:
        result["host"] = host_rows(HOST_SHAPE, min_run_time)
    if args.launcher:
        result["launcher"] = launcher_rows(HOST_SHAPE, min_run_time, rounds)
        result["in_model"] = in_model_rows(args.quick, rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cpu.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
