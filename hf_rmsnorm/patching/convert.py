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
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from ..ops import _cpu_kernel
from .centring import (QUANTIZED_ADVICE, _is_hidden, add_start_hooks, centre_writer_, centring_ratio, input_centring, is_centred,
                       keep_centred, output_params, quantized_why, stored_quantized)
from .discovery import NormSpec, build_fused
from .probe import EXACT_TOLERANCE, ProbeError, compare_outputs, describe_error, float64_inputs, model_outputs, random_outputs, run_probe
from .recorded import Record, describe_centring, read_record, verify_centring

# |mean| / rms of a norm's input at or below this (in float64) counts as centred
_CENTRED_FP64 = 1e-6
# a writer's shift gradient relative to its output gradient at or below this (float64, with
# the LayerNorms computing in float64: plan_conversion). Writers measure float64 rounding
# (1e-17..1e-15 over the test families). What is not a writer but leaks only a little of the
# stream's mean, through the q/k/v of a post-LN block, measures in proportion to those
# weights: 5e-5..3e-3 for tiny ELECTRA / RoBERTa as initialised, 1e-9 for a BERT with its
# q/k/v scaled by 1e-6. The final verification backs this up.
_INVARIANT_FP64 = 1e-10


# ------------------------------------------------------------------------------------ writers


def _out_features(module: nn.Module) -> Optional[int]:
    params = output_params(module)
    if not params:
        return None
    name, dim = next(iter(params.items()))
    return getattr(module, name).shape[dim]


def _shift(x: torch.Tensor, shifts: dict, outputs: dict, name: str) -> torch.Tensor:
    """x plus a zero, per-position shift along the ones direction that autograd can see."""
    shift = torch.zeros(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device, requires_grad=True)
    shifted = x + shift
    shifts.setdefault(name, []).append(shift)
    outputs.setdefault(name, []).append(shifted)
    return shifted


def _shifted_forward(model64: nn.Module, inputs: dict, outputs_of: list[str], inputs_of: list[str], readers: list[str]):
    """One float64 forward (no_grad off) with a zero per-position shift along the ones
    direction added to the named modules' outputs (``outputs_of``) and hidden-state inputs
    (``inputs_of``): (the model's outputs, {name: [shift]}, {name: [shifted tensor]}, the
    inputs of ``readers``, {reader: the centring ratio of its input}: ``input_centring``'s,
    before any centring)."""
    shifts, shifted, handles, read, ratios = {}, {}, [], [], {}

    def post_hook(name):
        return lambda mod, args, out: _shift(out, shifts, shifted, name) if _is_hidden(out) else None

    def pre_hook(name):
        def hook(mod, args, kwargs):
            if args and _is_hidden(args[0]):
                return (_shift(args[0], shifts, shifted, name), *args[1:]), kwargs
            if _is_hidden(kwargs.get("hidden_states")):
                return args, {**kwargs, "hidden_states": _shift(kwargs["hidden_states"], shifts, shifted, name)}
            return None

        return hook

    def read_hook(name):
        def hook(mod, args):
            if args and _is_hidden(args[0]):
                read.append(args[0])
                ratios[name] = max(ratios.get(name, 0.0), centring_ratio(args[0]))

        return hook

    for name in outputs_of:
        handles.append(model64.get_submodule(name).register_forward_hook(post_hook(name)))
    for name in inputs_of:
        handles.append(model64.get_submodule(name).register_forward_pre_hook(pre_hook(name), with_kwargs=True))
    for name in readers:
        handles.append(model64.get_submodule(name).register_forward_pre_hook(read_hook(name)))
    try:
        results = model_outputs(model64, inputs)
    finally:
        for h in handles:
            h.remove()
    return results, shifts, shifted, read, ratios


def _reaching(read: list, shifts: dict, g: torch.Generator) -> set[str]:
    """The names whose shifts reach one of the ``read`` tensors: the gradient of a random
    projection of them with respect to a shift is non-zero exactly where the shift reaches one."""
    names = [n for n in shifts]
    flat = [t for n in names for t in shifts[n]]
    if not read or not flat:
        return set()
    seen = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum() for t in read)
    if not seen.requires_grad:  # no shift reaches any of them (SqueezeBERT's conv blocks have no Linear writers)
        return set()
    grads = iter(torch.autograd.grad(seen, flat, allow_unused=True))
    reached = set()
    for n in names:
        if any([r is not None and float(r.abs().max()) > 0.0 for r in (next(grads) for _ in shifts[n])]):
            reached.add(n)
    return reached


