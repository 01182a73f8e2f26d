"""Norms on CUDA through one C++ operator (``_cuda_launch_op.cpp``): allocation, the launches
of the Triton-compiled kernels and the autograd node, forward and backward, without Python
between a call and its launches. The gated norm (``gated_rms_norm``) has an operator of its own
in the same library, planned and learnt the same way (:func:`gated_forward`).

On by default (``HF_RMSNORM_CPP_LAUNCH=0``, read at import, turns it off): on an H200 it halves
a norm's host time (run 15, benchmarks/NOTES.md, session 29). A norm call on CUDA that the
kernels take (``_norm._run_kernels``) first asks the operator; the operator launches where a
plan for the call's kind is registered, and otherwise returns None, so the call takes the
Python path, after which :func:`learn_forward` registers the plan of the launch it made; the
node's backward does the same with :func:`learn_backward`. What a plan holds and why is in the
C++ file. It needs a C++ compiler at first use, as the CPU kernel does (built by the same
builder, cached alike; about 15 s once per machine); without one, or with Triton outside
3.6-3.9 (whose launchers' parameter layout it packs), or with the direct launch off
(``HF_RMSNORM_DIRECT_LAUNCH=0``), every call takes the Python path and
:func:`unavailable_reason` says why (a warning says it where the variable asked for the
operator, an INFO log line where it is merely the default).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from . import _cpu_kernel, _direct

CPP_LAUNCH_ENV = "HF_RMSNORM_CPP_LAUNCH"
_OP_SOURCE = Path(__file__).with_name("_cuda_launch_op.cpp")
# how the operator packs each of a kernel's leading (non-constexpr) arguments, by the type
# Triton's signature gives it ("constexpr": specialised away, not passed; a pointer type: _PTR_KIND)
KINDS = {"constexpr": 0, "i32": 2, "i64": 3, "fp32": 4}
_PTR_KIND = 1
_log = logging.getLogger(__name__)


def _enabled_by_environment() -> bool:
    return _direct.env_switch(CPP_LAUNCH_ENV, "1", "norms on CUDA launched through one C++ operator, the default",
                              "launched from Python")


ENABLED = _enabled_by_environment()
_UNBUILT = object()
_LOCK = threading.Lock()
_ops = _UNBUILT  # torch.ops.<namespace> once loaded, None where it cannot be
_reason: Optional[str] = None
_norm_op = None  # the C++ callable behind ops.norm.default
_gated_op = None  # and behind ops.gated_norm.default
_path: Optional[Path] = None  # the library file it was loaded from
# (N, x dtype, weight dtype, bias dtype, is_rms, rounding, device, torch reference) -> the
# operator's family id; _FAMILY_REF[id] = (torch reference, cast mode, is_rms, rounding, y's dtype)
# for the node's backward. A gated family's key starts with "gated"; its _FAMILY_REF entry is
# (None, its settings: group size, norm_before_gate, sigmoid, cast_input; None, None, y's dtype).
_FAMILIES: dict = {}
_FAMILY_REF: list = []
_PYTHON_IMPLS: dict = {}
# Tests set this with a launch function of their own: CPU tensors then take this path too.
cpu_stub = False


def unavailable_reason() -> Optional[str]:
    """Why the operator cannot serve in this process (None where it can, or before it was
    first asked)."""
    return _reason


def ops():
    """The operators' namespace, built and loaded on first use; None where it cannot be had
    (said once: in a warning where ``HF_RMSNORM_CPP_LAUNCH=1`` asked for it, else at INFO: the
    Python path then serves, with the same results and more host time a call)."""
    if _ops is _UNBUILT:
        with _LOCK:
            _load()
            if _ops is None and ENABLED:
                asked = os.environ.get(CPP_LAUNCH_ENV, "").strip() == "1"
                _log.log(logging.WARNING if asked else logging.INFO,
                         "%s, but the C++ launch operator cannot serve: %s; the norms launch from Python",
                         f"{CPP_LAUNCH_ENV}=1" if asked else "The C++ launch operator is the default on CUDA", _reason)
    return _ops


def built_path() -> Optional[Path]:
    """The library file :func:`ops` loaded the operator from (None while it is not loaded)."""
    return _path if _ops not in (None, _UNBUILT) else None


def _load() -> None:
    global _ops, _reason, _norm_op, _gated_op, _path
    if _ops is not _UNBUILT:
        return
    _ops = None
    if not _direct._DIRECT_TRITON:
        _reason = f"Triton {_direct.triton.__version__}: the operator packs the launchers' parameters of Triton 3.6-3.9"
        return
    path, namespace, _reason = _cpu_kernel.build_library("cuda_launch", None, _OP_SOURCE, openmp=False,
                                                         what="the CUDA launch operator")
    if path is None:
        return
    try:
        loaded = _cpu_kernel.load_library(path, namespace, "norm", "the CUDA launch operator")
    except _cpu_kernel.OperatorsMissing as e:
        _reason = str(e)
        return
    except (OSError, RuntimeError) as e:
        _reason = f"could not load the CUDA launch operator {path}: {e}"
        return
    if namespace not in _PYTHON_IMPLS:
        impl = torch.library.Library(namespace, "IMPL")
        impl.impl("backward", _backward, "CompositeImplicitAutograd")
        impl.impl("graph_backward", _graph_backward, "CompositeImplicitAutograd")
        impl.impl("gated_backward", _gated_backward, "CompositeImplicitAutograd")
        impl.impl("gated_graph_backward", _gated_graph_backward, "CompositeImplicitAutograd")
        _PYTHON_IMPLS[namespace] = impl
    if torch.cuda.is_available():
        missing = loaded.load_driver()
        if missing:
            _reason = f"the CUDA driver's launch function: {missing}"
            return
        # the stream the operator launches on, from c10's device-generic interface, must be the
        # one torch calls current (an implementation without it raises)
        try:
            ours, torchs = loaded.current_stream(torch.cuda.current_device()), torch.cuda.current_stream().cuda_stream
        except RuntimeError as e:
            ours, torchs = f"an error ({e})", None
        if ours != torchs:
            _reason = f"the operator's current CUDA stream is {ours}, torch's {torchs}"
            return
    # past OpOverload.__call__'s Python frame
    _norm_op, _gated_op = (getattr(o, "_op", o) for o in (loaded.norm.default, loaded.gated_norm.default))
    _path, _ops = path, loaded


def recorded(launchers, run, *args) -> tuple:
    """(``run(*args)``, the launches ``launchers`` (``_triton_norm`` or ``_triton_gated``)
    recorded meanwhile), for the ``learn_*`` functions."""
    record = launchers.record = []
    try:
        return run(*args), record
    finally:
        launchers.record = None


def _backward(grad, x, weight, bias, mean, rstd, eps, offset, family, needs):
    """The operator's node where it has no plans for this backward yet (or dy is laid out
    otherwise): the backward kernels from Python (``_norm._bwd_impl``), then their launches'
    plans registered; the wanted gradients in order."""
    from . import _triton_norm
    from ._norm import _bwd_impl

    _, _, is_rms, rounding, _ = _FAMILY_REF[family]
    grads, record = recorded(_triton_norm, _bwd_impl, grad, x, weight, bias, mean, rstd, offset, is_rms, rounding)
    learn_backward(family, record, x, grad)
    return [g for i, g in enumerate(grads) if needs >> i & 1]


def _graph_backward(grad, x, weight, bias, mean, rstd, eps, offset, family, needs):
    """The operator's node under create_graph=True: the torch reference's gradients as a graph."""
    from ._norm import wanted_gradients_as_graph

    torch_impl, cast_mode, _, _, _ = _FAMILY_REF[family]
    return wanted_gradients_as_graph(torch_impl, grad, x, weight, bias, eps, offset, cast_mode, needs)


def _gated_backward(grad, x, gate, weight, rstd, eps, offset, family, needs):
    """As :func:`_backward`, for the gated operator's node (``gated_rms_norm._bwd_impl``)."""
    from . import _triton_gated
    from .gated_rms_norm import _bwd_impl

    size, before, sigmoid, cast_input = _FAMILY_REF[family][1]
    grads, record = recorded(_triton_gated, _bwd_impl, grad, x, gate, weight, rstd, offset, size, before, sigmoid,
                             cast_input)
    learn_gated_backward(family, record, x, grad, weight is not None)
    return [g for i, g in enumerate(grads) if needs >> i & 1]


