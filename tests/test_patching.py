"""patch_model / unpatch_model over a table of tiny random transformers models: one shared
tester (PEFT's TEST_CASES style), plus the report, the guards and the ecosystem checks."""

import copy
import enum
import json

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module, attach_align_device_hook_on_blocks
from torch import nn

from hf_rmsnorm import FusedGatedRMSNorm, FusedLayerNorm, FusedRMSNorm, PatchReport, patch_model, unpatch_model
from conftest import HAS_TRITON, INTERPRETING
from reference import rel_err
from tiny_models import MODELS, build, norm_modules, run

TRITON_SUBSET = ["gpt2", "llama", "gemma", "t5", "cohere", "olmo"]
TRAIN_SUBSET = ["gpt2", "llama", "gemma2", "t5", "bloom", "olmo", "phimoe"]  # phimoe: keep_centered on 3-D expert weights


def check_patch_roundtrip(name, dtype=torch.float32):
    model, inputs = build(name, dtype)
    ref = run(model, inputs)
    norms_before = {n: type(m) for n, m in norm_modules(model).items()}
    params_before = dict(model.named_parameters(remove_duplicate=False))
    keys_before = list(model.state_dict())

    report = patch_model(model, target="layernorm")

    # every norm either swapped or reported with a reason; these models have no exotic norms
    assert sorted(e["name"] for e in report) == sorted(norms_before)
    assert report.skipped == [], report.skipped
    for e in report:
        new = model.get_submodule(e["name"])
        assert isinstance(new, (FusedLayerNorm, FusedRMSNorm, FusedGatedRMSNorm)) and type(new).__name__ == e["new"]
        assert e["reason"].startswith("same function as")
    # the same Parameter objects under the same names; state_dict unchanged
    params_after = dict(model.named_parameters(remove_duplicate=False))
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    assert list(model.state_dict()) == keys_before

    out = run(model, inputs)
    assert out.keys() == ref.keys()
    for k in ref:
        assert out[k].dtype == ref[k].dtype, k
        if dtype == torch.float32:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
        else:  # a one-ulp difference in a norm may flip roundings downstream: dtype tolerance
            scale = ref[k].float().abs().max().item()
            torch.testing.assert_close(out[k].float(), ref[k].float(), rtol=3e-2, atol=3e-2 * scale, msg=f"{name}: {k}")

    unpatch_model(model)
    assert {n: type(m) for n, m in norm_modules(model).items()} == norms_before
    assert all(dict(model.named_parameters(remove_duplicate=False))[k] is params_before[k] for k in params_before)
    restored = run(model, inputs)
    assert all(torch.equal(restored[k], ref[k]) for k in ref), "unpatch_model did not restore the original function"
    return report


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_patches_to_the_same_function_fp32(name, monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    check_patch_roundtrip(name)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_patches_to_the_same_function_bf16(name, monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    check_patch_roundtrip(name, torch.bfloat16)


@pytest.mark.parametrize("name", TRITON_SUBSET)
def test_interpreted_triton_kernels_in_patched_models(name, monkeypatch, launches):
    if not (HAS_TRITON and INTERPRETING):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the GPU suite covers CUDA)")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    check_patch_roundtrip(name)
    assert launches() > 0


@pytest.mark.parametrize("name", TRAIN_SUBSET)
@pytest.mark.parametrize("target", ["layernorm", "rmsnorm"])
def test_training_follows_the_same_loss_curve(name, target, monkeypatch):
    """AdamW steps on the patched model follow the original's loss curve. For the exact
    conversion with keep_centered, the writers' updates are re-centred, which the original's
    LayerNorms could not see anyway. Dropout is off (eval mode): with it, the stream's mean is
    random and no conversion is exact."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    base, inputs = build(name)
    patched = copy.deepcopy(base)
    if target == "rmsnorm":
        report = patch_model(patched, keep_centered=True)
        assert report.count("exact") > 0 or name in ("llama", "gemma2", "t5")  # RMSNorm models: fused only
    else:
        patch_model(patched, target="layernorm")
    labels = inputs.get("decoder_input_ids", inputs["input_ids"]).contiguous()
    curves = []
    for model in (base, patched):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(4):
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]  # it trains at all
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-5)


def test_optimizer_built_before_patching_still_trains_the_model(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, inputs = build("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    patch_model(model)
    norm = model.model.norm
    before = norm.weight.detach().clone()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    assert not torch.equal(norm.weight, before)


def test_report_prints_iterates_and_serialises():
    model, _ = build("gemma")
    report = patch_model(model, target="layernorm")
    assert isinstance(report, PatchReport) and len(report) == 5
    text = str(report)
    assert text.splitlines()[0] == "hf_rmsnorm: GemmaForCausalLM, target=layernorm: 5 fused, 0 exact, 0 approximate, 0 skipped (changed 5 of 5 norm modules)"
    assert "model.layers.0.input_layernorm" in text and "GemmaRMSNorm → FusedRMSNorm" in text
    assert "offset=1" in text  # Gemma's (1 + w) was recognised, not guessed
    entries = json.loads(json.dumps(report))
    assert entries[0]["change"] == "fused" and entries[0]["old"] == "GemmaRMSNorm"
    assert [e["name"] for e in report] == [e["name"] for e in entries]


def test_include_and_exclude_select_by_dotted_name():
    model, _ = build("llama")
    report = patch_model(model, include="model.layers.*", exclude=["*.post_attention_layernorm"])
    fused = {e["name"] for e in report.changed}
    assert fused == {"model.layers.0.input_layernorm", "model.layers.1.input_layernorm"}
    assert {e["reason"] for e in report.skipped} == {"not selected by include/exclude"}
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_matching_nothing_repeats_what_was_asked():
    model, _ = build("llama")
    with pytest.raises(ValueError, match=r"matched target='rmsnorm', include=\['decoder\.\*'\]"):
        patch_model(model, include="decoder.*")
    with pytest.raises(ValueError, match="found no normalization modules in Sequential"):
        patch_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_patching_twice_is_a_no_op_that_says_so():
    model, _ = build("gpt2")
    patch_model(model)
    with pytest.warns(UserWarning, match="already patched"):
        again = patch_model(model)
    assert len(again) == 0 and "already patched" in str(again)
    unpatch_model(model)
    assert len(patch_model(model)) == 5  # and after an undo it patches again


def test_unpatching_an_unpatched_model_is_a_clear_error():
    with pytest.raises(ValueError, match="was not patched by hf_rmsnorm"):
        unpatch_model(build("gpt2")[0])


def test_unpatching_keeps_parameters_reassigned_since_and_each_module_mode(monkeypatch):
    """Parameters put on the fused modules after patching (load_state_dict(assign=True), as
    loaders that build on the meta device do) are the ones the originals get back; before, the
    originals came back with the parameters they had at patching time. Every module keeps its
    train/eval mode through patching and unpatching, a model whose parts differ included."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, inputs = build("llama")
    other, _ = build("llama", seed=1)  # other weights, the norms' included
    model.train()
    model.model.layers[1].eval()  # a part kept in eval mode while the rest trains
    modes = {n: m.training for n, m in model.named_modules()}
    patch_model(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    model.load_state_dict(other.state_dict(), assign=True)
    unpatch_model(model)
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == modes
    model.eval()
    torch.testing.assert_close(run(model, inputs), run(other, inputs), rtol=0, atol=0)


def test_dry_run_reports_without_changing_anything():
    model, _ = build("t5")
    report = patch_model(model, dry_run=True)
    assert report.count("fused") == 12 and "would change 12 of 12" in str(report)
    assert not any(isinstance(m, (FusedLayerNorm, FusedRMSNorm)) for m in model.modules())
    assert len(patch_model(model)) == 12  # a dry run leaves no "already patched" mark


class _WeirdNorm(nn.Module):
    """Norm-like by name, but computes something no fused module does (max-abs scaling)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * x / x.abs().amax(-1, keepdim=True)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.weird_norm = _WeirdNorm(8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.weird_norm(self.ln(self.lin(x)))


class _ConditionedRMSNorm(nn.Module):
    """An adaptive norm: RMSNorm(x) scaled by 1 + a conditioning tensor (no gate activation)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, hidden_states, condition):
        xf = hidden_states.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * n * (1 + condition.float())).to(hidden_states.dtype)


