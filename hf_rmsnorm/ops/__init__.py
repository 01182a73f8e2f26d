"""Functional, autograd-aware fused norms. ``HF_RMSNORM_BACKEND=auto|triton|torch`` picks
the implementation (see ``_norm.py``)."""

from .gated_rms_norm import gated_rms_norm, gated_rms_norm_ref
from .layer_norm import layer_norm, layer_norm_ref
from .rms_norm import rms_norm, rms_norm_ref

__all__ = ["rms_norm", "layer_norm", "gated_rms_norm", "rms_norm_ref", "layer_norm_ref", "gated_rms_norm_ref"]
