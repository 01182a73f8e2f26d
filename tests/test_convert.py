"""Exact LayerNorm -> RMSNorm conversion (target="rmsnorm") over every pre-LN family in the
tiny-model table, with non-default norm weights and biases: float64 outputs agree to 1e-10,
fp32 to 1e-5, bf16 within its tolerance; post-LN families are refused unless approximate
conversion is asked for; a planted non-centred writer fails strict verification and leaves
the model untouched; the round trip back to the original architecture is exact."""

import copy

import pytest
import torch
import transformers

from hf_rmsnorm import FusedLayerNorm, FusedRMSNorm, patch_model, unpatch_model
from hf_rmsnorm.ops import _cpu_kernel
from hf_rmsnorm.patching import convert, measure
from reference import rel_err
from tiny_models import build as build_tiny
from tiny_models import VOCAB, float64_truth, randomize_for_conversion, randomize_norms, run

# family -> number of norms converted exactly; the rest (embedding norms, norms on heads) must
# say why they stay LayerNorm
PRE_LN = {
    "gpt2": 5, "gpt_neo": 5, "gptj": 3, "codegen": 3, "gpt_neox": 5, "gpt_neox_sequential": 5,
    "opt": 5, "bloom": 5, "falcon": 3, "falcon_new": 5, "phi": 3, "biogpt": 5, "mpt": 5,
    "stablelm": 5, "persimmon": 5, "olmo": 5, "cohere": 3, "vit": 5, "clip": 10, "whisper": 12, "phimoe": 5, "xglm": 5,
    "wav2vec2": 5, "hubert": 5,
}
POST_LN = ["bert", "roberta", "electra", "distilbert", "bart", "wav2vec2_post_ln"]
# outputs that are the raw residual stream (no norm after them): they differ by their mean
STREAM_OUTPUTS = {"clip": {"vision_model_output.last_hidden_state"}}
# on top of 2x the original's error: the converted model pays one extra rounding of each
# centred weight (2^-24 relative in fp32, 2^-9 in bf16)
ATOL = {torch.float64: 1e-10, torch.float32: 5e-6, torch.bfloat16: 2e-2}
TOLERANCE = ATOL  # for the raw-stream outputs, compared once centred


pytestmark = pytest.mark.usefixtures("torch_backend")


def build(name, dtype=torch.float32):
    model, inputs = build_tiny(name)
    model = randomize_for_conversion(model).to(dtype)
    if dtype == torch.float64 and getattr(model.config, "_experts_implementation", "eager") != "eager":
        model.set_experts_implementation("eager")  # transformers' grouped_mm experts take no float64
    return model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _max_rel(out, ref, skip=()):
    return max(rel_err(out[k], ref[k]) for k in ref if k not in skip)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("name", list(PRE_LN))
