"""hf_rmsnorm: fused RMSNorm / LayerNorm kernels for Hugging Face transformers models, and
exact LayerNorm -> RMSNorm conversion of pre-LN models."""

__version__ = "0.1.0"

from .checkpoint import convert_checkpoint, from_pretrained, save_pretrained  # noqa: E402
from .modules import FusedGatedRMSNorm, FusedLayerNorm, FusedRMSNorm  # noqa: E402
from .patching import PatchReport, patch_model, unpatch_model  # noqa: E402

__all__ = [
    "patch_model",
    "unpatch_model",
    "PatchReport",
    "FusedRMSNorm",
    "FusedLayerNorm",
    "FusedGatedRMSNorm",
    "convert_checkpoint",
    "from_pretrained",
    "save_pretrained",
    "__version__",
]
