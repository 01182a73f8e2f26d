"""Convert checkpoints on disk, and load converted ones.

``convert_checkpoint(IN, OUT)`` streams the safetensors shards of a Hugging Face model
directory tensor by tensor: the residual-stream writers named by the architecture table are
centred (in float64, cast back), everything else is copied. The model is never instantiated
for the conversion (only, optionally, to verify it), so peak memory is about one shard. The
output is a checkpoint of the *original* architecture — vanilla ``transformers`` loads it and
computes what the input computed — whose ``config.json`` carries an ``hf_rmsnorm`` block
saying how to run it converted: ``hf_rmsnorm.from_pretrained(OUT)``.

Everything is written to a temporary directory beside OUT and renamed at the very end: a
failed or interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from ._peft_save import merged_lora_state_dict, peft_names
from .modules import FUSED_MODULES
from .patching.architectures import ARCHITECTURES, matches, relative_name
from .patching.centring import is_centred, output_params
from .patching.patch import CONFIG_BLOCK, TARGETS, _find_state, patch_model, unpatch_model

CONFIG = "config.json"
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SINGLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
REPORT = "hf_rmsnorm_conversion.txt"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = {SAFE_SINGLE, SAFE_INDEX, PICKLE_SINGLE, PICKLE_INDEX}


class ConversionError(Exception):
    """Bad input or a failed check: one line for the user, nothing left behind."""


@dataclasses.dataclass
class _Source:
    config: object
    config_dict: dict
    shards: list[Path]  # weight files in order
    index: Optional[dict]  # the index's weight_map, when sharded
    pickle: bool


def _read_source(src: Path, allow_pickle: bool, trust_remote_code: bool) -> _Source:
    from transformers import AutoConfig

    if not src.exists():
        raise ConversionError(f"{src}: no such directory.")
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory; pass a Hugging Face model directory (from save_pretrained).")
    if not (src / CONFIG).is_file():
        raise _no_config(src)
    try:
        config_dict = json.loads((src / CONFIG).read_text())
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as exc:  # unreadable JSON, an unknown model_type, a field transformers' validation refuses...
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ConversionError(f"{src}/config.json: {message[:300]}{'...' if len(message) > 300 else ''}") from exc
    pickle = False
    if (src / SAFE_INDEX).is_file():
        index = json.loads((src / SAFE_INDEX).read_text())["weight_map"]
        shards = [src / f for f in dict.fromkeys(index.values())]
    elif (src / SAFE_SINGLE).is_file():
        index, shards = None, [src / SAFE_SINGLE]
    elif (src / PICKLE_INDEX).is_file() or (src / PICKLE_SINGLE).is_file():
        if not allow_pickle:
            raise ConversionError(
                f"{src} holds pickle (.bin) weights, and unpickling can run arbitrary code; "
                "pass --allow-pickle if you trust this checkpoint (it is then written as safetensors)."
            )
        pickle = True
        if (src / PICKLE_INDEX).is_file():
            index = json.loads((src / PICKLE_INDEX).read_text())["weight_map"]
            shards = [src / f for f in dict.fromkeys(index.values())]
        else:
            index, shards = None, [src / PICKLE_SINGLE]
    else:
        raise ConversionError(f"{src} has no weights (model.safetensors, its index, or pytorch_model.bin).")
    for shard in shards:
        if not shard.is_file():
            raise ConversionError(f"{shard} is listed in the index but missing.")
    return _Source(config, config_dict, shards, index, pickle)


def _no_config(src: Path) -> ConversionError:
    """What a folder without config.json is instead of a model folder, and what to do."""
    inner = [p for p in _module_folders(src) if (src / p / CONFIG).is_file()]
    if inner:  # an older sentence-transformers layout: the transformer in a folder of its own
        return ConversionError(f"{src} has no config.json at the top: a sentence-transformers folder whose transformer is in "
                               f"{src / inner[0]}; use that folder.")
    if (src / "adapter_config.json").is_file():
        return ConversionError(f"{src} holds PEFT adapters alone (adapter_config.json), not a model: use the base model, "
                               "or save the adapted model whole with hf_rmsnorm.save_pretrained(peft_model, dir) and use that.")
    return ConversionError(f"{src} has no config.json: not a Hugging Face model directory.")


def architecture_class(architectures):
    """The transformers class a config's ``architectures`` names, else ``AutoModel``."""
    import transformers

    for name in architectures or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def build_meta(config, trust_remote_code: bool = False):
    """The architecture on the meta device: module names, classes and shapes, no memory."""
    cls = architecture_class(getattr(config, "architectures", None))
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # an Auto class
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls(config)


