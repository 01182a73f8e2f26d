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

from ..modules import FUSED_MODULES, FusedGatedRMSNorm, FusedLayerNorm, FusedRMSNorm
from ..ops.gated_rms_norm import ACTIVATIONS, GATED_CAST_MODES
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


@dataclasses.dataclass(frozen=True)
class GatedSpec:
    """What a ``FusedGatedRMSNorm`` needs to compute what a gated norm computes."""

    eps: float
    group_size: Optional[int]  # None: the whole row
    norm_before_gate: bool
    activation: str
    cast_mode: str
    offset: float = 0.0  # added to the weight
    gated: bool = True  # False: a one-input grouped RMSNorm (the gate's settings then unused)
    kind = "gated"  # a class attribute, not a field: neither is ever converted

    def describe(self) -> str:
        groups = f", group_size={self.group_size}" if self.group_size else ""
        offset = f", offset={self.offset:g}" if self.offset else ""
        if not self.gated:
            return f"grouped RMSNorm(eps={self.eps:g}{groups}, cast_mode={self.cast_mode}{offset})"
        order = "after" if self.norm_before_gate else "before"
        return (f"gated RMSNorm(eps={self.eps:g}{groups}, {self.activation} gate {order} the norm, "
                f"cast_mode={self.cast_mode}{offset})")


@dataclasses.dataclass
class Match:
    spec: Optional[NormSpec | GatedSpec]
    error: Optional[float]  # max relative error of the chosen candidate on the probes
    reason: str


def _named_norm(module: nn.Module, model_name: str) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm) + FUSED_MODULES):
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


def build_fused(spec: NormSpec | GatedSpec, module: nn.Module, shape: tuple) -> nn.Module:
    """A fused module for ``spec`` holding the very same Parameter objects as ``module``, and
    behind the same accelerate hook if ``module`` has one. A model dispatched with a
    ``device_map`` has one on every module with weights: it moves the module's inputs to the
    module's device, which matters where a norm sits on another device than the layer before
    it (a final norm on a device boundary), in the model and in its float64 copy alike."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    weight = weight if isinstance(weight, nn.Parameter) else None
    bias = bias if isinstance(bias, nn.Parameter) else None
    if isinstance(spec, GatedSpec):
        new = FusedGatedRMSNorm(
            shape[0], spec.eps, spec.group_size, norm_before_gate=spec.norm_before_gate, activation=spec.activation,
            cast_mode=spec.cast_mode, offset=spec.offset, elementwise_affine=weight is not None, device="meta",
        )
    else:
        cls = FusedLayerNorm if spec.kind == "layer" else FusedRMSNorm
        new = cls(
            shape, eps=spec.eps, elementwise_affine=weight is not None, bias=bias is not None,
            offset=spec.offset, cast_mode=spec.cast_mode, follow_autocast=spec.follow_autocast, device="meta",
        )
    if weight is not None:
        new.weight = weight
    if bias is not None:
        new.bias = bias
    new.train(module.training)  # a model in eval mode stays so, all through
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
    """max |got - want| / max |want|, in float64; ``centre`` first removes each row's mean. inf
    where either is not finite: NaN would compare false with every bound (and ``max`` would pass
    over it), an error no check may accept."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if centre:
        got, want = got - got.mean(-1, keepdim=True), want - want.mean(-1, keepdim=True)
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    return math.inf if math.isnan(err) else err


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


def _float64_output(twin: Optional[nn.Module], *inputs: torch.Tensor) -> Optional[torch.Tensor]:
    if twin is None:
        return None
    try:
        out = twin(*(x.double() for x in inputs))
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
    # as norm(x, gate) though its gate defaults to None. Two are probed as (hidden_states, gate).
    inputs = [_shown(p) for p in params]
    if len(inputs) == 1 and "dict" in str(next(iter(params)).annotation).lower():
        # sentence-transformers' Normalize: the L2 norm of a sentence embedding, in a features dict
        return f"its forward takes a dict ({inputs[0]}), not a tensor: not a norm of hidden states"
    if len(inputs) > 2 or (len(inputs) == 2 and _gate_input(module) is None):
        return (f"its forward takes {len(inputs)} inputs ({', '.join(inputs)}): a conditioned norm; "
                "the fused kernels normalise one tensor, or one with a gate")
    return None