def test_pre_ln_families_convert_exactly(name, dtype):
    if dtype == torch.float64 and name in ("olmo", "cohere"):
        pytest.skip("their LayerNorms compute in float32 inside (x.to(float32)): a float64 model of them is float32-exact at best, covered by fp32")
    if dtype == torch.float64 and name == "xglm":
        pytest.skip("XGLM as transformers ships it does not run in float64 (its masks overflow float32); its measuring copy runs with float64 as the default dtype")
    model, inputs = build(name, dtype)
    try:
        ref = run(model, inputs)  # the unpatched model
    except RuntimeError as e:
        if dtype != torch.float64 or "without overflow" not in str(e):
            raise
        # as XGLM's: transformers 4.x's MPT and CLIP fill their masks with float32's minimum
        pytest.skip(f"transformers {transformers.__version__}'s {name} does not run in float64 ({e})")
    truth = float64_truth(model, inputs)
    params_before = dict(model.named_parameters(remove_duplicate=False))
    report = patch_model(model)

    assert report.count("exact") == PRE_LN[name], str(report)
    for e in report:
        module = model.get_submodule(e["name"])
        if e["change"] == "exact":
            assert isinstance(module, FusedRMSNorm) and e["old"] != e["new"]
        else:
            assert e["change"] == "fused", str(report)
    assert all(dict(model.named_parameters(remove_duplicate=False))[k] is p for k, p in params_before.items())

    out = run(model, inputs)
    stream = STREAM_OUTPUTS.get(name, set())
    if dtype == torch.float64:
        assert _max_rel(out, ref, skip=stream) <= 1e-10
    # STYLE.md's rule: no further from the float64 truth than 2x the original model's own
    # rounding error in this dtype, plus a small atol. (Two fp32 evaluations of the same
    # function differ by up to ~1.2e-5 here, the original alone being ~6e-6 from the truth.)
    for k in set(ref) - stream:
        own = _max_rel({k: ref[k]}, {k: truth[k]})
        assert _max_rel({k: out[k]}, {k: truth[k]}) <= 2 * own + ATOL[dtype], k
    for k in stream:  # the raw stream lost exactly its mean, nothing else
        centred = lambda t: t.double() - t.double().mean(-1, keepdim=True)  # noqa: E731
        torch.testing.assert_close(centred(out[k]), centred(ref[k]), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])

    # the run-time check: every converted norm received a centred input
    ratios = report.verification["input_centring"]
    assert set(ratios) == {e["name"] for e in report if e["change"] == "exact"}
    assert max(ratios.values()) <= {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]


DECODERS = [n for n in PRE_LN if n not in ("vit", "clip", "whisper", "wav2vec2", "hubert")]


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_gives_identical_tokens(name):
    model, inputs = build(name)
    reference = model.generate(inputs["input_ids"], max_new_tokens=8, do_sample=False)
    patch_model(model)
    assert torch.equal(model.generate(inputs["input_ids"], max_new_tokens=8, do_sample=False), reference)


def test_tied_embeddings_stay_tied_and_uncentred():
    """GPT-2's token embedding is the LM head: centring it would shift every logit by a
    per-vocabulary offset. It is left as it is; the stream start is centred at run time."""
    model, inputs = build("gpt2")
    wte = model.transformer.wte.weight.detach().clone()
    report = patch_model(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, wte)
    assert report.conversion["runtime_centring"] == ["transformer.h.0"]
    assert "transformer.h.0.attn.c_proj" in report.conversion["writers"]
    assert "transformer.h.0.attn.c_attn" not in report.conversion["writers"]  # q/k/v is no writer
    # converted on the CPU on torch ops (this file's backend): the report says the converted
    # norms are slower there, and what to use
    assert "the model is on cpu, where the converted norms run on torch ops, slower" in str(report)
    assert "target='layernorm' keeps torch's layer_norm" in str(report)
    model, _ = build("gpt2")
    assert "the model is on cpu" not in str(patch_model(model, dry_run=True))  # inspecting runs nothing


