"""Exact LayerNorm -> RMSNorm conversion of pre-LN models (DESIGN.md §2), found by measuring
the model rather than by reading its name.

1. **Stream writers.** A module writes the residual stream when shifting its output along the
   all-ones direction changes nothing downstream (the stream is only read by shift-invariant
   LayerNorms). One float64 forward/backward with a zero shift added to the output of every
   Linear / Conv1D of hidden width measures exactly that: the gradient of the output with
   respect to the shift is zero for writers and not for anything else (q/k/v, up-projections).
2. **Centre them**: W <- C W, b <- b - mean(b), in float64, cast back. The model's function is
   unchanged.
3. **Centre each stream's start at run time**: a forward pre-hook subtracts the mean of the
   first block's input (one subtraction per forward). This covers every way a stream can begin
   — token embeddings tied to the LM head, position and token-type tables, an embedding
   LayerNorm, a convolutional stem — without rewriting any of them.
4. **Measure**: every LayerNorm whose input now has zero mean (to float64 rounding) reads the
   centred stream and becomes an RMSNorm with the same weight, bias and eps. The rest (post-LN
   norms, norms on heads, embedding norms) keep their function on the fused LayerNorm — or,
   with ``allow_approximate``, become RMSNorms anyway, with the deviation reported.

Steps 1 and 4 are measured on a float64 copy of the model (``measure.py``: the plan); this
module applies the plan to the model (``_Conversion``: steps 2 and 3), verifies it and reports.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..ops import _cpu_kernel
from .centring import (add_start_hooks, centre_writer_, input_centring, keep_centred, off_centre, output_params,
                       quantized_why, stored_quantized, watch_writers)
from .discovery import build_fused
from .measure import ConversionPlan, float64_copy_shortfall, plan_conversion
from .probe import EXACT_TOLERANCE, ProbeError, compare_outputs, evaluating, model_outputs, random_outputs, run_probe
from .recorded import Record, describe_centring, read_record, verify_centring

# what to do about a shortfall, where the conversion is then not made
_SHORTFALL_ADVICE = "; convert the checkpoint on disk instead (scripts/convert_checkpoint.py, shard by shard), or patch where the copy fits"
# ... where the checkpoint's record of a conversion cannot serve instead
_LOAD_ADVICE = "; patch it where the copy fits (e.g. loaded on the CPU), then move it to its device"


# ----------------------------------------------------------------------------- the conversion


def _off_cuda_note(device_type: str) -> str:
    """What the report says about running a converted model off CUDA, where Triton does not run."""
    reason = _cpu_kernel.torch_ops_reason() if device_type == "cpu" else None
    if device_type == "cpu" and reason is None:
        return (
            "the model is on cpu, where the converted norms run the compiled CPU RMSNorm: about as fast as the "
            "LayerNorms they replace from a hundred tokens a call up, up to 1.2x their time at a single token "
            "(Python's cost per call); the conversion pays on a CUDA GPU"
        )
    # a kernel that could not be built is worth a word; a backend the user chose is not
    why = f" ({reason})" if reason not in (None, _cpu_kernel.TORCH_BACKEND) else ""
    return (
        f"the model is on {device_type}, where the converted norms run on torch ops{why}, slower than the "
        "LayerNorms they replace (torch has a fused LayerNorm there, no fused RMSNorm): the conversion pays on "
        "a CUDA GPU; to run on this device, target='layernorm' keeps torch's layer_norm"
    )


def _update(report, fqn: str, **fields) -> None:
    for entry in report:
        if entry["name"] == fqn:
            entry.update(fields)
            return


def _not_converted(report, layer_norms, why: str) -> None:
    for fqn in layer_norms:
        _update(report, fqn, reason=f"kept as LayerNorm (fused): {why}")
    report.note = f"nothing converted: {why}."


_KEEP_CENTERED_CONFLICT = ("patch_model: keep_centered would centre {}, which the checkpoint this model was loaded from saved "
                           "uncentred (fine-tuned converted without keep_centered): that changes the model. Patch it without "
                           "keep_centered to run it as it was saved.")


class _Conversion:
    """The exact conversion of one model, in the order patch_model needs it: planned at
    construction (nothing changed), then ``apply`` (centre writers, start hooks), ``verify``
    (raise if not exact), ``finish``, and on failure ``undo_centring``."""

    def __init__(self, model, planned: dict, report, probe: Optional[dict], allow_approximate: bool, keep_centered: bool, strict: bool,
                 block: Optional[dict] = None):
        self.model, self.report, self.strict, self.keep_centered, self.probe = model, report, strict, keep_centered, probe
        self.shortfall: Optional[str] = None  # why the float64 measurement cannot be made here
        self.record: Optional[Record] = None  # the plan is then the checkpoint's record (block), not measured
        self.off: list[str] = []  # the record's writers loaded uncentred
        self.replacements: dict[str, nn.Module] = {}
        self.backups: dict[str, dict] = {}
        self.watch = None  # centring.WriterWatch of the centred writers (without keep_centered)
        layer_norms = {
            fqn: math.prod(new.normalized_shape)
            for fqn, (_, spec, new) in planned.items()
            if spec.kind == "layer" and new.normalized_shape is not None and len(new.normalized_shape) == 1
        }
        for fqn, (_, spec, new) in planned.items():
            if spec.kind == "layer" and new.normalized_shape is None:
                # the writers are found by their output width, which such a norm does not say
                _update(report, fqn, reason="kept as LayerNorm (fused): it has no parameters and no normalized_shape, so nothing "
                        "says which stream it reads; give it a normalized_shape to have it converted")
        self.plan = None
        if not layer_norms:
            return
        self.shortfall = float64_copy_shortfall(model)
        probe_note = None
        if self.shortfall:  # refused up front unless the checkpoint's record serves: an out-of-memory kill would say nothing
            self.record, why = read_record(model, block, layer_norms, allow_approximate)
            advice = _LOAD_ADVICE if why else _SHORTFALL_ADVICE
            if self.record is not None:
                why, advice = self._check_record()
            if self.record is None or why:
                return _not_converted(report, layer_norms, self.shortfall + (f"; {why}" if why else "") + advice)
            r = self.record
            self.plan, self.approximate = ConversionPlan(r.writers, r.starts, {}, r.exact, {}), r.approximate
        else:
            probe_note = self._measure(model, planned, layer_norms, probe, allow_approximate)
            if self.plan is None:
                return
        self._describe(planned, layer_norms, probe_note)

    def _check_record(self) -> tuple[str, str]:
        """(why the writers are not as the record leaves them, what to do about it), both ""
        where they are: a conversion on disk centred them, so weights off the centre changed
        since (a LayerNorm model fine-tuned in plain transformers, which keeps the block) and
        are another model's. A patched model's save may hold them uncentred (fine-tuned without
        keep_centered): that is the model it saved, which the float64-free check below cannot
        verify."""
        quantized = [w for w in self.record.writers if stored_quantized(self.model.get_submodule(w))]
        if quantized:
            # loaded with a quantization_config: the record's centring does not survive it, and no
            # other load helps (the reason ends with what does)
            return quantized_why(self.model, quantized), ""
        self.off = self._off_centre({w: None for w in self.record.writers if w not in self.record.centre_now})
        if self.off and self.record.on_disk:
            return (f"{self.off[0]} (and {len(self.off) - 1} more) is not centred as its conversion on disk left it: the "
                    "weights changed since (fine-tuned as a LayerNorm model?), so that conversion's record no longer describes "
                    "them"), _LOAD_ADVICE
        return "", ""

    def _measure(self, model, planned, layer_norms, probe, allow_approximate) -> Optional[str]:
        """The plan measured on the probe batch (None where it cannot be: the report says why)."""
        report = self.report
        # Nothing is changed yet when a probe fails. A batch the user gave that does not run
        # raises (run_probe); one built here that does not fit, or a model that cannot run in
        # float64, only means that the conversion cannot be verified, so it is not made.
        with evaluating(model):  # dropout would make the stream's mean random
            try:
                self.inputs, self.before, probe_note = run_probe(model, probe)
            except ProbeError as exc:
                return _not_converted(report, layer_norms, str(exc))
            try:
                specs = {fqn: planned[fqn][1] for fqn in layer_norms}
                self.plan = plan_conversion(model, layer_norms, self.inputs, specs, only_for_exact=not allow_approximate)
            except ProbeError as exc:
                return _not_converted(report, layer_norms, str(exc))
        self.approximate = [n for n in layer_norms if n not in self.plan.exact] if allow_approximate else []
        return probe_note

    def _describe(self, planned, layer_norms, probe_note) -> None:
        """The replacements, and every LayerNorm's report entry and the note, for the plan."""
        report = self.report
        for fqn in self.plan.exact + self.approximate:
            module, spec, _ = planned[fqn]
            self.replacements[fqn] = build_fused(dataclasses.replace(spec, kind="rms"), module, (layer_norms[fqn],))
        report.conversion = {"writers": self.plan.writers, "runtime_centring": self.plan.starts}
        if self.record is not None:
            for fqn in layer_norms:
                change = "exact" if fqn in self.plan.exact else "approximate" if fqn in self.approximate else None
                if change:
                    _update(report, fqn, change=change, new="FusedRMSNorm",
                            reason=f"as the checkpoint it was loaded from records ({change}), not measured here")
                else:
                    _update(report, fqn, reason="kept as LayerNorm (fused): the checkpoint it was loaded from did not convert it")
            r, n = self.record, len(self.plan.writers)
            if r.on_disk:
                what = f"its conversion on disk (convert_checkpoint's block): {n - len(r.centre_now)} stream writers centred there"
                what += f" and {len(r.centre_now)} here (stored in another layout on disk)" if r.centre_now else ""
            else:
                what = ("the checkpoint it was loaded from (hf_rmsnorm.save_pretrained's block): its stream writers as saved, "
                        + ("not centred (fine-tuned without keep_centered)" if self.off else "centred"))
            starts = f"; stream start centred at run time at: {', '.join(self.plan.starts)}" if self.plan.starts else ""
            report.note = f"rebuilt from the record of {what}{starts}; not measured in float64 here: {self.shortfall}."
            return
        quantized = quantized_why(self.model, self.plan.quantized) if self.plan.quantized else None  # one text for all
        for fqn in layer_norms:
            ratio = self.plan.centring.get(fqn, math.inf)
            if fqn in self.plan.exact:
                reason = f"reads the centred residual stream (input |mean|/rms {ratio:.0e} in float64): RMSNorm with the same weight, bias and eps"
                _update(report, fqn, change="exact", new="FusedRMSNorm", reason=reason)
            elif fqn in self.approximate:
                _update(report, fqn, change="approximate", new="FusedRMSNorm", reason=f"converted on request; its input is not centred (|mean|/rms {ratio:.2g})")
            elif fqn not in self.plan.centring:
                reason = "kept as LayerNorm (fused): the probe batch does not reach it, so nothing shows its input centred"
                _update(report, fqn, reason=reason)
            else:
                why = f": {quantized}" if quantized else (
                    " even with the stream writers centred: something other than a LayerNorm also reads its stream (a post-LN "
                    "block, a projection of raw hidden states), or it normalises something else (embeddings, heads)")
                _update(report, fqn, reason=f"kept as LayerNorm (fused): its input is not centred (|mean|/rms {ratio:.2g}){why}; "
                        "allow_approximate=True converts it anyway")
        if not self.replacements:
            report.note = (f"{quantized}: nothing converted." if quantized
                           else "no LayerNorm reads a stream that can be centred (post-LN?): nothing converted.")
            if not self.plan.centring:
                report.note = "the probe batch reaches no LayerNorm: nothing converted."
        else:
            note = [f"centred {len(self.plan.writers)} stream writers" + (f" (e.g. {self.plan.writers[0]})" if self.plan.writers else "")]
            if self.plan.starts:
                note.append(f"stream start centred at run time at: {', '.join(self.plan.starts)}")
            device = next(self.model.parameters()).device
            if device.type != "cuda" and not report.dry_run:
                # Not said in a dry run (`hf-rmsnorm inspect`), which builds the model on the
                # CPU to look. Measured: benchmarks/results/cpu/cpu.md.
                note.append(_off_cuda_note(device.type))
            report.note = "; ".join(note) + "."
        if probe_note:
            report.note = f"{probe_note}; {report.note}"

    def apply(self) -> list:
        """Centre the writers (keeping backups until verified) and hook the stream starts."""
        if not self.plan or not self.replacements:
            return []
        hooks = add_start_hooks(self.model, self.plan.starts)
        self._refuse_keep_centered(self.off)  # a record's writers stay as loaded; keep_centered may only keep them so
        for name in self.plan.writers if self.record is None else self.record.centre_now:
            module = self.model.get_submodule(name)
            self.backups[name] = {p: getattr(module, p).detach().clone() for p in output_params(module)}
            centre_writer_(module)
        if self.keep_centered:
            hooks += [h for name in self.plan.writers for h in keep_centred(self.model.get_submodule(name), self.model, name)]
        elif self.plan.writers and not self.off:  # writers loaded off the centre: the fine-tuned RMSNorm model
            self.watch = watch_writers(self.model, self.plan.writers)
            hooks.append(self.watch)
        return hooks

    def _off_centre(self, loaded: dict) -> list[str]:
        """The writers' parameters that were loaded uncentred (``loaded``: {writer: {parameter:
        its loaded value}}, or None where the module still holds it), as "writer.parameter"."""
        return [f"{name}.{p}" for name, values in loaded.items() for p in off_centre(self.model.get_submodule(name), values)]

    def _refuse_keep_centered(self, off: list[str]) -> None:
        """keep_centered would centre the writers ``off`` the centre, and so change the model."""
        if off and self.keep_centered:
            raise ValueError(_KEEP_CENTERED_CONFLICT.format(f"{off[0]} (and {len(off) - 1} more)"))

    def undo_centring(self) -> None:
        with torch.no_grad():
            for name, saved in self.backups.items():
                module = self.model.get_submodule(name)
                for p, value in saved.items():
                    getattr(module, p).copy_(value)
        self.backups.clear()

    def finish(self, writers_as_loaded: bool) -> None:
        """Drop the backups of the verified conversion, or (``writers_as_loaded``: the model was
        loaded from a save of a patched model) put them back: the verification has shown the
        structure exact for the loaded weights, and the writers as loaded are what that model
        computed with, centred or (fine-tuned converted without keep_centered) not."""
        if writers_as_loaded and self.backups:
            off = self._off_centre(self.backups)
            self._refuse_keep_centered(off)
            if not self.keep_centered:
                self.undo_centring()
            if off and self.watch is not None:
                self.watch.remove()  # the fine-tuned RMSNorm model: its writers are off the centre by design
            if off:
                for fqn in self.plan.exact:
                    _update(self.report, fqn, reason="RMSNorm as fine-tuned: the stream writers were trained converted, without "
                            "keep_centered, and keep their saved values, so its input is no longer centred")
                self.report.note = (f"{self.report.note} The {len(self.plan.writers)} stream writers keep their saved values "
                                    "(fine-tuned without keep_centered): this is the fine-tuned RMSNorm model, which plain "
                                    "transformers, reading its LayerNorms, does not compute.")
        self.backups.clear()

    def verify(self) -> None:
        """Outputs against the unconverted model's, and the centring of every converted
        norm's input, on the probe batch."""
        if not self.plan or not self.replacements:
            return
        if self.record is not None:
            return self._verify_record()
        with evaluating(self.model), torch.no_grad():
            after = model_outputs(self.model, self.inputs)
            random = random_outputs(self.model, self.inputs, after)
            exact = [n for n in self.plan.exact if n in self.replacements]
            ratios = input_centring(self.model, exact, self.inputs)
        dtype = next(iter(self.before.values())).dtype
        tolerance = EXACT_TOLERANCE.get(dtype, 1e-4)
        err, excess, stream_outputs = compare_outputs(self.before, after, self.plan.truth, tolerance, random)
        self.report.verification = {"max_rel_diff": err, "outputs_exposing_the_stream": stream_outputs, "input_centring": ratios,
                                    "random_outputs": random}
        verb = "measured" if self.approximate else "verified"
        line = f"{verb} on a probe batch: outputs differ from the original's by {err:.1e} (max relative)"
        if stream_outputs:
            line += f"; {', '.join(stream_outputs)} expose the raw residual stream and differ only by its mean, as designed"
        if random:
            line += (f"; {', '.join(random)} depend on random draws in the forward (masking, sampling), so they were "
                     "compared with the original's on the same draws, not with a float64 run")
        self.report.note = f"{self.report.note} {line}."
        for fqn in exact:
            _update(self.report, fqn, max_rel_error=err)
        if self.approximate:
            for fqn in self.approximate:
                _update(self.report, fqn, max_rel_error=err, reason=f"converted on request; model outputs deviate by {err:.2e} (max relative) with all {len(self.approximate)} approximated")
            return
        if excess > 0:
            worst = max(ratios, key=ratios.get) if ratios else "?"
            message = (
                f"patch_model: exact conversion failed verification: outputs differ by {err:.2e}, more than "
                f"rounding in {dtype} explains; the least centred converted norm is {worst} "
                f"(input |mean|/rms {ratios.get(worst, float('nan')):.2g})"
            )
            if random:
                # no float64 run bounds their rounding: a deep model may amplify its own past the tolerance
                message += (f"; {', '.join(random)} depend on random draws in the forward and were held to the "
                            f"original's on the same draws within {tolerance:.0e}, with no float64 run to say how much "
                            "rounding the model itself amplifies")
            if self.strict:
                raise RuntimeError(message + '; the model was restored. Use target="layernorm" or exclude=[...] for that module.')
            warnings.warn(message, stacklevel=3)

    def _verify_record(self) -> None:
        """A rebuilt record, checked in the model's own dtype (``verify_centring``) where its
        writers are centred; with writers fine-tuned off the centre, the norms read the
        uncentred stream they were trained on, and nothing here can check it."""
        exact = [n for n in self.plan.exact if n in self.replacements]
        found = verify_centring(self.model, exact, self.probe) if exact and not self.off else {}
        failure, note = describe_centring(found, "its writers were fine-tuned off the centre" if self.off else "it converted approximately")
        self.report.note += f" {note}"
        if found:
            self.report.verification = found
        for fqn, r in found.get("input_centring", {}).items():
            _update(self.report, fqn, reason=f"as the checkpoint it was loaded from records (exact); its input measured centred "
                                             f"here (|mean|/rms {r:.0e} in {found['dtypes'][fqn]})")
        if failure and self.strict:
            raise RuntimeError(f"{failure}; the model was restored. Load it where the float64 copy fits to have it measured.")
        if failure:
            warnings.warn(failure, stacklevel=3)