def _gate_input(module: nn.Module) -> Optional[bool]:
    """For a forward of exactly two inputs, ``(hidden_states, gate)``, whether the second is
    optional; None for any other forward."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if len(params) != 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return None
    return params[1].default is not params[1].empty


def _named_group_size(module: nn.Module, n_cols: int) -> Optional[int]:
    """The group size the module names (``group_size``, or ``n_groups`` groups), if it divides
    the row; None where it names none."""
    named = getattr(module, "group_size", None)
    groups = getattr(module, "n_groups", None)
    if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 and n_cols % groups == 0:
        named = n_cols // groups
    if isinstance(named, int) and not isinstance(named, bool) and 0 < named <= n_cols and n_cols % named == 0:
        return named
    return None


def _group_sizes(module: nn.Module, n_cols: int) -> tuple:
    """Group sizes to try: the one the module names, else the whole row and every divisor of it."""
    named = _named_group_size(module, n_cols)
    if named is not None:
        return (None,) if named == n_cols else (named,)
    return (None,) + tuple(d for d in range(1, n_cols) if n_cols % d == 0)


def gate_probes(shape, dtype, device, optional_gate: bool, seed=0) -> list:
    """The argument tuples a gated norm is probed with: each of ``_probes``' inputs with a gate
    of its dtype (a unit-scale one beside the tiny input, where eps matters), and each alone
    where the gate is optional (a call without it is a plain, possibly grouped, RMSNorm)."""
    xs, zs = _probes(shape, dtype, device, seed), _probes(shape, dtype, device, seed + 7)
    calls = [(x, zs[0] if i == 1 else z) for i, (x, z) in enumerate(zip(xs, zs))]
    return calls + ([(x,) for x in xs] if optional_gate else [])


def _grouped_specs(module, size: int, has_weight: bool):
    """Candidates for a one-input norm that names groups smaller than its row: a grouped RMSNorm
    (the gated kernel without a gate), its weight as it is or stored as w - 1 (Qwen4-Exp)."""
    for eps in _eps_candidates(module):
        for cast_mode in GATED_CAST_MODES:
            if cast_mode != "float32" and not has_weight:
                continue  # without a weight the two orders of casts are one
            for offset in (0.0, 1.0) if has_weight else (0.0,):
                yield GatedSpec(eps, size, False, "silu", cast_mode, offset, gated=False)


def _gated_specs(module, n_cols):
    for eps in _eps_candidates(module):
        for size in _group_sizes(module, n_cols):
            for before in (False, True):
                for activation in ACTIVATIONS:
                    for cast_mode in GATED_CAST_MODES:
                        yield GatedSpec(eps, size, before, activation, cast_mode)


def _match_gated(module: nn.Module, sig, optional_gate: bool, autocast_dtype) -> Match:
    """``match_norm`` for a forward ``(hidden_states, gate)``: the gated RMSNorm that computes
    what it computes, on every probe call (``gate_probes``), or why none does."""
    shape, has_weight, has_bias = sig
    if has_bias or shape is None or len(shape) != 1:
        what = "a bias" if has_bias else "no weight" if shape is None else f"a {len(shape)}-D weight"
        return Match(None, None, f"a gated norm (forward(hidden_states, gate)) with {what}: no fused equivalent")
    weight = module.weight
    if weight.device.type == "meta":
        return Match(None, None, "parameters are on the meta device")
    probe_module = _randomised(module)
    twin = _float64_twin(probe_module)
    references = []
    with torch.no_grad():
        for amp in (None, autocast_dtype) if autocast_dtype is not None else (None,):
            for args in gate_probes(shape, weight.dtype, weight.device, optional_gate):
                try:
                    with _autocast(weight.device, amp):
                        want = probe_module(*args)
                except Exception as exc:  # noqa: BLE001
                    if len(args) == 2 and args[0].dtype == weight.dtype:
                        # its second input is no gate of x's shape (a mask, a conditioning vector)
                        return Match(None, None, f"raised on a probe (hidden_states, gate) of shape {tuple(args[0].shape)}: "
                                                 f"{type(exc).__name__}: {exc}")
                    continue  # e.g. a mixed-dtype probe it does not support
                references.append((args, amp, want, _float64_output(twin, *args)))
    if not references or not isinstance(references[0][2], torch.Tensor):
        return Match(None, None, "does not map (hidden_states, gate) to a tensor on the probe inputs")
    best = _best(probe_module, references, _gated_specs(module, shape[0]), shape)
    if best is None:
        return Match(None, None, "a gated norm (forward(hidden_states, gate)) that no fused gated RMSNorm reproduces on the probe inputs")
    return Match(best[1], best[0], f"same function as {best[1].describe()}")


def _best(module, references, specs, shape):
    """(error, spec) of the candidate closest to the module's outputs on every reference
    ``(args, autocast dtype, output, float64 output)``; None if none agrees (``_agreement``)."""
    best = None
    device = references[0][0][0].device
    for spec in specs:
        candidate = build_fused(spec, module, shape)
        worst = 0.0
        with torch.no_grad():
            for args, amp, want, truth in references:
                try:
                    with _autocast(device, amp):
                        got = candidate(*args)
                except Exception:  # noqa: BLE001
                    worst = math.inf
                    break
                worst = max(worst, _agreement(got, want, truth))
                if worst == math.inf:
                    break
        if worst < math.inf and (best is None or worst < best[0]):
            best = (worst, spec)
    return best


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
    optional_gate = _gate_input(module)
    if optional_gate is not None:
        return _match_gated(module, sig, optional_gate, autocast_dtype)
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

    calls = [((x,), amp, want, truth) for x, amp, want, truth in references]
    best = _best(probe_module, calls, _specs(module, has_weight, follow), shape)
    groups = _named_group_size(module, shape[-1]) if shape is not None and len(shape) == 1 and not has_bias else None
    grouped = groups is not None and groups < shape[-1]  # groups smaller than the row
    if best is None and grouped:
        # it names groups (Qwen4-Exp's hyper-connection norms): normalised a group at a time
        best = _best(probe_module, calls, _grouped_specs(module, groups, has_weight), shape)
    if best is None:
        named = f" or grouped RMSNorm (groups of {groups})" if grouped else ""
        return Match(None, None, f"no fused LayerNorm/RMSNorm{named} reproduces its output on the probe inputs")
    return Match(best[1], best[0], f"same function as {best[1].describe()}")