def _gated_graph_backward(grad, x, gate, weight, rstd, eps, offset, family, needs):
    """As :func:`_graph_backward`, for the gated operator's node."""
    from .gated_rms_norm import gradients_as_graph

    return [g for g in gradients_as_graph(grad, x, gate, weight, eps, offset, *_FAMILY_REF[family][1],
                                          [bool(needs >> i & 1) for i in range(3)]) if g is not None]


def forward(torch_impl, x, weight, bias, eps: float, offset: float, is_rms: bool, rounding: int):
    """(y, family): y from the operator, or None where it has no plan for this call (the
    caller then takes the Python path and calls :func:`learn_forward` with ``family``); (None, None)
    where the operator cannot be had."""
    if _norm_op is None and ops() is None:
        return None, None
    key = _family_key(torch_impl, x, weight, bias, is_rms, rounding)
    family = _FAMILIES.get(key)
    if family is None:
        family = _new_family(key, _norm_family, weight, bias)
    return _norm_op(x, weight, bias, eps, offset, family), family


def gated_forward(x, gate, weight, eps: float, offset: float, size: int, norm_before_gate: bool, sigmoid: bool,
                  cast_input: bool):
    """As :func:`forward`, for ``gated_rms_norm`` (arguments as its ``dispatch`` passes them to
    the launchers); the caller then calls :func:`learn_gated_forward`."""
    if _gated_op is None and ops() is None:
        return None, None
    key = _gated_key(x, gate, weight, size, norm_before_gate, sigmoid, cast_input)
    family = _FAMILIES.get(key)
    if family is None:
        family = _new_family(key, _gated_family, gate, weight)
    return _gated_op(x, gate, weight, eps, offset, family), family


