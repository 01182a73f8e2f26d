"""The gated norm classes of transformers (every one this install has), matched by probing and
replaced by FusedGatedRMSNorm: the match names their maths, and the replacement computes what
they compute, forward and backward, on the torch path, on the compiled CPU kernel and on the
Triton kernels (interpreted on CPU tensors). The HF modules themselves are the reference: in
float64 the truth, in bf16 the yardstick for the error budget (STYLE.md)."""

import copy
import importlib

import pytest
import torch

from hf_rmsnorm import FusedGatedRMSNorm, patch_model
from hf_rmsnorm.patching.discovery import GatedSpec, build_fused, match_norm
from reference import ATOL, assert_close_to_fp64
from test_patching import check_patch_roundtrip
from tiny_models import build, run, taken_arguments

MAMBA2 = dict(norm_before_gate=False, activation="silu", cast_mode="input")
QWEN3_NEXT = dict(norm_before_gate=True, activation="silu", cast_mode="input")
KIMI = dict(norm_before_gate=True, activation="sigmoid", cast_mode="float32")
GROUPS_OF_16 = dict(group_size=16)

# module path, class, constructor kwargs, the spec the probe must find (None: only that it finds one)
CLASSES = {
    "mamba2": ("mamba2", "MambaRMSNormGated", dict(hidden_size=48, group_size=16, eps=1e-5), dict(MAMBA2, eps=1e-5, group_size=16)),
    "bamba": ("bamba", "BambaRMSNormGated", dict(hidden_size=48, group_size=16, eps=1e-5), dict(MAMBA2, eps=1e-5, group_size=16)),
    "nemotron_h": ("nemotron_h", "NemotronHRMSNormGated", dict(hidden_size=48, group_size=48, eps=1e-5), dict(MAMBA2, eps=1e-5, group_size=None)),
    "zamba2": ("zamba2", "Zamba2RMSNormGated", dict(hidden_size=48, group_size=16, eps=1e-5), dict(MAMBA2, eps=1e-5, group_size=16)),
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridRMSNormGated", dict(hidden_size=48, group_size=16, eps=1e-6), dict(MAMBA2, eps=1e-6, group_size=16)),
    "qwen3_next": ("qwen3_next", "Qwen3NextRMSNormGated", dict(hidden_size=48, eps=1e-6), dict(QWEN3_NEXT, eps=1e-6, group_size=None)),
    "qwen3_5": ("qwen3_5", "Qwen3_5RMSNormGated", dict(hidden_size=48, eps=1e-6), dict(QWEN3_NEXT, eps=1e-6, group_size=None)),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeRMSNormGated", dict(hidden_size=48, eps=1e-6), dict(QWEN3_NEXT, eps=1e-6, group_size=None)),
    "qwen4_exp": ("qwen4_exp", "Qwen4ExpTextRMSNormGated", dict(hidden_size=48, eps=1e-6), dict(QWEN3_NEXT, eps=1e-6, group_size=None)),
    "olmo_hybrid": ("olmo_hybrid", "OlmoHybridRMSNormGated", dict(hidden_size=48, eps=1e-6), None),
    "kimi_linear": ("kimi_linear", "KimiLinearRMSNormGated", dict(hidden_size=48, eps=1e-6), dict(KIMI, eps=1e-6, group_size=None)),
    "bailing_hybrid": ("bailing_hybrid", "BailingHybridRMSNormGated", dict(hidden_size=48, eps=1e-6), None),
    "glm5_next": ("glm5_next", "Glm5NextTextRMSNormGated", dict(hidden_size=48, eps=1e-6), None),
    "lara_mini": ("lara_mini", "LaraMiniRMSNormGated", dict(hidden_size=48, eps=1e-6), None),
    "falcon_h1": ("falcon_h1", "FalconH1RMSNormGated", dict(hidden_size=48, eps=1e-5, n_groups=3, norm_before_gate=True),
                  dict(norm_before_gate=True, activation="silu", cast_mode="float32", eps=1e-5, group_size=16)),
    "falcon_h1_gate_first": ("falcon_h1", "FalconH1RMSNormGated", dict(hidden_size=48, eps=1e-5, n_groups=3, norm_before_gate=False),
                             dict(norm_before_gate=False, activation="silu", cast_mode="float32", eps=1e-5, group_size=16)),
}


