"""The conversion a checkpoint records, for where it cannot be measured (DESIGN.md §2.4).

measure.py measures the exact conversion on a float64 copy of the model. Where that copy does
not fit (a big model on a GPU: the very models converted on disk, shard by shard, for want of
memory), a model loaded from a checkpoint hf_rmsnorm wrote still carries the record of its
conversion in its config's ``hf_rmsnorm`` block: which norms were converted, which stream
writers were centred, where the stream's start is centred at run time. ``convert_checkpoint``
writes the architecture table's plan, with the writers centred on disk;
``hf_rmsnorm.save_pretrained`` writes the plan measured in the patched model, with the writers
as it trained them. ``read_record`` rebuilds the conversion from that record, and
``verify_centring`` checks it in the model's own dtype, in place of the float64 measurement.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from .architectures import relative_name
from .centring import input_centring
from .probe import EXACT_TOLERANCE, ProbeError, evaluating, run_probe


@dataclasses.dataclass
class Record:
    writers: list[str]  # every stream writer, by this model's module names
    starts: list[str]  # stream starts centred at run time
    exact: list[str]
    approximate: list[str]
    centre_now: list[str]  # writers the conversion on disk could not centre (stored in another layout)
    on_disk: bool  # convert_checkpoint's record (writers centred on disk), not a patched model's save


def resolver(model: nn.Module):
    """A function giving a recorded module name as one of the model's: as recorded, else the
    one module whose name ends with it, or with it relative to the base model. A record names
    the modules of the class it was written with (GPT2LMHeadModel's ``transformer.h.0.ln_1``),
    which a GPT2Model holds as ``h.0.ln_1``, a PeftModel as ``base_model.model.transformer...``
    and a sentence-transformers model as ``0.auto_model.h.0.ln_1``. None where no single module
    fits."""
    names = [n for n, _ in model.named_modules() if n]
    exact = set(names)
    prefixes = {p for m in model.modules() if isinstance(p := getattr(m, "base_model_prefix", None), str) and p}

    def resolve(name: str) -> Optional[str]:
        if name in exact:
            return name
        for tail in dict.fromkeys((name, *(relative_name(name, p) for p in prefixes))):
            found = [n for n in names if n == tail or n.endswith(f".{tail}")]
            if len(found) == 1:
                return found[0]
        return None

    return resolve


def read_record(model: nn.Module, block: Optional[dict], layer_norms: dict, allow_approximate: bool) -> tuple[Optional[Record], str]:
    """(the conversion ``block`` records, with this model's names; else None and why not, ""
    where the block records no conversion to rebuild)."""
    if not block or block.get("target") != "rmsnorm":
        return None, ""
    modules = block.get("modules") or {}
    if not {"modules", "stream_writers", "runtime_centring"} <= block.keys():
        # a bare save of a patched model records counts alone; a conversion on disk of a model
        # type outside the architecture table, or refused by it, centred nothing there
        if not block.get("keep_writers") and any(c in ("exact", "approximate", "at load") for c in modules.values()):
            return None, f"its checkpoint's conversion on disk names no stream writers ({block.get('note') or 'an older record'})"
        return None, ""
    wanted = {"exact": [], "approximate": []}
    for name, change in modules.items():
        if change in wanted:
            wanted[change].append(name)
    if wanted["approximate"] and not allow_approximate:
        return None, "its checkpoint converted approximately: pass allow_approximate=True"
    on_disk = not block.get("keep_writers")
    later = list(block.get("not_centred_on_disk") or ()) if on_disk else []
    names, resolve = {}, resolver(model)
    for name in (*wanted["exact"], *wanted["approximate"], *block["stream_writers"], *later, *block["runtime_centring"]):
        names[name] = resolve(name)
        if names[name] is None:
            return None, f"the conversion its checkpoint records names {name}, which this {type(model).__name__} does not have"
    # the norms patched here (include / exclude may leave some out: with the writers centred,
    # a norm left a LayerNorm computes the same; with writers trained off the centre, patch.py
    # refuses a count other than the saved one)
    here = {change: [names[n] for n in wanted[change] if names[n] in layer_norms] for change in wanted}
    return Record(writers=[names[n] for n in (*block["stream_writers"], *later)], starts=[names[n] for n in block["runtime_centring"]],
                  exact=here["exact"], approximate=here["approximate"], centre_now=[names[n] for n in later], on_disk=on_disk), ""


def verify_centring(model: nn.Module, names: list[str], probe: Optional[dict]) -> dict:
    """Each converted norm's input on a probe batch, in the model's own dtype: a norm whose
    input has zero mean computes with RMSNorm what it computed with LayerNorm, and a mean of
    r times the input's rms moves its output by about r (in units of the output's rms). So an
    input centred to within ``EXACT_TOLERANCE`` of its dtype, the output error the float64
    verification allows, shows the recorded conversion exact to that dtype's rounding (a
    centred stream measures 0.1-20 eps there, by how much its start's centring cancelled;
    uncentred ones 0.2-0.7 of their rms in tiny random models). Returns {"input_centring":
    {name: ratio}, "dtypes": {name: dtype}, "tolerance": {name: the dtype's}, "unreached":
    [names]} or, where no probe batch runs, {"skipped": why}."""
    with evaluating(model):
        try:
            inputs, _, _ = run_probe(model, probe)  # a probe the user gave that does not run raises
        except ProbeError as exc:
            return {"skipped": str(exc)}
        dtypes: dict = {}
        ratios = input_centring(model, names, inputs, dtypes)
    return {"input_centring": ratios, "dtypes": {n: str(d).replace("torch.", "") for n, d in dtypes.items()},
            "tolerance": {n: EXACT_TOLERANCE.get(d, 1e-4) for n, d in dtypes.items()}, "unreached": [n for n in names if n not in ratios]}


def describe_centring(found: dict, unchecked: str) -> tuple[Optional[str], str]:
    """(the failure message, or None; the report's note) for ``verify_centring``'s result,
    empty where it was not run (``unchecked`` says why)."""
    ratios, tolerance = found.get("input_centring"), found.get("tolerance")
    if not ratios:
        why = found.get("skipped") or ("the probe batch reaches no converted norm" if found else unchecked)
        return None, f"Neither measured nor verified here: {why}."
    worst = max(ratios, key=lambda n: ratios[n] / tolerance[n])
    said = f"{worst}'s input has |mean|/rms {ratios[worst]:.2g} in {found['dtypes'][worst]}"
    if ratios[worst] > tolerance[worst]:
        return (f"patch_model: the conversion its checkpoint records failed verification: {said}, more than rounding there "
                f"explains ({tolerance[worst]:.0e}), so its RMSNorm would not compute its LayerNorm's function: the record does "
                "not describe these weights"), ""
    unreached = found["unreached"]
    return None, (f"Verified on a probe batch: every converted norm's input is centred to within its dtype's rounding (the least "
                  f"centred, {said}, against {tolerance[worst]:.0e}), where RMSNorm computes the LayerNorm's function"
                  + (f"; {len(unreached)} converted norms the probe batch does not reach are not verified (e.g. {unreached[0]})"
                     if unreached else "") + ".")


__all__ = ["Record", "describe_centring", "read_record", "resolver", "verify_centring"]