def _gated_key(x, gate, weight, size: int, norm_before_gate: bool, sigmoid: bool, cast_input: bool) -> tuple:
    return ("gated", x.shape[-1], size, x.dtype, gate.dtype if gate is not None else None,
            weight.dtype if weight is not None else None, norm_before_gate, sigmoid, cast_input, x.get_device())


def gated_family_of_call(x, gate, weight, size: int, norm_before_gate: bool, sigmoid: bool,
                         cast_input: bool) -> Optional[int]:
    """The gated family :func:`gated_forward` has made for this kind of call, or None."""
    return _FAMILIES.get(_gated_key(x, gate, weight, size, norm_before_gate, sigmoid, cast_input))


def _gated_family(key, gate, weight) -> tuple:
    """(the operator's new gated family for ``key``, its _FAMILY_REF entry)."""
    from .gated_rms_norm import output_dtype

    _, n, size, x_dtype, z_dtype, w_dtype, before, sigmoid, cast_input, device = key
    y_dtype = output_dtype(x_dtype, gate, weight, before, "input" if cast_input else "float32")
    return (_ops.new_gated_family(x_dtype, z_dtype, w_dtype, y_dtype, n, size, device),
            (None, (size, before, sigmoid, cast_input), None, None, y_dtype))


def _family_key(torch_impl, x, weight, bias, is_rms: bool, rounding: int) -> tuple:
    return (x.shape[-1], x.dtype, weight.dtype if weight is not None else None,
            bias.dtype if bias is not None else None, is_rms, rounding, x.get_device(), torch_impl)


def family_of_call(torch_impl, x, weight, bias, is_rms: bool, rounding: int) -> Optional[int]:
    """The family :func:`forward` has made for this kind of call, or None where it has made none."""
    return _FAMILIES.get(_family_key(torch_impl, x, weight, bias, is_rms, rounding))


def _norm_family(key, weight, bias) -> tuple:
    """(the operator's new family for ``key``, its _FAMILY_REF entry)."""
    from . import _norm, _triton_norm

    n, x_dtype, w_dtype, b_dtype, is_rms, rounding, device, torch_impl = key
    cast_mode = _norm.CAST_MODES[rounding]
    # fwd_tiles's choice of tiles depends on the row count only through this threshold
    threshold = _triton_norm._MIN_FWD_PROGRAMS * _triton_norm._FWD_ROWS
    y_dtype = _norm.output_dtype(x_dtype, weight, bias, cast_mode)
    return (_ops.new_family(x_dtype, w_dtype, b_dtype, y_dtype, n, device, is_rms, rounding, threshold),
            (torch_impl, cast_mode, is_rms, rounding, y_dtype))


def _new_family(key, make, *args) -> int:
    """The family for ``key``, made once by ``make(key, *args)`` (:func:`_norm_family`,
    :func:`_gated_family`): under the lock, so that _FAMILY_REF's index stays the operator's id."""
    with _LOCK:
        family = _FAMILIES.get(key)
        if family is None:
            family, ref = make(key, *args)
            _FAMILY_REF.append(ref)
            _FAMILIES[key] = family
    return family


# the kernels as the operator numbers them (its Kernel enum), and their arguments: pointers,
# integers, floats
_KERNELS = {"fwd": (0, 6, 3, 2), "bwd": (1, 7, 4, 1), "sum": (2, 3, 3, 0), "gfwd": (3, 5, 6, 2), "gbwd": (4, 8, 8, 1)}


