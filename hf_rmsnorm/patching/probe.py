"""The probe batch a conversion is measured and verified on: built from a model's config and
forward signature (``probe_inputs``), run through the model (``run_probe``, which falls back to
a vision-language model's text alone), and the outputs compared with the original's and with a
float64 truth (``compare_outputs``). ``measure.py``, ``convert.py`` and ``checkpoint.py`` use it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Optional

import torch
from torch import nn

from .discovery import _rel_err


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model.eval()`` while the probe runs (dropout would make its outputs random), then every
    module back in its own mode. The root's flag does not tell its children's: a PeftModel
    wrapping a model in eval mode is itself in train mode, and a part kept frozen in eval
    while the rest trains is a common recipe; ``model.train(was_training)`` changed both."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _config_value(config, name):
    """A value from the config or any of its sub-configs (CLIP keeps image_size in one)."""
    if hasattr(config, name) and getattr(config, name) is not None:
        return getattr(config, name)
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, name):
            found = _config_value(value, name)
            if found is not None:
                return found
    return None


def _audio_samples(config, frames: int) -> int:
    """Raw-audio samples that make ``frames`` frames out of a wav2vec2-style convolutional
    feature encoder (``conv_kernel`` and ``conv_stride`` in the config: its receptive field
    plus a stride per frame), or 3200 (0.2 s at 16 kHz) where the config names no such stack."""
    kernels, strides = _config_value(config, "conv_kernel"), _config_value(config, "conv_stride")
    if not (isinstance(kernels, (list, tuple)) and isinstance(strides, (list, tuple)) and len(kernels) == len(strides)):
        return 3200
    field, jump = 1, 1
    for k, s in zip(kernels, strides):
        field, jump = field + (k - 1) * jump, jump * s
    return field + (frames - 1) * jump


def probe_inputs(model: nn.Module, batch: int = 2, length: int = 12, seed: int = 0) -> dict:
    """A probe batch for the model's forward: token ids, pixel values, audio features or raw
    audio (and decoder ids for encoder-decoders), chosen from its signature and config."""
    wrapped = _features_wrapper(model)
    if wrapped is not None:
        name, inner = wrapped
        features = probe_inputs(inner, batch, length, seed)
        if "input_ids" in features:  # the pooling after the transformer reads the mask
            features["attention_mask"] = torch.ones_like(features["input_ids"])
        return {name: features}
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config to build a probe input from; pass probe_inputs={{...}} to convert it")
    params = _forward_parameters(model)
    param = next(iter(model.parameters()))
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    vocab = _config_value(config, "vocab_size")
    if "input_ids" in params and vocab:
        inputs["input_ids"] = torch.randint(min(3, vocab - 1), vocab, (batch, length), generator=g)
    if "pixel_values" in params and _config_value(config, "image_size"):
        size = _config_value(config, "image_size")
        size = size if isinstance(size, int) else size[0]
        channels = _config_value(config, "num_channels") or 3
        inputs["pixel_values"] = torch.randn(batch, channels, size, size, generator=g)
    if "input_features" in params and _config_value(config, "num_mel_bins"):
        frames = 2 * (_config_value(config, "max_source_positions") or 1500)
        inputs["input_features"] = torch.randn(batch, _config_value(config, "num_mel_bins"), frames, generator=g)
    if "input_values" in params and not inputs:  # raw audio (wav2vec2, HuBERT, WavLM)
        inputs["input_values"] = torch.randn(batch, _audio_samples(config, length), generator=g)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params and vocab:
        inputs["decoder_input_ids"] = torch.randint(min(3, vocab - 1), vocab, (batch, max(2, length // 2)), generator=g)
    if not inputs:
        raise ValueError(f"cannot build a probe input for {type(model).__name__}; pass probe_inputs={{...}} to convert it")
    return {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def _features_wrapper(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """sentence-transformers' ``SentenceTransformer``, whose forward takes one dict of features
    (a tokenizer's output) and runs it through its modules, the first holding the transformers
    model (``auto_model``): (the forward's argument name, that model), else None."""
    if not any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__):
        return None
    first = next(iter(model.children()), None)
    inner = getattr(first, "auto_model", None)
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    if not isinstance(inner, nn.Module) or not params:
        return None
    return params[0].name, inner


def _forward_parameters(model: nn.Module):
    """The parameters of the model's forward; through a wrapper whose forward hands ``**kwargs``
    on to the model it wraps (PEFT's ``PeftModel``, ``get_base_model()``), the wrapped one's."""
    params = inspect.signature(model.forward).parameters
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        inner = get_base()
        if isinstance(inner, nn.Module) and inner is not model:
            return _forward_parameters(inner)
    return params


class ProbeError(RuntimeError):
    """No probe batch runs through the model; the message says why (the model's own error)."""


def describe_error(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"


# what a text-only probe keeps of a multimodal one
_TEXT_KEYS = ("input_ids", "decoder_input_ids")


def run_probe(model: nn.Module, inputs: Optional[dict] = None) -> tuple[dict, dict, Optional[str]]:
    """(a probe batch, the model's outputs on it, without gradients, and a note when the batch
    is not the first one tried; the model's mode is the caller's). ``inputs`` when given; else
    the batch ``probe_inputs`` builds or, when that one raises in a model that also takes text,
    the text alone: a vision-language model wants image tokens placed to match its images (and
    image sizes, grids), which no generic batch knows, while its text path runs on token ids.
    Raises ProbeError with the model's own error; ValueError where the batch was the caller's
    (patch_model's ``probe_inputs``): a batch given that does not run is a mistake to report,
    while one built here only means that nothing can be verified on it."""
    padded = False
    if inputs is not None:
        inputs, padded = attended(inputs)
    candidates = [inputs] if inputs is not None else []
    if inputs is None:
        try:
            built = probe_inputs(model)
        except ValueError as exc:
            raise ProbeError(str(exc)) from exc
        candidates.append(built)
        text = {k: v for k, v in built.items() if k in _TEXT_KEYS}
        if "input_ids" in text and len(text) < len(built):
            candidates.append(text)
    first = None
    for batch in candidates:
        try:
            with torch.no_grad():
                outputs = model_outputs(model, batch)
        except Exception as exc:  # the model's forward: any error it raises means "does not fit"
            first = first or exc
            continue
        note = None if first is None else f"probed on {', '.join(batch)} alone: {_raised(candidates[0], first)}"
        if padded:
            note = ("probed with the batch's padding attended (its attention masks set to ones: a row whose first "
                    "positions see only padding gives NaN in float64 attention, and the centring holds at every position)")
        return batch, outputs, note
    if inputs is not None:
        raise ValueError(f"patch_model: probe_inputs do not run through {type(model).__name__}: {_raised(inputs, first)}") from first
    raise ProbeError(_raised(candidates[0], first)) from first


def attended(inputs: dict) -> tuple[dict, bool]:
    """(the batch with its padding attended, whether it had any): every 2-D attention mask
    (``attention_mask``, ``decoder_attention_mask``, ..., in a sentence-transformers features
    dict too) that masks a position becomes ones. With left padding a row's first queries see
    only masked keys, and SDPA's float64 attention (on the CPU) returns NaN there, which the
    next layer spreads over the row (a zero attention weight times NaN is NaN): the float64
    measurement and its verification would then see nothing. A padded token is a token like
    any other to the conversion, which centres the stream at every position."""
    out, padded = {}, False
    for key, value in inputs.items():
        if isinstance(value, dict):
            value, inner = attended(value)
            padded = padded or inner
        elif (key.endswith("attention_mask") and isinstance(value, torch.Tensor) and value.dim() == 2
              and not bool(value.all())):
            value, padded = torch.ones_like(value), True
        out[key] = value
    return out, padded


def _raised(batch: dict, exc: BaseException) -> str:
    return f"the model's forward raised on the probe batch ({', '.join(batch)}): {describe_error(exc)}"


def float64_inputs(inputs: dict) -> dict:
    """The batch with its floating tensors in float64 (ids, masks and non-tensor arguments
    such as ``use_cache=False`` as they are)."""
    return {k: float64_inputs(v) if isinstance(v, dict) else v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


# Verification (STYLE.md's rule): the converted model's error against the float64 original
# must be within 2x the original's own error in its dtype, plus this (relative to the output).
# The converted model pays one rounding more than the original: every centred weight is
# rounded back to the model's dtype (2^-24 relative per weight in fp32, 2^-9 in bf16), which
# the original's own error does not include; the atol covers it.
EXACT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# the seed of every probe forward's random draws (``model_outputs``)
PROBE_SEED = 0


def model_outputs(model: nn.Module, inputs: dict, seed: int = PROBE_SEED) -> dict:
    """Every floating tensor the model returns, by dotted name (caches left out). A forward
    that draws random numbers (ViTMAE's masking, ViLT's patch sampling) draws them from torch's
    generators seeded with ``seed``, in a fork of their state: two runs of the same model draw
    the same numbers, and the caller's random stream is left as it was."""
    devices = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                      for t in model.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        # a dict argument is copied: sentence-transformers adds its outputs to the features dict it is given
        return _tensors(model(**{k: dict(v) if isinstance(v, dict) else v for k, v in inputs.items()}), "")


def random_outputs(model: nn.Module, inputs: dict, outputs: dict) -> list[str]:
    """Which of ``outputs`` (the model's, seeded with PROBE_SEED) change when the forward draws
    other random numbers. The float64 truth does not describe them: a float64 forward draws
    other numbers than one in the model's dtype, even from the same seed."""
    with torch.no_grad():
        other = model_outputs(model, inputs, seed=PROBE_SEED + 1)
    return [k for k, v in outputs.items() if k in other and not torch.equal(other[k], v)]


def _tensors(value, prefix: str) -> dict:
    if isinstance(value, torch.Tensor):
        return {prefix: value} if value.is_floating_point() else {}
    if isinstance(value, dict):  # ModelOutput is a dict
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        return {}  # a KV cache or anything else that is not an output tensor
    found = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def compare_outputs(before: dict, after: dict, truth: dict, tolerance: float, random: tuple = ()) -> tuple[float, float, list[str]]:
    """(max relative difference converted vs original, the largest excess of the converted
    model's error against the float64 truth over 2x the original's own error, the outputs
    left out). Left out are outputs that differ only by a per-position mean: they expose the
    raw residual stream, whose mean the conversion removes by design (no LayerNorm saw it).
    The ``random`` outputs (``random_outputs``), which the truth does not describe, are held to
    the original's on the same draws instead, within ``tolerance``."""
    diff, excess, stream_outputs = 0.0, -math.inf, []
    for key, ref in before.items():
        got = after[key]
        if key in random:
            over = _rel_err(got, ref) - tolerance
            exposes = _rel_err(got, ref, centre=True) <= tolerance
        else:
            over = _rel_err(got, truth[key]) - (2 * _rel_err(ref, truth[key]) + tolerance)
            exposes = _rel_err(got, truth[key], centre=True) <= 2 * _rel_err(ref, truth[key], centre=True) + tolerance
        if over > 0 and exposes:
            stream_outputs.append(key)
            continue
        diff = max(diff, _rel_err(got, ref))
        excess = max(excess, over)
    return diff, excess, stream_outputs