def materialise_norms_(meta_model) -> None:
    """Give every norm of a meta-device model real (CPU) parameters, weight 1 and bias 0:
    norms are tiny, and they are all that discovery probes."""
    from .patching.discovery import is_norm_like

    for module in meta_model.modules():
        if is_norm_like(module) and not any(True for _ in module.children()):
            module.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                for name, p in module.named_parameters(recurse=False):
                    p.fill_(1.0 if name == "weight" else 0.0)


def _norm_kinds(meta_model) -> dict[str, str]:
    """{module: "layer" | "rms" | "gated" | reason} for every norm, by probing it."""
    from .patching.discovery import is_norm_like, match_norm

    materialise_norms_(meta_model)
    kinds = {}
    for name, module in meta_model.named_modules():
        if is_norm_like(module) and not any(True for _ in module.children()):
            match = match_norm(module)
            kinds[name] = match.spec.kind if match.spec else match.reason
    return kinds


def _plan(source: _Source, meta_model, target: str, allow_approximate: bool):
    """(writers {module: {parameter: its output-feature dim}}, metadata block) for this checkpoint."""
    model_type = getattr(source.config, "model_type", None)
    kinds = _norm_kinds(meta_model)
    layer_norms = [n for n, k in kinds.items() if k == "layer"]
    block = {"version": __version__, "target": target, "allow_approximate": allow_approximate, "model_type": model_type}
    modules = {}
    writers: dict[str, dict[str, int]] = {}
    if target == "rmsnorm" and layer_norms:
        arch = ARCHITECTURES.get(model_type)
        refusal = arch.refusal(source.config) if arch else None
        prefix = meta_model.base_model_prefix
        if arch is None:
            # not in the table: the weights are copied as they are, and hf_rmsnorm.from_pretrained
            # converts in memory at load time, where the writers are measured (measure.py)
            block["note"] = f"model_type {model_type!r} is not in the architecture table: converted when loaded, not on disk"
        elif refusal is not None:
            block["note"] = f"not converted exactly: {refusal}"
        if arch is not None and refusal is None:
            for name, module in meta_model.named_modules():
                params = output_params(module)
                if params and matches(name, arch.writers, prefix):
                    writers[relative_name(name, prefix)] = params  # checkpoints may or may not carry the prefix
            found = (_absolute(meta_model, s) for s in arch.starts)
            block["runtime_centring"] = [s for s in found if s is not None]
        for name in layer_norms:
            if arch is None:
                modules[name] = "at load"
            elif refusal is None and matches(name, arch.norms, prefix):
                modules[name] = "exact"
            else:
                modules[name] = "approximate" if allow_approximate else "fused"
    for name, kind in kinds.items():
        # "gated": gated and grouped RMSNorms, fused when loaded as the plain norms are
        modules.setdefault(name, "fused" if kind in ("layer", "rms", "gated") else "skipped")
    block["modules"] = modules
    block["centred_writers"] = len(writers)
    return writers, block


def _absolute(model, relative: str) -> Optional[str]:
    """The full module name of a name relative to the base model, if the model has it."""
    for name in (f"{model.base_model_prefix}.{relative}", relative):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    return None


