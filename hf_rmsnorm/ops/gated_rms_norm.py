"""Gated RMSNorm: an RMSNorm and a gate, ``act(gate)``, multiplied in, in one kernel.

The norm of the linear-attention and state-space mixers (Mamba2 and its hybrids: Bamba,
Zamba2, NemotronH, GraniteMoeHybrid, FalconH1; Qwen3-Next and Qwen3.5's gated delta net; Kimi
Linear). Two orders, as ``mamba_ssm``'s ``norm_before_gate``:

    norm_before_gate=False:  h = x · act(gate),   y = RMSNorm(h) · w          (Mamba2)
    norm_before_gate=True:   y = RMSNorm(x) · w · act(gate)                   (Qwen3-Next, Kimi)

``act`` is silu or sigmoid. With ``group_size`` S, each run of S elements of the last dim is
normalised on its own (Mamba2's ``n_groups`` = N / S). Statistics are fp32. ``cast_mode``
follows the HF classes' order of casts: ``"input"`` rounds the normalised row to x's dtype
before the weight (Llama's order; with the gate after, the weighted row is rounded again, to
the weight-promoted dtype, before the gate), ``"float32"`` keeps everything in fp32 and
rounds once, at the end.

Read top to bottom: the reference (torch ops, or on the CPU the compiled kernel of
``_cpu_rms_norm.c``; also the fallback), the custom ops around the Triton launchers
(``_triton_gated.py``, imported when first needed), the public function.
"""

from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu_kernel
from ._norm import (
    _C_APPLY, _KERNEL_DTYPES, _PLAIN_TENSORS, _apply_norm, _autocasting, _elsewhere, _memory, _needs_function_apply,
    _rows, _tracing_state, _use_triton, cast, hand_written_ok, kernel_tensors, needs_grad, records_kernels, transforms_active,
    weight_plus_offset,
)

ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}
GATED_CAST_MODES = ("input", "float32")


def output_dtype(x_dtype: torch.dtype, gate: Optional[Tensor], weight: Optional[Tensor],
                 norm_before_gate: bool, cast_mode: str) -> torch.dtype:
    """x's dtype, except where the row ends with ``w · n.to(x.dtype)`` (``cast_mode="input"``
    without a gate after the norm): then promoted with the weight's, as Mamba2's ``weight *
    hidden_states.to(input_dtype)``."""
    if cast_mode == "float32" or weight is None or (gate is not None and norm_before_gate):
        return x_dtype
    return torch.promote_types(x_dtype, weight.dtype)


def gated_rms_norm_ref(
    x: Tensor,
    gate: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
    activation: str = "silu",
    cast_mode: str = "input",
    offset: float = 0.0,
) -> Tensor:
    """The gated RMSNorm off the Triton kernels, with their semantics (module docstring):
    statistics in fp32 (fp64 for fp64 input), the roundings of ``cast_mode`` where the kernels
    make them. Torch ops, differentiable by autograd; on the CPU, as ``rms_norm_ref``, the
    compiled kernel wherever it computes the call (``_compiled_kernel``), unless
    ``HF_RMSNORM_BACKEND=torch`` asks for torch ops only."""
    size = group_size or x.shape[-1]
    grad, transforms = needs_grad(x, gate, weight), transforms_active()
    if x.is_cpu and not transforms:
        compiled = _compiled_kernel(x, gate, weight, norm_before_gate, activation, cast_mode)
        if compiled is not None:
            if grad:
                return _GatedFunction.apply(x, gate, weight, float(eps), float(offset), size, norm_before_gate,
                                            activation == "sigmoid", cast_mode == "input", compiled)
            fwd, _, flags = compiled
            return fwd(x, gate, weight, eps, offset, size, flags, False)[0]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Not while torch.jit.trace records: it would replay the in-place work under autograd
    if not grad and hand_written_ok(x, gate, weight) and _tracing_state() is None:
        return _in_place(x, gate, weight, eps, offset, size, norm_before_gate, activation, cast_mode, compute)
    return _composite(x, gate, weight, eps, offset, size, norm_before_gate, activation, cast_mode, compute)