@pytest.mark.parametrize("kernel", ["built", "not_built"])
def test_the_cpu_note_says_what_the_converted_norms_run_on(kernel, monkeypatch):
    """With the default backend the converted norms run the compiled CPU kernel where it could
    be built, and the report says so; where it could not, the report says why and that the
    torch ops are slower."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    if kernel == "built" and _cpu_kernel.op() is None:
        pytest.skip(f"the compiled CPU kernel is not available here: {_cpu_kernel.unavailable_reason()}")
    if kernel == "not_built":
        monkeypatch.setattr(_cpu_kernel, "_op", None)
        monkeypatch.setattr(_cpu_kernel, "_reason", "no C++ compiler found (test)")
    model, _ = build("gpt2")
    report = str(patch_model(model))
    if kernel == "built":
        assert "the model is on cpu, where the converted norms run the compiled CPU RMSNorm" in report
    else:
        assert "converted norms run on torch ops (no C++ compiler found (test)), slower than the LayerNorms" in report
        assert "target='layernorm' keeps torch's layer_norm" in report


@pytest.mark.parametrize("name", POST_LN + ["opt_post_ln"])
def test_post_ln_families_are_refused_unless_approximate_is_asked(name):
    if name == "opt_post_ln":  # OPT-350m's layout
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, vocab_size=128, max_position_embeddings=64, do_layer_norm_before=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        from tiny_models import randomize_norms

        randomize_norms(model)
        inputs = {"input_ids": torch.randint(3, 128, (2, 9))}
    else:
        model, inputs = build(name)
    approx = copy.deepcopy(model)
    ref = run(model, inputs)

    report = patch_model(model)
    assert report.count("exact") == 0 and report.count("approximate") == 0
    layer_norms = [e for e in report if e["new"] == "FusedLayerNorm"]
    assert layer_norms and all("allow_approximate=True" in e["reason"] for e in layer_norms)
    torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)  # still the same model

    report = patch_model(approx, allow_approximate=True)
    assert report.count("approximate") == len(layer_norms)
    deviation = report.verification["max_rel_diff"]
    assert deviation > 1e-4  # it did change the function, and says by how much
    assert all(e["max_rel_error"] == deviation for e in report if e["change"] == "approximate")
    assert f"{deviation:.2e}" in str(report)
    assert isinstance(approx.get_submodule(layer_norms[0]["name"]), FusedRMSNorm)


def test_a_planted_non_centred_writer_fails_strict_verification_and_leaves_the_model_untouched(monkeypatch):
    model, inputs = build("gpt2")
    ref = run(model, inputs)
    state = copy.deepcopy(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    real_plan = convert.plan_conversion

    def plan_missing_a_writer(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plan.writers.remove("transformer.h.1.mlp.c_proj")  # this writer will not be centred
        return plan

    monkeypatch.setattr(convert, "plan_conversion", plan_missing_a_writer)
    with pytest.raises(RuntimeError, match=r"exact conversion failed verification.*transformer\.(h\.1\.ln_2|ln_f)"):
        patch_model(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(run(model, inputs)[k], ref[k]) for k in ref)  # no hook left behind
    assert len(patch_model(model, target="layernorm")) == 5  # and not marked as patched


@pytest.mark.parametrize("name", ["gpt2", "opt", "whisper"])
def test_round_trip_to_the_original_architecture(name, tmp_path):
    model, inputs = build(name)
    ref = run(model, inputs)
    patch_model(model)
    converted = run(model, inputs)
    unpatch_model(model)  # LayerNorms back, writers still centred, no run-time hooks
    assert not any(isinstance(m, (FusedRMSNorm, FusedLayerNorm)) for m in model.modules())
    back = run(model, inputs)
    for k in ref:
        torch.testing.assert_close(back[k], ref[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(converted[k], ref[k], rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()  # vanilla transformers
    torch.testing.assert_close(run(loaded, inputs), ref, rtol=1e-5, atol=1e-5)


def test_keep_centered_keeps_a_fine_tuned_model_exportable():
    model, inputs = build("gpt2")
    patch_model(model, keep_centered=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    tuned = run(model, inputs)
    writer = model.transformer.h[0].mlp.c_proj.weight
    assert writer.double().mean(-1).abs().max() < 1e-6  # still centred after Adam steps
    unpatch_model(model)
    torch.testing.assert_close(run(model, inputs), tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [0.1, 0.01, 1e-4], ids=["q/k/v x0.1", "q/k/v x0.01", "q/k/v x1e-4"])
def test_a_post_ln_model_with_small_attention_weights_is_still_measured_as_post_ln(scale):
    """In a post-LN block the stream also feeds q/k/v, so its mean matters, but only as much
    as those weights pass the all-ones direction on: with small ones, the stream's start
    measures a shift gradient of 1e-4 or less of its output gradient (ELECTRA-sized models do,
    as initialised). Taking that for invariance centres the stream, converts LN1 and changes
    the function. The measurement must tell it from a real writer's float64 rounding."""
    model, inputs = build("bert")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attention.self." in name:
                p.mul_(scale)
    ref = run(model, inputs)
    report = patch_model(model)  # strict: a wrong conversion raises
    assert report.count("exact") == 0 and report.count("fused") == 5, str(report)
    out = run(model, inputs)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)