def _open_shard(path: Path, pickle: bool):
    """{name: tensor} of one shard, loaded whole (one shard is the memory bound)."""
    try:
        if pickle:
            return torch.load(path, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - any read failure means a bad file
        raise ConversionError(f"{path.name} is corrupt or truncated ({type(exc).__name__}: {str(exc).splitlines()[0]}).") from exc


def _parse_size(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    try:
        return int(t)
    except ValueError:
        raise ConversionError(f"--max-shard-size {text!r}: use a size like 500MB or 2GB.") from None


def convert_checkpoint(
    src,
    dst,
    target: str = "rmsnorm",
    allow_approximate: bool = False,
    dtype: str = "auto",
    force: bool = False,
    verify: bool = True,
    max_shard_size: Optional[str] = None,
    allow_pickle: bool = False,
    to_original: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Convert the model directory ``src`` into ``dst``; returns the ``hf_rmsnorm`` block.

    Raises :class:`ConversionError` (nothing written) on bad input or a failed check."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if target not in TARGETS:
        raise ConversionError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}.")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if allow_approximate and target != "rmsnorm":
        raise ConversionError("--allow-approximate only applies to --target rmsnorm.")
    shard_limit = _parse_size(max_shard_size)
    source = _read_source(src, allow_pickle, trust_remote_code)
    quantization = source.config_dict.get("quantization_config")
    if quantization:  # its shards hold integer codes and their scales, not the weights the plan centres
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise ConversionError(
            f"{src} is a quantized checkpoint (config.json's quantization_config, quant_method {method}): its weights are stored "
            "quantized, which no centring changes exactly, so it cannot be converted. The full-precision checkpoint converts (to "
            "run unquantized); a quantized model's norms are fused as they are by patch_model, which keeps its LayerNorms, saying why."
        )
    if dst.resolve() == src.resolve():
        raise ConversionError("OUT is IN: write the conversion to a new directory.")
    if src.resolve().is_relative_to(dst.resolve()):
        # --force replaces OUT as a whole: the input inside it would go with it
        raise ConversionError(f"IN is inside OUT ({dst}): replacing OUT would delete the input; write the conversion to a new directory.")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise ConversionError(f"{dst} exists and is not empty; pass --force to replace it.")
    parent = dst.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConversionError(f"cannot write to {parent}: it does not exist or is not writable.")

    prior = source.config_dict.get(CONFIG_BLOCK)  # an earlier conversion's, or a patched model's save's
    saved_patched = bool((prior or {}).get("keep_writers"))
    if not to_original and (prior or {}).get("writers_centred") is False:
        raise ConversionError(
            f"{src} was fine-tuned converted without keep_centered (its hf_rmsnorm block says the stream writers are not "
            "centred): converting it again would change the model. Load it with hf_rmsnorm.from_pretrained."
        )
    meta_model = build_meta(source.config, trust_remote_code)
    prefix = meta_model.base_model_prefix
    expected = {relative_name(n, prefix): tuple(p.shape) for n, p in meta_model.state_dict().items()}
    if to_original:
        block = prior
        if block is None:
            raise ConversionError(f"{src} is not an hf_rmsnorm conversion (its config.json has no hf_rmsnorm block).")
        writers, _ = _plan(source, meta_model, "rmsnorm", False)
        block = dict(block, target="original")
    else:
        writers, block = _plan(source, meta_model, target, allow_approximate)
        if saved_patched:
            # saved from a patched model: its writers are what it computed with, centred on
            # disk below only where that changes nothing; loaded, they stay as written
            block["keep_writers"] = True

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=parent))
    try:
        weight_map, total, shard_names = {}, 0, []
        pending: dict = {}
        pending_bytes = 0
        centred_params: set = set()

        def flush(name: Optional[str] = None):
            nonlocal pending, pending_bytes
            if not pending:
                return
            fname = name or f"model-{len(shard_names) + 1:05d}.safetensors"
            save_file(pending, tmp / fname, metadata={"format": "pt"})
            shard_names.append(fname)
            weight_map.update({k: fname for k in pending})
            pending, pending_bytes = {}, 0

        for shard in source.shards:
            tensors = _open_shard(shard, source.pickle)
            for key, tensor in tensors.items():
                rel = relative_name(key, prefix)
                module, _, leaf = rel.rpartition(".")
                if rel in expected and tuple(tensor.shape) != expected[rel]:
                    raise ConversionError(f"{key} has shape {tuple(tensor.shape)} in {shard.name}, but the config implies {expected[rel]}.")
                if leaf in writers.get(module, ()):
                    t64 = tensor.double()
                    dim = writers[module][leaf]
                    centred = t64 - t64.mean(dim, keepdim=True)
                    if (to_original or saved_patched) and not is_centred(tensor, dim):
                        raise ConversionError(
                            f"{key} is no longer centred (fine-tuned without keep_centered?): the checkpoint cannot be "
                            + ("exported exactly to the original architecture." if to_original else
                               "converted again without changing the model it was saved from; load it with hf_rmsnorm.from_pretrained.")
                        )
                    tensor = centred.to(tensor.dtype)
                    centred_params.add((module, leaf))
                if DTYPES[dtype] is not None and tensor.is_floating_point():
                    tensor = tensor.to(DTYPES[dtype])
                pending[key] = tensor.contiguous()
                pending_bytes += tensor.numel() * tensor.element_size()
                total += tensor.numel() * tensor.element_size()
                if shard_limit is not None and pending_bytes >= shard_limit:
                    flush()
            del tensors
            if shard_limit is None:  # keep the input's shard boundaries
                flush(SAFE_SINGLE if len(source.shards) == 1 else f"model-{len(shard_names) + 1:05d}-of-{len(source.shards):05d}.safetensors")
        flush()
        # transformers may store a module under other names or in another layout than it
        # builds (Phi-MoE's experts: per-expert w1/w2/w3 on disk, one 3-D down_proj in
        # memory): a writer not found whole is left as it is and said so; from_pretrained
        # centres it in memory, where it measures the model anyway
        missing = sorted(m for m, params in writers.items() if any((m, leaf) not in centred_params for leaf in params))
        if missing and not to_original:
            writers = {m: p for m, p in writers.items() if m not in missing}
            block["centred_writers"] = len(writers)
            note = (
                f"{len(missing)} stream writers of the architecture table are stored under other names or in another layout "
                f"in this checkpoint (e.g. {missing[0]}): left as they are here, centred in memory by hf_rmsnorm.from_pretrained"
            )
            block["note"] = f"{block['note']}; {note}" if block.get("note") else note
            block["not_centred_on_disk"] = missing
        if "runtime_centring" in block and not (to_original or saved_patched):
            # the writers centred here, named as in the class built for the plan: what a load
            # where the float64 measurement does not fit rebuilds the conversion from (patching/recorded.py)
            block["stream_writers"] = [_absolute(meta_model, w) or w for w in writers]
        if len(shard_names) == 1 and shard_names[0] != SAFE_SINGLE:
            (tmp / shard_names[0]).rename(tmp / SAFE_SINGLE)
            weight_map = {k: SAFE_SINGLE for k in weight_map}
            shard_names = [SAFE_SINGLE]
        if len(shard_names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

        config_dict = dict(source.config_dict)
        config_dict.pop(CONFIG_BLOCK, None)
        if DTYPES[dtype] is not None:
            config_dict["dtype"] = dtype
        if not to_original:
            config_dict[CONFIG_BLOCK] = block
        (tmp / CONFIG).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        for item in src.iterdir():  # tokenizer, processor, generation config: unchanged
            if item.is_file() and item.name not in _WEIGHT_FILES | {CONFIG, REPORT} and not item.name.endswith((".safetensors", ".bin")):
                shutil.copy2(item, tmp / item.name)
        for sub in _module_folders(src):  # a sentence-transformers model's pooling, dense layers...
            shutil.copytree(src / sub, tmp / sub)
        (tmp / REPORT).write_text(_report_text(src, block, writers, to_original))

        if verify and not to_original:
            block["verification"] = _verify(src, tmp, source, block)
            config_dict[CONFIG_BLOCK] = block
            (tmp / CONFIG).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return block


def _module_folders(src: Path) -> list[str]:
    """The folders a sentence-transformers model's ``modules.json`` names for the modules after
    its transformer (which sits at the top, the weights this conversion rewrites): copied as
    they are, so that the output loads as that model. Other folders (checkpoints, logs) are not
    the model's and are left behind."""
    try:
        modules = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    return [p for p in paths if isinstance(p, str) and p and (src / p).is_dir() and (src / p).resolve().parent == src.resolve()]


def _report_text(src, block, writers, to_original) -> str:
    counts = {}
    for kind in block.get("modules", {}).values():
        counts[kind] = counts.get(kind, 0) + 1
    lines = [
        f"hf_rmsnorm {__version__}: {'exported back to the original architecture' if to_original else 'conversion'} of {src}",
        f"target: {block['target']}; model_type: {block.get('model_type')}",
        "norms: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        f"stream writers centred: {len(writers)}",
    ]
    if block.get("note"):
        lines.append(block["note"])
    if block.get("runtime_centring"):
        lines.append("centred at run time (by hf_rmsnorm.from_pretrained): " + ", ".join(block["runtime_centring"]))
    lines.append("")
    lines += [f"{name}: {kind}" for name, kind in block.get("modules", {}).items()]
    return "\n".join(lines) + "\n"


def _verify(src: Path, out: Path, source: _Source, block: dict) -> dict:
    """Load the input, the output run converted, and the output in plain transformers (when
    the model fits in memory three times over) and compare their outputs on a probe batch, by
    STYLE.md's rule against the float64 input. Where it fits once, with a quarter to spare,
    load the output converted alone: ``from_pretrained`` checks the conversion as it would on
    the machine that runs it (in float64 where that copy fits, else the record in the model's
    dtype), and a record these weights do not bear out fails here rather than there."""
    from .patching.measure import available_bytes, float64_default, to_float64_
    from .patching.probe import EXACT_TOLERANCE, ProbeError, compare_outputs, describe_error, float64_inputs, model_outputs, random_outputs, run_probe

    size = sum(s.stat().st_size for s in source.shards)
    free = available_bytes(torch.device("cpu"))
    cls = architecture_class(getattr(source.config, "architectures", None))
    if 3 * size > free:
        if 5 * size // 4 > free:
            return {"skipped": f"the model ({size / 2**30:.1f} GiB) does not fit in memory ({free / 2**30:.1f} GiB free)"}
        try:
            report = from_pretrained(out, model_class=cls).hf_rmsnorm_report
        except RuntimeError as exc:  # the conversion failed its check (strict)
            raise ConversionError(f"verification failed: {exc}") from exc
        found = report.verification or {}
        if not found or "skipped" in found:
            return {"skipped": f"the model ({size / 2**30:.1f} GiB) does not fit in memory three times over, and loaded "
                               f"converted alone: {report.note}"}
        return {"loaded_converted": found, "note": report.note}
    original = cls.from_pretrained(src, use_safetensors=not source.pickle).eval()
    try:
        inputs, ref, _ = run_probe(original)
    except ProbeError as exc:
        return {"skipped": f"no probe batch runs through the model ({exc})"}
    random = random_outputs(original, inputs, ref)  # before `original` turns float64 below
    models = {"converted": from_pretrained(out, model_class=cls).eval(), "plain transformers": cls.from_pretrained(out).eval()}
    with torch.no_grad():
        results = {label: model_outputs(m, inputs) for label, m in models.items()}
        try:
            with float64_default():
                truth = model_outputs(to_float64_(original), float64_inputs(inputs))
        except Exception as exc:  # the reference the rule is measured against cannot be computed
            return {"skipped": f"the model's forward does not run in float64, which the check compares against: {describe_error(exc)}"}
    tolerance = EXACT_TOLERANCE.get(next(iter(ref.values())).dtype, 1e-4)
    approximate = "approximate" in block.get("modules", {}).values()
    diffs = {}
    for label, got in results.items():
        diffs[label], excess, _ = compare_outputs(ref, got, truth, tolerance, random)
        if excess > 0 and not (approximate and label == "converted"):
            raise ConversionError(f"verification failed: the {label} model's outputs differ from the input's by {diffs[label]:.2e}.")
    return {"max_rel_diff": diffs}


def from_pretrained(path, model_class=None, probe_inputs=None, **kwargs):
    """Load a checkpoint written by ``convert_checkpoint``, or saved from a patched model, and
    run it as its ``hf_rmsnorm`` block says: the model class named in its config (or
    ``model_class``, e.g. ``AutoModelForCausalLM``), patched with the block's target. Saved from
    a patched model (``keep_writers``), the stream writers keep their saved values once the
    conversion is verified, so a model fine-tuned converted without keep_centered comes back
    as it trained; where that needs a conversion that cannot be made here, it raises rather
    than load a different model. Where the model's float64 copy, which the conversion is
    measured on, does not fit (a big model on a GPU), the conversion the block records is
    rebuilt and checked in the model's own dtype instead (``patching/recorded.py``; the report
    says so). ``probe_inputs`` (one forward call's keyword arguments)
    verify the conversion where the batch built from the config does not fit the model, as
    in ``patch_model``. Other keyword arguments go to ``from_pretrained``."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise _no_config(path)
    config_dict = json.loads((path / CONFIG).read_text())
    block = config_dict.get(CONFIG_BLOCK)
    if block is None:
        raise ConversionError(f"{path} was not written by hf_rmsnorm (no hf_rmsnorm block in config.json); load it with transformers.")
    cls = model_class or architecture_class(config_dict.get("architectures"))
    model = cls.from_pretrained(path, **kwargs)
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_BLOCK, block)  # as loaded, also where a config= argument replaced the file's
    target = block["target"] if block["target"] in TARGETS else "layernorm"
    # a block saved from a patched model (keep_writers) is on the loaded config: patch_model
    # keeps the writers as loaded, and refuses where it cannot convert what the model had
    report = patch_model(model, target=target, allow_approximate=bool(block.get("allow_approximate")) and target == "rmsnorm",
                         include=block.get("include"), exclude=block.get("exclude"), probe_inputs=probe_inputs)
    as_trained, converted = bool(block.get("keep_writers")), report.count("exact") + report.count("approximate")
    measured = report.conversion or {}
    for key, what in (("stream_writers", "writers"), ("runtime_centring", "runtime_centring")):
        saved, now = block.get(key), measured.get(what, [])
        if as_trained and converted and saved is not None and sorted(saved) != sorted(now):
            unpatch_model(model)
            raise ConversionError(
                f"{path}: the {key.replace('_', ' ')} measured now ({len(now)}: {', '.join(now[:3]) or '-'}...) are not the "
                f"{len(saved)} the model was fine-tuned with (its hf_rmsnorm block), so it cannot be loaded as it was trained."
            )
    model.hf_rmsnorm_report = report
    return model


def save_pretrained(model, save_directory, state_dict: Optional[dict] = None, **kwargs) -> Optional[dict]:
    """Save a transformers model — patched or not, wrapped by PEFT or not — as a checkpoint of
    its original architecture, whole; a patched one with the ``hf_rmsnorm`` block
    :func:`from_pretrained` needs to load it as it ran. Returns the block (None unpatched).

    The block records the patch (target, every module's change, the stream writers, the
    run-time centring) and whether the writers are still centred, measured on the weights
    written. They are after an exact conversion, and after fine-tuning with
    ``keep_centered=True``: plain transformers then computes the same function (unless norms
    were approximated). Fine-tuned converted without keep_centered they are not: the weights
    then describe an RMSNorm model whose LayerNorm reading is a different model, and only
    ``hf_rmsnorm.from_pretrained`` loads what was trained (and ``convert_checkpoint`` refuses
    to convert it again). A ``PeftModel`` is saved with its LoRA adapters folded into their
    base layers, under the original names, without changing the model (or as it is, once
    ``merge_and_unload()`` has merged them); a norm or head trained as a copy (``modules_to_save``,
    LN tuning) is saved as the copy that runs. ``state_dict`` (the model's own keys, gathered
    from FSDP shards, say) and the other keyword arguments go to the model's own
    ``save_pretrained``. Written to a temporary directory beside ``save_directory`` and moved
    in at the end."""
    if any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__):
        raise ValueError(
            "hf_rmsnorm.save_pretrained: save a SentenceTransformer with its own save(): the hf_rmsnorm block patch_model "
            "put on its transformers config goes with it, and SentenceTransformer(path) then patch_model(model) runs it "
            "as it was saved."
        )
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"hf_rmsnorm.save_pretrained: {type(model).__name__} is not a transformers model; save its state_dict.")
    if kwargs.get("push_to_hub"):  # it would push the temporary directory, under that directory's name
        raise ValueError("hf_rmsnorm.save_pretrained does not push: save here, then upload the folder "
                         "(huggingface_hub.upload_folder), or call model.push_to_hub, whose save carries the block too.")
    saved_model, rename = model, (lambda name: name)
    if any(c.__name__ == "PeftModel" for c in type(model).__mro__):
        if getattr(model, "_is_prompt_learning", False):
            raise ValueError(
                "hf_rmsnorm.save_pretrained: a prompt-learning PeftModel (prompt, prefix or p-tuning) has no whole-model "
                "form: its virtual tokens are not weights of the base architecture. Save the adapter with "
                "peft_model.save_pretrained(dir); the base model stays as it was loaded (it trained frozen), and "
                "PeftModel.from_pretrained(base, dir) then patch_model runs it as it ran."
            )
        # merged or not, each base layer stands (or will) where its adapter wrapper stood, under the original name
        saved_model = model.get_base_model()
        rename = peft_names(model)
        state_dict = merged_lora_state_dict(model, state_dict if state_dict is not None else model.state_dict(), rename)
    found = _find_state(model)
    if found is None:
        if any(isinstance(m, FUSED_MODULES) for m in model.modules()):
            raise ValueError(f"hf_rmsnorm.save_pretrained: {type(model).__name__} was patched as part of a larger model; save that one.")
        _save_into(saved_model, Path(save_directory), None, state_dict, kwargs)
        return None
    prefix, owner, state = found
    report = state["report"]
    full = (lambda name: rename(f"{prefix}.{name}")) if prefix else rename
    conversion = report.conversion or {}
    modules = _saved_changes(owner, state, full)
    converted = sum(change in ("exact", "approximate") for change in modules.values())  # the writers are centred only then
    # an adapter's lora_B wrote into the stream beside its base layer; merged, it is part of it
    writers = [w for w in dict.fromkeys(full(w) for w in conversion.get("writers", []) if ".lora_" not in w) if w] if converted else []
    weights = state_dict if state_dict is not None else saved_model.state_dict()

    def writer(name):  # unmerged, the layer is inside its adapter's wrapper
        module = saved_model.get_submodule(name)
        return getattr(module, "base_layer", module)

    centred = all(
        is_centred(weights[f"{w}.{p}"] if f"{w}.{p}" in weights else getattr(writer(w), p), dim)
        for w in writers for p, dim in output_params(writer(w)).items()
    )
    block = {
        "version": __version__, "target": state["target"], "allow_approximate": report.count("approximate") > 0,
        "model_type": getattr(getattr(saved_model, "config", None), "model_type", None),
        "modules": modules, "stream_writers": writers,
        "runtime_centring": [full(s) for s in conversion.get("runtime_centring", []) if full(s)] if writers else [],
        "writers_centred": centred, "keep_writers": converted > 0, "converted_norms": converted,
    }
    tag = getattr(getattr(saved_model, "config", None), CONFIG_BLOCK, None) or {}  # patch_model's (_tag_config)
    block.update({k: tag[k] for k in ("include", "exclude") if k in tag})
    _save_into(saved_model, Path(save_directory), block, state_dict, kwargs)
    return block


def _saved_changes(owner, state: dict, full) -> dict[str, str]:
    """{saved name: change} of the norms the save holds, in the model's order. A report entry
    names the path a module was patched at; PEFT may since have moved it (LN tuning's merge
    swaps the tuned copy into its base layer's place) or run a copy of it (modules_to_save),
    so each module the save holds takes the entry of the fused module it is, or else of the
    norm whose saved name it has. A copy that does not run is not saved (``full`` gives None)."""
    entries = {e["name"]: e for e in state["report"]}
    installed = {id(m): entries[fqn] for fqn, m in state.get("installed", {}).items() if fqn in entries}
    by_name: dict = {}
    for e in state["report"]:
        by_name.setdefault(full(e["name"]), e)
    modules: dict = {}
    for path, m in owner.named_modules(remove_duplicate=False):
        name = full(path) if path else None
        entry = (installed.get(id(m)) or by_name.get(name)) if isinstance(m, FUSED_MODULES) else entries.get(path)
        if name is not None and entry is not None:
            modules.setdefault(name, entry["change"])
    return modules


def _save_into(model, dst: Path, block: Optional[dict], state_dict: Optional[dict], kwargs: dict) -> None:
    """``model.save_pretrained`` into a temporary directory beside ``dst``, ``block`` put in its
    config.json, then moved in: into an existing directory as transformers saves (its other
    files stay; weight files of an earlier save that this one does not write go)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, **kwargs)
        config_dict = json.loads((tmp / CONFIG).read_text())
        config_dict.pop(CONFIG_BLOCK, None)  # an unpatched model's config may carry a loaded one
        if block is not None:
            config_dict[CONFIG_BLOCK] = block
        (tmp / CONFIG).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if not dst.exists():
            tmp.rename(dst)
            return
        new = {f.name for f in tmp.iterdir()}
        for old in dst.iterdir():
            if old.is_file() and old.name not in new and (old.name.startswith(("model", "pytorch_model")) and old.suffix in (".safetensors", ".bin", ".json")):
                old.unlink()
        for f in tmp.iterdir():
            os.replace(f, dst / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
