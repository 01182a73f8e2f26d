"""RMSNorm: y = x / sqrt(mean(x²) + eps) · (offset + weight) + bias, over the last dimension.

Read top to bottom: the torch reference (also the CPU path and the fallback), then the public
function. The Triton kernels it shares with LayerNorm live in ``_triton_norm.py`` (one
``IS_RMS`` flag apart), the custom ops and autograd in ``_norm.py``.

Reference: Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu_kernel
from ._norm import (
    _PLAIN_TENSORS, ROUNDING, _tracing_state, affine_torch, backward_by_autograd, cast, compute_dtype, exporting, hand_written_ok,
    needs_grad, normalize, output_dtype, plain_tensors,
    rounding_dtype, torchscript_onnx_export, transforms_active, wanted_gradients_as_graph, weight_plus_offset,
)


def rms_norm_ref(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_mode: str = "float32",
) -> Tensor:
    """Plain-torch RMSNorm with the kernels' semantics: statistics in fp32 (fp64 for fp64
    input), then the affine in the same precision, rounded once to the output dtype.

    ``cast_mode="float32"``: everything in fp32, cast to x's dtype at the end (torch's
    ``F.rms_norm``, Gemma). ``cast_mode="input"``: normalise in fp32, cast to x's dtype, then
    multiply by the weight in the promoted dtype (Llama). ``cast_mode="weight"``: the same but
    cast to the weight's dtype (T5).
    """
    if x.is_cpu and hand_written_ok(x, weight, bias):
        compiled = _compiled_kernel(x, weight, bias, cast_mode)
        if compiled is not None:
            op, flags = compiled  # with its own autograd node, in C++
            return op(x, weight, bias, eps, offset, flags, cast_mode)
        # Not while torch.jit.trace records: its trace holds an autograd.Function's forward ops
        # without its backward, and replays work done in place or with out= under autograd
        # when later called with gradients (which fails), whatever the traced call needed
        if _tracing_state() is None:
            if needs_grad(x, weight, bias):
                return _RMSNormCPU.apply(x, weight, bias, eps, offset, cast_mode)
            return affine_torch(_normalized(x, eps)[0], x.dtype, weight, bias, offset, cast_mode, overwrite=True)
    return _rms_norm_composite(x, weight, bias, eps, offset, cast_mode)


def _rms_norm_composite(x, weight, bias, eps, offset, cast_mode):
    # Off the CPU (CUDA without Triton, float64, rows beyond the kernels' limit) torch's own
    # rms_norm is one fused kernel: use it for the statistics and let autograd differentiate.
    # Also what second derivatives are taken of, on every path (backward_by_autograd).
    same_dtype = weight is None or weight.dtype == x.dtype
    if cast_mode == "float32" and bias is None and offset == 0.0 and same_dtype:
        # torch's kernel computes exactly this (fp32 statistics and affine, one rounding)
        return _torch_rms_norm(x, weight, eps)
    if x.dtype == torch.float32 and all(p is None or p.dtype == torch.float32 for p in (weight, bias)):
        # all fp32: no rounding to order, so every cast mode is torch's kernel plus the bias
        y = _torch_rms_norm(x, weight + offset if offset and weight is not None else weight, eps)
        return y + bias if bias is not None else y
    xc = x.to(compute_dtype(x))
    n = _torch_rms_norm(xc, None, eps)
    return affine_torch(n, x.dtype, weight, bias, offset, cast_mode)


def _torch_rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """``F.rms_norm`` over the last dim (x and weight of one dtype, or no weight): torch's own,
    except for an eager tensor subclass, which gets the same arithmetic out of place (fp32
    statistics and affine, one rounding). torch's composition adds eps in place, and DTensor
    refuses that where tensor parallelism shards the normalised dim (the mean is then a partial
    sum to reduce). Under torch.compile and torch.export, torch's own: tracing tensors are
    subclasses too (is_compiling first: torch 2.6's dynamo cannot trace the type test). The same
    arithmetic for torch.onnx's TorchScript exporter, which has no ``aten::rms_norm`` (its opsets
    stop at 20; ONNX's RMSNormalization is opset 23)."""
    if torch.compiler.is_compiling() or exporting() or (plain_tensors(x, weight) and not torchscript_onnx_export()):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xc = x.to(compute_dtype(x))
    # the mean as a sum over N: a sharded sum reduces with SUM, which every backend has
    # (torch 2.6's DTensor reduces a sharded mean with AVG, which gloo lacks)
    y = xc * torch.rsqrt(xc.pow(2).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return (y if weight is None else y * weight.to(xc.dtype)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The CPU path. torch has no fused RMSNorm kernel for the CPU: F.rms_norm there is a chain of
# elementwise ops (an fp32 copy, square, mean, rsqrt, products), and autograd differentiates
# each. Below, the sum of squares is one vector_norm pass and the backward is the closed form
# in a few passes, saving only x and rstd. Measured on the CI CPU (scripts/benchmark_cpu.py,
# benchmarks/results/cpu/): 1.2–2.3× faster than HF's eager RMSNorm modules in training from
# 128 tokens up, and faster in inference.
# --------------------------------------------------------------------------------------------


def _compiled_kernel(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], cast_mode: str):
    """(operator, flags) where the compiled CPU kernel computes this call
    (``_cpu_kernel``), else None: float32/bfloat16 tensors, at least one row, contiguous CPU
    parameters of the row's length; not while torch.compile traces (the operator has no
    meta kernel to trace with); not with ``HF_RMSNORM_BACKEND=torch`` (torch ops only); not where
    the kernel could not be built. Called on every CPU call: the dtype logic is worked out once
    per signature."""
    flags = _flags_of(x, weight, bias, cast_mode)
    # is_compiling first: torch 2.6's dynamo cannot trace the frozenset test (it breaks the graph)
    if torch.compiler.is_compiling() or flags is None or type(x) not in _PLAIN_TENSORS or not x.numel():
        return None
    n = x.shape[-1]
    for p in (weight, bias):
        # the kernel reads n values of each from CPU memory: anything else (another device, the
        # meta device, whose data_ptr is 0) is the torch path's to refuse with a clear error
        if p is not None and (type(p) not in _PLAIN_TENSORS or not p.is_cpu or p.shape != (n,) or not p.is_contiguous()):
            return None
    op = _cpu_kernel.op_unless_torch_ops()
    return None if op is None else (op, flags)


def _flags_of(x, weight, bias, cast_mode):
    """``_kernel_flags`` of this call's dtypes, worked out once per signature."""
    key = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype, cast_mode)
    flags = _KERNEL_FLAGS.get(key, _UNSEEN)
    if flags is _UNSEEN:
        flags = _KERNEL_FLAGS[key] = _kernel_flags(x.dtype, weight, bias, cast_mode)
    return flags


def _kernel_flags(x_dtype, weight, bias, cast_mode):
    """The kernel's flags for these dtypes, or None where it has no such dtypes."""
    rounding = ROUNDING[cast_mode]
    round_to = rounding_dtype(rounding, x_dtype, weight) if rounding else torch.float32
    out_dtype = output_dtype(x_dtype, weight, bias, cast_mode)
    dtypes = (x_dtype, round_to, out_dtype, *(p.dtype for p in (weight, bias) if p is not None))
    if not all(d in _cpu_kernel.DTYPES for d in dtypes):
        return None
    w_dtype, b_dtype = (None if p is None else p.dtype for p in (weight, bias))
    return _cpu_kernel.dtype_flags(x_dtype, w_dtype, b_dtype, out_dtype, round_to == torch.bfloat16)


def _kernel_call_for_module(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, offset: float,
                            cast_mode: str) -> Optional[Tensor]:
    """``FusedRMSNorm``'s CPU shortcut (the module asks only with ``HF_RMSNORM_BACKEND`` other
    than ``torch``): the compiled kernel's output, or None where ``rms_norm_ref`` must decide.

    The same call ``rms_norm_ref`` makes, with fewer questions asked in Python first: at one
    token the checks cost as much as the kernel. The parameters' device, length and contiguity
    (and x's being non-empty) are left to the operator, which checks them on every call
    (``_cpu_rms_norm_op.cpp``) and raises where they do not hold; the module then goes its
    general way, which checks them all and says what was wrong or runs torch ops. Not for
    torch.onnx.export's TorchScript exporter, which records what runs (ONNX has no operator for
    the kernel's): ``rms_norm_ref`` gives it the composition."""
    if not x.is_cpu or torch.compiler.is_compiling() or transforms_active() or torchscript_onnx_export():
        return None
    flags = _flags_of(x, weight, bias, cast_mode)
    if (flags is None or type(x) not in _PLAIN_TENSORS or (weight is not None and type(weight) not in _PLAIN_TENSORS)
            or (bias is not None and type(bias) not in _PLAIN_TENSORS)):
        return None
    op = _cpu_kernel.op()
    return None if op is None else op(x, weight, bias, eps, offset, flags, cast_mode)


def settle_on_cpu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], cast_mode: str) -> Optional[tuple]:
    """What a ``FusedRMSNorm`` keeps after ``_kernel_call_for_module`` ran its call, so that its
    next calls of the same kind go to the kernel in one C++ call (``_module_calls.kernels_settled``, then
    ``_cpu_kernel.settled_op``, which asks everything this module's shortcut asks in Python and
    returns None where any of it differs): (the kind's id, this load's token, the cast mode), as
    ``_module_calls.settle`` keeps for the CUDA operator. None where the kernel has no such kind, and
    while torch.jit.trace records (which would see x's width as a tensor)."""
    flags = _flags_of(x, weight, bias, cast_mode)
    if flags is None or _cpu_kernel.op() is None or _tracing_state() is not None:
        return None
    kind = _cpu_kernel.settle(flags, cast_mode, x.shape[-1], weight is not None, bias is not None)
    return kind, _cpu_kernel.settled_token, cast_mode


