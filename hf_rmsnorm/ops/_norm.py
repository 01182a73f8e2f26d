"""The machinery shared by ``rms_norm`` and ``layer_norm``: input checks, backend choice,
autocast policy, and the torch custom ops (forward, backward, autograd) around the Triton
launchers.

The two public functions differ only in their torch implementation and in ``is_rms``; all
the rest lives here once. Nothing here imports Triton: ``_triton_norm`` is imported the first
time the Triton backend actually runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

BACKEND_ENV = "HF_RMSNORM_BACKEND"
BACKENDS = ("auto", "triton", "torch")
# cast_mode -> which dtype the normalised row is rounded to before the affine (kernel code)
ROUNDING = {"float32": 0, "input": 1, "weight": 2}
CAST_MODES = tuple(ROUNDING)
# dtypes the Triton kernels read and write; anything else (float64, ...) takes the torch path
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest hidden size a kernel program holds in registers as one row (it spills beyond that:
# scripts/kernel_report.py). Longer rows take the torch path: slower, never wrong.
_MAX_FUSED_N = 65536


# find_spec does not import Triton; a constant (not a cached function) keeps torch.compile quiet
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def selected_backend() -> str:
    """The value of ``HF_RMSNORM_BACKEND`` (default ``auto``), validated.

    Read on every call, so that setting the variable after import takes effect; each value
    seen is validated once."""
    value = _environ_get(BACKEND_ENV, "auto")
    backend = _BACKEND_OF.get(value)
    if backend is None:
        backend = value.strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"{BACKEND_ENV}={backend!r} is not a backend; use one of {', '.join(BACKENDS)}."
            )
        _BACKEND_OF[value] = backend
    return backend


# raw value of the environment variable -> the backend it names (a dict, not lru_cache, which
# torch.compile would warn about when it traces the call)
_BACKEND_OF: dict = {}


def _environ_get(name: str, default: str) -> str:
    """``os.environ.get(name, default)`` for a variable read on every norm call. os.environ
    encodes the key and decodes the value on each read (≈ 0.9 µs on the CI CPU, as much as the
    arithmetic of a one-token norm); on POSIX its bytes dict, which every assignment through
    os.environ updates, answers in ≈ 0.05 µs."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get(name, default)
    value = data.get(name.encode())
    return default if value is None else os.fsdecode(value)


def _use_triton(x: Tensor, device_type: str, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    # Called on every norm call: the common cases (auto on CPU, auto on CUDA) are decided
    # first and with the fewest lookups, since this is host time that the GPU waits for.
    backend = selected_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        # With auto, the interpreter is never picked for CPU tensors: it is far slower than torch.
        if device_type != "cuda" or not TRITON_AVAILABLE:
            return False
    else:
        if not TRITON_AVAILABLE:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but Triton is not installed; "
                "install it (pip install triton) or set HF_RMSNORM_BACKEND=auto."
            )
        if device_type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but x is on {x.device}: Triton kernels need a CUDA device, "
                "or TRITON_INTERPRET=1 to run them on the CPU (slowly; meant for tests). "
                "Use HF_RMSNORM_BACKEND=auto to take the torch path there."
            )
    return (
        x.dtype in _KERNEL_DTYPES
        and (weight is None or weight.dtype in _KERNEL_DTYPES)
        and (bias is None or bias.dtype in _KERNEL_DTYPES)
        and 0 < x.shape[-1] <= _MAX_FUSED_N
        and not transformed()  # the kernels' autograd has no forward mode and no functorch rules
        and kernel_tensors(x, weight, bias)
    )


_EXPORT_UNSAID = not hasattr(torch.compiler, "is_exporting")  # torch < 2.7: see ``exporting``


