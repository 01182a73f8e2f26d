"""``patch_model`` / ``unpatch_model``: one small walker over any ``nn.Module``.

The walker visits a module before its children, builds the dotted name as it goes, replaces
a child with ``setattr(parent, name, new)`` only when something changed, and never descends
into what it just replaced. Replacements hold the very same ``nn.Parameter`` objects, so the
optimizer, tied weights and state_dict keys are untouched. The originals are kept (outside
the module tree) so that ``unpatch_model`` can put them back.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..modules import FUSED_MODULES, FusedGatedRMSNorm
from .discovery import (
    _agreement,
    _eps_candidates,
    _param_signature,
    _gate_input,
    _probes,
    build_fused,
    gate_probes,
    is_norm_like,
    match_norm,
    model_name_of,
    probe_shapes,
)
from .centring import is_dtensor
from .convert import _Conversion
from .report import FUSED, NOT_SELECTED, SKIPPED, PatchReport

TARGETS = ("layernorm", "rmsnorm")
_STATE_ATTR = "_hf_rmsnorm_state"
CONFIG_BLOCK = "hf_rmsnorm"  # the config attribute, and the key in config.json, saying how the model was patched
_Patterns = Optional[Union[str, Sequence[str]]]


def _patterns(value: _Patterns, arg: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg} takes a dotted-name pattern or a list of them, got {value!r}.")
    return tuple(value)


def _selected(name: str, include: tuple, exclude: tuple) -> bool:
    """fnmatch patterns on the dotted name: 'model.layers.*.input_layernorm', '*ln_f'."""
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _refuse_wrapped_or_unmaterialised(model: nn.Module) -> None:
    """Patching must happen on the plain model, before wrapping or sharding."""
    before = "Patch the plain model before accelerator.prepare / wrapping, e.g. patch_model(model) then accelerator.prepare(model)."
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    if isinstance(model, wrappers):
        raise TypeError(f"patch_model got a {type(model).__name__}-wrapped model. {before}")
    names = {c.__name__ for c in type(model).__mro__}
    if names & {"FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine", "PipelineEngine"}:
        raise TypeError(f"patch_model got a {type(model).__name__} (FSDP / DeepSpeed) model. {before}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("patch_model got a torch.compile'd model; patch first, then call torch.compile(model).")
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or is_dtensor(p):
            raise TypeError(f"parameter {name} is sharded (DeepSpeed ZeRO-3 / FSDP). {before}")


def _find_state(model: nn.Module):
    for prefix, module in model.named_modules():
        state = module.__dict__.get(_STATE_ATTR)
        if state is not None:
            return prefix, module, state
    return None


def _walk(module: nn.Module, prefix: str, visit, seen: dict, replaced: dict) -> None:
    """Visit children before grandchildren; swap a child only when ``visit`` returns a new
    module, and then do not descend into it. ``replaced`` collects ``{fqn: original}``."""
    # _modules, not named_children(): that one hides a module registered under two names
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        fqn = f"{prefix}.{name}" if prefix else name
        if id(child) not in seen:
            seen[id(child)] = visit(fqn, child)
            if seen[id(child)] is None:
                _walk(child, fqn, visit, seen, replaced)
        new = seen[id(child)]  # a module shared at two paths gets the same replacement
        if new is not None:
            setattr(module, name, new)
            replaced[fqn] = child


def _offloaded_by_accelerate(model: nn.Module, fqn: str) -> bool:
    """Whether an accelerate hook on the module at ``fqn`` or on a module above it offloads
    its weights (they live on the meta device between calls)."""
    parts = fqn.split(".")
    for depth in range(len(parts) + 1):
        hook = model.get_submodule(".".join(parts[:depth])).__dict__.get("_hf_hook")
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,))):  # SequentialHook holds several
            return True
    return False


def _settings(module: nn.Module) -> tuple:
    """The plain settings an instance carries besides its parameters (``data_format``,
    ``eps``, flags): instances of one class that differ there may compute different functions
    (ConvNeXt's LayerNorm: channels_first instances permute a 4-D input, channels_last ones
    are a LayerNorm), so they do not share a class probe's answer."""
    plain = (str, int, float, bool, type(None))

    def is_plain(v):
        return isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(e, plain) for e in v))

    return tuple(sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and is_plain(v)))