def test_a_conversion_whose_float64_copy_would_not_fit_keeps_the_layernorms_with_the_reason(monkeypatch):
    """The measurement runs on a float64 copy of the model; where that cannot fit, patch_model
    says so and keeps every norm's function on the fused LayerNorm, instead of being killed
    for memory halfway (from_pretrained of a large converted checkpoint goes this way too)."""
    model, inputs = build("gpt2")
    ref = run(model, inputs)
    state = copy.deepcopy(model.state_dict())
    need = 8 * sum(p.numel() for p in model.parameters()) * 9 // 8  # the copy and its 1/8 margin
    monkeypatch.setattr(measure, "available_bytes", lambda device: need // 2)
    report = patch_model(model)
    assert report.count("exact") == 0 and report.count("fused") == 5
    assert all("float64 copy of the model" in e["reason"] and "convert_checkpoint.py" in e["reason"] for e in report)
    assert "nothing converted" in str(report)
    assert all(isinstance(m, FusedLayerNorm) for n, m in model.named_modules() if n.endswith(("ln_1", "ln_2", "ln_f")))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no writer centred
    out = run(model, inputs)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_the_float64_copy_keeps_ties_and_leaves_the_model_alone():
    model, _ = build("gpt2", dtype=torch.bfloat16)
    state = copy.deepcopy(model.state_dict())
    model64 = measure.float64_copy(model)
    assert all(t.dtype == torch.float64 for t in (*model64.parameters(), *model64.buffers()) if t.is_floating_point())
    assert model64.transformer.wte.weight is model64.lm_head.weight  # tied: one tensor
    assert not any(p.requires_grad for p in model64.parameters())
    for k, v in model64.state_dict().items():
        assert torch.equal(v, state[k].to(v.dtype)) and state[k].dtype == model.state_dict()[k].dtype
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model64.training


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"], ids=["experts x out x in", "experts x in x out, with bias"])
def test_centring_fused_expert_weights_centres_every_routed_output(model_type):
    """transformers keeps every expert's down-projection in one 3-D parameter, out x in
    (Mixtral, Phi-MoE) or transposed with a bias (GPT-OSS). Centring it as a stream writer
    must make the experts module's output zero-mean for any routing, in either layout."""
    from transformers import AutoConfig

    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} keeps no experts in 3-D parameters (an nn.Linear each)")

    config = AutoConfig.for_model(model_type, hidden_size=24, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    experts = {"mixtral": MixtralExperts, "gpt_oss": GptOssExperts}[model_type](config).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2 + 0.1)  # a mean to remove
    tokens = torch.randn(10, 24, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=g, dtype=torch.float64)
    before = experts(tokens, index, weights)
    assert before.mean(-1).abs().min() > 1e-3  # not centred to begin with
    assert set(convert.output_params(experts)) == ({"down_proj", "down_proj_bias"} if model_type == "gpt_oss" else {"down_proj"})
    convert.centre_writer_(experts)
    after = experts(tokens, index, weights)
    torch.testing.assert_close(after.mean(-1), torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-13)
    # only the mean went: what a LayerNorm reads is unchanged
    torch.testing.assert_close(after, before - before.mean(-1, keepdim=True), rtol=0, atol=1e-13)