def kernel_tensors(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels may take ``tensors`` (None entries ignored): anything while
    torch.compile or torch.export traces (fake tensors; the kernels' custom op has a fake
    implementation), else plain tensors. An eager subclass goes the torch way: a DTensor (tensor
    parallelism) splits torch's ops by sharding rules of its own, and has none for the kernels' op.
    Not while torch.onnx.export traces: ONNX has no operator for the kernels' custom op, so the
    exported graph holds the torch composition (standard ONNX operators)."""
    # is_compiling first: torch 2.6's dynamo cannot trace the frozenset test (it breaks the graph)
    if torch.compiler.is_compiling():
        # dynamo folds is_dynamo_compiling to True, so it never traces the ONNX question (which it
        # would answer False); torch.onnx.export's default exporter traces without dynamo
        # (non-strict torch.export), where is_compiling is True as well. torch 2.6's dynamo
        # exporter does not say it is ONNX's: there every non-strict trace takes the composition
        return torch.compiler.is_dynamo_compiling() or not (onnx_exporting() or _EXPORT_UNSAID)
    return plain_tensors(*tensors)


def onnx_exporting() -> bool:
    """Whether torch.onnx.export traces (a process that never imported torch.onnx does not)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def torchscript_onnx_export() -> bool:
    """Whether torch.onnx.export's TorchScript exporter (``dynamo=False``, which optimum and older
    code use) traces: it records with torch.jit.trace, so it is asked only while a trace records
    (one C call otherwise)."""
    return _tracing_state() is not None and onnx_exporting()


def records_kernels() -> Optional[bool]:
    """For a call the kernels take: None in an eager call; while torch.compile, torch.export or
    torch.jit.trace records, whether the kernels' custom op is what it records: not for
    torch.onnx's TorchScript exporter (ONNX has no such operator; the torch composition then).
    Its default exporter never gets here (``kernel_tensors`` turned it to the torch path)."""
    if torch.compiler.is_compiling():
        return True
    if _tracing_state() is None:
        return None
    return not onnx_exporting()


def plain_tensors(*tensors: Optional[Tensor]) -> bool:
    """Whether every one of ``tensors`` (None entries ignored) is a plain tensor or parameter."""
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return False
    return True


# Device types torch's autocast knows. A constant set, not torch.amp.is_autocast_available:
# torch.compile (2.11) cannot trace that call and would break the graph.
_AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})
# (device type, is_rms) -> whether torch's own norm computes in float32 under autocast there
_FLOAT32_UNDER_AUTOCAST: dict = {}


def _autocasting(device_type: str) -> bool:
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def _autocast_to_float32(device_type: str, is_rms: bool) -> bool:
    """Whether torch's autocast, active now, runs its own layer_norm / rms_norm in float32.

    The CPU's autocast leaves both alone. On CUDA it depends on the torch version (2.11 lists
    layer_norm among the float32 ops, rms_norm not), so torch is asked once, with a 1×2 probe
    run under the active autocast, and the answer is kept."""
    if device_type == "cpu" or not _autocasting(device_type):
        return False
    key = (device_type, is_rms)
    if key not in _FLOAT32_UNDER_AUTOCAST:
        probe = torch.ones(1, 2, device=device_type, dtype=torch.get_autocast_dtype(device_type))
        out = torch.rms_norm(probe, (2,)) if is_rms else torch.layer_norm(probe, (2,))
        _FLOAT32_UNDER_AUTOCAST[key] = out.dtype == torch.float32
    return _FLOAT32_UNDER_AUTOCAST[key]


def check_inputs(
    name: str,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    offset: float,
    cast_mode: str,
) -> None:
    """One clear error for each way the arguments can be wrong, before any kernel runs."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: x must be a floating-point tensor, got dtype {x.dtype}; "
            "convert it first, e.g. x.float()."
        )
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension (the normalised one), got a scalar.")
    hidden = x.shape[-1]
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}: {pname} must be a torch.Tensor or None, got {type(p).__name__}.")
        if not p.is_floating_point():
            raise TypeError(f"{name}: {pname} must be floating point, got dtype {p.dtype}.")
        if tuple(p.shape) != (hidden,):
            raise ValueError(
                f"{name}: {pname} has shape {tuple(p.shape)} but x's last dimension is {hidden}; "
                f"{pname} must have shape ({hidden},)."
            )
        if p.device != x.device:
            raise ValueError(
                f"{name}: {pname} is on {p.device} but x is on {x.device}; "
                f"move them to the same device (e.g. {pname}.to(x.device))."
            )
    if not isinstance(eps, (int, float)) or not eps >= 0:  # NaN too
        raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}.")
    if offset and weight is None:
        raise ValueError(f"{name}: offset is added to the weight, but weight is None; pass a weight or offset=0.")
    if cast_mode == "weight" and weight is None:
        raise ValueError(f'{name}: cast_mode="weight" rounds to the weight\'s dtype, but weight is None.')
    if cast_mode not in CAST_MODES:
        raise ValueError(f"{name}: cast_mode must be one of {CAST_MODES}, got {cast_mode!r}.")


def transformed() -> bool:
    """Whether forward-mode AD or a torch.func transform (grad, vmap, jvp, ...) is active. The
    CPU path's hand-written pieces (the compiled kernel, the closed-form backward, the affine
    written in place) support neither; torch's own ops do, so such calls are composed of them."""
    if torch.compiler.is_compiling():  # the compiler handles transforms of what it traces
        return False
    return transforms_active()