class _MaskedRMSNorm(_ConditionedRMSNorm):
    """A norm that zeroes padded positions: its second input is a (batch, length) mask."""

    def forward(self, hidden_states, padding_mask=None):
        if padding_mask is not None:
            hidden_states = hidden_states.masked_fill(~padding_mask[..., None].bool(), 0.0)
        return super().forward(hidden_states, torch.zeros_like(hidden_states))


class _ThreeInputNorm(_ConditionedRMSNorm):
    def forward(self, hidden_states, scale, shift):
        return super().forward(hidden_states, scale) + shift


class _ImageNorm(nn.Module):
    """Normalises (B, C, H, W) over C, and says so nowhere but in its forward."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        b, c, h, w = x.shape
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), (c,), self.weight).permute(0, 3, 1, 2)


class _NormedBlock(nn.Module):
    """Named for the norm it holds (as wav2vec2's LayerNormConvLayer), and not one."""

    def __init__(self, n):
        super().__init__()
        self.proj, self.norm = nn.Linear(n, n), nn.LayerNorm(n)

    def forward(self, x):
        return self.norm(self.proj(x))


class _NoLayerNormConvLayer(nn.Module):
    """Named for the norm it lacks (wav2vec2's first conv layers without feat_extract_norm)."""

    def __init__(self, n):
        super().__init__()
        self.conv = nn.Conv1d(n, n, 1)

    def forward(self, x):
        return self.conv(x)


def test_what_is_no_norm_of_one_tensor_over_its_last_dim_says_what_it_is():
    model = nn.ModuleDict({
        "conditioned": _ConditionedRMSNorm(8), "three_inputs": _ThreeInputNorm(8), "masked": _MaskedRMSNorm(8), "group_norm": nn.GroupNorm(2, 8), "image_norm": _ImageNorm(8),
        "block": _NormedBlock(8), "conv_layer": _NoLayerNormConvLayer(8),
        # weight normalisation of a conv (torch's parametrization, as in wav2vec2's positional conv)
        "conv": nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3)),
    })
    report = {e["name"]: e for e in patch_model(model, target="layernorm")}
    assert sorted(report) == ["block.norm", "conditioned", "group_norm", "image_norm", "masked", "three_inputs"]  # no block, no weight norm, no "NoLayerNorm"
    assert report["block.norm"]["change"] == "fused"
    # two inputs: probed as a gated norm, which it is not
    assert "a gated norm (forward(hidden_states, gate)) that no fused gated RMSNorm reproduces" in report["conditioned"]["reason"]
    assert "takes 3 inputs (hidden_states, scale, shift)" in report["three_inputs"]["reason"]
    # without its mask it is an RMSNorm, but its callers pass one, which is no gate
    assert report["masked"]["reason"].startswith("raised on a probe (hidden_states, gate) of shape (3, 5, 8)")
    assert "GroupNorm normalises over channels" in report["group_norm"]["reason"]
    assert report["image_norm"]["reason"].startswith("raised on a probe input")
    assert all(report[n]["change"] == "skipped" for n in ("conditioned", "three_inputs", "masked", "group_norm", "image_norm"))
    assert isinstance(model["conditioned"], _ConditionedRMSNorm) and isinstance(model["group_norm"], nn.GroupNorm)