def hf_module(name, dtype):
    module_path, cls_name, kwargs, _ = CLASSES[name]
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{module_path}.modeling_{module_path}"), cls_name)
    except (ImportError, AttributeError):
        pytest.skip(f"this transformers has no {cls_name}")
    module = cls(**taken_arguments(cls, kwargs))
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.3 + 1)
    return module.to(dtype)


@pytest.mark.parametrize("name", list(CLASSES))
def test_the_probe_names_its_maths(name):
    module = hf_module(name, torch.float32)
    match = match_norm(module)
    assert isinstance(match.spec, GatedSpec), match.reason
    expected = CLASSES[name][3]
    if expected is not None:
        kwargs = CLASSES[name][2]
        if "group_size" in kwargs and "group_size" not in taken_arguments(type(module), kwargs):
            expected = dict(expected, group_size=None)  # a release whose class normalises whole rows
        assert match.spec == GatedSpec(**expected)
    assert match.reason.startswith("same function as gated RMSNorm(")


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CLASSES))
def test_the_replacement_computes_what_it_computes(name, w_dtype, backend, monkeypatch):
    """bf16 activations, with the weight in bf16 (a bf16 model) or fp32 (mixed precision):
    same output dtype, outputs two ulps apart at most, and gradients of x, gate and weight
    within 2x the module's own bf16 error (against its float64 twin) plus atol."""
    module = hf_module(name, w_dtype)
    with monkeypatch.context() as m:
        m.setenv("HF_RMSNORM_BACKEND", "torch")  # the probe's hundreds of candidates: interpreted, minutes
        spec = match_norm(module).spec
    fused = build_fused(spec, module, (48,))
    assert isinstance(fused, FusedGatedRMSNorm) and fused.weight is module.weight
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 5, 48, generator=g) * 2 + 0.3).to(torch.bfloat16)
    gate = (torch.randn(4, 5, 48, generator=g) * 2).to(torch.bfloat16)
    dy = torch.randn(4, 5, 48, generator=g).to(torch.bfloat16)

    def run(m, dtype=None):
        leaves = [t.to(dtype or t.dtype).detach().requires_grad_(True) for t in (x, gate)]
        m.zero_grad()
        y = m(*leaves)
        y.backward(dy.to(y.dtype))
        return [y.detach(), leaves[0].grad, leaves[1].grad, m.weight.grad.clone()]

    ours, theirs = run(fused), run(module)
    truth = run(copy.deepcopy(module).double(), torch.float64)
    assert ours[0].dtype == theirs[0].dtype
    assert (ours[0].float() - theirs[0].float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * theirs[0].float().abs().max()
    for what, got, want, t64 in zip(("output", "grad of x", "grad of gate", "grad of weight"), ours, theirs, truth):
        assert got.dtype == want.dtype, what
        assert_close_to_fp64(got, want, t64, torch.bfloat16, what)


@pytest.mark.parametrize("backend", ["torch", "compiled"], indirect=True)
def test_a_grouped_norm_is_matched_and_replaced_by_the_gated_kernel_without_a_gate(backend, gated_runs):
    """Qwen4-Exp's hyper-connection norm normalises each stream (a group of the last dim) on its
    own, its weight stored as w - 1: matched as a grouped RMSNorm with offset 1 and replaced by
    FusedGatedRMSNorm, called with one input; forward and the gradients of x and weight within
    the budget against its float64 twin (bf16 activations, fp32 weight, as the model holds it)."""
    try:
        from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextRMSNorm
    except ImportError:
        pytest.skip("this transformers has no Qwen4ExpTextRMSNorm")
    module = Qwen4ExpTextRMSNorm(48, group_size=16, eps=1e-6)
    with torch.no_grad():
        module.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_RMSNORM_BACKEND", "torch")  # the probe's candidates, fast
        match = match_norm(module)
    assert match.spec == GatedSpec(1e-6, 16, False, "silu", "float32", offset=1.0, gated=False), match.reason
    assert match.reason == "same function as grouped RMSNorm(eps=1e-06, group_size=16, cast_mode=float32, offset=1)"
    fused = build_fused(match.spec, module, (48,))
    assert isinstance(fused, FusedGatedRMSNorm) and fused.weight is module.weight and fused.offset == 1.0
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 5, 48, generator=g) * 2 + 0.3).to(torch.bfloat16)
    dy = torch.randn(4, 5, 48, generator=g).to(torch.bfloat16)

    def run(m, dtype=None):
        leaf = x.to(dtype or x.dtype).detach().requires_grad_(True)
        m.zero_grad()
        y = m(leaf)
        y.backward(dy.to(y.dtype))
        return [y.detach(), leaf.grad, m.weight.grad.clone()]

    before = gated_runs()
    ours = run(fused)
    assert gated_runs() - before == (0 if backend == "torch" else 2)
    theirs, truth = run(module), run(copy.deepcopy(module).double(), torch.float64)
    for what, got, want, t64 in zip(("output", "grad of x", "grad of weight"), ours, theirs, truth):
        assert got.dtype == want.dtype, what
        assert_close_to_fp64(got, want, t64, torch.bfloat16, what)