def test_a_first_list_of_modules_that_takes_ids_is_not_shifted():
    """The stream's start is measured at the first module of each outermost list of modules.
    MarkupLM's first such list holds embedding tables, which take integer ids: those are not
    hidden states, and neither the measurement nor the run-time centring touch them."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        "markuplm", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, max_depth=8, xpath_unit_hidden_size=8,
    )
    torch.manual_seed(0)
    model = randomize_for_conversion(AutoModel.from_config(config).eval())
    randomize_norms(model)
    assert isinstance(model.get_submodule("embeddings.xpath_embeddings.xpath_tag_sub_embeddings.0"), torch.nn.Embedding)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))}
    ref, truth = run(model, inputs), float64_truth(model, inputs)
    report = patch_model(model)
    assert report.count("exact") == 0 and report.count("fused") == 5, str(report)  # post-LN, BERT-like
    for k, got in run(model, inputs).items():
        assert rel_err(got, truth[k]) <= 2 * rel_err(ref[k], truth[k]) + ATOL[torch.float32], k


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_head_as_wide_as_a_layernorm_that_feeds_no_layernorm_is_left_alone(tied):
    """ELECTRA's generator with embedding_size == vocab_size: its LM head's output is as wide as
    the embedding LayerNorm, and shifting it per position changes nothing a LayerNorm sees, but it
    feeds no LayerNorm, so it is no stream writer. Centring it anyway shifted the logits and,
    with the head tied to the embedding table, changed the embeddings (the conversion then
    failed its verification)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "electra", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, embedding_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = randomize_for_conversion(AutoModelForCausalLM.from_config(config).eval())
    randomize_norms(model)
    assert (model.generator_lm_head.weight is model.electra.embeddings.word_embeddings.weight) == tied
    head = model.generator_lm_head.weight.detach().clone()
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))}
    ref, truth = run(model, inputs), float64_truth(model, inputs)
    report = patch_model(model)
    assert "generator_lm_head" not in report.conversion["writers"], report.conversion
    assert torch.equal(model.generator_lm_head.weight, head)
    for k, got in run(model, inputs).items():  # the logits themselves, not only up to a shift
        assert rel_err(got, truth[k]) <= 2 * rel_err(ref[k], truth[k]) + ATOL[torch.float32], k


class _TiedWriterToy(torch.nn.Module):
    """A pre-LN block whose output projection shares its weight with a side head that reads the
    final norm's output through a non-linearity: centring that projection as a writer would
    change the side head too."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.ln1, self.ln_f = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.inner, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.side = torch.nn.Linear(d, d)
        self.side.weight = self.out.weight

    def forward(self, input_ids):
        x = self.emb(input_ids)
        x = x + self.out(torch.relu(self.inner(self.ln1(x))))
        y = self.ln_f(x)
        return {"main": y, "side": torch.tanh(self.side(y))}


def test_a_writer_whose_weight_another_module_holds_is_not_centred():
    torch.manual_seed(0)
    model = randomize_for_conversion(_TiedWriterToy().eval())
    randomize_norms(model)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))}
    ref, truth = run(model, inputs), float64_truth(model, inputs)
    weight = model.out.weight.detach().clone()
    report = patch_model(model, probe_inputs=inputs)
    assert report.conversion["writers"] == [] and torch.equal(model.out.weight, weight)
    # nothing centres the stream here, so both norms stay LayerNorms, and say so
    assert all(e["change"] == "fused" and "not centred" in e["reason"] for e in report), str(report)
    for k, got in run(model, inputs).items():
        assert rel_err(got, truth[k]) <= 2 * rel_err(ref[k], truth[k]) + ATOL[torch.float32], k


class _PreLNBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.mix, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.out(torch.tanh(self.mix(self.ln1(x))))
        return x + self.down(torch.relu(self.up(self.ln2(x))))


class _PooledStage(torch.nn.Module):
    def __init__(self, d, pool):
        super().__init__()
        self.ln_pool = torch.nn.LayerNorm(d) if pool else None
        self.proj = torch.nn.Linear(d, d) if pool else None
        self.blocks = torch.nn.ModuleList([_PreLNBlock(d), _PreLNBlock(d)])

    def forward(self, x):
        if self.proj is not None:  # Hiera's stage transition: pool a projection of the normalised stream
            b, t, d = x.shape
            x = self.proj(self.ln_pool(x)).view(b, t // 2, 2, d).amax(2)
        for block in self.blocks:
            x = block(x)
        return x


class _PooledStagesToy(torch.nn.Module):
    """Two stages of pre-LN blocks in one list, as Hiera's: the second stage's stream begins at a
    projection max-pooled over pairs of positions, which no centring makes zero-mean, so only the
    first stage's LayerNorms convert; last_hidden_state is the raw stream at the end."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.stages = torch.nn.ModuleList([_PooledStage(d, False), _PooledStage(d, True)])
        self.ln_f = torch.nn.LayerNorm(d)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for stage in self.stages:
            x = stage(x)
        return {"last_hidden_state": x, "pooled": self.ln_f(x).mean(1)}