def test_unmatched_norms_are_left_alone_with_the_reason():
    model = _Toy()
    report = patch_model(model)
    by_name = {e["name"]: e for e in report}
    assert by_name["ln"]["change"] == "fused"
    assert by_name["weird_norm"]["change"] == "skipped"
    assert "no fused LayerNorm/RMSNorm reproduces its output" in by_name["weird_norm"]["reason"]
    assert "running statistics" in by_name["bn"]["reason"]
    assert isinstance(model.weird_norm, _WeirdNorm) and isinstance(model.bn, nn.BatchNorm1d)


class _ActivationDtypeRMSNorm(nn.Module):
    """ImageGPT's norm: normalises in the activations' dtype, then multiplies by the weight, so
    bf16 activations with fp32 weights give fp32 outputs holding bf16 rounding."""

    def __init__(self, n, scale=1.0):
        super().__init__()
        self.weight, self.eps, self.scale = nn.Parameter(torch.ones(n)), 1e-5, scale

    def forward(self, x):
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight * self.scale


def test_a_norm_computed_in_the_activations_dtype_is_fused_and_a_near_miss_is_not(monkeypatch):
    """The fused module computes the statistics in fp32, so it does not reproduce the module's
    bf16 rounding; it is accepted where it is no further from the float64 value of the
    module's function than twice the module's own error (plus two ulps), and that rule still
    tells a function 0.2 % off apart."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model = nn.ModuleDict({"norm": _ActivationDtypeRMSNorm(64), "off_norm": _ActivationDtypeRMSNorm(64, scale=1.002)})
    with torch.no_grad():
        for m in model.values():
            m.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.3 + 1)
    original = copy.deepcopy(model["norm"])
    report = {e["name"]: e for e in patch_model(model)}
    assert report["norm"]["change"] == "fused" and isinstance(model["norm"], FusedRMSNorm)
    assert report["off_norm"]["change"] == "skipped" and isinstance(model["off_norm"], _ActivationDtypeRMSNorm)
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    truth = original.double()(x.double())
    for dtype in (torch.float32, torch.bfloat16):
        want, got = copy.deepcopy(original).float()(x.to(dtype)), model["norm"](x.to(dtype))
        assert got.dtype == want.dtype == torch.float32
        assert rel_err(got, truth) <= 2 * rel_err(want, truth) + 1e-6, dtype


class _Formula(enum.Enum):
    LAYER = "layer"
    RMS = "rms"


class _LayoutNorm(nn.LayerNorm):
    """One class, three functions by instance: ConvNeXt's LayerNorm, whose ``data_format``
    ("channels_first": a (B, C, H, W) input, permuted around the norm) is a plain attribute,
    and a formula switch held in an object, which no attribute scan can read."""

    def __init__(self, n, data_format="channels_last", formula=_Formula.LAYER):
        super().__init__(n)
        self.data_format, self.formula = data_format, formula

    def forward(self, x):
        if self.data_format == "channels_first":
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.formula is _Formula.RMS:  # in fp32, rounded once to x's dtype (torch's rms_norm order)
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias).to(x.dtype)
        return super().forward(x)


class _LayoutToy(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = _LayoutNorm(c, "channels_first")  # probed first: raises on a (..., C) probe
        self.first = _LayoutNorm(c)
        self.as_rms = _LayoutNorm(c, formula=_Formula.RMS)  # same settings as `first` to a scan

    def forward(self, x):  # x: (B, C, H, W)
        y = self.stem(x).permute(0, 2, 3, 1)
        return self.as_rms(self.first(y))


def test_instances_of_one_class_that_compute_different_functions_are_each_probed(monkeypatch):
    """A class's probe answers for its instances only where they carry the same settings
    (channels-first ConvNeXt norms do not make the channels-last ones unfusable), and an
    instance the answer still does not fit is probed on its own (fused as what it computes, or
    left alone with its reason) instead of failing the patch or crashing inside its forward."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    torch.manual_seed(0)
    model = _LayoutToy()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.2)
    x = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        want = model(x)
    report = patch_model(model, target="layernorm")
    by_name = {e["name"]: e for e in report}
    assert by_name["stem"]["change"] == "skipped" and "data_format='channels_first'" in by_name["stem"]["reason"]
    assert isinstance(model.stem, _LayoutNorm)
    assert by_name["first"]["new"] == "FusedLayerNorm"
    assert by_name["as_rms"]["new"] == "FusedRMSNorm" and model.as_rms.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_shared_norm_module_is_replaced_once_and_stays_shared():
    model = _Toy()
    model.ln2 = model.ln  # the same module at two paths
    report = patch_model(model)
    assert [e["name"] for e in report.changed] == ["ln"]
    assert model.ln is model.ln2 and isinstance(model.ln, FusedLayerNorm)
    unpatch_model(model)
    assert model.ln is model.ln2 and type(model.ln) is nn.LayerNorm


