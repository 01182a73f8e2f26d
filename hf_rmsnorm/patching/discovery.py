"""Find normalization modules in any model and work out, by probing, which fused module
computes the same function.

Nothing here is keyed on model names. A module is *norm-like* when its class says so
(``nn.LayerNorm``, ``nn.RMSNorm``, or "Norm" in the class name). Its semantics are then
*measured*: a randomised copy of it is run on probe tensors and every fused candidate (LayerNorm
or RMSNorm; each HF order of casts; Gemma's ``1 + w``; each plausible eps) is run on the same
tensors with the same parameters. The candidate that reproduces the output (dtype included)
best, within the dtype's tolerance, is chosen; if none does, the module is left alone and the
reason is reported. Results are cached per class and parameter signature.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..modules import FusedLayerNorm, FusedRMSNorm, _FusedNorm
from ..ops._norm import CAST_MODES

# Attributes HF and torch norm classes keep their epsilon in.
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "layer_norm_epsilon")
# Tried, and told apart by a small-magnitude probe, when a class keeps eps nowhere (OLMo).
_COMMON_EPS = (1e-5, 1e-6, 1e-12, 1e-8)
# Max |candidate - original| / max |original| accepted per output dtype: about two ulps.
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
# Ops that CUDA autocast runs in float32: a norm that hands them a half-precision tensor
# changes under autocast (nn.LayerNorm); one that upcasts first does not (HF's RMSNorms).
_AUTOCAST_FP32_OPS = {"layer_norm", "rms_norm", "group_norm", "pow", "rsqrt", "reciprocal", "exp", "log", "sum"}


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """What a fused module needs to compute what the original computes."""

    kind: str  # "layer" or "rms"
    eps: float
    cast_mode: str
    offset: float
    follow_autocast: bool

    def describe(self) -> str:
        name = "LayerNorm" if self.kind == "layer" else "RMSNorm"
        extra = f", offset={self.offset:g}" if self.offset else ""
        autocast = "follows autocast" if self.follow_autocast else "ignores autocast"
        return f"{name}(eps={self.eps:g}, cast_mode={self.cast_mode}{extra}, {autocast})"


@dataclasses.dataclass
class Match:
    spec: Optional[NormSpec]
    error: Optional[float]  # max relative error of the chosen candidate on the probes
    reason: str


def _named_norm(module: nn.Module, model_name: str) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, _FusedNorm)):
        return True
    if type(module).__module__.startswith("torch.nn.utils.parametriz"):
        return False  # weight normalisation (a conv's parametrization): it normalises weights, not activations
    name = type(module).__name__
    if model_name and name.startswith(model_name):
        name = name[len(model_name):]
    # a class that names itself for the norm it lacks (wav2vec2's NoLayerNormConvLayer,
    # MobileBERT's NoNorm: an elementwise affine) is none
    return "norm" in name.lower().replace("nolayernorm", "").replace("nonorm", "")


def is_norm_like(module: nn.Module, model_name: str = "") -> bool:
    """A norm by its class: ``nn.LayerNorm``, ``nn.RMSNorm`` or "Norm" in the class name, less
    ``model_name``, the prefix a model's classes carry (``model_name_of``: every block of
    RoBERTa-PreLayerNorm has "Norm" in its class name). A block named for the norms it holds
    (wav2vec2's LayerNormConvLayer, HuBERT's EncoderStableLayerNorm) is not one: its norms are
    found in turn."""
    if not _named_norm(module, model_name):
        return False
    return not any(_named_norm(m, model_name) for m in module.modules() if m is not module)


def model_name_of(model: nn.Module) -> str:
    """The name transformers prefixes a model's classes with: its config class's, less "Config"
    (``RobertaPreLayerNormConfig`` -> ``RobertaPreLayerNorm``); "" for anything else."""
    name = type(getattr(model, "config", None)).__name__
    return name[: -len("Config")] if name.endswith("Config") and len(name) > len("Config") else ""


def _param_signature(module: nn.Module):
    """(normalized_shape, has_weight, has_bias) or a reason why this is no LayerNorm/RMSNorm.
    The shape is None for a module with neither parameters nor ``normalized_shape``: a norm of
    that kind normalises the last dim whatever its width, and is probed at several widths."""
    if any(True for _ in module.children()):
        return "has submodules: a composite block, not a single norm"
    if any(True for _ in module.buffers()):
        return "has buffers (e.g. running statistics): not a LayerNorm/RMSNorm"
    params = dict(module.named_parameters(recurse=False))
    extra = sorted(set(params) - {"weight", "bias"})
    if extra:
        return f"has parameters other than weight/bias: {extra}"
    shapes = {tuple(p.shape) for p in params.values()}
    if len(shapes) > 1:
        return f"weight and bias shapes differ: {sorted(shapes)}"
    if shapes:
        shape = shapes.pop()
    else:
        shape = getattr(module, "normalized_shape", None)
        shape = (shape,) if isinstance(shape, int) else tuple(shape) if shape else None
        if shape is None:
            return None, False, False
    if not shape or math.prod(shape) == 0:
        return f"empty normalized shape {shape}"
    if "bias" in params and "weight" not in params:
        return "has a bias but no weight: no fused equivalent"
    for name, p in params.items():
        if not p.is_floating_point():
            return f"{name} is {p.dtype} (quantized?)"
    return shape, "weight" in params, "bias" in params


def _eps_candidates(module: nn.Module) -> tuple[float, ...]:
    found = []
    for attr in _EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            found.append(float(value))
    return tuple(dict.fromkeys(found)) or _COMMON_EPS


def _specs(module, has_weight, follow_autocast):
    for eps in _eps_candidates(module):
        for kind in ("layer", "rms"):
            for cast_mode in CAST_MODES:
                if cast_mode != "float32" and not has_weight:
                    continue
                for offset in (0.0, 1.0) if has_weight else (0.0,):
                    yield NormSpec(kind, eps, cast_mode, offset, follow_autocast)


def build_fused(spec: NormSpec, module: nn.Module, shape: tuple) -> _FusedNorm:
    """A fused module for ``spec`` holding the very same Parameter objects as ``module``, and
    behind the same accelerate hook if ``module`` has one. A model dispatched with a
    ``device_map`` has one on every module with weights: it moves the module's inputs to the
    module's device, which matters where a norm sits on another device than the layer before
    it (a final norm on a device boundary), in the model and in its float64 copy alike."""
    cls = FusedLayerNorm if spec.kind == "layer" else FusedRMSNorm
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    weight = weight if isinstance(weight, nn.Parameter) else None
    bias = bias if isinstance(bias, nn.Parameter) else None
    new = cls(
        shape, eps=spec.eps, elementwise_affine=weight is not None, bias=bias is not None,
        offset=spec.offset, cast_mode=spec.cast_mode, follow_autocast=spec.follow_autocast, device="meta",
    )
    if weight is not None:
        new.weight = weight
    if bias is not None:
        new.bias = bias
    hook = module.__dict__.get("_hf_hook")
    if hook is not None:
        _attach_without_init(new, hook)
    return new


def _attach_without_init(module: nn.Module, hook) -> None:
    """``accelerate.hooks.add_hook_to_module`` without the hook's ``init_hook``: the fused module
    holds the original's parameters, which that hook placed already, and placing them again
    would, on a GPU, run ``gc.collect()`` and empty the CUDA cache once per parameter (accelerate's
    ``set_module_tensor_to_device``): ≈ 0.1-0.2 s each with a model loaded, several per norm
    while patching probes and converts."""
    from accelerate.hooks import add_hook_to_module  # only a dispatched model has such a hook

    hook.init_hook = lambda m: m  # an instance attribute, shadowing the method for this call only
    try:
        add_hook_to_module(module, hook)
    finally:
        del hook.init_hook


class _OpRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.half_inputs_to_fp32_ops = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _AUTOCAST_FP32_OPS:
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.dtype in (torch.float16, torch.bfloat16):
                self.half_inputs_to_fp32_ops = True
        return func(*args, **(kwargs or {}))


def _follows_autocast(module: nn.Module, x: torch.Tensor) -> bool:
    """Would CUDA autocast change this module's maths? True when it feeds a half-precision
    tensor to an op autocast runs in float32 (nn.LayerNorm does; HF RMSNorms upcast first)."""
    recorder = _OpRecorder()
    # a bf16 copy, so that modules whose parameters must match the input dtype run too
    half = copy.deepcopy(module).to(torch.bfloat16)
    with torch.no_grad(), recorder:
        half(x.to(torch.bfloat16))
    return recorder.half_inputs_to_fp32_ops


# The widths a norm without parameters or normalized_shape is probed at: a function of the
# last dim alone must match at each (one that only works at one width is no such norm).
_ANY_WIDTH = ((64,), (24,))


def probe_shapes(shape) -> tuple:
    """The normalized shapes to probe a norm of this signature shape at."""
    return _ANY_WIDTH if shape is None else (shape,)


def _probes(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 5, *shape, generator=g)
    probes = [base * 2 + 0.7, (base + 0.3) * 1e-3]  # a non-zero mean; a tiny scale where eps matters
    out = [p.to(device=device, dtype=dtype) for p in probes]
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32  # mixed precision
    out.append(probes[0].to(device=device, dtype=other))
    return out


def _randomised(module: nn.Module) -> nn.Module:
    """A copy with random parameters, so that no candidate matches by accident of the
    current values (all-ones weights would hide Gemma's 1 + w)."""
    probe = copy.deepcopy(module)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in probe.named_parameters(recurse=False):
            centre = 1.0 if name == "weight" else 0.0
            p.copy_((torch.randn(p.shape, generator=g) * 0.3 + centre).to(p.dtype))
    return probe


def _rel_err(got: torch.Tensor, want: torch.Tensor, centre: bool = False) -> float:
    """max |got - want| / max |want|, in float64; ``centre`` first removes each row's mean."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if centre:
        got, want = got - got.mean(-1, keepdim=True), want - want.mean(-1, keepdim=True)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _float64_twin(module: nn.Module) -> Optional[nn.Module]:
    """A float64 copy of a (probe) module, to compute the exact value of its function."""
    try:
        return copy.deepcopy(module).double()
    except Exception:  # noqa: BLE001 - nothing to compare with; the plain rule applies
        return None


def _float64_output(twin: Optional[nn.Module], x: torch.Tensor) -> Optional[torch.Tensor]:
    if twin is None:
        return None
    try:
        out = twin(x.double())
    except Exception:  # noqa: BLE001 - a module that hard-codes a dtype
        return None
    return out if isinstance(out, torch.Tensor) and out.dtype == torch.float64 else None


def _agreement(got: torch.Tensor, want: torch.Tensor, truth: Optional[torch.Tensor]) -> float:
    """The candidate's error against the module's output (inf: not the same function). The
    same function is within about two ulps of the output's dtype of the module's output or,
    where the module computes in a lower precision than it returns (ImageGPT's RMSNorm given
    bf16 activations and fp32 weights normalises in bf16, then returns fp32), no further from
    the float64 value of the module's function than twice the module's own error plus those
    ulps: the rule STYLE.md sets for the kernels."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return math.inf
    err = _rel_err(got, want)
    tolerance = _TOLERANCE.get(want.dtype, 1e-5)
    if err <= tolerance:
        return err
    if truth is not None and truth.shape == want.shape and _rel_err(got, truth) <= 2 * _rel_err(want, truth) + tolerance:
        return err
    return math.inf


def _not_a_last_dim_norm(module: nn.Module) -> Optional[str]:
    """Why ``module`` is no function of one tensor normalised over its last dim, where its
    class or forward says so before any probe does."""
    if isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return f"{type(module).__name__} normalises over channels (dim 1) and space, not the last dim: no fused equivalent"
    if getattr(module, "data_format", None) == "channels_first":
        return "normalises over channels first (data_format='channels_first'), not the last dim: no fused equivalent"
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    # every input a caller may pass counts, optional ones too: Mamba2's gated norm is called
    # as norm(x, gate) though its gate defaults to None, and the fused modules take one tensor
    inputs = [_shown(p) for p in params]
    if len(inputs) > 1:
        return (f"its forward takes {len(inputs)} inputs ({', '.join(inputs)}): a gated or conditioned norm; "
                "the fused kernels normalise one tensor")
    return None


def _shown(p: inspect.Parameter) -> str:
    stars = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    return stars + p.name + ("" if p.default is p.empty else f"={p.default!r}")


def match_norm(module: nn.Module, autocast_dtype: Optional[torch.dtype] = None) -> Match:
    """Probe ``module`` and return the fused spec that computes the same function, or why not.

    With ``autocast_dtype``, every probe also runs under ``torch.autocast`` of the module's
    device, and a candidate must match there too (what it proves depends on the device: on
    the CPU torch's autocast leaves norms alone; on CUDA it runs LayerNorm in float32)."""
    sig = _param_signature(module)
    if isinstance(sig, str):
        return Match(None, None, sig)
    unlike = _not_a_last_dim_norm(module)
    if unlike:
        return Match(None, None, unlike)
    shape, has_weight, has_bias = sig
    params = list(module.parameters(recurse=False))
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        return Match(None, None, "parameters are on the meta device")
    probe_module = _randomised(module)
    shapes = probe_shapes(shape)
    try:
        follow = _follows_autocast(probe_module, _probes(shapes[0], dtype, device)[0])
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot vouch for it
        return Match(None, None, f"raised on a probe input of shape (3, 5, {', '.join(map(str, shapes[0]))}): {type(exc).__name__}: {exc}")

    references = []
    twin = _float64_twin(probe_module)
    with torch.no_grad():
        for amp in (None, autocast_dtype) if autocast_dtype is not None else (None,):
            for x in (x for s in shapes for x in _probes(s, dtype, device)):
                try:
                    with _autocast(device, amp):
                        want = probe_module(x)
                except Exception:  # noqa: BLE001 - e.g. a mixed-dtype probe it does not support
                    continue
                references.append((x, amp, want, _float64_output(twin, x)))
    if not references or not isinstance(references[0][2], torch.Tensor):
        return Match(None, None, "does not map a tensor to a tensor on the probe input")

    best: Optional[tuple[float, NormSpec]] = None
    for spec in _specs(module, has_weight, follow):
        candidate = build_fused(spec, probe_module, shape)
        worst = 0.0
        with torch.no_grad():
            for x, amp, want, truth in references:
                try:
                    with _autocast(device, amp):
                        got = candidate(x)
                except Exception:  # noqa: BLE001
                    worst = math.inf
                    break
                worst = max(worst, _agreement(got, want, truth))
                if worst == math.inf:
                    break
        if worst < math.inf and (best is None or worst < best[0]):
            best = (worst, spec)
    if best is None:
        return Match(None, None, "no fused LayerNorm/RMSNorm reproduces its output on the probe inputs")
    return Match(best[1], best[0], f"same function as {best[1].describe()}")