def test_a_norm_that_names_groups_but_is_no_grouped_rms_norm_says_so():
    class Centred(torch.nn.Module):  # a grouped LayerNorm: centred groups, which no candidate is
        def __init__(self):
            super().__init__()
            self.weight, self.group_size = torch.nn.Parameter(torch.ones(48)), 16

        def forward(self, x):
            g = x.unflatten(-1, (3, 16))
            g = g - g.mean(-1, keepdim=True)
            return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(-2) * self.weight

    match = match_norm(Centred())
    assert match.spec is None
    assert match.reason == "no fused LayerNorm/RMSNorm or grouped RMSNorm (groups of 16) reproduces its output on the probe inputs"


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.slow
def test_patch_model_swaps_each_and_keeps_its_function(name, backend, gated_runs):
    """Through patch_model, each instance verified with its own parameters (Kimi's gate defaults
    to None but is needed: a call without it raises, and is no evidence against the match). The
    torch path composes the HF classes' own ops: the same bits. The compiled CPU kernel sums the
    statistics in float64: bf16 outputs an ulp apart where that moves a rounding, in at most
    1 % of the elements."""
    model = torch.nn.ModuleDict({"norm": hf_module(name, torch.bfloat16)})
    g = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(64, 3, 48, generator=g) * 2).to(torch.bfloat16), torch.randn(64, 3, 48, generator=g).to(torch.bfloat16)
    want = model["norm"](x, gate)
    (entry,) = patch_model(model)
    assert entry["change"] == "fused" and isinstance(model["norm"], FusedGatedRMSNorm), entry["reason"]
    before = gated_runs()
    got = model["norm"](x, gate)
    assert got.dtype == want.dtype
    if backend == "torch":
        assert torch.equal(got, want)
        return
    assert gated_runs() == before + 1, "the compiled CPU kernel did not run"
    differ = got != want
    assert differ.float().mean() <= 0.01
    one_ulp = torch.finfo(want.dtype).eps * want.float().abs()  # at most eps·|value|
    assert ((got.float() - want.float()).abs()[differ] <= one_ulp[differ]).all()


def test_a_gated_model_patched_by_name_keeps_its_callers_working():
    """Mamba2 with one group, whose mixer calls norm(x, gate): once taken for a plain RMSNorm
    (its gate defaults to None) and swapped for a module that takes one input."""
    model, inputs = build("mamba2_one_group")
    want = run(model, inputs)
    report = patch_model(model)
    gated = [e for e in report if e["new"] == "FusedGatedRMSNorm"]
    assert len(gated) == 2 and all(e["change"] == "fused" for e in gated)
    got = run(model, inputs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=ATOL[torch.float32])