class _AnyWidthRMSNorm(nn.Module):
    """No parameters, no normalized_shape: RMS over the last dim at whatever width comes (in
    float32, cast back), as Llama 4's q/k norm and NanoChat's norms."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class _AnyWidthLayerNorm(nn.Module):
    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5)


class _SphereNorm(_AnyWidthRMSNorm):
    """Onto the unit sphere (nGPT): the sum of squares, not their mean. At any one width that is
    an RMSNorm times a constant, but no fused module without a weight computes it."""

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + self.eps)).type_as(x)


class _AnyWidthToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.shared_norm = _AnyWidthRMSNorm()  # called at width 16, then at width 8
        self.ln_norm, self.sphere_norm = _AnyWidthLayerNorm(), _SphereNorm()

    def forward(self, x):
        h = self.shared_norm(self.up(x))
        return self.sphere_norm(self.ln_norm(self.shared_norm(self.down(h) + x)))


def test_norms_without_parameters_or_shape_are_fused_for_any_width():
    """A parameterless norm says nothing of its width: it is probed at several, fused as a
    module of no fixed width, and the one instance then serves every width the model calls it
    at; what no fused module computes is left alone, and a parameterless LayerNorm is fused,
    not converted (nothing says which stream it reads)."""
    torch.manual_seed(0)
    model = _AnyWidthToy()
    x = torch.randn(2, 5, 8, requires_grad=True)
    want = model(x)
    want_grads = torch.autograd.grad(want.sum(), [x, *model.parameters()])
    report = patch_model(model)
    by_name = {e["name"]: e for e in report}
    assert by_name["shared_norm"]["change"] == "fused" and by_name["ln_norm"]["change"] == "fused"
    assert isinstance(model.shared_norm, FusedRMSNorm) and model.shared_norm.normalized_shape is None
    assert isinstance(model.ln_norm, FusedLayerNorm) and model.ln_norm.normalized_shape is None
    assert "no normalized_shape" in by_name["ln_norm"]["reason"]
    assert by_name["sphere_norm"]["change"] == "skipped" and isinstance(model.sphere_norm, _SphereNorm)
    assert "no fused LayerNorm/RMSNorm reproduces its output" in by_name["sphere_norm"]["reason"]
    for _ in range(2):  # the second call goes the way the first one settled, where there is one
        got = model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(torch.autograd.grad(got.sum(), [x, *model.parameters()]), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_model_whose_name_says_norm_reports_only_its_norms(monkeypatch):
    """RoBERTa-PreLayerNorm puts "Norm" in every class name (RobertaPreLayerNormAttention, ...):
    its blocks are not norms, and the report lists its LayerNorms alone, every one fused."""
    from transformers import AutoConfig, AutoModel

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    config = AutoConfig.for_model("roberta-prelayernorm", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=128, max_position_embeddings=80)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    composites = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower() and any(m.children())]
    assert len(composites) > 5  # what used to be reported as skipped
    layer_norms = sorted(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    report = patch_model(model, target="layernorm")
    assert sorted(e["name"] for e in report) == layer_norms and report.count("fused") == len(layer_norms)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)


def test_tied_weights_stay_tied():
    model, _ = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    patch_model(model)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize(
    "wrap,message",
    [
        (lambda m: nn.DataParallel(m), "DataParallel-wrapped model"),
        (lambda m: torch.compile(m), "torch.compile'd model; patch first"),
    ],
)
def test_wrapped_models_are_refused_with_what_to_do(wrap, message):
    model, _ = build("gpt2")
    with pytest.raises(TypeError, match=message):
        patch_model(wrap(model))


def test_meta_device_is_refused_with_what_to_do():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="meta device: load the real weights first"):
        patch_model(model)
    assert isinstance(model[1], nn.LayerNorm)


class _Recorder(ModelHook):
    """An accelerate hook that records the class of each module it runs in front of, and the
    dtype of its input. In a class attribute: the conversion's float64 copy of the model holds
    a deep copy of the hook, which must record here too."""

    seen: list = []
    inits = 0

    def init_hook(self, module):
        _Recorder.inits += 1
        return module

    def pre_forward(self, module, *args, **kwargs):
        _Recorder.seen.append((type(module).__name__, args[0].dtype))
        return args, kwargs


def test_accelerate_hooks_of_a_dispatched_model_move_to_the_fused_modules():
    """A model dispatched with a device_map carries an accelerate hook on every module with
    weights (it moves the module's inputs to the module's device); the fused modules must keep
    running behind them, with the same parameters, and unpatching gives the originals back
    with theirs."""
    model, inputs = build("gpt2")
    ref = run(model, inputs)
    blocks = ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h", "transformer.ln_f", "lm_head"]
    attach_align_device_hook_on_blocks(model, execution_device={b: "cpu" for b in blocks})  # what dispatch_model does
    _Recorder.seen, _Recorder.inits = [], 0
    add_hook_to_module(model.transformer.ln_f, _Recorder(), append=True)
    assert _Recorder.inits == 1
    originals = dict(norm_modules(model))
    hooks = {n: m._hf_hook for n, m in originals.items()}
    params = dict(model.named_parameters(remove_duplicate=False))

    report = patch_model(model)
    assert {e["name"] for e in report.changed} == set(originals)
    # the conversion ran the fused final norm in its float64 copy of the model behind the hook
    assert any(name.startswith("Fused") and dtype == torch.float64 for name, dtype in _Recorder.seen)
    # and the hooks were not initialised again for the fused modules (accelerate's placement of
    # the parameters, which on a GPU collects garbage and empties the CUDA cache per parameter)
    assert _Recorder.inits == 1
    for name in originals:
        new = model.get_submodule(name)
        assert isinstance(new, FusedRMSNorm) and new._hf_hook is hooks[name], name
    assert all(p is params[k] for k, p in model.named_parameters(remove_duplicate=False))
    out = run(model, inputs)
    assert _Recorder.seen[-1] == ("FusedRMSNorm", torch.float32)  # the hook ran in front of the fused module
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)

    unpatch_model(model)
    assert all(model.get_submodule(n) is m and m._hf_hook is hooks[n] for n, m in originals.items())
    run(model, inputs)
    assert _Recorder.seen[-1] == ("LayerNorm", torch.float32)


@pytest.mark.parametrize("where", ["every module", "the block above"])
def test_offloaded_norms_are_refused_with_what_to_do(where):
    model, _ = build("gpt2")
    if where == "every module":
        cpu_offload(model, execution_device="cpu")
    else:  # one hook on the block offloads its submodules' weights too; the norms have none of their own
        block = model.transformer.h[0]
        weights = {k: v.detach().clone() for k, v in block.state_dict().items()}
        add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights, place_submodules=True))
        assert "_hf_hook" not in block.ln_1.__dict__ and block.ln_1.weight.device.type == "meta"
    with pytest.raises(ValueError, match="is offloaded by accelerate .* Load the model with every layer on a device"):
        patch_model(model)
    assert type(model.transformer.h[0].ln_1) is nn.LayerNorm


def test_quantized_norm_is_refused_with_what_to_do():
    model = nn.Sequential(nn.LayerNorm(4))
    model[0].weight = nn.Parameter(torch.ones(4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="patch the model before quantizing it"):
        patch_model(model)


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got str"):
        patch_model("gpt2")
    with pytest.raises(ValueError, match="target must be one of"):
        patch_model(build("gpt2")[0], target="batchnorm")
    with pytest.raises(ValueError, match='only apply to target="rmsnorm"'):
        patch_model(build("gpt2")[0], target="layernorm", allow_approximate=True)


def test_generate_gradient_checkpointing_and_save_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    from transformers import AutoModelForCausalLM

    model, inputs = build("llama")
    reference = model.generate(inputs["input_ids"], max_new_tokens=5, do_sample=False)
    patch_model(model)
    assert torch.equal(model.generate(inputs["input_ids"], max_new_tokens=5, do_sample=False), reference)

    model.save_pretrained(tmp_path)  # a plain checkpoint of the original architecture
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.norm).__name__ == "LlamaRMSNorm"
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs))

    model.train()
    model.gradient_checkpointing_enable()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert model.model.norm.weight.grad is not None


@pytest.mark.slow
def test_torch_compile_of_a_patched_model_has_no_graph_breaks_in_the_norms(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    torch._dynamo.reset()
    model, inputs = build("llama")
    ref = run(model, inputs)
    patch_model(model)
    # the norms alone compiled with fullgraph: a graph break inside them raises
    norm = torch.compile(model.model.layers[0].input_layernorm, fullgraph=True)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(norm(x), model.model.layers[0].input_layernorm(x))
    compiled = torch.compile(model)
    torch.testing.assert_close(run(compiled, inputs), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "olmo"])
def test_probe_under_autocast_keeps_the_same_swaps(name):
    """On the CPU autocast leaves norms alone, so the swaps must agree with and without it
    (the CUDA case, where it matters, is in tests/test_gpu.py)."""
    plain, _ = build(name)
    amp, inputs = build(name)
    expected = [(e["name"], e["reason"]) for e in patch_model(plain, target="layernorm")]
    assert [(e["name"], e["reason"]) for e in patch_model(amp, target="layernorm", probe_autocast=torch.bfloat16)] == expected
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(build(name)[0], inputs)
        out = run(amp, inputs)
    for k in ref:
        assert out[k].dtype == ref[k].dtype
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["DeepSpeedEngine", "FullyShardedDataParallel", "FSDPModule"])
def test_deepspeed_and_fsdp_wrappers_are_refused(engine):
    """Recognised by class name, so neither package needs importing (or installing)."""
    wrapper = type(engine, (nn.Module,), {})()
    wrapper.module = build("gpt2")[0]
    with pytest.raises(TypeError, match="FSDP / DeepSpeed.*before accelerator.prepare"):
        patch_model(wrapper)