def transforms_active() -> bool:
    """``transformed()`` without asking whether torch.compile traces (for a caller that asks
    that itself)."""
    return _forward_ad._current_level >= 0 or _functorch_active()


_functorch_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state


def _non_strict_tracing() -> bool:
    """torch 2.6's stand-in for ``is_exporting``: torch.export's non-strict trace (which
    torch.onnx.export's dynamo exporter uses) runs the Python code under is_compiling, without
    dynamo. Its strict trace (2.6's default for torch.export itself) is dynamo's, as
    torch.compile's, and goes unseen."""
    return torch.compiler.is_compiling() and not torch.compiler.is_dynamo_compiling()


# Whether torch.export traces (torch >= 2.7 says so). The program it records is one graph for
# every later call, with gradients or without, and its trace sees parameters that do not require
# grad: a choice by ``needs_grad`` would bake in the torch path's in-place work (an affine written
# with out=, which autograd refuses; a buffer modified that autograd saved) and break the
# program's calls with gradients. Under export the torch path is the plain composition.
exporting = getattr(torch.compiler, "is_exporting", None) or _non_strict_tracing


def hand_written_ok(*tensors: Optional[Tensor]) -> bool:
    """Whether the CPU torch path's hand-written pieces (the compiled kernel, the closed-form
    backward, work done in place) may serve a call on ``tensors`` (None entries ignored): not
    under a transform, torch.export or torch.onnx.export's TorchScript exporter (which would
    record the compiled kernel's operator: ONNX has none), and on plain tensors. A
    subclass (DTensor, a wrapper) dispatches torch's ops by rules of its own, which cover the
    composition's ops but not every in-place one (DTensor has none for ``unsqueeze_``). Under
    torch.compile, yes: its fake tensors stand for plain ones, and it traces these pieces."""
    if transformed() or exporting() or torchscript_onnx_export():
        return False
    return torch.compiler.is_compiling() or plain_tensors(*tensors)


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will differentiate through a call on ``tensors`` (None entries ignored).
    A loop, not ``any`` over a generator: asked once per norm call (0.3 against 0.8 µs, CI CPU)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call where ``t`` has that dtype already (then both give
    ``t`` itself). Even a no-op ``to`` costs ≈ 0.9 µs of dispatch on the CPU, and the torch
    path asks for several per norm, as much as the arithmetic at a few tokens."""
    return t if t.dtype == dtype else t.to(dtype)


def weight_plus_offset(weight: Tensor, dtype: torch.dtype, offset: float) -> Tensor:
    """The multiplier the affine applies, ``offset + weight``, in ``dtype``."""
    w = cast(weight, dtype)
    return w + offset if offset else w


def rounding_dtype(rounding: int, x_dtype: torch.dtype, weight: Optional[Tensor]) -> torch.dtype:
    """The dtype a ``ROUNDING`` mode rounds the normalised row to before the affine: x's
    (1, Llama) or the weight's (2, T5)."""
    return x_dtype if rounding == 1 else weight.dtype


