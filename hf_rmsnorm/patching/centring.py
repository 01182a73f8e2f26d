"""Centring the residual stream (convert.py's steps 2 and 3, DESIGN.md §2): which parameters
make a stream writer's output (``output_params``), centring them once (``centre_writer_``),
keeping them centred while the converted model trains (``keep_centred``, patch_model's
``keep_centered``), centring a stream's start at run time (``add_start_hooks``), and measuring
how centred a module's input is (``input_centring``). Every hook
here is a module-level function, or a partial of one, so that a patched model pickles."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .probe import EXACT_TOLERANCE, model_outputs

# ------------------------------------------------------------------------ writers' parameters


def stored_quantized(module: nn.Module) -> bool:
    """Whether a module keeps its weight quantized: in integers (bitsandbytes' 8-bit layers:
    int8; its 4-bit ones: two values packed in each uint8), or in a tensor subclass that wraps
    its storage (torchao's quantized weights, which report the float dtype they stand for;
    optimum-quanto's are such subclasses too, untested). Centring cannot change such a weight
    exactly (C W, rounded again to the levels of each row's or block's scale, is not centred; a
    wrapper may not even have the mean), so ``output_params`` names none of its parameters:
    nothing centres it, and the stream it writes cannot be centred. A DTensor (a sharded
    weight) is no quantization."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    return not (weight.is_floating_point() or weight.is_complex()) or _wrapped_storage(weight)


def _wrapped_storage(t: torch.Tensor) -> bool:
    return is_traceable_wrapper_subclass(t) and not is_dtensor(t)


def _stored_as(weight: torch.Tensor) -> str:
    """How a ``stored_quantized`` weight is kept: its subclass, or its integer dtype."""
    return type(weight).__name__ if _wrapped_storage(weight) else str(weight.dtype)


# what to do where layers that write a stream keep quantized weights (measured or recorded alike)
QUANTIZED_ADVICE = "; target='layernorm' keeps every LayerNorm as it is, fused"


def quantized_why(model: nn.Module, names: list[str]) -> str:
    """Why the streams that ``names`` (layers of a stream's width, weights ``stored_quantized``) may write stay uncentred."""
    layer = model.get_submodule(names[0])
    return (f"{len(names)} layers that may write the stream keep their weights quantized ({type(layer).__name__}, {_stored_as(layer.weight)}: "
            f"e.g. {names[0]}), which no centring changes exactly, so the streams they write stay uncentred{QUANTIZED_ADVICE}")


def output_params(module: nn.Module) -> dict[str, int]:
    """{parameter name: the dimension that indexes the module's output features} for the
    parameters that make a module's output (its weight and bias): Linear, GPT-2's Conv1D, and
    transformers' mixture-of-experts modules, which hold every expert's down-projection as one
    3-D parameter (experts x out x in, or x in x out when ``is_transposed``) and its bias as
    experts x out. Empty for anything else, and for a weight ``stored_quantized``."""
    if stored_quantized(module):
        return {}
    if isinstance(module, nn.Linear):
        return {"weight": 0, **({"bias": 0} if module.bias is not None else {})}
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return {"weight": 1, **({"bias": 0} if getattr(module, "bias", None) is not None else {})}  # stored (in, out)
    down = getattr(module, "down_proj", None)
    transposed = getattr(module, "is_transposed", None)  # set by transformers' use_experts_implementation
    if isinstance(down, nn.Parameter) and down.dim() == 3 and isinstance(transposed, bool):
        bias = getattr(module, "down_proj_bias", None)
        return {"down_proj": 2 if transposed else 1, **({"down_proj_bias": 1} if isinstance(bias, nn.Parameter) else {})}
    return {}


def is_centred(t: torch.Tensor, dim: int) -> bool:
    """Whether a writer's output parameter is centred over its output dim up to its dtype's
    rounding: centred in a wider type and rounded, each value moves by at most eps/2 of the
    largest, and so does their mean. A writer trained without keep_centered is off by more."""
    t64 = t.detach().double()
    return bool((t64.mean(dim).abs().max() <= torch.finfo(t.dtype).eps * t64.abs().max()).item())


def off_centre(module: nn.Module, values: Optional[dict] = None) -> list[str]:
    """The writer's output parameters that are not ``is_centred``, each read from ``values``
    ({parameter name: tensor}, e.g. the values it was loaded with) where given there."""
    values = values or {}
    return [p for p, dim in output_params(module).items() if not is_centred(values[p] if p in values else getattr(module, p), dim)]


def is_dtensor(t) -> bool:
    """A DTensor (a sharded tensor), known by its class name, without importing torch.distributed."""
    return type(t).__name__ == "DTensor"


def _is_hidden(x) -> bool:
    """Hidden states, as a block takes them: a floating tensor (the first list of blocks in a
    model can be a list of embedding tables taking ids, as MarkupLM's xpath embeddings)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point()


@torch.no_grad()
def centre_writer_(module: nn.Module) -> None:
    """W <- C W and b <- b - mean(b) over the output features, in float64, cast back."""
    for name, dim in output_params(module).items():
        p = getattr(module, name)
        p64 = p.double()
        p.copy_((p64 - p64.mean(dim, keepdim=True)).to(p.dtype))


def keep_centred(module: nn.Module, root: nn.Module, name: str) -> list:
    """Hooks that make a converted model train exactly like the LayerNorm original: the
    writer's output is centred, so it computes with C W and C b, and autograd hands its
    parameters the centred gradient (the LayerNorm model's gradient is the centred part of the
    RMSNorm model's, since LN(x) = RMS(Cx)); and its weights are re-centred before each forward
    (Adam's elementwise step does not keep them centred; the LayerNorms never saw the
    difference), so that they stay exactly exportable to the original architecture.

    The centring acts on the output, not on hooks of the parameters: FSDP2 (``fully_shard``)
    hands the module other tensors than the parameters patch_model saw (gathered copies, made
    per forward), whose gradients a hook on the originals never sees. Under FSDP2 the in-place
    re-centring reaches only the gathered copy; the sharded weights keep the mean Adam adds,
    which the centred output ignores and the module's state_dict leaves out
    (``_centred_state``), so that what is saved is what was trained.

    Each forward of the writer's parent first checks that the writer has not been wrapped in
    its slot: a wrapper put there afterwards (PEFT's LoRA layer) adds to the stream what these
    hooks do not centre, and the model would quietly stop training as the LayerNorm original.
    Every hook is a module-level function (or a partial of one), so that a patched model still
    pickles (torch.save(model)) and its deep copies check themselves."""
    parent_name, _, slot = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    return [module.register_forward_pre_hook(_recentre_hook),
            module.register_forward_hook(_centre_output),
            module.register_state_dict_post_hook(_centred_state),
            parent.register_forward_pre_hook(functools.partial(_check_slot, slot, name))]


def _recentre_hook(module, args) -> None:
    _recentre_(module)


def _centre_output(module, args, output):
    # The mean is small here (the weights were centred before this forward, or under FSDP2 off
    # by Adam's drift), so unlike a stream start's (_centred) it is subtracted in the output's
    # own dtype: one rounding, two passes over the output
    if not isinstance(output, torch.Tensor):
        # every writer output_params knows returns the stream's addend itself
        raise TypeError(f"keep_centered: the stream writer {type(module).__name__} returned a {type(output).__name__}, "
                        "not a tensor, so its output cannot be centred; patch without keep_centered.")
    return output - _mean_in_fp32(output, -1)


@torch.no_grad()
def _centred_state(module, state_dict, prefix, local_metadata) -> None:
    """The writer's parameters in its state_dict, centred (sharded ones too: DTensor's mean
    gathers across the shards); left as they are where the state_dict holds the parameters
    themselves (``keep_vars=True``), whose identity the caller wants."""
    for name, dim in output_params(module).items():
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            state_dict[key] = value - _mean_in_fp32(value, dim)


def _check_slot(slot: str, name: str, parent: nn.Module, args) -> None:
    """Raise where the writer in ``parent``'s ``slot`` now runs inside a wrapper put there.
    (A module put there instead of it never reaches the stream through these hooks; one that
    moved, as PEFT's merge_and_unload puts the merged base layer where its wrapper stood, is
    still the stream's writer and centred.) Writers are known by their output hook, which
    unpatch_model removes with the rest."""
    now = parent._modules.get(slot)
    if now is None or _centre_output in now._forward_hooks.values():
        return
    if any(_centre_output in m._forward_hooks.values() for m in now.modules()):
        raise RuntimeError(
            f"keep_centered: the stream writer {name} now runs inside a "
            f"{type(now).__module__}.{type(now).__qualname__} put in its place after patching (a PEFT adapter?). "
            "What the wrapper adds to the stream is not kept centred, so the model would no longer train as the "
            "LayerNorm original. Wrap first, then patch: patch_model(get_peft_model(model, config), keep_centered=True) "
            "finds and centres the adapters' writers too (or unpatch_model, wrap, patch again)."
        )


@torch.no_grad()
def _recentre_(module: nn.Module) -> None:
    """Per-step re-projection (keep_centered), in place: the mean in fp32, no float64 copy of
    the weight on every forward (the weight is centred already, up to one optimizer step)."""
    for name, dim in output_params(module).items():
        p = getattr(module, name)
        p.sub_(_mean_in_fp32(p, dim))


def _mean_in_fp32(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ``dim`` (kept), accumulated in fp32 and given in t's dtype: keep_centered's
    means are small (one optimizer step's drift), so no float64 copy is needed for them."""
    return t.mean(dim, keepdim=True, dtype=torch.float32).to(t.dtype)


# ------------------------------------------------------- what is put in a writer's place later

# on a centred writer's parent: {slot: (the writer, its dotted name, the model's shared state)},
# so that deep copies and pickles of a converted model carry their own
_WATCHED = "_hf_rmsnorm_writer_slots"
_REGISTRATION_HOOK = None


class WriterWatch:
    """What ``watch_writers`` returns: ``remove()`` stops the watch (unpatch_model), like a hook
    handle; unpickled in another process, it puts the registration hook back."""

    def __init__(self, slots: list):
        self.slots = slots  # [(parent, slot)]
        _install_registration_hook()

    def remove(self) -> None:
        for parent, slot in self.slots:
            parent.__dict__.get(_WATCHED, {}).pop(slot, None)

    def __setstate__(self, state):
        self.__dict__.update(state)
        _install_registration_hook()


def watch_writers(root: nn.Module, names: list[str]) -> WriterWatch:
    """Watch the slots of the centred writers of a model converted without keep_centered. The
    conversion is exact for the writers it centred; a module put in one's place afterwards (a
    PEFT adapter loaded onto the converted model, trained on the original) may write an
    uncentred stream, and the converted norms then compute something else than the LayerNorm
    original with that change. torch tells every module assignment to one registration hook:
    a wrapper put in a writer's slot has what it writes measured on its first forward, a
    writer put back (PEFT's merge_and_unload) has its weights checked, and either warns where
    they are off the centre, once a model. Nothing runs per forward."""
    slots, shared = [], {"warned": False}
    for name in names:
        parent_name, _, slot = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        parent.__dict__.setdefault(_WATCHED, {})[slot] = (root.get_submodule(name), name, shared)
        slots.append((parent, slot))
    return WriterWatch(slots)


def _install_registration_hook() -> None:
    global _REGISTRATION_HOOK
    if _REGISTRATION_HOOK is None:
        _REGISTRATION_HOOK = nn.modules.module.register_module_module_registration_hook(_slot_assigned)


_OFF_CENTRE_ADVICE = (
    "the converted norms (RMSNorm) no longer see a centred stream, so this model computes something other than the "
    "LayerNorm original with the same change. For an adapter trained on the original model: put it on before patching "
    "(PeftModel.from_pretrained(model, dir), then patch_model(peft_model)), or unpatch_model(model) first. Training a new "
    "adapter on the converted model trains the RMSNorm model; patch_model(..., keep_centered=True) keeps it the "
    "LayerNorm one."
)


def _slot_assigned(parent: nn.Module, slot: str, module):
    """torch's module registration hook, for every module assignment in the process: one dict
    lookup unless the slot is a watched writer's, or a new one beside it in a ModuleDict (a
    second adapter's lora_B next to the one a PeftModel was converted with)."""
    watched = parent.__dict__.get(_WATCHED)
    if not watched or module is None:
        return None
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if slot in watched:
        writer, name, shared = watched[slot]
        what = f"the stream writer {name} now runs inside a {cls} put in its place after patching"
    elif isinstance(parent, nn.ModuleDict):
        _, sibling, shared = next(iter(watched.values()))
        writer = None
        what = f"a {cls} put beside the stream writer {sibling} after patching (another adapter?)"
    else:
        return None
    if shared["warned"]:
        return None
    if module is writer:
        try:
            off = off_centre(writer)
        except Exception:  # noqa: BLE001 - weights it cannot read (meta, offloaded): a check must not break the assignment
            return None
        if off:
            _warn(shared, f"the stream writer {name} was put back in its place after patching with its {' and '.join(off)} "
                          "off the centre (an adapter merged into it?)", stacklevel=4)
    else:
        holder: dict = {}
        holder["handle"] = module.register_forward_hook(functools.partial(_measure_once, what, shared, holder))
    return None


def _measure_once(what: str, shared: dict, holder: dict, module, args, output) -> None:
    """Forward hook on what was put in a writer's place: on its first forward, warn where its
    output is not centred to its dtype's rounding, then remove itself."""
    handle = holder.pop("handle", None)
    if handle is not None:
        handle.remove()
    if not shared["warned"] and isinstance(output, torch.Tensor) and output.is_floating_point():
        try:
            ratio = centring_ratio(output)
        except Exception:  # noqa: BLE001 - an output it cannot read (meta, traced): a check must not break the forward
            return
        if ratio > EXACT_TOLERANCE.get(output.dtype, 1e-4):
            _warn(shared, f"{what}, whose output has |mean|/rms {ratio:.2g} on this forward", stacklevel=3)


def _warn(shared: dict, what: str, stacklevel: int) -> None:
    shared["warned"] = True  # once a model: an adapter usually wraps every writer alike
    warnings.warn(f"hf_rmsnorm: {what} (and any other writer changed likewise): {_OFF_CENTRE_ADVICE}", stacklevel=stacklevel)


# ----------------------------------------------------------------------- run-time centring


def _centred(x: torch.Tensor) -> torch.Tensor:
    # in at least fp32: in bf16, x - mean(x) cancels catastrophically when the mean dominates
    # (embedding tables often have one); the small centred values then round well
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf - xf.mean(-1, keepdim=True)).to(x.dtype)


def _centre_first_input(module, args, kwargs):
    """Forward pre-hook: subtract the per-position mean of the block's hidden states."""
    if args and _is_hidden(args[0]):
        return (_centred(args[0]), *args[1:]), kwargs
    if _is_hidden(kwargs.get("hidden_states")):
        return args, {**kwargs, "hidden_states": _centred(kwargs["hidden_states"])}
    return None


def add_start_hooks(model: nn.Module, starts: list[str]) -> list:
    return [model.get_submodule(s).register_forward_pre_hook(_centre_first_input, with_kwargs=True) for s in starts]


# ------------------------------------------------------------------ measuring a stream's mean


def centring_ratio(x: torch.Tensor) -> float:
    """max |mean| / rms over the positions of x, in float64; inf where x is not finite (NaN,
    which ``max`` would pass over, says nothing about centring)."""
    x = x.detach().double()
    ratio = (x.mean(-1).abs() / x.pow(2).mean(-1).sqrt().clamp_min(1e-300)).max().item()
    return math.inf if math.isnan(ratio) else ratio


def input_centring(model: nn.Module, names: list[str], inputs: dict, dtypes: dict | None = None) -> dict[str, float]:
    """max |mean| / rms of each named module's input over the probe batch (and, into
    ``dtypes`` when given, the dtype each input came in: its rounding bounds the ratio of a
    stream that is centred in exact arithmetic)."""
    ratios, handles = {}, []
    for name in names:

        def hook(mod, args, name=name):
            ratios[name] = max(ratios.get(name, 0.0), centring_ratio(args[0]))
            if dtypes is not None:
                dtypes[name] = args[0].dtype

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model_outputs(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return ratios
