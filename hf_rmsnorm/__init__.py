"""hf_rmsnorm: fused RMSNorm / LayerNorm kernels for Hugging Face transformers models."""

from .modules import FusedLayerNorm, FusedRMSNorm

__version__ = "0.1.0"
__all__ = ["FusedRMSNorm", "FusedLayerNorm", "__version__"]