def affine_torch(
    n: Tensor, x_dtype: torch.dtype, weight: Optional[Tensor], bias: Optional[Tensor], offset: float, cast_mode: str,
    overwrite: bool = False,
) -> Tensor:
    """The affine step of the torch path, in the same order of casts as the kernels.

    ``n`` is the normalised row in the compute dtype (fp32, or fp64 for fp64 input). The
    affine runs in that dtype and the result is rounded once, to ``output_dtype``.
    ``overwrite=True`` (``n`` is a temporary outside autograd) writes the affine into ``n``:
    one activation-sized allocation fewer, which on the CPU can mean a round of page faults
    fewer (glibc hands large blocks back to the kernel when they are freed).
    """
    out_dtype = output_dtype(x_dtype, weight, bias, cast_mode)
    rounding = ROUNDING[cast_mode]
    if rounding:
        rounded = rounding_dtype(rounding, x_dtype, weight)
        if (
            weight is not None and bias is None and not offset and weight.dtype == rounded == out_dtype
            and not needs_grad(n, weight)
        ):
            # Inference in HF's own order, w * y.to(dtype): one pass over the row instead of
            # four (casts, product, cast). Bit-identical to the path below: the product of two
            # values of this dtype is exact in n's dtype, so both round once, the same way.
            # Not when gradients flow: autograd would then form dw from half-precision products.
            return weight * cast(n, rounded)
        n = cast(cast(n, rounded), n.dtype)
    if weight is not None:
        w = weight_plus_offset(weight, n.dtype, offset)
        # with a bias, one pass (addcmul) instead of two
        if bias is not None:
            n = torch.addcmul(cast(bias, n.dtype), n, w, out=n if overwrite else None)
        else:
            n = n.mul_(w) if overwrite else n * w
    elif bias is not None:
        n = n.add_(cast(bias, n.dtype)) if overwrite else n + cast(bias, n.dtype)
    return cast(n, out_dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def output_dtype(dtype: torch.dtype, weight: Optional[Tensor], bias: Optional[Tensor], cast_mode: str) -> torch.dtype:
    """``float32``: x's dtype (like torch's norms); ``input``: promoted like Llama's
    ``w * y.to(x.dtype)``; ``weight``: the parameters' dtype, like T5's ``w * y.to(w.dtype)``."""
    if cast_mode == "float32":
        return dtype
    if cast_mode == "weight":
        dtype = weight.dtype
    for p in (weight, bias):
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# The Triton forward and backward, wrapped twice around the same two functions: as torch custom
# ops (opaque to torch.compile, so no graph breaks, with fake implementations for tracing) and
# as a plain autograd.Function for eager mode, where a custom op's dispatch would cost more CPU
# time per call than a small norm kernel takes on the GPU.
# Optional outputs cannot be None in a custom op, so absent statistics/gradients are empty.
# --------------------------------------------------------------------------------------------


def _rows(x: Tensor) -> Tensor:
    """``x``'s rows in a layout the launchers take: ``x`` itself where it is contiguous (any
    rank: the kernels need a pointer, a row count and a row stride, no view), else an (M, N)
    matrix of rows with unit column stride, a view wherever the leading dimensions allow one, a
    copy otherwise."""
    if x.is_contiguous():
        return x  # a reshape costs ≈ 1.3 µs of host time, three per forward+backward
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2.contiguous() if x2.shape[1] > 1 and x2.stride(1) != 1 else x2


# The CUDA device current on this thread (torch.cuda.current_device without its lazy-init
# check: a CUDA tensor in hand means CUDA is initialised); None in a build without CUDA.
_current_cuda_device = getattr(torch._C, "_cuda_getDevice", None)


def _elsewhere(x: Tensor) -> bool:
    """Whether ``x`` is on a CUDA device other than the current one, as in a model spread over
    GPUs (``device_map="auto"``), whose layers run with the first GPU current. Triton launches
    on the current device, its stream and its copy of the kernel, which cannot read another
    GPU's memory: the launch must happen with x's device current, as torch's own ops do."""
    return x.is_cuda and x.get_device() != _current_cuda_device()


# the launchers (``_triton_norm``, which imports Triton), the direct launch and the C++ launch
# operator's bridge, imported on the first kernel call: an import statement inside the forward
# cost 0.3 µs a call, a global's lookup 0.03
_launchers = _direct = _cuda_launch = None


def _import_launchers():
    global _launchers, _direct, _cuda_launch
    from . import _cuda_launch as cuda_launch
    from . import _direct as direct
    from . import _triton_norm

    _direct, _cuda_launch, _launchers = direct, cuda_launch, _triton_norm
    return _triton_norm


def _memory(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` with its values in memory, which is what the kernels read: a lazily negated tensor
    (the negation bit: ``torch._neg_view``, the imaginary part of a conjugated complex tensor)
    holds them un-negated. Resolved inside the kernels' node (whose gradients are with respect to
    the values; autograd carries them through the negation) and at run time, where torch.compile
    does not trace (it cannot trace ``is_neg``)."""
    return t.resolve_neg() if t is not None and t.is_neg() else t


def _fwd_impl(x, weight, bias, eps, offset, is_rms, rounding):
    """The forward on ``x`` of any shape: y in x's shape, the statistics one per row."""
    launchers = _launchers or _import_launchers()
    if _elsewhere(x):
        with torch.cuda.device(x.device):
            return _fwd_impl(x, weight, bias, eps, offset, is_rms, rounding)
    x, weight, bias = _memory(x), _memory(weight), _memory(bias)
    out_dtype = output_dtype(x.dtype, weight, bias, CAST_MODES[rounding])
    return launchers.norm_fwd(_rows(x), weight, bias, eps, offset, is_rms, rounding, out_dtype, like=x)


def _bwd_impl(dy, x, weight, bias, mean, rstd, offset, is_rms, rounding):
    """The backward for x of any shape (dy in x's shape): dx in x's shape, then the parameter
    gradients."""
    launchers = _launchers or _import_launchers()
    if _elsewhere(x):  # autograd's device threads make x's device current; a caller of the op need not
        with torch.cuda.device(x.device):
            return _bwd_impl(dy, x, weight, bias, mean, rstd, offset, is_rms, rounding)
    dy, x, weight = _memory(dy), _memory(x), _memory(weight)
    dx, part = launchers.norm_bwd(
        _rows(dy), _rows(x), weight, mean, rstd, offset, is_rms, rounding, bias is not None, like=x
    )
    if part is None:
        return dx, None, None
    # Partial rows summed in a fixed order (deterministic, unlike atomics), each gradient in
    # its parameter's dtype. None where there is no such parameter (the custom op turns that
    # into an empty tensor).
    grads = iter(launchers.sum_partials(part, [p.dtype for p in (weight, bias) if p is not None]))
    return dx, next(grads) if weight is not None else None, next(grads) if bias is not None else None


@torch.library.custom_op("hf_rmsnorm::norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    offset: float,
    is_rms: bool,
    rounding: int,
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _fwd_impl(x, weight, bias, eps, offset, is_rms, rounding)
    return y, mean if mean is not None else x.new_empty((0,), dtype=torch.float32), rstd


@_norm_fwd_op.register_fake
def _(x, weight, bias, eps, offset, is_rms, rounding):
    M = x.numel() // x.shape[-1]  # rows of any rank (``_rows``); the kernels never see N = 0
    y = x.new_empty(x.shape, dtype=output_dtype(x.dtype, weight, bias, CAST_MODES[rounding]))
    mean = x.new_empty((0 if is_rms else M,), dtype=torch.float32)
    return y, mean, x.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op("hf_rmsnorm::norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    offset: float,
    is_rms: bool,
    rounding: int,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _bwd_impl(dy, x, weight, bias, mean, rstd, offset, is_rms, rounding)
    empty = lambda: x.new_empty((0,), dtype=torch.float32)  # noqa: E731
    return dx, dw if dw is not None else empty(), db if db is not None else empty()


@_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, offset, is_rms, rounding):
    def grad_like(p):
        return p.new_empty(p.shape) if p is not None else x.new_empty((0,), dtype=torch.float32)

    return x.new_empty(x.shape), grad_like(weight), grad_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, offset, is_rms, rounding = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps, ctx.offset, ctx.is_rms, ctx.rounding = eps, offset, is_rms, rounding
    # The statistics are outputs nobody differentiates; by default autograd would still hand
    # the backward a zero tensor for each, one fill kernel of M floats per norm per step.
    ctx.set_materialize_grads(False)


def _backward_with(bwd, ctx, dy):
    if dy is None:  # no gradient reached the output (grads are not materialised): none to pass on
        return None, None, None, None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = bwd(dy, x, weight, bias, mean, rstd, ctx.offset, ctx.is_rms, ctx.rounding)
    # already in the parameters' dtypes; the custom op's empty stand-ins become None
    return dx, dw if weight is not None else None, db if bias is not None else None, None, None, None, None


def _backward(ctx, dy, _dmean, _drstd):
    return _backward_with(_norm_bwd_op, ctx, dy)


_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _NormFunction(torch.autograd.Function):
    """The eager twin of ``_norm_fwd_op``: same launches, same saved tensors, same backward.

    Cheaper for autograd in two ways, both host time per norm per step: it takes x in the
    caller's shape and returns y in it (the rows are viewed inside, where autograd does not
    record, instead of two view nodes around the call), and y is its only output (the
    statistics are saved, not returned, so autograd wraps one tensor, not three)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, offset, is_rms, rounding, torch_impl):
        inputs = (x, weight, bias, eps, offset, is_rms, rounding)
        output = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.torch_impl = torch_impl
        return output[0]

    @staticmethod
    def backward(ctx, dy):
        if dy is not None and torch.is_grad_enabled():  # create_graph=True: the kernels have no second derivative
            x, weight, bias, _, _ = ctx.saved_tensors
            grads = backward_by_autograd(
                ctx.torch_impl, dy, (x, weight, bias), ctx.needs_input_grad[:3],
                ctx.eps, ctx.offset, CAST_MODES[ctx.rounding],
            )
            return (*grads, None, None, None, None, None)
        return (*_backward_with(_bwd_impl, ctx, dy), None)


# autograd.Function's C++ apply bound to _NormFunction (what Function.apply calls after its
# Python), and functorch's test for its wrapper tensors; None where a torch build lacks either
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
_C_APPLY = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_apply_norm = _C_APPLY.__get__(None, _NormFunction) if _C_APPLY is not None and _functorch_wrapped is not None else None


def backward_by_autograd(torch_impl, dy, inputs, needs, eps, offset, cast_mode) -> tuple:
    """Gradients of ``torch_impl`` (a torch composition autograd can differentiate to any
    order) for ``inputs`` (x, weight, bias), as a graph: the backward of a hand-written
    backward when asked for ``create_graph=True``, so that second derivatives (gradient
    penalties, meta-learning) come out right instead of silently missing the norm's part."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        y = torch_impl(*inputs, eps, offset, cast_mode)
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def wanted_gradients_as_graph(torch_impl, grad, x, weight, bias, eps, offset, cast_mode, needs: int) -> list:
    """:func:`backward_by_autograd` for the C++ autograd nodes (the CPU kernel's, the CUDA launch
    operator's), whose own backward is not differentiable: the gradients ``needs`` asks for
    (bits 1, 2, 4: x, weight, bias), in that order, as a list."""
    wanted = tuple(bool(needs >> i & 1) for i in range(3))
    grads = backward_by_autograd(torch_impl, grad, (x, weight, bias), wanted, eps, offset, cast_mode)
    return [g for g in grads if g is not None]


# --------------------------------------------------------------------------------------------
# The one entry point behind rms_norm and layer_norm.
# --------------------------------------------------------------------------------------------


def normalize(
    name: str,
    torch_impl: Callable[..., Tensor],
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    offset: float,
    is_rms: bool,
    cast_mode: str,
    follow_autocast: bool,
) -> Tensor:
    """Check the inputs, apply the autocast policy, then run Triton or ``torch_impl``.

    ``torch_impl(x, weight, bias, eps, offset, cast_mode)`` is the op's torch reference; it
    also serves every case the kernels do not cover (CPU tensors, float64, huge rows).
    """
    check_inputs(name, x, weight, bias, eps, offset, cast_mode)
    device_type = x.device.type
    autocasting = _autocasting(device_type)
    if follow_autocast and autocasting and _autocast_to_float32(device_type, is_rms):
        x, weight, bias = (t.float() if t is not None else None for t in (x, weight, bias))
    return _dispatch(torch_impl, x, device_type, weight, bias, eps, offset, is_rms, cast_mode, autocasting)


def _dispatch(torch_impl, x, device_type, weight, bias, eps, offset, is_rms, cast_mode, autocasting):
    if not _use_triton(x, device_type, weight, bias):
        return _torch_path(torch_impl, x, weight, bias, eps, offset, cast_mode, autocasting)
    return _run_kernels(torch_impl, x, weight, bias, float(eps), float(offset), is_rms, ROUNDING[cast_mode])


def _torch_path(torch_impl, x, weight, bias, eps, offset, cast_mode, autocasting):
    if autocasting:
        # The policy is decided above (or deliberately ignored by modules that replace code
        # which autocast does not touch); none of torch_impl's ops may re-cast. The kernels
        # need no such guard (autocast casts no custom op or autograd.Function input), and
        # entering it costs ≈ 3 µs of host time per norm.
        with torch.autocast(x.device.type, enabled=False):
            return torch_impl(x, weight, bias, eps, offset, cast_mode)
    return torch_impl(x, weight, bias, eps, offset, cast_mode)


def _run_kernels(torch_impl, x, weight, bias, eps: float, offset: float, is_rms: bool, rounding: int) -> Tensor:
    """The Triton path, once chosen: through the custom op while torch.compile traces, else on
    CUDA through the C++ launch operator where it has a plan (the default; off with
    ``HF_RMSNORM_CPP_LAUNCH=0``), else through an autograd node where gradients flow, else the
    forward launch alone."""
    # The kernels read the parameters with unit stride. A strided one (a slice of a fused
    # parameter, say) is copied first, outside the kernels' autograd node, so that autograd
    # carries its gradient back to the viewed elements.
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    args = (weight, bias, eps, offset, is_rms, rounding)
    recording = records_kernels()
    if recording:
        # traceable and opaque to the compiler; it takes the rows as ``_rows`` lays them out.
        # Also what torch.jit.trace records: one operator its trace replays (the launchers, run
        # while it records, would see x's sizes as tensors, and no operator of theirs is recorded)
        return _norm_fwd_op(_rows(x), *args)[0].view(x.shape)
    if recording is not None:  # torch.onnx's TorchScript exporter
        return _torch_path(torch_impl, x, weight, bias, eps, offset, CAST_MODES[rounding], _autocasting(x.device.type))
    if _launchers is None:
        _import_launchers()
    if (_cuda_launch.ENABLED and (x.is_cuda or _cuda_launch.cpu_stub) and not _needs_function_apply(x, weight, bias)
            and _direct.plain_launches()):
        # one C++ operator allocates, launches and records the node (_cuda_launch); None where it
        # has no plan for this kind of call yet: then the Python path, and its launch's plan
        y, family = _cuda_launch.forward(torch_impl, x, *args)
        if y is not None:
            _launchers.LAUNCHES["norm_fwd"] += 1  # counted as the Python path counts its launches
            return y
        if family is not None:
            y, record = _cuda_launch.recorded(_launchers, _kernels_in_python, torch_impl, x, *args)
            _cuda_launch.learn_forward(family, record, x)
            return y
    return _kernels_in_python(torch_impl, x, *args)


def _needs_function_apply(x, weight, bias) -> bool:
    """Whether an input is a functorch wrapper that a finished torch.func transform left behind
    (the callers have made sure no transform is active), which only Function.apply's Python
    unwraps; or this torch build lacks what the direct C++ apply needs."""
    return _apply_norm is None or _functorch_wrapped(x) or (weight is not None and _functorch_wrapped(weight)) or (
        bias is not None and _functorch_wrapped(bias))


def _kernels_in_python(torch_impl, x, weight, bias, eps, offset, is_rms, rounding) -> Tensor:
    args = (weight, bias, eps, offset, is_rms, rounding)
    if needs_grad(x, weight, bias):
        # eager: cheaper than the custom op's dispatch. Without a functorch wrapper Function.apply's
        # Python would do nothing, and its C++ apply is called directly (CI CPU: 18.9 -> 16.0 µs
        # a call).
        if _needs_function_apply(x, weight, bias):
            return _NormFunction.apply(x, *args, torch_impl)
        return _apply_norm(x, *args, torch_impl)
    return _fwd_impl(x, *args)[0]  # nothing to differentiate: no autograd node at all


# what the shortcuts hand a kernel: a tensor subclass (fake tensors, DTensor, wrappers) may have
# no memory of its own behind data_ptr, and goes the general way, through torch ops that dispatch it
_PLAIN_TENSORS = frozenset({Tensor, torch.nn.Parameter})
# whether autocast is on for any device (one call; with any on, the general path applies its policy)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: any(
    _autocasting(d) for d in _AUTOCAST_DEVICE_TYPES))
