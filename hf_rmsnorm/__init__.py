"""hf_rmsnorm: fused RMSNorm / LayerNorm kernels for Hugging Face transformers models."""

from .modules import FusedLayerNorm, FusedRMSNorm
from .patching import PatchReport, patch_model, unpatch_model

__version__ = "0.1.0"
__all__ = ["patch_model", "unpatch_model", "PatchReport", "FusedRMSNorm", "FusedLayerNorm", "__version__"]