def learn_forward(family: int, record: list, x) -> bool:
    """Register the plan of the forward launch the Python path has just made for ``family``
    (``_triton_norm.record``), if it is this call's own, on x itself: the list is a global, and
    another thread's call may have recorded into it meanwhile."""
    if len(record) != 1 or record[0][0] != "fwd" or record[0][4][0] is not x:
        return False
    return _register(family, *record[0])


def learn_backward(family: int, record: list, x, dy) -> bool:
    """Register the plans of the backward's launches the Python path has just made: the
    backward kernel on x and dy themselves, dy of y's dtype (the operator's key takes dy's dtype
    as the family's y dtype; Triton compiles the kernel for dy's), then the sums of its partials
    (where there are parameters), and nothing else in the list."""
    if (not record or record[0][0] != "bwd" or record[0][4][0] is not x or record[0][4][2] is not dy
            or dy.dtype != _FAMILY_REF[family][4]):
        return False
    part = record[0][4][4]
    if (part is None and len(record) != 1) or (part is not None and (
            len(record) != 2 or record[1][0] != "sum" or record[1][4][0] is not part)):
        return False
    return all([_register(family, *r) for r in record])


def learn_gated_forward(family: int, record: list, x) -> bool:
    """As :func:`learn_forward`, for the gated forward (``_triton_gated.record``). The launchers
    take rows as (M, N) views, never x itself, so the launch is known for x's by its memory:
    a copy (rows that no view lays out, which the operator does not take) is not registered."""
    return (len(record) == 1 and record[0][0] == "gfwd" and _same_memory(record[0][4][0], x)
            and _register(family, *record[0]))


def learn_gated_backward(family: int, record: list, x, dy, has_weight: bool) -> bool:
    """As :func:`learn_backward`, for the gated backward: its one launch, on x's and dy's own
    memory, dy of y's dtype; the width of its partial sums' rows registered with it."""
    if (len(record) != 1 or record[0][0] != "gbwd" or not _same_memory(record[0][4][1], x)
            or not _same_memory(record[0][4][0], dy) or dy.dtype != _FAMILY_REF[family][4]):
        return False
    return _register(family, *record[0], width=record[0][4][7].shape[1] if has_weight else 0)


def _same_memory(rows, t) -> bool:
    """Whether the launchers' (M, N) ``rows`` are ``t``'s elements in place: a view of them."""
    return rows.data_ptr() == t.data_ptr() and rows.numel() == t.numel() and rows.dtype == t.dtype


def _register(family: int, kernel: str, compiled, per_program: int, cap: int, args, width: int = 0) -> bool:
    """Register one launch's plan; False where the operator cannot launch that compiled kernel
    as Triton's launcher would (then that kernel stays Python's). ``width``: the gated
    backward's partial sums a program."""
    number, n_ptrs, n_ints, n_floats = _KERNELS[kernel]
    md = getattr(compiled, "metadata", None)  # None: not a compiled kernel (the interpreter, a test's stub)
    if (md is None or getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False)
            or getattr(md, "launch_pdl", False) or getattr(md, "global_scratch_size", 0)
            or getattr(md, "profile_scratch_size", 0) or not isinstance(getattr(compiled, "function", None), int)
            or len(args) != n_ptrs + n_ints + n_floats):
        return False
    types = list(compiled.src.signature.values())[:len(args)]
    kinds = [_PTR_KIND if isinstance(t, str) and t.startswith("*") else KINDS.get(t) for t in types]
    if None in kinds or len(kinds) != len(args):
        return False
    warps, _, shared = compiled.packed_metadata
    ptrs = [0 if a is None else a.data_ptr() for a in args[:n_ptrs]]
    _ops.register_plan(family, number, ptrs, list(args[n_ptrs:n_ptrs + n_ints]), compiled.function, per_program, cap,
                       32 * warps, shared, kinds, width)
    return True


def launches() -> int:
    """Forward launches the operator has made in this process (0 before it was loaded)."""
    return launch_counts()[0]


def launch_counts(gated: bool = False) -> list:
    """Launches the operator has made in this process of the forward, the backward and the
    partial sums, or with ``gated`` of the gated forward and backward (zeros before it was
    loaded)."""
    counts = list(_ops.launch_counts()) if _ops not in (None, _UNBUILT) else [0] * 5
    return counts[3:] if gated else counts[:3]
