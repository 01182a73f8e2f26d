"""Direct launches of compiled Triton kernels, skipping Triton's ``JITFunction.run``.

``_triton_norm``'s launchers call ``launch`` for every kernel they start. With
``_DIRECT_LAUNCH`` on (the default; ``HF_RMSNORM_DIRECT_LAUNCH=0`` turns it off) it calls the
compiled kernel's launcher itself once Triton has compiled and launched a kernel for the same
facts; off, it is ``kernel[grid](...)``.
Written against the ``run`` of Triton 3.6 to 3.9 (``_DIRECT_TRITON``): the launcher's
arguments changed between earlier releases.
"""

from __future__ import annotations

import os
import re

import torch
import triton

# ``kernel[grid](...)`` goes through Triton's ``JITFunction.run`` on every call: it binds the
# arguments, specialises each one, builds the cache key and looks the compiled kernel up, ≈ 9 µs
# of Python per launch on the CI CPU (Triton 3.6 and 3.9, timed with benchmark_cpu.py's
# stand-in driver), three launches per forward+backward. A direct launch keys the compiled
# kernel on what Triton specialises an argument on (``_arg_facts``) and calls its launcher with the same
# arguments Triton passes (tests/test_direct_launch.py compares them call by call on the CPU,
# with the driver's launch a no-op); the first call of each key goes through Triton, which
# compiles and launches it. On since run 10 (H200, benchmarks/NOTES.md): the same bits as
# Triton's launch (tests/test_gpu.py), and, timed alternately with it, 9-17 us less host time a
# forward and 82-118 us less a forward+backward (profile_norms.py); GPT-2-medium's host-bound
# bf16 training step 84.0 -> 81.6 ms. HF_RMSNORM_DIRECT_LAUNCH=0 (read at import) goes back to
# Triton's launch, e.g. to rule this path out when something looks wrong.
DIRECT_LAUNCH_ENV = "HF_RMSNORM_DIRECT_LAUNCH"


def env_switch(name: str, default: str, on: str, off: str) -> bool:
    """An environment variable that is 1 or 0 (``default`` where unset); anything else is
    refused with a message saying what each value does (``on``, ``off``)."""
    value = os.environ.get(name, default).strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 1 ({on}) or 0 ({off}); set one of them or unset it.")
    return value == "1"


def _direct_launch_default() -> bool:
    return env_switch(DIRECT_LAUNCH_ENV, "1", "launch compiled Triton kernels directly, the default",
                      "through Triton's own launch")


_DIRECT_LAUNCH = _direct_launch_default()
# the Triton releases whose ``JITFunction.run`` launches as ``launch`` does (read in 3.6, 3.7,
# 3.8 and 3.9; the launcher's arguments have changed between earlier releases)
_DIRECT_TRITON = (3, 6) <= tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) <= (3, 9)
# (kernel id, device, launch options, argument facts) -> the compiled kernel Triton chose for them
_DIRECT: dict = {}
_THROUGH_TRITON = object()  # such an entry: launched through Triton every time (not an NVIDIA GPU)
if _DIRECT_TRITON:
    from triton import knobs
    from triton.runtime.driver import driver

    _HOOK_CHAIN = getattr(knobs, "HookChain", None)  # the type of Triton's launch hooks (3.6 to 3.9)


def _arg_facts(args) -> tuple[tuple, list]:
    """What Triton specialises each non-constexpr argument on, and the arguments as the direct
    launch hands them to the compiled kernel's launcher.

    The facts: a tensor's dtype and whether its data is 16-byte aligned; an integer's type (i32,
    i64 or u64 by its range), whether it is 1 and whether 16 divides it; a float's type; None.
    Two calls whose facts agree compile to the same kernel. Anything else is its own fact (its
    type and value), which is never wrong, only rarer.

    The arguments: each tensor as its data pointer, an int, everything else as it is. Triton's
    launcher takes an int pointer as it is, where for a tensor it calls ``data_ptr()`` and then
    asks the CUDA driver whether the address is device memory (``cuPointerGetAttribute``), a
    driver call per pointer per launch that only repeats what the caller checked: the kernels
    are launched only for CUDA tensors on one device (``_norm._use_triton``). The pointer is
    read here anyway, for its alignment.

    One loop with the common cases inline and the integers' facts kept by value: a call per
    argument was a third of ``launch``'s time (CI CPU, eleven arguments: 2.3 µs with a helper
    per scalar, 1.6 inline; with the pointers handed on 2.2, and 1.8 with the facts kept)."""
    facts, bound = [], []
    for a in args:
        kind = type(a)
        if kind is int:  # not bool, whose type is its own (Triton: i1)
            fact = _INT_FACTS.get(a)
            if fact is None:
                fact = (int, a == 1, a % 16 == 0, -(1 << 31) <= a < (1 << 31), a >= (1 << 63))
                if len(_INT_FACTS) < 4096:  # row widths, strides, row counts: a few per model
                    _INT_FACTS[a] = fact
            facts.append(fact)
        elif kind is float or a is None:
            facts.append(kind)
        elif isinstance(a, _Tensor):
            pointer = a.data_ptr()
            facts.append((a.dtype, pointer % 16 == 0))
            a = pointer
        else:
            facts.append((kind, a))
        bound.append(a)
    return tuple(facts), bound


