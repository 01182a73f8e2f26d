"""LayerNorm: y = (x − mean(x)) / sqrt(var(x) + eps) · (offset + weight) + bias, over the last
dimension.

Read top to bottom: the torch reference (also the CPU path and the fallback), then the public
function. The Triton kernels it shares with RMSNorm live in ``_triton_norm.py`` (one
``IS_RMS`` flag apart), the custom ops and autograd in ``_norm.py``.

Reference: Ba, Kiros & Hinton, "Layer Normalization", 2016.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ._norm import _tracing_state, affine_torch, cast, compute_dtype, normalize


def torch_layer_norm_computes(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], offset: float,
                              cast_mode: str) -> bool:
    """Whether torch's own ``layer_norm`` computes exactly this call (torch's casting, no
    offset, the parameters in x's dtype)."""
    return (
        cast_mode == "float32" and offset == 0.0
        and (weight is None or weight.dtype == x.dtype) and (bias is None or bias.dtype == x.dtype)
    )


def layer_norm_ref(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    offset: float = 0.0,
    cast_mode: str = "float32",
) -> Tensor:
    """Plain-torch LayerNorm with the kernels' semantics (see ``rms_norm_ref`` for the cast
    modes); ``cast_mode="float32"`` with ``offset=0`` is exactly ``F.layer_norm``."""
    # The width as a constant while torch.jit.trace records: torch.onnx's TorchScript exporter
    # needs layer_norm's shape constant, and a recorded x.shape[-1] is not where other dims vary
    shape = (x.shape[-1],) if _tracing_state() is None else (int(x.shape[-1]),)
    if torch_layer_norm_computes(x, weight, bias, offset, cast_mode):
        # torch's kernel, fastest on the CPU. Not for fp32 parameters with half inputs: its
        # mixed-dtype CPU backward loses precision there (caught by tests/test_ops.py).
        return F.layer_norm(x, shape, weight, bias, eps)
    xc = cast(x, compute_dtype(x))
    n = F.layer_norm(xc, shape, None, None, eps)
    return affine_torch(n, x.dtype, weight, bias, offset, cast_mode)


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    offset: float = 0.0,
    cast_mode: str = "float32",
    *,
    follow_autocast: bool = True,
) -> Tensor:
    """Fused LayerNorm over the last dimension of ``x``, differentiable in x, weight and bias.

    Same arguments and backends as :func:`hf_rmsnorm.ops.rms_norm`; with the defaults it
    computes what ``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`` computes, under
    autocast too.
    """
    return normalize(
        "layer_norm", layer_norm_ref, x, weight, bias, eps, offset,
        is_rms=False, cast_mode=cast_mode, follow_autocast=follow_autocast,
    )
