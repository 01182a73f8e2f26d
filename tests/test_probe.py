"""The probe batch (``patching/probe.py``) as the conversion uses it: built from the config
(raw audio sized to a conv feature encoder), given by the user, refused when it does not run,
the text alone for a vision-language model, a model that cannot run in float64, and forwards
that draw random numbers, verified on the same draws."""

import copy

import pytest
import torch

from hf_rmsnorm import FusedLayerNorm, FusedRMSNorm, patch_model, unpatch_model
from hf_rmsnorm.patching import convert
from reference import rel_err
from test_convert import ATOL, _PreLNBlock, build
from tiny_models import _LLAMA_LIKE, VOCAB, float64_truth, randomize_for_conversion, randomize_norms, run
from tiny_models import build as build_tiny


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")


def test_a_model_without_a_probe_input_keeps_its_layernorms_with_the_reason():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    report = patch_model(model)
    assert report[0]["change"] == "fused" and "pass probe_inputs={...} to convert it" in report[0]["reason"]


def test_probe_inputs_can_be_given():
    model, inputs = build("gpt2")
    report = patch_model(model, probe_inputs=inputs)
    assert report.count("exact") == 5


def _with_a_required_input(model):
    """The model's forward takes one more required argument than the probe builder knows of
    (as Qwen3-ASR's encoder takes a features mask): a built probe batch raises TypeError."""
    base = type(model)

    def forward(self, input_ids, scale, **kwargs):
        return base.forward(self, input_ids=input_ids * scale, **kwargs)

    model.__class__ = type(f"{base.__name__}NeedingScale", (base,), {"forward": forward})
    return model


def _unchanged(model, state, inputs, ref, fused=FusedLayerNorm):
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no writer centred
    assert not any(isinstance(m, (FusedRMSNorm, FusedLayerNorm)) and not isinstance(m, fused) for m in model.modules())
    out = run(model, inputs)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_a_model_whose_forward_rejects_the_built_probe_keeps_its_layernorms_and_says_why():
    """The conversion is verified on a probe batch; where the batch built from the config does
    not run through the model, nothing is converted, every norm keeps its function on the fused
    LayerNorm, and the report carries the model's own error. A batch that runs converts it."""
    model, inputs = build("gpt2")
    model = _with_a_required_input(model)
    inputs = dict(inputs, scale=1)
    ref, state = run(model, inputs), copy.deepcopy(model.state_dict())
    report = patch_model(model)
    assert report.count("exact") == 0 and report.count("fused") == 5, str(report)
    for e in report:
        assert "the model's forward raised on the probe batch (input_ids)" in e["reason"] and "TypeError" in e["reason"], e
    assert "nothing converted" in str(report)
    _unchanged(model, state, inputs, ref)
    unpatch_model(model)
    assert patch_model(model, probe_inputs=inputs).count("exact") == 5


def _tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8),
        text_config=dict(_LLAMA_LIKE, model_type="llama"),
        image_token_index=VOCAB - 1,
    )
    torch.manual_seed(0)
    model = randomize_for_conversion(LlavaForConditionalGeneration(config).eval())
    randomize_norms(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 1, (2, 20), generator=g)
    ids[:, 2:18] = config.image_token_index  # one token per image patch: (32 / 8) ** 2
    return model, {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def test_a_vision_language_model_is_probed_on_its_text_when_the_built_batch_does_not_fit():
    """A generic batch cannot place Llava's image tokens to match its images: the model raises
    on it. patch_model then probes the text alone, fuses every norm with its own function, and
    says that the vision tower's LayerNorms were not reached. A batch with the images placed
    reaches them, and shows that they cannot be converted: Llava's projector reads the vision
    tower's raw hidden states (its stream, mean included), not only its LayerNorms."""
    model, inputs = _tiny_llava()
    ref, state, truth = run(model, inputs), copy.deepcopy(model.state_dict()), float64_truth(model, inputs)

    def same_function():  # fused RMSNorm on torch ops rounds apart from LlamaRMSNorm's
        for k, got in run(model, inputs).items():
            assert rel_err(got, truth[k]) <= 2 * rel_err(ref[k], truth[k]) + ATOL[torch.float32], k

    report = patch_model(model)
    assert report.count("fused") == 11 and report.count("exact") == 0, str(report)
    assert "probed on input_ids alone: the model's forward raised on the probe batch (input_ids, pixel_values): ValueError" in report.note
    vision = [e for e in report if ".vision_tower." in e["name"]]
    assert len(vision) == 6 and all("the probe batch does not reach it" in e["reason"] for e in vision)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no writer centred
    same_function()
    unpatch_model(model)
    report = patch_model(model, probe_inputs=inputs)
    assert report.count("exact") == 0 and report.count("fused") == 11, str(report)
    vision = [e for e in report if ".vision_tower." in e["name"]]
    assert all("its input is not centred" in e["reason"] and "a projection of raw hidden states" in e["reason"] for e in vision)
    same_function()


def test_probe_inputs_that_do_not_run_are_refused_and_the_model_left_alone():
    model, inputs = build("gpt2")
    ref, state = run(model, inputs), copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"probe_inputs do not run through GPT2LMHeadModel: .*IndexError"):
        patch_model(model, probe_inputs={"input_ids": inputs["input_ids"] + 1000})  # past the vocabulary
    _unchanged(model, state, inputs, ref, fused=())


