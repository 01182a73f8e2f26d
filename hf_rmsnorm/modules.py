"""``FusedRMSNorm`` and ``FusedLayerNorm``: drop-in nn.Modules on the fused kernels.

Their parameters are called ``weight`` and ``bias`` with shape ``normalized_shape``, like
``nn.LayerNorm`` and the HF norm classes, so state_dict keys and shapes are unchanged when one
replaces the other (and ``patch_model`` can hand them the very same ``nn.Parameter`` objects).
A module without parameters may take ``normalized_shape=None``: it normalises the last dim,
whatever its width, as the weightless HF norms do (Llama 4's q/k norm, NanoChat's).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .ops import gated_rms_norm, layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from .ops.gated_rms_norm import check_settings, dispatch, gated_rms_norm_ref
from .ops._module_calls import gated_settled, kernels_for_module, kernels_settled, settle, settle_gated
from .ops._norm import CAST_MODES, _any_autocast, selected_backend
from .ops.layer_norm import torch_layer_norm_computes
from .ops.rms_norm import _kernel_call_for_module, settle_on_cpu

_Shape = Union[int, Sequence[int]]


def _set_eps(module: nn.Module, value: float) -> None:
    module.eps = value


# ``eps`` under the name the HF RMSNorm classes keep it in, for code around the norm that reads
# it: the Mamba2-family mixers (Mamba2, Bamba, Zamba2, NemotronH, GraniteMoeHybrid, FalconH1)
# pass ``norm.weight`` and ``norm.variance_epsilon`` to their fused scan-and-norm in training
# rather than calling the norm. Shared by the RMS modules.
_VARIANCE_EPSILON = property(lambda module: module.eps, _set_eps, doc="``eps``, as the HF RMSNorm classes name it.")


class _FusedNorm(nn.Module):
    """Shared body: the last ``len(normalized_shape)`` dims are normalised as one row (the last
    dim, of any width, where ``normalized_shape`` is None)."""

    _fn = None  # the functional op, set by subclasses
    _ref = None  # its torch reference: what the op runs off CUDA
    _kernel = None  # a compiled CPU kernel's call for the CPU shortcut, or None where the reference decides
    _settle_kernel = None  # what the module keeps after ``_kernel`` served a call (``_settled``)
    _is_rms = None  # RMSNorm (True) or LayerNorm (False): the kernels' flag
    # what the last call on the kernels settled for the next ones (``_module_calls.settle`` on CUDA,
    # ``rms_norm.settle_on_cpu`` on the compiled CPU kernel), or None
    _settled = None

    def __init__(
        self,
        normalized_shape: Optional[_Shape],
        eps: float,
        elementwise_affine: bool,
        bias: bool,
        offset: float,
        cast_mode: str,
        follow_autocast: bool,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if normalized_shape is None:
            if elementwise_affine:
                raise ValueError(
                    "normalized_shape=None (the last dim, any width) is for a norm without parameters: "
                    "pass the weight's shape, or elementwise_affine=False."
                )
            shape = None
        else:
            shape = (normalized_shape,) if isinstance(normalized_shape, (int, float)) else tuple(normalized_shape)
            if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
                raise ValueError(f"normalized_shape must be a positive int or a tuple of them, or None, got {normalized_shape!r}.")
        if cast_mode not in CAST_MODES:
            raise ValueError(f"cast_mode must be one of {CAST_MODES}, got {cast_mode!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:  # NaN too
            raise ValueError(f"eps must be a non-negative number, got {eps!r}.")
        if offset and not elementwise_affine:
            raise ValueError("offset is added to the weight; it needs elementwise_affine=True.")
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = offset
        self.cast_mode = cast_mode
        self.follow_autocast = follow_autocast
        factory = {"device": device, "dtype": dtype}
        # both always registered parameters (None where absent), as nn.Linear's bias: the
        # forward reads them from _parameters (_affine)
        self.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if elementwise_affine else None)
        self.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if elementwise_affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            # identity at initialisation: (offset + w) == 1
            nn.init.constant_(self.weight, 1.0 - self.offset)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        settled = self._settled
        if settled is not None:
            # a call like the last one that the kernels took: straight to the C++ launch operator
            weight, bias = self._affine()
            y = kernels_settled(settled, x, weight, bias, self.eps, self.offset, self.cast_mode)
            if y is not None:
                return y
        if not x.is_cuda and (backend := selected_backend()) != "triton":
            # Off CUDA the op runs its torch reference anyway; go there directly. The op's
            # per-call checks cost as much as the arithmetic for a few tokens on a CPU, and this
            # module's own arguments were checked when it was built. Anything the shortcut
            # cannot take, or any error in it, goes the general way below, which says in its
            # own words what was wrong. (The cheap half of ``_use_triton``'s decision: calling
            # it here cost 1.3 -> 1.5x nn.LayerNorm at one token.)
            try:
                y = self._torch_forward(x, backend)
            except Exception:
                y = None
            if y is not None:
                return y
        shape = self.normalized_shape
        if shape is None:
            if not x.dim():
                raise ValueError(f"{type(self).__name__} normalises the last dim, but got a 0-dim input.")
            shape = x.shape[-1:]
        k = len(shape)
        if x.shape[x.dim() - k:] != shape:  # torch.Size compares equal to a tuple
            raise ValueError(
                f"{type(self).__name__} normalises the last dims {shape}, "
                f"but got an input of shape {tuple(x.shape)}."
            )
        weight, bias = self._affine()
        if k == 1:  # the usual case: called once per norm per step, so kept lean
            y = kernels_for_module(self._ref, x, weight, bias, self.eps, self.offset, self._is_rms, self.cast_mode)
            if y is not None:
                now = settle(self._ref, x, weight, bias, self._is_rms, self.cast_mode)
                if now != settled:
                    self._settled = now
                return y
            return self._fn(x, weight, bias, self.eps, self.offset, self.cast_mode,
                            follow_autocast=self.follow_autocast)
        lead = x.shape[: x.dim() - k]
        weight = weight.reshape(-1) if weight is not None else None
        bias = bias.reshape(-1) if bias is not None else None
        y = self._fn(
            x.reshape(*lead, math.prod(shape)), weight, bias, self.eps, self.offset, self.cast_mode,
            follow_autocast=self.follow_autocast,
        )
        return y.reshape(*lead, *shape)

    def _torch_forward(self, x: Tensor, backend: str):
        """This module's output by its torch reference, or None where only the general path
        applies (several normalised dims, non-float input, autocast, whose policy ``normalize``
        applies). ``backend``: ``selected_backend()``, asked once per call by ``forward``."""
        shape = self.normalized_shape
        if (len(shape) != 1 if shape is not None else not x.dim()) or not x.is_floating_point() or _any_autocast():
            return None
        weight, bias = self._affine()
        if weight is None and shape is not None and x.shape[-1:] != shape:
            # the general way's message: the torch ops and the kernel check x's width against
            # the weight's length, and a weightless module has none
            return None
        if self._kernel is not None and backend != "torch":
            y = self._kernel(x, weight, bias, self.eps, self.offset, self.cast_mode)
            if y is not None:
                self._settled = self._settle_kernel(x, weight, bias, self.cast_mode)
                return y
        return self._ref(x, weight, bias, self.eps, self.offset, self.cast_mode)

    def _affine(self):
        """(weight, bias), from ``_parameters`` where they are registered there (as ``__init__``
        registers them): ``self.weight`` goes through ``nn.Module.__getattr__``, 0.6 µs a read on
        the CI CPU, a tenth of a one-token norm's time. Anything else (a plain attribute set
        after a ``del``) by its name."""
        params = self._parameters
        return (params["weight"] if "weight" in params else self.weight,
                params["bias"] if "bias" in params else self.bias)

    def extra_repr(self) -> str:
        shape = self.normalized_shape
        shape = shape[0] if shape is not None and len(shape) == 1 else shape
        parts = [f"{shape}", f"eps={self.eps}", f"elementwise_affine={self.elementwise_affine}"]
        parts.append(f"bias={self.bias is not None}")
        if self.offset:
            parts.append(f"offset={self.offset}")
        parts.append(f"cast_mode={self.cast_mode}")
        if not self.follow_autocast:
            parts.append("follow_autocast=False")
        return ", ".join(parts)


class FusedRMSNorm(_FusedNorm):
    """RMSNorm on the fused kernels: ``y = x / sqrt(mean(x²) + eps) · (offset + weight) + bias``.

    Defaults match an HF Llama-style RMSNorm's parameters (weight, no bias). ``cast_mode`` and
    ``offset`` reproduce the HF flavours: ``cast_mode="input"`` for Llama's order of casts,
    ``offset=1.0, cast_mode="float32"`` for Gemma. ``bias=True`` gives the RMSNorm-with-bias
    that an exact LayerNorm conversion produces.
    """

    _fn = staticmethod(rms_norm)
    _ref = staticmethod(rms_norm_ref)
    _kernel = staticmethod(_kernel_call_for_module)
    _settle_kernel = staticmethod(settle_on_cpu)
    _is_rms = True

    def __init__(
        self,
        normalized_shape: Optional[_Shape],
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = False,
        *,
        offset: float = 0.0,
        cast_mode: str = "float32",
        follow_autocast: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, offset, cast_mode, follow_autocast, device, dtype)

    variance_epsilon = _VARIANCE_EPSILON


class FusedLayerNorm(_FusedNorm):
    """LayerNorm on the fused kernels, a drop-in for ``nn.LayerNorm`` (same arguments, same
    state_dict, same behaviour under autocast)."""

    _fn = staticmethod(layer_norm)
    _ref = staticmethod(layer_norm_ref)
    _is_rms = False

    def __init__(
        self,
        normalized_shape: Optional[_Shape],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        offset: float = 0.0,
        cast_mode: str = "float32",
        follow_autocast: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, offset, cast_mode, follow_autocast, device, dtype)

    def _torch_forward(self, x: Tensor, backend: str):
        w, b = self._affine()
        if self.follow_autocast and torch_layer_norm_computes(x, w, b, self.offset, self.cast_mode):
            # nn.LayerNorm's own op, autocast policy included: exactly what this module computes
            return torch.layer_norm(x, self.normalized_shape or x.shape[-1:], w, b, self.eps)
        return super()._torch_forward(x, backend)


class FusedGatedRMSNorm(nn.Module):
    """Gated RMSNorm on the fused kernels (``ops/gated_rms_norm.py`` for the maths): a drop-in
    for the gated norms of Mamba2 and its hybrids (``norm_before_gate=False``, groups of
    ``group_size``), Qwen3-Next / Qwen3.5 (``norm_before_gate=True``) and Kimi Linear
    (``activation="sigmoid", cast_mode="float32"``); without a gate, a grouped RMSNorm
    (Qwen4-Exp's hyper-connection norms: ``offset=1``, the weight stored as w - 1). Called as
    they are: ``forward(hidden_states, gate=None)``; its one parameter is ``weight``, of shape
    ``(hidden_size,)``, as theirs. Autocast does not change it, as it does not change them."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        group_size: Optional[int] = None,
        *,
        norm_before_gate: bool = False,
        activation: str = "silu",
        cast_mode: str = "input",
        offset: float = 0.0,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"FusedGatedRMSNorm: hidden_size must be a positive int, got {hidden_size!r}.")
        check_settings("FusedGatedRMSNorm", hidden_size, eps, group_size, activation, cast_mode, offset, elementwise_affine)
        self.hidden_size = hidden_size
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.activation = activation
        self.cast_mode = cast_mode
        self.offset = float(offset)
        # the identity at initialisation: offset + weight = 1 (ones; zeros under an offset of one)
        weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype)) \
            if elementwise_affine else None
        self.register_parameter("weight", weight)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    variance_epsilon = _VARIANCE_EPSILON
    # what the last call through the C++ launch operator settled for the next ones
    # (``_module_calls.settle_gated``), or None
    _settled = None

    def forward(self, hidden_states: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        weight = self._parameters["weight"] if "weight" in self._parameters else self.weight
        x = hidden_states
        settled = self._settled
        if settled is not None:
            # a call like the last one the operator took: straight to it
            y = gated_settled(settled, x, gate, weight, self.eps, self.offset, self._kernel_settings())
            if y is not None:
                return y
        if (
            isinstance(x, Tensor) and not x.is_cuda and selected_backend() != "triton" and not _any_autocast()
            and (gate is None or gate.shape == x.shape) and x.shape[-1:] == (self.hidden_size,)
        ):
            # Off CUDA the op runs its reference anyway (the compiled CPU kernel, or torch ops):
            # straight there (this module's settings were checked when it was built, the shapes
            # just now), as the other fused modules do: the checks below cost as much as a few
            # tokens' arithmetic
            return gated_rms_norm_ref(x, gate, weight, self.eps, self.group_size, self.norm_before_gate,
                                      self.activation, self.cast_mode, self.offset)
        if (
            isinstance(x, Tensor) and x.is_floating_point() and x.shape[-1:] == (self.hidden_size,)
            and (gate is None or (gate.shape == x.shape and gate.device == x.device and gate.is_floating_point()))
            and (weight is None or weight.device == x.device)
        ):
            # this module's settings were checked when it was built, its inputs just now: past
            # the op's per-call checks, which cost as much host time as a small call's kernels
            y = dispatch(x, gate, weight, self.eps, self.group_size, self.norm_before_gate, self.activation,
                         self.cast_mode, self.offset)
            if not torch.compiler.is_compiling():  # (a traced graph would hold the assignment)
                now = settle_gated(x, gate, weight, self._kernel_settings())
                if now != settled:
                    self._settled = now
            return y
        return gated_rms_norm(  # says what is wrong
            x, gate, weight, self.eps, group_size=self.group_size,
            norm_before_gate=self.norm_before_gate, activation=self.activation, cast_mode=self.cast_mode,
            offset=self.offset,
        )

    def _kernel_settings(self) -> tuple:
        """The settings a settled call was found for (eps and offset are passed with each call)."""
        return self.group_size, self.norm_before_gate, self.activation, self.cast_mode

    def extra_repr(self) -> str:
        parts = [f"{self.hidden_size}", f"eps={self.eps}"]
        if self.group_size is not None:
            parts.append(f"group_size={self.group_size}")
        parts += [f"norm_before_gate={self.norm_before_gate}", f"activation={self.activation}", f"cast_mode={self.cast_mode}"]
        if self.offset:
            parts.append(f"offset={self.offset:g}")
        if self.weight is None:
            parts.append("elementwise_affine=False")
        return ", ".join(parts)


# every module class patch_model puts in (what it recognises as patched already)
FUSED_MODULES = (_FusedNorm, FusedGatedRMSNorm)

__all__ = ["FusedRMSNorm", "FusedLayerNorm", "FusedGatedRMSNorm"]
