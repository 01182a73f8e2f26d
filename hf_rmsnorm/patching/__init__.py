"""Walk a model, find its norms, swap them for fused modules; report and undo."""

from .patch import patch_model, unpatch_model
from .report import PatchReport

__all__ = ["patch_model", "unpatch_model", "PatchReport"]