def test_only_writers_of_a_stream_that_a_converted_norm_reads_are_centred():
    """Centring the second stage's writers would leave its LayerNorms as they are and take the
    per-position mean off last_hidden_state: they stay as they were, and every output, the raw
    stream included, is the original's."""
    torch.manual_seed(0)
    model = randomize_for_conversion(_PooledStagesToy().eval())
    randomize_norms(model)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))}
    ref, truth = run(model, inputs), float64_truth(model, inputs)
    second = {n: p.detach().clone() for n, p in model.stages[1].named_parameters()}
    report = patch_model(model, probe_inputs=inputs)
    changes = {e["name"]: e["change"] for e in report}
    assert {n for n, c in changes.items() if c == "exact"} == {f"stages.0.blocks.{i}.ln{k}" for i in (0, 1) for k in (1, 2)} | {"stages.1.ln_pool"}, str(report)
    assert sorted(report.conversion["writers"]) == sorted(f"stages.0.blocks.{i}.{w}" for i in (0, 1) for w in ("out", "down"))
    assert all(torch.equal(p, second[n]) for n, p in model.stages[1].named_parameters())
    assert report.verification["outputs_exposing_the_stream"] == []
    for k, got in run(model, inputs).items():
        assert rel_err(got, truth[k]) <= 2 * rel_err(ref[k], truth[k]) + ATOL[torch.float32], k
    # converting the rest approximately, on request, still centres every writer: it brings
    # those norms' inputs as near zero-mean as the writers can
    approx = randomize_for_conversion(_PooledStagesToy().eval())
    report = patch_model(approx, probe_inputs=inputs, allow_approximate=True)
    assert {f"stages.1.blocks.{i}.{w}" for i in (0, 1) for w in ("out", "down")} <= set(report.conversion["writers"])


def test_the_writers_are_cut_down_only_where_a_norm_that_stays_was_reached(monkeypatch):
    """The cut costs a float64 forward and backward: BLOOM's one LayerNorm that stays (on the
    embeddings) is reached by no writer, so there is nothing to cut and it is not run; in the
    Hiera-like toy it is."""
    calls = []
    real = measure._only_what_exact_norms_read
    monkeypatch.setattr(measure, "_only_what_exact_norms_read", lambda *a: calls.append(1) or real(*a))
    model, _ = build("bloom")
    report = patch_model(model)
    assert report.count("exact") == PRE_LN["bloom"] and not calls
    toy = randomize_for_conversion(_PooledStagesToy().eval())
    patch_model(toy, probe_inputs={"input_ids": torch.randint(3, VOCAB, (2, 10))})
    assert calls == [1]


class _ConvBlockToy(torch.nn.Module):
    """LayerNorms around a block of 1x1 convolutions, as SqueezeBERT's: the one Linear as wide
    as the stream is a pooler that reaches no LayerNorm, and with ``pooled=False`` not even the
    outputs."""

    def __init__(self, pooled, d=16):
        super().__init__()
        self.pooled = pooled
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.mix = torch.nn.Conv1d(d, d, 1)
        self.pooler = torch.nn.Linear(d, d)

    def forward(self, input_ids):
        x = self.ln1(self.emb(input_ids))
        y = self.ln2(x + self.mix(x.transpose(1, 2)).transpose(1, 2))
        pooled = torch.tanh(self.pooler(y[:, 0]))
        return {"hidden": y, **({"pooled": pooled} if self.pooled else {})}