_Tensor = torch.Tensor  # one global lookup, not two, per argument
# an integer argument's facts by its value (tuples of five, built once per value)
_INT_FACTS: dict = {}


def _no_hook(hook) -> bool:
    """Whether a launch hook of Triton's knobs would do nothing: None, or an empty chain."""
    return hook is None or (type(hook) is _HOOK_CHAIN and not hook.calls)


def plain_launches() -> bool:
    """Whether ``launch`` launches known kernels directly, with nothing of Triton's to run around
    a launch (no launch hooks, no stages hook): then ``_cuda_launch``'s operator may launch in
    its place."""
    return (_DIRECT_LAUNCH and _DIRECT_TRITON and getattr(knobs.runtime, "add_stages_inspection_hook", None) is None
            and _no_hook(knobs.runtime.launch_enter_hook) and _no_hook(knobs.runtime.launch_exit_hook))


def launch(kernel, grid, args, meta, meta_key):
    """``kernel[grid](*args, **meta)``: directly (see ``_DIRECT_LAUNCH``) where the compiled
    kernel for these arguments is known, else through Triton, which compiles it if need be.
    ``args`` are the kernel's leading non-constexpr arguments, ``meta`` its constexprs in
    declaration order and the launch options (num_warps, maxnreg), ``meta_key`` is
    ``tuple(meta.items())``, made once by the caller's launch plan."""
    if not (_DIRECT_LAUNCH and _DIRECT_TRITON and type(kernel) is triton.runtime.jit.JITFunction
            and not kernel.pre_run_hooks and getattr(knobs.runtime, "add_stages_inspection_hook", None) is None):
        return kernel[grid](*args, **meta)  # the interpreter, a stub, another Triton, hooks Triton runs
    device = driver.active.get_current_device()
    # the kernel's id, not the kernel: hashing a JITFunction costs 0.3 µs, and these live as long
    # as the module
    facts, bound = _arg_facts(args)
    key = (id(kernel), device, meta_key, facts)
    entry = _DIRECT.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        if compiled is not None:
            # NVIDIA GPUs only: the key holds what Triton's NVIDIA backend specialises on, and
            # AMD's specialises on more (pointer ranges, for one), so there every launch stays
            # Triton's. Asked once per key, off the hot path.
            if driver.active.get_current_target().backend != "cuda":
                _DIRECT[key] = _THROUGH_TRITON
            else:  # with the constexprs' values in declaration order, which Triton passes after
                # the other arguments and which the key fixes
                _DIRECT[key] = compiled, tuple(meta[name] for name in kernel.arg_names[len(args):])
        return compiled
    if entry is _THROUGH_TRITON:
        return kernel[grid](*args, **meta)
    compiled, constexprs = entry
    stream = driver.active.get_current_stream(device)
    dims = (*grid, 1, 1)
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    # Triton's launchers (3.6 to 3.9) read the launch metadata only to hand it to these hooks,
    # which Triton keeps as chains, empty unless something (a profiler) added a hook. Where both
    # are empty the launcher is given none: no metadata to build (a fresh LazyDict, ≈ 1 µs) and
    # no chain to call for nothing, twice per launch.
    if _no_hook(enter) and _no_hook(leave):
        enter = leave = metadata = None
        bound += constexprs
    else:  # the hooks see the arguments as Triton's own launch passes them
        bound = (*args, *constexprs)
        metadata = compiled.launch_metadata(grid, stream, *bound)
    compiled.run(dims[0], dims[1], dims[2], stream, compiled.function, compiled.packed_metadata, metadata, enter, leave,
                 *bound)
    return compiled