class _GroupsNamedNowhere(torch.nn.Module):
    """Groups of 12 that no attribute names: the probe tries every divisor of the width."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(48))

    def forward(self, hidden_states, gate):
        h = (hidden_states.float() * torch.sigmoid(gate.float())).unflatten(-1, (4, 12))
        n = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2)
        return (self.weight.float() * n).to(hidden_states.dtype)


def test_groups_are_found_where_no_attribute_names_them():
    match = match_norm(_GroupsNamedNowhere())
    assert match.spec == GatedSpec(1e-5, 12, False, "sigmoid", "float32"), match.reason


def test_module_state_dict_and_arguments():
    hf = hf_module("mamba2", torch.float32)
    fused = FusedGatedRMSNorm(48, 1e-5, getattr(hf, "group_size", None))  # transformers < 5.23: whole rows
    assert list(fused.state_dict()) == list(hf.state_dict()) == ["weight"]
    fused.load_state_dict(hf.state_dict())
    x, gate = torch.randn(3, 48), torch.randn(3, 48)
    torch.testing.assert_close(fused(x, gate), hf(x, gate), rtol=1e-6, atol=1e-6)
    assert FusedGatedRMSNorm(48, elementwise_affine=False).weight is None
    for kwargs, message in [
        (dict(hidden_size=48, group_size=10), "group_size 10 does not divide the normalised dimension 48"),
        (dict(hidden_size=0), "hidden_size must be a positive int, got 0"),
        (dict(hidden_size=48, activation="relu"), "activation must be one of ('silu', 'sigmoid')"),
        (dict(hidden_size=48, cast_mode="weight"), "cast_mode must be one of ('input', 'float32')"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            FusedGatedRMSNorm(**kwargs)


@pytest.mark.parametrize("call,message", [
    (lambda m, x: m(x, x[..., :8]), "gate has shape (3, 8); it must have shape (3, 48)"),
    (lambda m, x: m(x[..., :40], None), "weight has shape (48,); it must have shape (40,)"),
    (lambda m, x: m("not a tensor"), "x must be a floating-point tensor with at least one dimension, got str"),
])
def test_module_calls_with_wrong_inputs_say_what_is_wrong(call, message, backend):
    module = FusedGatedRMSNorm(48, group_size=16)
    with pytest.raises((ValueError, TypeError)) as info:
        call(module, torch.randn(3, 48))
    assert message in str(info.value)


@pytest.mark.parametrize("backend", ["compiled", "triton"], indirect=True)
@pytest.mark.parametrize("name", ["mamba2", "qwen3_next", "qwen4_exp"])
def test_gated_kernels_in_patched_models(name, backend, gated_runs):
    """The patched hybrid model's outputs as the unpatched model's, its gated norms on the
    compiled CPU kernel or the Triton kernels (interpreted)."""
    check_patch_roundtrip(name)
    assert gated_runs() > 0, f"the gated norms did not run on the {backend} kernels"


@pytest.mark.parametrize("backend", ["compiled", "triton"], indirect=True)
@pytest.mark.parametrize("name", ["mamba2", "qwen3_next", "qwen4_exp"])
def test_gradients_through_gated_kernels_match_the_original(name, backend, gated_runs):
    """One backward of a patched hybrid model on the kernels: every parameter's gradient as the
    unpatched model's (the gate's gradient reaches the projection that made it, the weight's
    lands on the same Parameter)."""
    base, inputs = build(name)
    patched = copy.deepcopy(base)
    patch_model(patched)
    grads = []
    for model in (base, patched):
        before = gated_runs()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert gated_runs() - before >= 2, f"the gated forward and backward did not run on the {backend} kernels"
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["mamba2", "falcon_h1"])
def test_patched_mamba2_family_models_train(name):
    """In training the Mamba2-family mixers pass ``norm.weight`` and ``norm.variance_epsilon`` to
    their fused scan-and-norm rather than calling the norm: the patched model must keep what
    they read (it raised AttributeError on its first training step before), and its gradients
    be the unpatched model's."""
    base, inputs = build(name)
    patched = copy.deepcopy(base)
    patch_model(patched)
    assert any(isinstance(m, FusedGatedRMSNorm) for m in patched.modules())
    grads = []
    for model in (base, patched):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_rms_modules_answer_to_variance_epsilon():
    from hf_rmsnorm import FusedRMSNorm

    for module in (FusedGatedRMSNorm(48, eps=1e-5), FusedRMSNorm(48, eps=1e-5)):
        assert module.variance_epsilon == module.eps == 1e-5
        module.variance_epsilon = 1e-6
        assert module.eps == 1e-6