def shift_invariant(model64: nn.Module, inputs: dict, outputs_of: list[str], inputs_of: list[str],
                    readers: list[str], ratios: Optional[dict] = None) -> set[str]:
    """Which of the named modules' outputs (``outputs_of``) or hidden-state inputs
    (``inputs_of``) can be shifted along the ones direction, per position, without changing
    any model output, and reach the input of one of ``readers`` (the LayerNorms): one float64
    forward and two backwards through ``model64`` (eval mode). A module of the stream's width
    that feeds no LayerNorm (an LM head as wide as an embedding, say) is no stream writer:
    centring it would only shift its outputs, and change what shares its weight. ``ratios``, when
    given, receives the readers' input centring as they are."""
    results, shifts, shifted, read, seen = _shifted_forward(model64, inputs, outputs_of, inputs_of, readers)
    if ratios is not None:
        ratios.update(seen)
    if not shifts:
        return set()
    # A random projection of every output, blind to per-position mean shifts: outputs that
    # expose the raw residual stream (CLIP's vision last_hidden_state) carry the stream's mean,
    # which the conversion removes by design; only what the LayerNorms see must be unchanged.
    g = torch.Generator().manual_seed(7)
    loss = 0.0
    for t in results.values():
        r = torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
        loss = loss + (t * (r - r.mean(-1, keepdim=True))).sum()
    if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
        return set()  # no shifted output reaches the model's outputs: nothing is proven a writer
    names = list(shifts)
    flat = [t for n in names for t in shifts[n]] + [t for n in names for t in shifted[n]]
    grads = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=bool(read))
    count = len(flat) // 2
    reached = _reaching(read, shifts, g)
    invariant, i = set(), 0
    for n in names:
        k = len(shifts[n])
        gs, go = grads[i : i + k], grads[count + i : count + i + k]
        i += k
        if any(g is None for g in go + gs) or all(float(g.abs().max()) == 0.0 for g in go) or n not in reached:
            continue  # unused, or read by no LayerNorm: nothing to centre, nothing proven
        ratio = max(
            (s.abs() / (o.norm(dim=-1, keepdim=True) * math.sqrt(o.shape[-1])).clamp_min(1e-300)).max().item()
            for s, o in zip(gs, go)
        )
        if ratio <= _INVARIANT_FP64:
            invariant.add(n)
    return invariant


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (a head tied to an embedding
    table)."""
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    return {k for k, count in holders.items() if count > 1}


# ------------------------------------------------------------- stream starts, centring measured


def block_lists(model: nn.Module) -> dict[str, str]:
    """{outermost ModuleList: its first block}: where each stream of blocks enters (an
    encoder's and a decoder's layers are two; experts inside a block are not a stream)."""
    chosen: dict[str, str] = {}
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and n]
    for name, module in sorted(lists, key=lambda item: item[0].count(".")):
        if not any(name.startswith(f"{c}.") for c in chosen):
            chosen[name] = f"{name}.{next(iter(module._modules))}"
    return chosen


# ------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class ConversionPlan:
    writers: list[str]
    starts: list[str]
    centring: dict[str, float]  # |mean|/rms of each LayerNorm's input after centring (fp64)
    exact: list[str]
    truth: dict  # the original model's outputs on the probe batch, in float64
    quantized: list = dataclasses.field(default_factory=list)  # layers of a stream's width, weights quantized


def _float64_tensors(model: nn.Module) -> list:
    """The model's floating parameters and buffers, each once (tied ones are one tensor)."""
    seen, tensors = set(), []
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    return tensors


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode, on the devices of its tensors, made tensor by
    tensor (no deep copy in the model's own dtype first), ties kept (one tensor per tied group),
    and with parameters that need no gradient: only the probe's shifts are differentiated, so
    the backward keeps nothing for weight gradients."""
    memo = {}
    for t in _float64_tensors(model):
        t64 = t.detach().to(torch.float64)
        memo[id(t)] = nn.Parameter(t64, requires_grad=False) if isinstance(t, nn.Parameter) else t64
    return to_float64_(copy.deepcopy(model, memo)).eval()


def to_float64_(model: nn.Module) -> nn.Module:
    """``model.double()`` (in place), set to run in float64: where transformers dispatches its
    mixture-of-experts kernels (grouped_mm takes no float64), its reference (eager) experts,
    which compute the same function."""
    model.double()
    config = getattr(model, "config", None)
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None and getattr(config, "_experts_implementation", "eager") != "eager":
        try:
            setter("eager")
        except Exception:  # an older transformers, or a model it cannot switch: the forward says so
            pass
    return model


@contextlib.contextmanager
def float64_default():
    """torch's default dtype float64 for the length of a float64 forward: tensors a model
    creates on the fly (masks filled with ``finfo(dtype).min``, positions) then match its
    float64 weights instead of overflowing or mixing with float32 (XGLM, MRA)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory that a new allocation on ``device`` can take now, or None where unknown."""
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's allocator has cached but not handed out are free to it, not to the driver
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None


def float64_copy_shortfall(model: nn.Module) -> Optional[str]:
    """Why ``float64_copy(model)`` would not fit in memory now (None if it would, or where
    the free memory of a device is unknown): it takes 8 bytes per floating parameter and buffer
    on each device, and the float64 probe's activations on top (a margin of 1/8)."""
    need: dict = {}
    for t in _float64_tensors(model):
        need[t.device] = need.get(t.device, 0) + 8 * t.numel()
    for device, size in need.items():
        size += size // 8
        free = available_bytes(device)
        if free is not None and size > free:
            return (
                f"the exact conversion measures on a float64 copy of the model ({size / 2**30:.1f} GiB on {device}), "
                f"more than the {free / 2**30:.1f} GiB free there"
            )
    return None


# what to do about a shortfall, where the conversion is then not made
_SHORTFALL_ADVICE = "; convert the checkpoint on disk instead (scripts/convert_checkpoint.py, shard by shard), or patch where the copy fits"
# ... where the checkpoint's record of a conversion cannot serve instead
_LOAD_ADVICE = "; patch it where the copy fits (e.g. loaded on the CPU), then move it to its device"


def plan_conversion(model: nn.Module, layer_norms: dict[str, int], inputs: dict, specs: dict[str, NormSpec],
                    only_for_exact: bool = True) -> ConversionPlan:
    """Measure, on a float64 copy of ``model``, which of ``layer_norms`` ({name: width}, each
    computing what ``specs[name]`` says) read a stream that centring its writers (and its
    start) makes zero-mean. With ``only_for_exact``, the plan centres only the writers and
    starts that those norms read (the rest would change nothing but the raw stream). It
    differentiates the copy, so with gradients in any caller's mode (``torch.no_grad()``, ...)."""
    with float64_default(), torch.inference_mode(False), torch.enable_grad():
        return _measure(model, float64_copy(model), layer_norms, float64_inputs(inputs), specs, only_for_exact)


def _measure(model: nn.Module, model64: nn.Module, layer_norms: dict[str, int], inputs64: dict, specs: dict[str, NormSpec],
             only_for_exact: bool) -> ConversionPlan:
    try:
        with torch.no_grad():
            truth = model_outputs(model64, inputs64)
    except Exception as exc:  # e.g. a kernel or a dtype the model hard-codes, float32 only
        raise ProbeError(f"the exact conversion measures on a float64 copy of the model, whose forward does not run in float64: {describe_error(exc)}") from exc
    # NaN or inf in the truth would leave every measurement below without meaning
    broken = [k for k, v in truth.items() if not bool(torch.isfinite(v).all())]
    if broken:
        raise ProbeError(f"the exact conversion measures on a float64 copy of the model, whose outputs on the probe batch are not "
                         f"finite ({', '.join(broken[:3])}): nothing can be measured on them; pass probe_inputs on which the "
                         "model gives finite outputs in float64")
    # The measurement below needs LayerNorms that are exactly blind to their input's mean,
    # in float64. Some HF ones compute in float32 inside (OLMo, Cohere) and would leave
    # float32 rounding in a writer's shift gradient, which then has to be told apart from a
    # small real dependence (a post-LN model with small q/k/v weights measures 1e-5..1e-3)
    # by a threshold. In the copy each becomes the fused module of its own spec, computing in
    # float64, so a writer measures float64 rounding and the threshold can sit far from both.
    for name, spec in specs.items():
        model64.set_submodule(name, build_fused(spec, model64.get_submodule(name), (layer_norms[name],)))
    widths = set(layer_norms.values())
    shared = _shared_parameters(model64)
    # not a module whose weight another module holds (a head tied to an embedding table):
    # centring it would change the other holder's function too
    candidates = [
        n for n, m in model64.named_modules()
        if _out_features(m) in widths and not any(id(getattr(m, p)) in shared for p in output_params(m))
    ]
    # layers that may write a stream but keep their weights quantized, which nothing centres
    quantized = [n for n, m in model64.named_modules() if stored_quantized(m) and getattr(m, "out_features", None) in widths]
    lists = block_lists(model64)
    as_they_are: dict[str, float] = {}
    invariant = shift_invariant(model64, inputs64, candidates, list(lists.values()), list(layer_norms), as_they_are)
    writers = [n for n in candidates if n in invariant]
    # a stream's start may be centred only where nothing but LayerNorms reads it (pre-LN);
    # in a post-LN block the input also feeds q/k/v directly, and the test above says so
    starts = sorted(first for name, first in lists.items() if first in invariant and any(w.startswith(f"{name}.") for w in writers))
    for name in writers:
        centre_writer_(model64.get_submodule(name))
    centring = _centring_with(model64, starts, list(layer_norms), inputs64)
    exact = [n for n in layer_norms if centring.get(n, math.inf) <= _CENTRED_FP64]
    # a writer that no converted norm reads reaches one that stays, whose input it then changes;
    # where none of those changed (BLOOM's embedding LayerNorm), there is nothing to drop
    kept = [n for n in layer_norms if n not in exact]
    if only_for_exact and exact and kept and writers and any(_moved(as_they_are.get(n), centring.get(n)) for n in kept):
        writers, starts, centring = _only_what_exact_norms_read(model, model64, writers, starts, exact, centring, inputs64)
    del model64
    return ConversionPlan(writers, starts, centring, exact, truth, quantized)


def _moved(before: Optional[float], after: Optional[float]) -> bool:
    """Did a centring ratio change (beyond float64 rounding), or is either side unknown?"""
    return before is None or after is None or abs(after - before) > 1e-9 * max(before, after, 1e-300)


def _centring_with(model64: nn.Module, starts: list[str], norms: list[str], inputs64: dict) -> dict[str, float]:
    """``input_centring`` of ``norms`` with the stream ``starts`` centred at run time."""
    handles = add_start_hooks(model64, starts)
    try:
        return input_centring(model64, norms, inputs64)
    finally:
        for h in handles:
            h.remove()


def _only_what_exact_norms_read(model, model64, writers, starts, exact, centring, inputs64):
    """(writers, starts, centring) cut down to the writers and starts whose stream reaches a
    norm that converts exactly. The others write streams that only LayerNorms kept as they are
    read (Hiera's later stages, which begin at a max-pooled projection that no centring
    reaches; the post-LN part of a model): centring them would change nothing those norms see
    and only take the per-position mean off the raw stream, which outputs like
    last_hidden_state expose. Measured on ``model64`` (writers centred), whose dropped writers
    are then restored from ``model`` and the norms' centring measured again; where that
    uncovers a dependence the gradient did not show, the full plan stands."""
    _, shifts, _, read, _ = _shifted_forward(model64, inputs64, writers, starts, exact)
    needed = _reaching(read, shifts, torch.Generator().manual_seed(11))
    dropped = [n for n in writers if n not in needed]
    if not dropped:
        return writers, starts, centring
    with torch.no_grad():
        for name in dropped:
            original, copy64 = model.get_submodule(name), model64.get_submodule(name)
            for p in output_params(copy64):
                getattr(copy64, p).copy_(getattr(original, p).detach().double())
    kept_starts = [s for s in starts if s in needed]
    recentred = _centring_with(model64, kept_starts, list(centring), inputs64)
    if any(recentred.get(n, math.inf) > _CENTRED_FP64 for n in exact):
        return writers, starts, centring
    return [n for n in writers if n in needed], kept_starts, recentred


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
            if self.record is not None:
                why = self._check_record()
            if self.record is None or why:
                advice = "" if why.endswith(QUANTIZED_ADVICE) else _LOAD_ADVICE if why else _SHORTFALL_ADVICE
                return _not_converted(report, layer_norms, self.shortfall + (f"; {why}" if why else "") + advice)
            r = self.record
            self.plan, self.approximate = ConversionPlan(r.writers, r.starts, {}, r.exact, {}), r.approximate
        else:
            probe_note = self._measure(model, planned, layer_norms, probe, allow_approximate)
            if self.plan is None:
                return
        self._describe(planned, layer_norms, probe_note)

    def _check_record(self) -> str:
        """Why the writers are not as the record leaves them ("" where they are): a conversion
        on disk centred them, so weights off the centre changed since (a LayerNorm model
        fine-tuned in plain transformers, which keeps the block) and are another model's. A
        patched model's save may hold them uncentred (fine-tuned without keep_centered): that
        is the model it saved, which the float64-free check below cannot verify."""
        quantized = [w for w in self.record.writers if stored_quantized(self.model.get_submodule(w))]
        if quantized:  # loaded with a quantization_config: the record's centring does not survive it
            return quantized_why(self.model, quantized)
        self.off = self._off_centre({w: None for w in self.record.writers if w not in self.record.centre_now})
        if self.off and self.record.on_disk:
            return (f"{self.off[0]} (and {len(self.off) - 1} more) is not centred as its conversion on disk left it: the "
                    "weights changed since (fine-tuned as a LayerNorm model?), so that conversion's record no longer describes them")
        return ""

    def _measure(self, model, planned, layer_norms, probe, allow_approximate) -> Optional[str]:
        """The plan measured on the probe batch (None where it cannot be: the report says why)."""
        report = self.report
        was_training = model.training
        model.eval()  # dropout would make the stream's mean random
        # Nothing is changed yet when a probe fails. A batch the user gave that does not run
        # raises (run_probe); one built here that does not fit, or a model that cannot run in
        # float64, only means that the conversion cannot be verified, so it is not made.
        try:
            try:
                self.inputs, self.before, probe_note = run_probe(model, probe)
            except ProbeError as exc:
                return _not_converted(report, layer_norms, str(exc))
            try:
                specs = {fqn: planned[fqn][1] for fqn in layer_norms}
                self.plan = plan_conversion(model, layer_norms, self.inputs, specs, only_for_exact=not allow_approximate)
            except ProbeError as exc:
                return _not_converted(report, layer_norms, str(exc))
        finally:
            model.train(was_training)
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
                why = quantized_why(self.model, self.plan.quantized) if self.plan.quantized else (
                    "something other than a LayerNorm also reads its stream (a post-LN block, a projection of raw hidden "
                    "states), or it normalises something else (embeddings, heads)")
                _update(report, fqn, reason=f"kept as LayerNorm (fused): its input is not centred (|mean|/rms {ratio:.2g}) even with "
                        f"the stream writers centred: {why}; allow_approximate=True converts it anyway")
        if not self.replacements:
            report.note = (f"{quantized_why(self.model, self.plan.quantized)}: nothing converted." if self.plan.quantized
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
        return hooks

    def _off_centre(self, loaded: dict) -> list[str]:
        """The writers' parameters that were loaded uncentred (``loaded``: {writer: {parameter:
        its loaded value}}, or None where the module still holds it), as "writer.parameter"."""
        off = []
        for name, values in loaded.items():
            module = self.model.get_submodule(name)
            off += [f"{name}.{p}" for p, dim in output_params(module).items()
                    if not is_centred(values[p] if values is not None else getattr(module, p), dim)]
        return off

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
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                after = model_outputs(self.model, self.inputs)
            random = random_outputs(self.model, self.inputs, after)
            exact = [n for n in self.plan.exact if n in self.replacements]
            ratios = input_centring(self.model, exact, self.inputs)
        finally:
            self.model.train(was_training)
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