@pytest.mark.parametrize("pooled", [True, False])
def test_a_model_where_no_linear_writes_the_stream_keeps_its_layernorms(pooled):
    """Nothing a shift could be put on reaches a LayerNorm (or, unpooled, any output): the
    measurement finds no writer, rather than failing inside autograd, and the model is unchanged."""
    torch.manual_seed(0)
    model = randomize_for_conversion(_ConvBlockToy(pooled).eval())
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))}
    ref = run(model, inputs)
    report = patch_model(model, probe_inputs=inputs)
    assert report.conversion["writers"] == [] and report.count("exact") == 0
    assert all(e["change"] == "fused" and "not centred" in e["reason"] for e in report), str(report)
    for k, got in run(model, inputs).items():
        torch.testing.assert_close(got, ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["gpt2", "bloom"])
def test_patching_without_gradients_converts_as_with_them(name, mode):
    """patch_model called under torch.no_grad() or torch.inference_mode(), the probe batch made
    there too (as in an inference script; ids made in inference mode are inference tensors, which
    autograd may not save): the measurement differentiates the float64 copy, and
    had found no writer there, converting nothing with "post-LN?" as the reason. Now the same
    changes and weights as patched with gradients, the original's function against float64, and
    a model that still trains."""
    model, inputs = build(name)
    twin, reference = copy.deepcopy(model), copy.deepcopy(model)
    with getattr(torch, mode)():
        report = patch_model(model, probe_inputs={k: v.clone() for k, v in inputs.items()})
    usual = patch_model(twin, probe_inputs=inputs)
    assert report.count("exact") == PRE_LN[name] and [e["change"] for e in report] == [e["change"] for e in usual], str(report)
    theirs = twin.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    out, want, truth = run(model, inputs), run(reference, inputs), float64_truth(reference, inputs)
    for key in truth:
        assert rel_err(out[key], truth[key]) <= 2 * rel_err(want[key], truth[key]) + ATOL[torch.float32], key
    model.train()
    model(**inputs).logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_hidden_states_before_the_final_norm_lose_only_their_mean(monkeypatch):
    """output_hidden_states=True on a converted GPT-2: every hidden state before the final norm
    is the original's with its per-position mean taken off (float64 reference), the last one,
    after ln_f, the original's; a probe that asks for them has the report name them."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, inputs = build_tiny("gpt2")
    randomize_for_conversion(model)
    asked = dict(inputs, output_hidden_states=True)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(**asked).hidden_states
    report = patch_model(model, probe_inputs=asked)
    assert report.count("exact") == 5
    assert report.verification["outputs_exposing_the_stream"] == ["hidden_states.0", "hidden_states.1"]
    assert "hidden_states.0, hidden_states.1 expose the raw residual stream" in report.note
    with torch.no_grad():
        got = model(**asked).hidden_states
    assert len(got) == len(want) == 3
    for i, (g, w) in enumerate(zip(got, want)):
        if i < len(want) - 1:
            assert w.mean(-1).abs().max() > 0.05  # the mean taken off is not nothing
            w = w - w.mean(-1, keepdim=True)
        assert rel_err(g, w) < 1e-5, i


def test_the_watch_on_a_converted_writers_slot_never_breaks_an_assignment_or_a_forward(monkeypatch):
    """What is put in a centred writer's place is measured once (test_peft.py); one whose output
    or weights cannot be read (on the meta device) still assigns and runs, unmeasured."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, _ = build_tiny("gpt2")
    randomize_for_conversion(model)
    patch_model(model)
    block = model.transformer.h[0].attn
    writer = block.c_proj
    block.c_proj = copy.deepcopy(writer).to("meta")
    assert block.c_proj(torch.randn(2, 3, 32, device="meta")).device.type == "meta"
    block.c_proj = writer.to("meta")  # put back with weights that cannot be read
    assert block.c_proj is writer