def test_a_model_that_cannot_run_in_float64_keeps_its_layernorms_and_says_why():
    """The conversion is measured on a float64 copy; a model that hard-codes float32 somewhere
    (MRA's kernels do) cannot be measured, so it is not converted, and the report says why."""
    model, inputs = build("gpt2")

    def float32_only(module, args):
        if args[0].dtype == torch.float64:
            raise RuntimeError("mat1 and mat2 must have the same dtype, but got Float and Double")

    model.transformer.h[1].register_forward_pre_hook(float32_only)
    ref, state = run(model, inputs), copy.deepcopy(model.state_dict())
    report = patch_model(model)
    assert report.count("exact") == 0 and report.count("fused") == 5, str(report)
    assert all("does not run in float64: RuntimeError: mat1 and mat2 must have the same dtype" in e["reason"] for e in report)
    _unchanged(model, state, inputs, ref)


def test_a_raw_audio_probe_gives_the_encoder_the_frames_asked_for():
    """The raw-audio probe's length comes from the config's conv stack; transformers' own
    arithmetic for that stack says how many frames it makes."""
    from hf_rmsnorm.patching.probe import probe_inputs

    model, _ = build_tiny("wav2vec2")
    for length in (1, 12):
        samples = probe_inputs(model, length=length)["input_values"].shape[-1]
        assert int(model._get_feat_extract_output_lengths(samples)) == length
        assert int(model._get_feat_extract_output_lengths(samples - 1)) == length - 1  # the fewest that make them


class _MaskingToy(torch.nn.Module):
    """Pre-LN blocks over a random half of the positions, as ViTMAE's encoder: the forward
    draws its mask from torch's generator, in the default dtype (so a float64 run of it draws
    another mask than a float32 one, from the same seed)."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.blocks = torch.nn.ModuleList([_PreLNBlock(d), _PreLNBlock(d)])
        self.ln_f = torch.nn.LayerNorm(d)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        keep = torch.rand(x.shape[:2]).argsort(-1)[:, : x.shape[1] // 2].to(x.device)
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return {"hidden": self.ln_f(x)}


def _masking_toy():
    torch.manual_seed(0)
    model = randomize_for_conversion(_MaskingToy().eval())
    randomize_norms(model)
    return model, {"input_ids": torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))}


def test_a_forward_that_draws_random_numbers_is_verified_on_the_same_draws():
    """Its outputs are compared with the original's on the same draws (a float64 run draws
    other ones), the conversion is still exact, and the caller's random stream is untouched."""
    model, inputs = _masking_toy()
    original = copy.deepcopy(model)
    state = torch.get_rng_state()
    report = patch_model(model, probe_inputs=inputs)
    assert torch.equal(torch.get_rng_state(), state)
    assert report.count("exact") == 5 and report.verification["random_outputs"] == ["hidden"]
    assert "compared with the original's on the same draws" in report.note
    for seed in (3, 4):
        torch.manual_seed(seed)
        ref = run(original, inputs)
        torch.manual_seed(seed)
        assert rel_err(run(model, inputs)["hidden"], ref["hidden"]) <= ATOL[torch.float32]


