"""A ``FusedRMSNorm`` / ``FusedLayerNorm`` call past the functional op's per-call checks: on
the kernels with only what can change between calls asked (``kernels_for_module``), and, once a
call has gone through a C++ operator, straight to that operator with what the call settled
(``settle``, ``rms_norm.settle_on_cpu``, ``kernels_settled``); a ``FusedGatedRMSNorm``'s alike
(``settle_gated``, ``gated_settled``). ``modules.py`` calls these; the general way
(``_norm.normalize``, ``gated_rms_norm.dispatch``) takes whatever they leave.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from . import _cpu_kernel, _norm
from ._norm import (
    _KERNEL_DTYPES, _PLAIN_TENSORS, ROUNDING, _any_autocast, _functorch_active, _run_kernels, _tracing_state,
    _use_triton, transforms_active,
)


# the gated op's module (the package exports its function under the same name): its launchers'
# globals are set on their first call
_gated = importlib.import_module(".gated_rms_norm", __package__)

# A module's settled call (``settle``, ``kernels_settled``) holds this process's object: the C++
# launch operator's family ids are this process's own, and a copied or unpickled module holds a
# copy, not this object, so it settles afresh on its next call.
_SETTLED = object()


def settle(torch_impl, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], is_rms: bool,
           cast_mode: str) -> Optional[tuple]:
    """What a module keeps after a call that ``kernels_for_module`` ran, so that its next calls
    go to the C++ launch operator with the least Python (``kernels_settled``): (the operator's
    family for this kind of call, ``_SETTLED``, the cast mode it was found for), or None where the
    operator has not served such a call (off, off CUDA, not yet)."""
    cuda_launch = _norm._cuda_launch  # imported with the launchers, on the first kernel call
    if cuda_launch is None or not cuda_launch.ENABLED or not (x.is_cuda or cuda_launch.cpu_stub):
        return None
    family = cuda_launch.family_of_call(torch_impl, x, weight, bias, is_rms, ROUNDING[cast_mode])
    return None if family is None else (family, _SETTLED, cast_mode)


def kernels_settled(settled: tuple, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    offset: float, cast_mode: str) -> Optional[Tensor]:
    """A module's call straight to the C++ launch operator with the family ``settle`` found for
    its earlier call, or None where the general way must take it. In a model's forward every
    check of the general way costs several times what it costs in a loop (CI CPU, GPT-2-shaped
    forward: 33 µs a norm call in the model, 14 in a loop; the operator alone 12 and 3:
    benchmarks/NOTES.md, session 29), so only what can change between calls and the operator
    cannot see is asked here: torch.compile, torch.jit.trace, autocast, a transform, Triton's
    launch hooks, the operator switched off. The operator checks the rest, the tensors against the
    family (type, dtype, length, layout, device, wrappers) and ``HF_RMSNORM_BACKEND``, and
    returns None where they differ.

    A ``FusedRMSNorm`` that the compiled CPU kernel served holds that kernel's settled call
    instead (``rms_norm.settle_on_cpu``), whose operator asks all but torch.compile itself."""
    # torch.jit.trace would record the operator's call and replay it where its answer (None
    # included) differs: a trace takes the general way, which records an operator that replays
    if torch.compiler.is_compiling() or _tracing_state() is not None or settled[2] != cast_mode:
        return None
    if settled[1] is _cpu_kernel.settled_token:
        # what the operator cannot see: a torch.func transform, whose dispatch would hand it x's
        # slices one call each (vmap's fallback: right, slow, warned about)
        if _functorch_active():
            return None
        return _cpu_kernel.settled_op(x, weight, bias, eps, offset, settled[0])
    # a settled CUDA call: ``settle`` found its family after the launchers were imported
    cuda_launch = _norm._cuda_launch
    if (settled[1] is not _SETTLED or not cuda_launch.ENABLED or _any_autocast() or transforms_active()
            or not _norm._direct.plain_launches()):
        return None
    y = cuda_launch._norm_op(x, weight, bias, eps, offset, settled[0])
    if y is not None:
        _norm._launchers.LAUNCHES["norm_fwd"] += 1  # counted as the Python path counts its launches
    return y


def settle_gated(x: Tensor, gate: Optional[Tensor], weight: Optional[Tensor], settings: tuple) -> Optional[tuple]:
    """As :func:`settle`, for a ``FusedGatedRMSNorm`` whose call ``gated_rms_norm.dispatch``
    has just run with ``settings`` (group size or None, norm_before_gate, activation,
    cast_mode): (the operator's gated family, ``_SETTLED``, ``settings``), or None."""
    cuda_launch = _gated._cuda_launch  # imported with the gated launchers, on their first call
    if cuda_launch is None or not cuda_launch.ENABLED or not (x.is_cuda or cuda_launch.cpu_stub):
        return None
    size, before, activation, cast_mode = settings
    family = cuda_launch.gated_family_of_call(x, gate, weight, size or x.shape[-1], before, activation == "sigmoid",
                                              cast_mode == "input")
    return None if family is None else (family, _SETTLED, settings)


def gated_settled(settled: tuple, x: Tensor, gate: Optional[Tensor], weight: Optional[Tensor], eps: float,
                  offset: float, settings: tuple) -> Optional[Tensor]:
    """As :func:`kernels_settled`, for a ``FusedGatedRMSNorm``: its call straight to the C++
    launch operator's gated norm with the family ``settle_gated`` found, or None where the
    general way must take it (torch.compile, torch.jit.trace, a transform, Triton's launch hooks,
    the operator off, the module's settings changed; the operator checks the tensors and
    ``HF_RMSNORM_BACKEND``). The gated norm ignores autocast, so autocast is not asked."""
    if (torch.compiler.is_compiling() or _tracing_state() is not None or settled[1] is not _SETTLED
            or settled[2] != settings):
        return None
    cuda_launch = _gated._cuda_launch
    if not cuda_launch.ENABLED or transforms_active() or not _gated._direct.plain_launches():
        return None
    y = cuda_launch._gated_op(x, gate, weight, eps, offset, settled[0])
    if y is not None:
        _gated._launchers.LAUNCHES["gated_fwd"] += 1  # counted as the Python path counts its launches
    return y


def kernels_for_module(torch_impl, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       offset: float, is_rms: bool, cast_mode: str) -> Optional[Tensor]:
    """A ``FusedRMSNorm`` / ``FusedLayerNorm`` call with one normalised dimension on the
    kernels, or None where ``normalize`` must decide (and check, and say what is wrong).

    In a training forward each norm's host time is step time where the host paces the step
    (GPT-2-medium in bf16 on an H200: benchmarks/NOTES.md, run 14b), and the general path
    checks what a module settled when it was built (eps, cast mode, offset, the parameters'
    shape). Here only what can change between calls is asked, each cheaply: x's type and dtype,
    the parameters' types, dtypes, length and device (they can be replaced), autocast and
    torch.compile; then ``_use_triton``, the general path's own choice of backend. Everything
    ``check_inputs`` would refuse has been sent the general way by then, so an error
    ``_use_triton`` raises is the one the general path would raise. The module has checked x's
    last dimension against its own shape."""
    rounding = ROUNDING.get(cast_mode)
    # is_compiling first: torch 2.6's dynamo cannot trace the frozenset test (it breaks the graph)
    if (torch.compiler.is_compiling() or rounding is None or type(x) not in _PLAIN_TENSORS
            or x.dtype not in _KERNEL_DTYPES or _any_autocast()):
        return None
    n = x.shape[-1]
    device = x.get_device()
    for p in (weight, bias):
        # the device by its CUDA index (cheap); off CUDA, where meta and CPU both answer -1, by name
        if p is not None and (type(p) not in _PLAIN_TENSORS or p.dtype not in _KERNEL_DTYPES or p.shape != (n,)
                              or p.get_device() != device or (device < 0 and p.device != x.device)):
            return None
    if ((weight is None and (offset or rounding == ROUNDING["weight"])) or type(eps) not in (float, int) or not eps >= 0
            or not _use_triton(x, "cuda" if x.is_cuda else "cpu", weight, bias)):
        return None
    return _run_kernels(torch_impl, x, weight, bias, float(eps), float(offset), is_rms, rounding)