def _fit(module: nn.Module, match, shape) -> tuple[Optional[nn.Module], float]:
    """The fused module ``match`` names for this instance, and its error against the instance
    (inf: it does not fit); (None, inf) where the match names none."""
    if match.spec is None:
        return None, float("inf")
    new = build_fused(match.spec, module, shape)
    return new, _verify_instance(module, new, shape)


def _verify_instance(module: nn.Module, new: nn.Module, shape) -> float:
    """The chosen fused module against this very instance (its real parameters)."""
    params = list(module.parameters(recurse=False))
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    # a gated norm's forward (hidden_states, gate), its gate optional or not; else one input (a grouped norm's)
    optional_gate = _gate_input(module) if isinstance(new, FusedGatedRMSNorm) else None
    gated = optional_gate is not None
    if gated:
        calls = [c for c in gate_probes(shape, dtype, device, optional_gate, seed=1) if c[0].dtype == dtype]
    else:
        calls = [(_probes(s, dtype, device, seed=1)[0],) for s in probe_shapes(shape)]
    worst = 0.0
    for args in calls:
        try:
            with torch.no_grad():
                want = module(*args)
        except Exception:  # noqa: BLE001
            if gated and len(args) == 1:
                continue  # a gate that defaults to None but is needed (Kimi's): the probe skipped that call too
            return float("inf")  # e.g. an instance that needs another input layout: not this function
        try:
            with torch.no_grad():
                got = new(*args)
        except Exception:  # noqa: BLE001
            return float("inf")
        if not isinstance(want, torch.Tensor):
            return float("inf")
        # the probe is in the parameters' dtype, where the module computes as precisely as it
        # returns: the two-ulp rule alone, no float64 truth
        worst = max(worst, _agreement(got, want, None))
        if worst == float("inf"):
            return worst
    return worst