def test_a_planted_non_centred_writer_in_a_random_forward_fails_verification(monkeypatch):
    """Against a float64 run with another mask, the original's own error is of order one, and
    twice it would let any conversion pass: the check has to hold on the same draws."""
    model, inputs = _masking_toy()
    real_plan = convert.plan_conversion

    def plan_missing_a_writer(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plan.writers.remove("blocks.1.down")
        return plan

    monkeypatch.setattr(convert, "plan_conversion", plan_missing_a_writer)
    with pytest.raises(RuntimeError, match="exact conversion failed verification.*hidden depend on random draws"):
        patch_model(model, probe_inputs=inputs)


def _padded_batch(vocab, side):
    """A tokenizer's padded batch: rows of 12, 9 and 5 tokens, padded on ``side``."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 9, 5)):
        pad = slice(0, 12 - length) if side == "left" else slice(length, 12)
        mask[row, pad] = 0
        ids[row, pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["bloom", "gpt_neox", "opt", "phi", "gpt2"])
def test_a_padded_probe_batch_converts_as_an_unpadded_one(name, side):
    """A tokenizer's padded batch as probe_inputs. With left padding a row's first queries see
    only padding, and the float64 copy's attention (SDPA on the CPU) gives NaN there, which
    spreads over the row: these models had been converted wrongly (outputs off by 0.6-11x their
    size) while the report said exact. Now: the same changes and the same weights as with the
    unpadded ids, the same outputs on the padded batch, and the function of the original: on
    the ids all attended, within the verification's bound of a float64 run (a float64 run of the
    padded batch itself is NaN, eager attention included)."""
    model, _ = build_tiny(name)
    randomize_for_conversion(model)
    model.eval()
    reference, twin = copy.deepcopy(model), copy.deepcopy(model)
    probe = _padded_batch(model.config.vocab_size, side)
    mask = probe["attention_mask"].clone()
    ids = {"input_ids": probe["input_ids"]}
    report = patch_model(model, probe_inputs=probe)
    plain = patch_model(twin, probe_inputs=ids)
    assert [e["change"] for e in report] == [e["change"] for e in plain] and report.count("exact") >= 3, str(report)
    assert torch.equal(probe["attention_mask"], mask)  # the caller's batch as it was
    assert "padding attended" in report.note
    theirs = twin.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    out, same = run(model, probe), run(twin, probe)
    assert all(torch.equal(out[k], same[k]) for k in same)
    out, want, truth = run(model, ids), run(reference, ids), float64_truth(reference, ids)
    for key in truth:
        assert rel_err(out[key], truth[key]) <= 2 * rel_err(want[key], truth[key]) + ATOL[torch.float32], key


def test_a_probe_batch_with_non_finite_float64_outputs_keeps_the_layernorms_and_says_why():
    """NaN in the float64 truth would make every measurement pass (NaN compares false with
    every bound): the model is left with its LayerNorms fused, and the report says why."""
    model, inputs = build("gpt2")

    def nan_in_float64(module, args, output):
        return output * float("nan") if output[0].dtype == torch.float64 else output

    model.transformer.h[1].mlp.register_forward_hook(nan_in_float64)
    ref, state = run(model, inputs), copy.deepcopy(model.state_dict())
    report = patch_model(model, probe_inputs=inputs)
    assert report.count("exact") == 0 and report.count("fused") == 5, str(report)
    assert all("outputs on the probe batch are not finite (logits" in e["reason"] for e in report), str(report)
    _unchanged(model, state, inputs, ref)


def test_a_non_finite_value_is_never_within_a_bound():
    """The two measures every check of the conversion compares with a bound."""
    from hf_rmsnorm.patching.centring import centring_ratio
    from hf_rmsnorm.patching.discovery import _rel_err

    x = torch.randn(4, 8, dtype=torch.float64)
    nan = x.clone()
    nan[1, 2] = float("nan")
    inf = x.clone()
    inf[2, 3] = float("inf")
    assert _rel_err(x, x) == 0.0 and centring_ratio(x - x.mean(-1, keepdim=True)) < 1e-15
    for bad in (nan, inf):
        assert _rel_err(bad, x) == float("inf") and _rel_err(x, bad) == float("inf") and _rel_err(bad, bad) == float("inf")
        assert centring_ratio(bad) == float("inf")