def _composite(x, gate, weight, eps, offset, size, norm_before_gate, activation, cast_mode, compute) -> Tensor:
    """The definition as torch ops, for autograd (and second derivatives) to differentiate."""
    n_cols = x.shape[-1]
    h = cast(x, compute)
    g = ACTIVATIONS[activation](cast(gate, compute)) if gate is not None else None
    if g is not None and not norm_before_gate:
        h = h * g
    # the composition, not F.rms_norm: on the CPU torch composes that of the same ops, and its
    # autograd took 2-3 µs more a small training call (benchmarks/NOTES.md, session 34)
    groups = h.unflatten(-1, (n_cols // size, size))
    # the mean as a sum over the group's size: a DTensor sharded along the hidden dim reduces a
    # sum with SUM, which every backend has (torch 2.6 reduces a sharded mean with AVG, which
    # gloo lacks)
    n = (groups * torch.rsqrt(groups.pow(2).sum(-1, keepdim=True) / size + eps)).flatten(-2)
    if cast_mode == "input":
        m = cast(n, x.dtype)
        if weight is not None:
            # in the promoted dtype, rounded once, as the HF classes' own product (with an
            # offset: its fp32 value, rounded once, as the kernels)
            m = weight * m if not offset else cast(weight_plus_offset(weight, compute, offset) * m, _promoted(m, weight))
        if g is None or not norm_before_gate:
            return m
        return cast(m * g, x.dtype)  # m promoted to g's dtype exactly, as the HF classes' product
    m = n * weight_plus_offset(weight, compute, offset) if weight is not None else n
    if g is not None and norm_before_gate:
        m = m * g
    return cast(m, x.dtype)


def _promoted(m: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(m.dtype, weight.dtype)


def _in_place(x, gate, weight, eps, offset, size, norm_before_gate, activation, cast_mode, compute) -> Tensor:
    """``gated_rms_norm_ref`` outside autograd, in as few full-size temporaries as the casts
    allow (three where the composition takes up to nine), each op after the first writing into
    a buffer of its own: on the CPU a fresh large temporary costs page faults, which took more
    time than the arithmetic (benchmarks/NOTES.md, session 34). The same ops on the same
    values as ``gated_rms_norm_ref``'s composition, so the same bits."""
    g = None
    if gate is not None:
        g = gate.to(compute, copy=True)
        g = torch.nn.functional.silu(g, inplace=True) if activation == "silu" else g.sigmoid_()
    if g is not None and not norm_before_gate:
        h, g, own = g.mul_(x), None, True  # x·act(gate), in the gate's buffer
    else:
        h = cast(x, compute)
        own = h is not x
    groups = h.unflatten(-1, (h.shape[-1] // size, size))
    # pow().mean(), not a squared vector norm: that one allocates nothing but measured 2-4x the
    # rounding error of the mean square (2.2e-5 at 131072 columns)
    rstd = groups.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    n = (groups.mul_(rstd) if own else groups * rstd).flatten(-2)
    if cast_mode == "input":
        m = cast(n, x.dtype)  # n itself (ours) where x is in the compute dtype, else a new buffer
        if offset and weight is not None:
            m = cast(weight_plus_offset(weight, compute, offset) * m, _promoted(m, weight))
        elif weight is not None:
            m = m.mul_(weight) if _promoted(m, weight) == m.dtype else weight * m
        if g is None or not norm_before_gate:
            return m
        return cast(g.mul_(m), x.dtype)
    if weight is not None:
        n = n.mul_(weight_plus_offset(weight, compute, offset))
    if g is not None and norm_before_gate:
        n = n.mul_(g)
    return cast(n, x.dtype)


# --------------------------------------------------------------------------------------------
# The compiled CPU kernel (``_cpu_rms_norm.c``'s second half): one pass over each row forward
# and one backward, where the torch ops make up to nine each way.
# --------------------------------------------------------------------------------------------


def _compiled_kernel(x: Tensor, gate: Optional[Tensor], weight: Optional[Tensor], norm_before_gate: bool,
                     activation: str, cast_mode: str):
    """(the forward operator, the backward operator, their flags) where the compiled CPU kernel
    computes this call (the backward then runs on the library the forward ran on), else
    None: float32/bfloat16 plain CPU tensors, at least one element, a gate of x's shape, a
    contiguous weight of the row's length; not while torch.compile traces (the operator has no
    meta kernel: the compiler fuses the torch ops itself) or torch.jit.trace records (it would
    record the Python autograd.Function, which a saved trace cannot hold, or this build's
    operator, which another process does not have: torch ops trace into a portable graph); not
    where the library cannot be had or ``HF_RMSNORM_BACKEND=torch``."""
    flags = _cpu_flags(x.dtype, gate, weight, norm_before_gate, activation, cast_mode)
    # is_compiling first: torch 2.6's dynamo cannot trace the frozenset test (it breaks the graph)
    if (torch.compiler.is_compiling() or flags is None or type(x) not in _PLAIN_TENSORS or not x.numel()
            or _tracing_state() is not None):
        return None
    if gate is not None and (type(gate) not in _PLAIN_TENSORS or not gate.is_cpu or gate.shape != x.shape):
        return None
    if weight is not None and (type(weight) not in _PLAIN_TENSORS or not weight.is_cpu
                               or weight.shape != x.shape[-1:] or not weight.is_contiguous()):
        return None
    ops = _cpu_kernel.gated_ops()
    return None if ops is None else (*ops, flags)


def _cpu_flags(x_dtype, gate, weight, norm_before_gate, activation, cast_mode) -> Optional[int]:
    """The C functions' flags for these dtypes and settings (None where the kernel has no such
    dtypes), worked out once per signature."""
    key = (x_dtype, None if gate is None else gate.dtype, None if weight is None else weight.dtype, norm_before_gate,
           activation, cast_mode)
    flags = _CPU_FLAGS.get(key, _UNSEEN)
    if flags is _UNSEEN:
        k, bf16 = _cpu_kernel, torch.bfloat16
        out = output_dtype(x_dtype, gate, weight, norm_before_gate, cast_mode)
        if not all(d in k.DTYPES for d in (x_dtype, out, *(t.dtype for t in (gate, weight) if t is not None))):
            flags = None
        else:
            rounds = x_dtype == bf16 and cast_mode == "input"  # a rounding to float32 changes nothing
            before = gate is not None and norm_before_gate
            flags = (
                k.dtype_flags(x_dtype, None if weight is None else weight.dtype, None, out, rounds)
                | (k.Z_BF16 if gate is not None and gate.dtype == bf16 else 0)
                | (k.ROUND_M if rounds and _round_m(x_dtype, gate, weight, norm_before_gate, True) else 0)
                | (k.NORM_BEFORE_GATE if before else 0) | (k.SIGMOID if activation == "sigmoid" else 0)
            )
        _CPU_FLAGS[key] = flags
    return flags


_CPU_FLAGS: dict = {}
_UNSEEN = object()


def check_settings(name: str, hidden: int, eps, group_size, activation, cast_mode, offset=0.0,
                   has_weight: bool = True) -> None:
    """One clear error per way the settings can be wrong (shared with ``FusedGatedRMSNorm``)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:  # NaN too
        raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}.")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"{name}: offset must be a finite number, got {offset!r}.")
    if offset and not has_weight:
        raise ValueError(f"{name}: offset is added to the weight, but there is no weight; pass a weight or offset=0.")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"{name}: group_size must be a positive int or None (one group), got {group_size!r}.")
        if hidden % group_size:
            raise ValueError(
                f"{name}: group_size {group_size} does not divide the normalised dimension {hidden}; "
                f"pass a divisor of {hidden} (the width of one group), or None for one group."
            )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}.")
    if cast_mode not in GATED_CAST_MODES:
        raise ValueError(f"{name}: cast_mode must be one of {GATED_CAST_MODES}, got {cast_mode!r}.")


def _check_inputs(x, gate, weight, eps, group_size, activation, cast_mode, offset) -> None:
    name = "gated_rms_norm"
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name}: x must be a floating-point tensor with at least one dimension, got {got}.")
    for pname, t, shape in (("gate", gate, tuple(x.shape)), ("weight", weight, (x.shape[-1],))):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name}: {pname} must be a floating-point tensor or None, got {got}.")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: {pname} has shape {tuple(t.shape)}; it must have shape {shape} (x is {tuple(x.shape)}).")
        if t.device != x.device:
            raise ValueError(f"{name}: {pname} is on {t.device} but x is on {x.device}; move them to the same device.")
    check_settings(name, x.shape[-1], eps, group_size, activation, cast_mode, offset, weight is not None)


# --------------------------------------------------------------------------------------------
# The Triton forward and backward as torch custom ops: opaque to torch.compile (no graph
# breaks), with fake implementations for tracing. Absent gradients come back empty.
# --------------------------------------------------------------------------------------------

_launchers = _direct = _cuda_launch = None


def _kernels():
    global _launchers, _direct, _cuda_launch
    if _launchers is None:
        from . import _cuda_launch as cuda_launch, _direct as direct, _triton_gated

        _direct, _cuda_launch, _launchers = direct, cuda_launch, _triton_gated
    return _launchers


def _rows_of(t: Optional[Tensor], n_cols: int) -> Optional[Tensor]:
    """``t`` as an (M, N) matrix whose columns are adjacent (the kernels take any row stride;
    ``_norm._rows``): a view wherever one exists, so a gate split off a projection (Mamba2's) is
    read in place."""
    return None if t is None else _rows(_memory(t)).reshape(-1, n_cols)


def _round_m(x_dtype, gate, weight, norm_before_gate, cast_input) -> bool:
    # Qwen3-Next's ``(w * n.to(dtype)) * act(gate)``: the product is rounded where its dtype is x's
    return cast_input and gate is not None and norm_before_gate and output_dtype(
        x_dtype, None, weight, False, "input") == x_dtype


def _fwd_impl(x, gate, weight, eps, offset, group_size, norm_before_gate, sigmoid, cast_input):
    """The forward launch on x of any shape: y in x's shape, rstd per group row."""
    if _elsewhere(x):  # Triton launches on the current device
        with torch.cuda.device(x.device):
            return _fwd_impl(x, gate, weight, eps, offset, group_size, norm_before_gate, sigmoid, cast_input)
    n_cols = x.shape[-1]
    out = output_dtype(x.dtype, gate, weight, norm_before_gate, "input" if cast_input else "float32")
    y, rstd = _kernels().gated_fwd(
        _rows_of(x, n_cols), _rows_of(gate, n_cols), _rows_of(weight, n_cols).view(-1) if weight is not None else None,
        eps, offset, group_size, norm_before_gate, sigmoid, cast_input, _round_m(x.dtype, gate, weight, norm_before_gate, cast_input), out,
    )
    return y.view(x.shape), rstd


def _bwd_impl(dy, x, gate, weight, rstd, offset, group_size, norm_before_gate, sigmoid, cast_input):
    """The backward launch: dx in x's shape, dgate in its (None without one), dw in the
    weight's dtype (None without one)."""
    if _elsewhere(x):
        with torch.cuda.device(x.device):
            return _bwd_impl(dy, x, gate, weight, rstd, offset, group_size, norm_before_gate, sigmoid, cast_input)
    n_cols = x.shape[-1]
    dx, dz, dw = _kernels().gated_bwd(
        _rows_of(dy, n_cols), _rows_of(x, n_cols), _rows_of(gate, n_cols),
        _rows_of(weight, n_cols).view(-1) if weight is not None else None, rstd, offset, group_size,
        norm_before_gate, sigmoid, cast_input, _round_m(x.dtype, gate, weight, norm_before_gate, cast_input),
    )
    return dx.view(x.shape), dz.view(x.shape) if dz is not None else None, dw.to(weight.dtype) if dw is not None else None


@torch.library.custom_op("hf_rmsnorm::gated_rms_norm_fwd", mutates_args=())
def _fwd_op(x: Tensor, gate: Optional[Tensor], weight: Optional[Tensor], eps: float, offset: float, group_size: int,
            norm_before_gate: bool, sigmoid: bool, cast_input: bool) -> tuple[Tensor, Tensor]:
    return _fwd_impl(x, gate, weight, eps, offset, group_size, norm_before_gate, sigmoid, cast_input)


@_fwd_op.register_fake
def _(x, gate, weight, eps, offset, group_size, norm_before_gate, sigmoid, cast_input):
    out = output_dtype(x.dtype, gate, weight, norm_before_gate, "input" if cast_input else "float32")
    return x.new_empty(x.shape, dtype=out), x.new_empty((x.numel() // group_size,), dtype=torch.float32)


@torch.library.custom_op("hf_rmsnorm::gated_rms_norm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, gate: Optional[Tensor], weight: Optional[Tensor], rstd: Tensor, offset: float, group_size: int,
            norm_before_gate: bool, sigmoid: bool, cast_input: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dz, dw = _bwd_impl(dy, x, gate, weight, rstd, offset, group_size, norm_before_gate, sigmoid, cast_input)
    empty = x.new_empty((0,))
    return dx, dz if dz is not None else empty, dw if dw is not None else empty


@_bwd_op.register_fake
def _(dy, x, gate, weight, rstd, offset, group_size, norm_before_gate, sigmoid, cast_input):
    empty = x.new_empty((0,))
    return (x.new_empty(x.shape), gate.new_empty(gate.shape) if gate is not None else empty,
            weight.new_empty(weight.shape) if weight is not None else empty)


def _setup_context(ctx, inputs, output):
    x, gate, weight, _eps, offset, group_size, norm_before_gate, sigmoid, cast_input = inputs
    ctx.save_for_backward(x, gate, weight, output[1])
    ctx.settings = (offset, group_size, norm_before_gate, sigmoid, cast_input)
    ctx.set_materialize_grads(False)  # rstd is an output nobody differentiates


def _backward(ctx, dy, _drstd):
    if dy is None:
        return (None,) * 9
    x, gate, weight, rstd = ctx.saved_tensors
    dx, dz, dw = _bwd_op(dy, x, gate, weight, rstd, *ctx.settings)
    return dx, dz if gate is not None else None, dw if weight is not None else None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _GatedFunction(torch.autograd.Function):
    """The eager twin of ``_fwd_op``: the same launches and saved tensors, without a custom
    op's dispatch, which costs more host time per call than the kernels take on a GPU at a
    model's sizes (measured for the plain norms: ``_norm.py``). torch.compile traces the op.
    With ``cpu`` (not None: ``_compiled_kernel``'s operators and flags) the compiled CPU
    kernel runs instead of Triton."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps, offset, group_size, norm_before_gate, sigmoid, cast_input, cpu):
        if cpu is None:
            y, rstd = _fwd_impl(x, gate, weight, eps, offset, group_size, norm_before_gate, sigmoid, cast_input)
        else:
            y, rstd = cpu[0](x, gate, weight, eps, offset, group_size, cpu[2], True)
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.eps, ctx.settings = eps, (offset, group_size, norm_before_gate, sigmoid, cast_input)
        ctx.cpu = cpu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the kernels have no second derivative; the reference's
            # gradients, as a graph, do (gradient penalties come out right, not without the norm)
            return (*gradients_as_graph(dy, x, gate, weight, ctx.eps, *ctx.settings, ctx.needs_input_grad[:3]),
                    None, None, None, None, None, None, None)
        if ctx.cpu is None:
            dx, dz, dw = _bwd_impl(dy, x, gate, weight, rstd, *ctx.settings)
        else:
            offset, group_size = ctx.settings[:2]
            dx, dz, dw = ctx.cpu[1](dy, x, gate, weight, rstd, offset, group_size, ctx.cpu[2], *ctx.needs_input_grad[:3])
        return dx, dz, dw, None, None, None, None, None, None, None


# autograd.Function's C++ apply bound to _GatedFunction (None where _norm found no such apply)
_apply_gated = _C_APPLY.__get__(None, _GatedFunction) if _apply_norm is not None else None


def gradients_as_graph(dy, x, gate, weight, eps, offset, size, before, sigmoid, cast_input, needs) -> tuple:
    """The gradients of x, gate and weight that ``needs`` asks for (None for the others) as a
    graph of the torch composition, for create_graph=True (also the C++ operator's node's)."""
    inputs = (x, gate, weight)
    with torch.enable_grad():
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = _composite(x, gate, weight, eps, offset, size, before, "sigmoid" if sigmoid else "silu",
                       "input" if cast_input else "float32", compute)
        grads = iter(torch.autograd.grad(y, [t for t, need in zip(inputs, needs) if need], dy, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _kernels_take(x: Tensor, gate: Optional[Tensor], weight: Optional[Tensor]) -> bool:
    # rows wider than the plain norms' kernel limit (65536) take the torch path, and with them
    # any group a program could not hold in registers
    return (_use_triton(x, x.device.type, weight, None) and (gate is None or gate.dtype in _KERNEL_DTYPES)
            and kernel_tensors(gate))


def gated_rms_norm(
    x: Tensor,
    gate: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    *,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
    activation: str = "silu",
    cast_mode: str = "input",
    offset: float = 0.0,
) -> Tensor:
    """Fused gated RMSNorm over the last dimension of ``x`` (module docstring for the maths),
    differentiable in x, gate and weight.

    Args:
        x: input of any leading shape, fp32 / fp16 / bf16 (fp64 runs on the torch path).
        gate: None (a plain, possibly grouped, RMSNorm) or a tensor of x's shape.
        weight: optional ``(hidden,)`` tensor; its dtype may differ from x's.
        eps: added to each group's mean square before the square root.
        group_size: normalise each run of ``group_size`` elements on its own (a divisor of
            the hidden size); None: the whole row.
        norm_before_gate: the gate multiplies the normalised row (True) or the input (False).
        activation: ``"silu"`` or ``"sigmoid"``, applied to the gate in fp32.
        cast_mode: ``"input"`` or ``"float32"`` (module docstring). The output has x's dtype,
            except with ``"input"`` and no gate after the norm: then it is promoted with the
            weight's, as ``w * n.to(x.dtype)`` is.
        offset: added to the weight (in fp32) before it multiplies: ``(1 + w)`` for a weight
            stored as a difference from one (Gemma's, Qwen4-Exp's grouped norms). Needs a weight.

    Autocast does not change it: the HF classes it replaces compute in the dtypes they choose.
    The Triton kernels run on CUDA tensors (``HF_RMSNORM_BACKEND=auto``), or on CPU tensors
    with ``HF_RMSNORM_BACKEND=triton TRITON_INTERPRET=1``; everything else uses
    :func:`gated_rms_norm_ref`: on the CPU the compiled kernel (float32 and bfloat16, built on
    first use as the plain RMSNorm's), else torch ops.
    """
    _check_inputs(x, gate, weight, eps, group_size, activation, cast_mode, offset)
    return dispatch(x, gate, weight, eps, group_size, norm_before_gate, activation, cast_mode, offset)


def _eager(args: tuple, unwrap: bool) -> Tensor:
    """The Triton path in Python: no autograd node where nothing needs a gradient, else as the
    plain norms: Function.apply's Python only unwraps the tensors a finished torch.func
    transform left behind (``unwrap``); without them its C++ apply is called directly."""
    if not needs_grad(*args[:3]):
        return _fwd_impl(*args)[0]
    return _GatedFunction.apply(*args, None) if unwrap else _apply_gated(*args, None)


def dispatch(x: Tensor, gate: Optional[Tensor], weight: Optional[Tensor], eps: float, group_size: Optional[int],
             norm_before_gate: bool, activation: str, cast_mode: str, offset: float = 0.0) -> Tensor:
    """``gated_rms_norm`` past its argument checks, for a caller that has made them
    (``FusedGatedRMSNorm``: about 5 µs of host time a call, as much as a small kernel takes)."""
    size = group_size or x.shape[-1]
    # (not under torch.onnx's TorchScript exporter, which records what runs: records_kernels False)
    if x.shape[-1] and _kernels_take(x, gate, weight) and (recording := records_kernels()) is not False:
        args = (x, gate, weight, float(eps), float(offset), size, norm_before_gate, activation == "sigmoid",
                cast_mode == "input")
        if recording:
            return _fwd_op(*args)[0]
        launchers = _launchers or _kernels()
        unwrap = _needs_function_apply(x, gate, weight)
        if (_cuda_launch.ENABLED and (x.is_cuda or _cuda_launch.cpu_stub) and not unwrap
                and _direct.plain_launches()):
            # as the plain norms (_norm._run_kernels): the C++ operator allocates, launches and
            # records the node where it has a plan for this kind of call; else the Python path,
            # and its launch's plan
            y, family = _cuda_launch.gated_forward(x, *args[1:])
            if y is not None:
                launchers.LAUNCHES["gated_fwd"] += 1  # counted as the Python path counts its launches
                return y
            if family is not None:
                y, record = _cuda_launch.recorded(launchers, _eager, args, unwrap)
                _cuda_launch.learn_gated_forward(family, record, x)
                return y
        return _eager(args, unwrap)
    if x.shape[-1] == 0:
        return x.new_empty(x.shape, dtype=output_dtype(x.dtype, gate, weight, norm_before_gate, cast_mode))
    if _autocasting(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return gated_rms_norm_ref(x, gate, weight, eps, group_size, norm_before_gate, activation, cast_mode, offset)
    return gated_rms_norm_ref(x, gate, weight, eps, group_size, norm_before_gate, activation, cast_mode, offset)