def patch_model(
    model: nn.Module,
    target: str = "rmsnorm",
    include: _Patterns = None,
    exclude: _Patterns = None,
    strict: bool = True,
    dry_run: bool = False,
    allow_approximate: bool = False,
    keep_centered: bool = False,
    probe_inputs: Optional[dict] = None,
    probe_autocast: Optional[torch.dtype] = None,
) -> PatchReport:
    """Swap the normalization modules of ``model`` (in place) for fused ones and return a
    :class:`PatchReport` saying, per module, what changed and why. A transformers model's
    config gets an ``hf_rmsnorm`` block (``unpatch_model`` takes it off), so that any save of
    the model loads back as it runs through ``hf_rmsnorm.from_pretrained``.

    Args:
        model: any ``nn.Module`` (a transformers model, a PEFT model, ...), not yet wrapped by
            DDP / FSDP / DeepSpeed / torch.compile.
        target: ``"rmsnorm"`` (default): every LayerNorm that reads the residual stream of a
            pre-LN model becomes an RMSNorm computing the same function (the stream writers are
            centred, see ``convert.py``, as measured on a float64 copy of the model by ``measure.py``;
            where that does not fit, a model loaded from a checkpoint hf_rmsnorm wrote is converted as its
            record says and checked in its own dtype, see ``recorded.py``, and any other is
            left unconverted, saying why); every other norm keeps its function on the fused
            kernels. ``"layernorm"``: no conversion, every norm keeps its function (LayerNorm ->
            FusedLayerNorm, every RMSNorm flavour -> FusedRMSNorm).
        include / exclude: fnmatch patterns on dotted module names (``"*.ln_f"``,
            ``"model.layers.*.input_layernorm"``); only names matching ``include`` (when given)
            and no ``exclude`` pattern are touched.
        strict: if verification fails (a swapped norm that does not match its instance, or a
            conversion whose outputs differ from the original's), restore the model exactly as
            it was and raise, naming the module.
        dry_run: report what would change without changing anything.
        allow_approximate: with ``target="rmsnorm"``, also turn the LayerNorms that cannot be
            converted exactly (post-LN models: BERT, BART, ...) into RMSNorms with the same
            weight and bias; they are reported as approximate with the measured deviation.
        keep_centered: keep the centred stream writers centred while training (their outputs
            are centred, which centres their gradients, and their weights are re-projected
            before each forward and in the state_dict), so that a fine-tuned converted model
            trains as the LayerNorm original and stays exactly exportable to its architecture.
        probe_inputs: the keyword arguments of one forward call used to verify a conversion
            (default: a small batch built from the model's config and signature).
        probe_autocast: also probe each norm under ``torch.autocast(device, probe_autocast)``
            (e.g. ``torch.bfloat16`` for a model that trains under AMP on a GPU) and keep a
            swap only if it matches there too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model expects a torch.nn.Module, got {type(model).__name__}.")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    if (allow_approximate or keep_centered) and target != "rmsnorm":
        raise ValueError('allow_approximate and keep_centered only apply to target="rmsnorm".')
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    _refuse_wrapped_or_unmaterialised(model)

    found = _find_state(model)
    if found is not None:
        prefix, _, state = found
        where = f" (at {prefix})" if prefix else ""
        note = f"already patched{where} with target={state['target']}: nothing changed. Call unpatch_model(model) first to patch again."
        warnings.warn(f"patch_model: {type(model).__name__} {note}", stacklevel=2)
        return PatchReport(type(model).__name__, target, note=note)

    report = PatchReport(type(model).__name__, target, dry_run=dry_run)
    planned = _plan(model, report, include_p, exclude_p, strict, probe_autocast)
    asked = f"target={target!r}" + (f", include={list(include_p)}" if include_p else "") + (f", exclude={list(exclude_p)}" if exclude_p else "")
    if not report:
        raise ValueError(f"patch_model found no normalization modules in {type(model).__name__} ({asked}).")
    if all(e["reason"] == NOT_SELECTED for e in report):
        raise ValueError(
            f"patch_model: no normalization module of {type(model).__name__} matched {asked}; "
            f"they are named like {report[0]['name']!r}."
        )
    replacements = {fqn: new for fqn, (_, _, new) in planned.items()}
    conversion = None
    block = getattr(getattr(model, "config", None), CONFIG_BLOCK, None)  # a checkpoint's record, which hf_rmsnorm wrote
    saved = block if isinstance(block, dict) and block.get("keep_writers") else None  # ... saving a patched model
    if target == "rmsnorm":
        conversion = _Conversion(model, planned, report, probe_inputs, allow_approximate, keep_centered, strict,
                                 block if isinstance(block, dict) else None)
        replacements.update(conversion.replacements)
    if dry_run:
        if saved is not None and conversion is not None:
            report.note = (f"{report.note or ''} Loaded from a save of a patched model: the stream writers would keep their "
                           "saved values.").strip()
        return report
    if saved is not None and conversion is not None:
        _check_saved_conversion(model, saved, report, conversion, allow_approximate)
    elif saved is not None and saved.get("converted_norms") and not saved.get("writers_centred"):
        warnings.warn(
            f"patch_model: {type(model).__name__} was loaded from a checkpoint saved from a patched model with "
            f"{saved['converted_norms']} norms converted to RMSNorm; with target='layernorm' it runs as the LayerNorm "
            "reading of those weights, which is another model if it was fine-tuned converted without keep_centered. "
            "target='rmsnorm' runs it as it was saved.", stacklevel=2)

    by_id = {id(planned[fqn][0]): new for fqn, new in replacements.items()}
    originals: dict[str, nn.Module] = {}
    hooks: list = []
    try:
        if conversion is not None:
            hooks = conversion.apply()
        _walk(model, "", lambda fqn, module: by_id.get(id(module)), {}, originals)
        if conversion is not None:
            conversion.verify()
            conversion.finish(writers_as_loaded=saved is not None)
    except Exception:
        _restore(model, originals)  # strict: the model is left exactly as it was
        for h in hooks:
            h.remove()
        if conversion is not None:
            conversion.undo_centring()
        raise
    if originals:
        model.__dict__[_STATE_ATTR] = {"target": target, "originals": originals, "report": report, "hooks": hooks,
                                       "installed": {fqn: by_id[id(m)] for fqn, m in originals.items()},
                                       "config_block": _tag_config(model, target, report, include_p, exclude_p)}
    return report


def _check_saved_conversion(model: nn.Module, saved: dict, report: PatchReport, conversion: _Conversion, allow_approximate: bool) -> None:
    """A checkpoint saved from a patched model whose writers are not known to be centred (the
    model was fine-tuned converted without keep_centered, or nobody measured) is that model
    only with the same norms converted: refuse, changing nothing, where fewer or more are."""
    expected, converted = saved.get("converted_norms"), len(conversion.replacements)
    if expected is None or expected == converted or saved.get("writers_centred"):
        return
    why = next((e["reason"] for e in report if e["reason"].startswith("kept as LayerNorm")), "")
    if conversion.shortfall and conversion.record is None:
        # converting on disk is no way out here: it refuses writers that are not centred
        why = (f"kept as LayerNorm (fused): {conversion.shortfall}; patch it where that copy fits, e.g. loaded on the "
               "CPU (device_map='cpu'), and move the patched model to its device afterwards")
    if saved.get("allow_approximate") and not allow_approximate:
        why = "it converted approximately: pass allow_approximate=True"
    elif saved.get("include") or saved.get("exclude"):
        why = f"it was patched with include={saved.get('include')}, exclude={saved.get('exclude')}: pass the same"
    raise ValueError(
        f"patch_model: {type(model).__name__} was loaded from a checkpoint saved from a patched model with {expected} "
        f"norms converted to RMSNorm and its stream writers kept as they were (fine-tuned without keep_centered?); "
        f"running it as it ran needs the same conversion, but {converted} would be converted here"
        f"{': ' + why if why else ''}. Converted otherwise, or not at all, it would be a different model."
    )


def _tag_config(model: nn.Module, target: str, report: PatchReport, include: tuple, exclude: tuple):
    """Give the model a config of its own carrying an ``hf_rmsnorm`` block, so that every save
    of the model — its own save_pretrained, a Trainer checkpoint, push_to_hub — says how to
    load it as it runs: ``hf_rmsnorm.from_pretrained`` patches it again and keeps the stream
    writers as saved (centred, unless fine-tuned without keep_centered; either way what the
    model computed). A copy, put wherever the model's modules hold the config: models built
    from one config object share it, and a block on a model left unpatched would make its
    LayerNorm weights load as a converted model's. Returns what unpatch_model restores."""
    from .. import __version__

    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return None
    converted = report.count("exact") + report.count("approximate")
    # with nothing converted the weights are still the LayerNorm model's, to be converted as any
    block = {"version": __version__, "target": target, "allow_approximate": report.count("approximate") > 0,
             "converted_norms": converted, "keep_writers": converted > 0}
    block.update({k: list(v) for k, v in (("include", include), ("exclude", exclude)) if v})
    holders = [m for m in model.modules() if m.__dict__.get("config") is config]
    if not holders:  # reached some other way: the block goes on that config itself
        before = config.__dict__.get(CONFIG_BLOCK)
        setattr(config, CONFIG_BLOCK, block)
        return {"config": config, "before": before}
    own = copy.copy(config)
    setattr(own, CONFIG_BLOCK, block)
    for m in holders:
        m.__dict__["config"] = own
    return {"config": config, "holders": holders}

