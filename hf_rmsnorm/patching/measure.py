"""The float64 measurement behind the exact conversion (convert.py's steps 1 and 4, DESIGN.md
§2): on a float64 copy of the model, which modules write each residual stream (``shift_invariant``),
where each stream starts (``block_lists``), and which LayerNorms read a stream that centring its
writers and its start makes zero-mean; the result is a ``ConversionPlan``, which convert.py
applies to the model and verifies. Also whether that copy fits in memory
(``float64_copy_shortfall``), and what running a model in float64 takes (``to_float64_``,
``float64_default``), which checkpoint.py's verification shares."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from .centring import _is_hidden, add_start_hooks, centre_writer_, centring_ratio, input_centring, output_params, stored_quantized
from .discovery import NormSpec, build_fused
from .probe import ProbeError, describe_error, float64_inputs, model_outputs

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
