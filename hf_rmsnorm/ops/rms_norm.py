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

from ._norm import affine_torch, compute_dtype, normalize


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
    same_dtype = weight is None or weight.dtype == x.dtype
    if cast_mode == "float32" and bias is None and offset == 0.0 and same_dtype:
        # torch's own kernel computes exactly this (fp32 statistics and affine, one rounding)
        # and is the fastest path on the CPU.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if x.dtype == torch.float32 and all(p is None or p.dtype == torch.float32 for p in (weight, bias)):
        # all fp32: no rounding to order, so every cast mode is torch's kernel plus the bias
        # (the converted LayerNorms of an fp32 model take this path on the CPU)
        y = F.rms_norm(x, (x.shape[-1],), weight + offset if offset and weight is not None else weight, eps)
        return y + bias if bias is not None else y
    xc = x.to(compute_dtype(x))
    n = F.rms_norm(xc, (x.shape[-1],), None, eps)
    return affine_torch(n, x.dtype, weight, bias, offset, cast_mode)


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