def _plan(model, report, include_p, exclude_p, strict, probe_autocast) -> dict:
    """Match every norm-like module (nothing is changed yet): ``{fqn: (module, spec, fused)}``
    for the ones that have a fused equivalent; report entries for all of them."""
    planned: dict = {}
    cache: dict = {}
    model_name = model_name_of(model)

    def visit(fqn: str, module: nn.Module) -> None:
        if not is_norm_like(module, model_name):
            return None
        old = type(module).__name__
        if isinstance(module, FUSED_MODULES):
            report.add(fqn, old, None, SKIPPED, "already a fused module")
            return None
        if not _selected(fqn, include_p, exclude_p):
            report.add(fqn, old, None, SKIPPED, NOT_SELECTED)
            return None
        sig = _param_signature(module)
        if isinstance(sig, str) and "quantized" in sig:
            raise TypeError(
                f"{fqn} ({old}) {sig}: patch the model before quantizing it (or load it unquantized), then quantize."
            )
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            if _offloaded_by_accelerate(model, fqn):
                raise ValueError(
                    f"{fqn} ({old}) is offloaded by accelerate (a device_map with \"cpu\" or \"disk\" "
                    "entries, or cpu_offload): its weights are loaded only while it runs, so it cannot be "
                    "patched in place. Load the model with every layer on a device (a device_map "
                    "without \"cpu\" or \"disk\" entries), then patch."
                )
            raise ValueError(
                f"{fqn} ({old}) has parameters on the meta device: load the real weights first "
                "(not init_empty_weights / a device_map still to be dispatched), then patch."
            )
        # one probe per class, parameter signature and instance settings; each instance is still verified below
        key = (type(module), repr(sig), tuple((p.dtype, p.device) for p in module.parameters(recurse=False)),
               _eps_candidates(module), _settings(module))
        match = cache.get(key)
        probed = match is None
        if probed:
            match = cache[key] = match_norm(module, probe_autocast)
        new, err = _fit(module, match, sig[0])
        if err == float("inf") and not probed and match.spec is not None:
            # settings held in objects (an enum, a callable) are not in the key: an instance the
            # class's match does not fit is probed on its own before anything is concluded
            match = match_norm(module, probe_autocast)
            new, err = _fit(module, match, sig[0])
        if match.spec is None:
            report.add(fqn, old, None, SKIPPED, match.reason)
            return None
        if err == float("inf"):
            reason = f"the probe matched {match.spec.describe()}, but not with this instance's own parameters"
            if strict:
                raise RuntimeError(f"patch_model: {fqn} ({old}): {reason}; nothing was changed. Use exclude=[{fqn!r}] to leave it out.")
            report.add(fqn, old, None, SKIPPED, reason)
            return None
        report.add(fqn, old, type(new).__name__, FUSED, match.reason, max(err, match.error or 0.0))
        planned[fqn] = (module, match.spec, new)
        return None

    _walk(model, "", visit, {}, {})
    return planned