# (x dtype, weight dtype, bias dtype, cast_mode) -> _kernel_flags's answer
_KERNEL_FLAGS: dict = {}
_UNSEEN = object()


# (eps, dtype) -> eps as a 0-dim CPU tensor, for the addcmul in _normalized
_EPS: dict = {}


def _normalized(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x / sqrt(mean(x²) + eps), 1 / sqrt(mean(x²) + eps)), both in the compute dtype.

    The first is a new tensor that the caller may overwrite."""
    xc = cast(x, compute_dtype(x))  # converted once, for the norm and for the product (_scaled)
    norm = torch.linalg.vector_norm(xc, dim=-1, keepdim=True)
    c = xc.dtype
    # eps + norm²/N in one op: at one token each op on the (M, 1) statistics costs as much
    # as the arithmetic on the row, so four small ops are the difference to HF's module
    if torch.compiler.is_compiling() or type(norm) is not Tensor:
        # Tracing (dynamo would record the store into _EPS as a side effect of the traced
        # function, which it refuses inside the autograd.Function's forward), fake tensors and
        # other subclasses: a fresh one of their kind, never cached
        eps_t = torch.tensor(eps, dtype=c)
    else:
        eps_t = _EPS.get((eps, c))
        if eps_t is None:
            eps_t = _EPS[(eps, c)] = torch.tensor(eps, dtype=c)
    rstd = torch.addcmul(eps_t, norm, norm, value=1.0 / max(x.shape[-1], 1)).rsqrt_()
    return _scaled(x, rstd, xc), rstd


def _scaled(x: Tensor, rstd: Tensor, xc: Optional[Tensor] = None) -> Tensor:
    """x · rstd in rstd's dtype, as a new tensor the caller may overwrite (``xc``: x already
    converted to that dtype). x is converted first: torch's CPU ops on mixed dtypes
    (bf16 · fp32) take a slow, unvectorised loop, 1.7× the time of the same op on two fp32
    tensors."""
    xc = cast(x, rstd.dtype) if xc is None else xc
    return xc * rstd if xc is x else xc.mul_(rstd)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm with a hand-written backward: with n = x·rstd and g = dy·(offset + w),
    dx = rstd · (g − n · mean(g·n)), dw = Σ_rows dy·round(n), db = Σ_rows dy."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, offset, cast_mode):
        ctx.eps, ctx.offset, ctx.cast_mode = eps, offset, cast_mode
        n, rstd = _normalized(x, eps)
        ctx.save_for_backward(x, weight, bias, rstd)
        return affine_torch(n, x.dtype, weight, bias, offset, cast_mode, overwrite=True)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the closed form below is not differentiable
            grads = backward_by_autograd(
                _rms_norm_composite, dy, (x, weight, bias), (need_x, need_w, need_b), ctx.eps, ctx.offset, ctx.cast_mode
            )
            return (*grads, None, None, None)
        lead = tuple(range(x.dim() - 1))  # the dims summed over for the parameter gradients

        def param_grad(t, dtype):
            # sum over the leading dims; a 1-D x has none (sum(()) would sum everything), and
            # then t itself is a buffer the steps below overwrite
            return cast(t.sum(lead) if lead else t.clone(), dtype)

        c = rstd.dtype
        # Every activation-sized temporary is written in place where it is ours to overwrite
        # (see affine_torch's ``overwrite``): fewer allocations, fewer page faults on the CPU.
        dyc = cast(dy, c)
        own_dyc = dyc is not dy
        n = _scaled(x, rstd)  # recomputed: cheaper than saving a copy
        scratch = torch.empty_like(n)
        dx = dw = db = dyn = None
        if need_b:
            db = param_grad(dyc, bias.dtype)
        if need_w:
            rounded = ROUNDING[ctx.cast_mode]
            # the weight multiplied the row as rounded in the forward
            nr = cast(cast(n, rounding_dtype(rounded, x.dtype, weight)), c) if rounded else n
            dyn = torch.mul(dyc, nr, out=scratch)
            dw = param_grad(dyn, weight.dtype)
        if need_x:
            w = weight_plus_offset(weight, c, ctx.offset) if weight is not None else None
            g = dyc if w is None else dyc.mul_(w) if own_dyc else torch.mul(dyc, w)
            if w is not None and dyn is not None and nr is n:
                # Σ g·n over a row is Σ dy·n·w: the weight gradient's product dy·n, already
                # formed, times w. One matrix-vector read instead of forming g·n and summing it
                # (2048×768 fp32, one thread, steady allocator: forward+backward ≈ −10 %). g
                # keeps a buffer of its own rather than taking scratch's: with glibc's default
                # allocator that reuse made every other process trim and page-fault 17 MB a
                # call (2× slower).
                row_gn = torch.matmul(dyn, w).unsqueeze_(-1)
            else:
                row_gn = torch.mul(g, n, out=scratch).sum(-1, keepdim=True)
            mean_gn = row_gn.div_(-max(x.shape[-1], 1))
            dx = torch.addcmul(g, n, mean_gn, out=g if g is not dy else scratch).mul_(rstd)
            dx = cast(dx, x.dtype)
        return dx, dw, db, None, None, None


def graph_backward(grad, x, weight, bias, eps, offset, cast_mode, needs):
    """The compiled kernel's gradients as a graph, for ``create_graph=True`` (its backward is
    not differentiable): the gradients ``needs`` asks for (bits 1, 2, 4: x, weight, bias), in
    that order. Registered as the operator ``rms_norm_graph_backward`` beside the kernel's, which
    calls it from C++."""
    return wanted_gradients_as_graph(_rms_norm_composite, grad, x, weight, bias, eps, offset, cast_mode, needs)


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_mode: str = "float32",
    *,
    follow_autocast: bool = True,
) -> Tensor:
    """Fused RMSNorm over the last dimension of ``x``, differentiable in x, weight and bias.

    Args:
        x: input of any leading shape, fp32 / fp16 / bf16 (fp64 runs on the torch path).
        weight, bias: optional ``(hidden,)`` tensors; their dtype may differ from x's.
        eps: added to the mean square before the square root.
        offset: added to the weight, in fp32 (``offset=1.0`` is Gemma's ``1 + w``).
        cast_mode: ``"float32"`` (all fp32, output in x's dtype, like ``F.rms_norm``),
            ``"input"`` (Llama: round the normalised row to x's dtype, then the affine; the
            output dtype is promoted with the weight's) or ``"weight"`` (T5: round to the
            weight's dtype; the output has the weight's dtype).
        follow_autocast: under ``torch.autocast``, do what torch's ``rms_norm`` does there
            (asked of torch once: unchanged on the CPU, and on CUDA before torch lists it
            among the float32 ops). Modules replacing code that autocast leaves alone
            (HF's RMSNorm classes) pass ``False``.

    The Triton kernels run on CUDA tensors (``HF_RMSNORM_BACKEND=auto``), or on CPU tensors
    with ``HF_RMSNORM_BACKEND=triton TRITON_INTERPRET=1``; everything else uses
    :func:`rms_norm_ref`.
    """
    return normalize(
        "rms_norm", rms_norm_ref, x, weight, bias, eps, offset,
        is_rms=True, cast_mode=cast_mode, follow_autocast=follow_autocast,
    )