def _restore(model: nn.Module, originals: dict, installed: Optional[dict] = None) -> None:
    """Put an original module back wherever a fused module patch_model put in (``installed``,
    {path: module}) now sits, moved or not (PEFT's merge_and_unload moves a norm's trained copy
    out of its modules_to_save wrapper), and wherever a copy of one sits at or below the path
    it was patched at (PEFT's modules_to_save and LN tuning wrap a norm with trained copies of
    it; merged, such a copy stands in the norm's place): a copy gets a copy of the original.
    Either way the module put back holds the fused module's parameters as they are now
    (trained, or reassigned, as by ``load_state_dict(assign=True)``) and its train/eval mode.
    A fused module anywhere else is the user's own and stays."""
    used: set[int] = set()
    patched_as = {id(m): fqn for fqn, m in (installed or {}).items()}

    def original_for(fqn: str, module: nn.Module) -> Optional[nn.Module]:
        if not isinstance(module, FUSED_MODULES):
            return None
        at = [patched_as[id(module)]] if id(module) in patched_as else [k for k in originals if fqn == k or fqn.startswith(k + ".")]
        if not at:
            return None
        original = originals[max(at, key=len)]
        if id(original) in used:  # a second fused module from one original: a copy, sharing nothing
            tensors = [*original.parameters(recurse=False), *original.buffers(recurse=False)]
            original = copy.deepcopy(original, {id(t): t for t in tensors})
        used.add(id(original))
        for name in original._parameters:
            if name in module._parameters:
                original._parameters[name] = module._parameters[name]
        original.train(module.training)
        return original

    _walk(model, "", original_for, {}, {})


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put back the original modules (holding the same, possibly trained, parameters) and
    return ``model``."""
    found = _find_state(model)
    if found is None:
        if any(isinstance(m, FUSED_MODULES) for m in model.modules()):
            # the record lives on the model patch_model was given, which this one sits inside
            raise ValueError(
                f"unpatch_model: {type(model).__name__} holds hf_rmsnorm's fused norms, but was patched as part of "
                "a larger model (the PeftModel that wrapped it, before merge_and_unload?). Call unpatch_model on the "
                "model that was patched: unpatch_model(peft_model), then peft_model.merge_and_unload()."
            )
        raise ValueError(f"unpatch_model: {type(model).__name__} was not patched by hf_rmsnorm (nothing to undo).")
    _, owner, state = found
    _restore(owner, state["originals"], state.get("installed"))
    for handle in state.get("hooks", ()):
        handle.remove()  # run-time centring and keep_centered projections
    tagged = state.get("config_block")
    for m in (tagged or {}).get("holders", ()):
        m.__dict__["config"] = tagged["config"]  # the config the model had, as it was
    if tagged and "before" in tagged:
        if tagged["before"] is None:
            tagged["config"].__dict__.pop(CONFIG_BLOCK, None)
        else:
            setattr(tagged["config"], CONFIG_BLOCK, tagged["before"])
    del owner.__dict__[_STATE_ATTR]
    return model
