"""patch_model with PEFT: LoRA before or after patching (fused swaps), and the exact conversion
of a PeftModel: the adapters on the stream writers centred with them, keep_centered training
as the unconverted model, merging and unpatching, adapters added after patching refused, and
keep_centered models that pickle and deep-copy. Then what PEFT puts around the norms and
heads (modules_to_save, LN tuning, a classifier's head): trained, saved whole and unpatched as
trained; PEFT layers a whole save cannot hold (IA3, prompt tuning) refused; and an adapter
trained on the original, put on a converted model later, warned about."""

import copy
import warnings

import pytest
import torch

import hf_rmsnorm
from hf_rmsnorm import FusedGatedRMSNorm, FusedLayerNorm, FusedRMSNorm, patch_model, unpatch_model
from tiny_models import adam_losses, build, randomize_for_conversion, run


def test_peft_before_or_after_patching(monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    for order in ("patch_first", "peft_first"):
        model, inputs = build("llama")
        ref = run(model, inputs)
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
        if order == "patch_first":
            patch_model(model)
            model = peft.get_peft_model(model, config)
        else:
            model = peft.get_peft_model(model, config)
            patch_model(model)
        torch.testing.assert_close(run(model, inputs), ref, rtol=1e-5, atol=1e-5)
        unpatch_model(model)
        assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())


def _lora(peft):
    # the stream writers (c_proj) among the targets: their adapters write into the stream too
    return peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)


def test_lora_then_keep_centered_trains_as_the_layernorm_model(monkeypatch):
    """PEFT first, then patch_model: the probe batch is built through the PeftModel (its
    forward takes **kwargs), the conversion is exact, and the adapters on the stream writers
    (lora_B) are centred with the writers, so LoRA fine-tuning follows the unconverted
    model's loss curve."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    base, inputs = build("gpt2")
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(base), _lora(peft))
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), _lora(peft))
    report = patch_model(model, keep_centered=True)
    assert report.count("exact") == 5, report
    assert any(".lora_B." in w for w in report.conversion["writers"]), report.conversion
    ids = inputs["input_ids"]
    for m in (model, reference):
        m.eval()  # get_peft_model leaves the model training; dropout would make the stream's mean random
    curve, expected = adam_losses(model, ids), adam_losses(reference, ids)
    assert expected[-1] < expected[0]
    torch.testing.assert_close(curve, expected, rtol=1e-5, atol=1e-5)
    # merged, each base layer stands where its wrapper stood, with the adapter folded in: still
    # the writer, still centred, and the merged models agree
    merged, merged_reference = model.merge_and_unload(), reference.merge_and_unload()
    want = run(merged_reference, {"input_ids": ids})
    torch.testing.assert_close(run(merged, {"input_ids": ids}), want, rtol=1e-5, atol=1e-5)
    # the patch record is the PeftModel's: unpatching the merged model alone says so, and
    # unpatching the PeftModel gives a plain LayerNorm GPT-2 computing the unconverted function
    with pytest.raises(ValueError, match="patched as part of a larger model.*unpatch_model\\(peft_model\\)"):
        unpatch_model(merged)
    unpatch_model(model)
    assert not any(isinstance(m, (FusedRMSNorm, FusedLayerNorm, FusedGatedRMSNorm)) for m in merged.modules())
    torch.testing.assert_close(run(merged, {"input_ids": ids}), want, rtol=1e-5, atol=1e-5)


def test_lora_added_after_keep_centered_is_refused_at_the_forward(monkeypatch):
    """Patching first and wrapping the writers afterwards would leave the adapters' output
    uncentred: the forward says so instead of training a different model."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, inputs = build("gpt2")
    patch_model(model, keep_centered=True)
    model = peft.get_peft_model(model, _lora(peft))
    with pytest.raises(RuntimeError, match=r"stream writer transformer\.h\.0\.attn\.c_proj now runs inside a peft\.tuners.*Wrap first, then patch"):
        model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_keep_centered_model_pickles_and_its_copy_keeps_itself_centred(how, tmp_path, monkeypatch):
    """torch.save(model) of a keep_centered model (its hooks are module-level functions), and a
    deep copy: the copy computes the same, keeps its own writers centred through Adam steps,
    and refuses an adapter put on one of its own writers (the check is the copy's, not the
    original's)."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, inputs = build("gpt2")
    patch_model(model, keep_centered=True)
    if how == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        copied = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        copied = copy.deepcopy(model)
    torch.testing.assert_close(run(copied, inputs), run(model, inputs), rtol=0, atol=0)
    adam_losses(copied, inputs["input_ids"], steps=3)
    run(copied, inputs)  # re-centred before this forward
    writer = copied.transformer.h[0].mlp.c_proj.weight
    assert writer.double().mean(-1).abs().max() < 1e-6
    wrapped = peft.get_peft_model(copied, _lora(peft))
    with pytest.raises(RuntimeError, match="now runs inside a peft"):
        wrapped(input_ids=inputs["input_ids"])
    run(model, inputs)  # the original, unwrapped, still runs


@pytest.mark.parametrize("order,keep", [("lora_first", True), ("lora_first", False), ("patch_first", False), ("unpatched", False)])
def test_a_lora_model_saves_whole_and_loads_as_trained(order, keep, tmp_path, monkeypatch):
    """hf_rmsnorm.save_pretrained of a trained PeftModel: the adapters folded into their base
    layers (W + scaling B A, without changing the model), under the original names, as PEFT's
    merge_and_unload() gives; and the same once merged. With keep_centered the writers stay
    centred; otherwise the adapters move them, and from_pretrained keeps them as saved. Either
    way the loaded model computes what the trained one did; unpatched, it is a plain save."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    model, inputs = build("gpt2")
    if order == "lora_first":
        model = peft.get_peft_model(model, _lora(peft))
        patch_model(model, keep_centered=keep)
    else:
        if order == "patch_first":
            patch_model(model)
        model = peft.get_peft_model(model, _lora(peft))
    model.eval()  # no dropout on the stream
    adam_losses(model, inputs["input_ids"])
    run(model, inputs)  # keep_centered re-centres the writers before a forward: after the last step, now
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    block = hf_rmsnorm.save_pretrained(model, tmp_path / "unmerged")
    after = model.state_dict()  # left as it was: the adapters unmerged, every weight the same
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    assert any(".lora_B." in k for k in after)
    merged = model.merge_and_unload()
    reference = run(merged, inputs)
    again = hf_rmsnorm.save_pretrained(model, tmp_path / "merged")
    assert again == block
    if order == "unpatched":
        assert block is None
        for saved in ("unmerged", "merged"):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / saved).eval()
            torch.testing.assert_close(run(loaded, inputs), reference, rtol=1e-5, atol=1e-5)
        return
    assert block["writers_centred"] is keep
    assert block["stream_writers"] == [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    assert list(block["modules"]) == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"]
    for saved in ("unmerged", "merged"):
        loaded = hf_rmsnorm.from_pretrained(tmp_path / saved).eval()
        torch.testing.assert_close(run(loaded, inputs), reference, rtol=1e-5, atol=1e-5)


def test_an_adapter_folder_is_refused_saying_what_to_use(tmp_path):
    """PEFT's own save writes the adapters alone (adapter_config.json, no config.json): no
    model to convert or load, and the refusal says what to use instead."""
    peft = pytest.importorskip("peft")
    from hf_rmsnorm.checkpoint import ConversionError, convert_checkpoint

    model = peft.get_peft_model(build("gpt2")[0], _lora(peft))
    model.save_pretrained(tmp_path / "adapters")
    for load in (lambda: convert_checkpoint(tmp_path / "adapters", tmp_path / "out"), lambda: hf_rmsnorm.from_pretrained(tmp_path / "adapters")):
        with pytest.raises(ConversionError, match="holds PEFT adapters alone.*hf_rmsnorm.save_pretrained"):
            load()
    assert not (tmp_path / "out").exists()


def _norm_tuning(peft, kind):
    """PEFT configs that train copies of the norms: LoRA with the norms in modules_to_save, and
    LN tuning (each norm wrapped with a trainable copy)."""
    norms = ["ln_1", "ln_f"]
    if kind == "modules_to_save":
        return peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=norms)
    return peft.LNTuningConfig(target_modules=norms)


def _fused(model):
    return [n for n, m in model.named_modules() if isinstance(m, (FusedRMSNorm, FusedLayerNorm, FusedGatedRMSNorm))]


@pytest.mark.parametrize("kind", ["modules_to_save", "ln_tuning"])
@pytest.mark.parametrize("order", ["patch_first", "peft_first"])
def test_trained_copies_of_the_norms_save_and_survive_unpatching(order, kind, tmp_path, monkeypatch):
    """PEFT wrappers that train copies of the norms (modules_to_save, LN tuning), around a
    converted GPT-2: patching leaves every module in its mode (a PeftModel around a model in
    eval mode is itself in train mode; patch_model had put all of it in train mode, dropout
    on), the wrapped model trains as its unpatched twin, hf_rmsnorm.save_pretrained saves the
    copies that run under the norms' own names (it had saved the wrappers' keys, which no
    model loads), and unpatching, before or after merge_and_unload, keeps the wrappers and the
    trained copies: the model computes what it trained to, with LayerNorms."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    base, inputs = build("gpt2")
    randomize_for_conversion(base)
    torch.manual_seed(0)
    twin = peft.get_peft_model(copy.deepcopy(base), _norm_tuning(peft, kind))
    torch.manual_seed(0)
    if order == "patch_first":
        patch_model(base)
        model = peft.get_peft_model(base, _norm_tuning(peft, kind))
    else:
        model = peft.get_peft_model(base, _norm_tuning(peft, kind))
        modes = {n: m.training for n, m in model.named_modules()}
        assert modes[""] and not modes["base_model.model"]
        patch_model(model)
        assert {n: m.training for n, m in model.named_modules() if n in modes} == modes
    assert not any(m.training for n, m in model.named_modules() if n in _fused(model))
    torch.testing.assert_close(run(model, inputs), run(twin, inputs), rtol=1e-5, atol=1e-5)

    def step(m):
        trainable = [p for p in m.parameters() if p.requires_grad]
        assert trainable
        m(**inputs).logits.pow(2).mean().backward()
        torch.optim.SGD(trainable, lr=0.5).step()

    untrained = run(twin, inputs)
    step(model)
    step(twin)
    trained = run(twin, inputs)
    assert (trained["logits"] - untrained["logits"]).abs().max() > 1e-2
    torch.testing.assert_close(run(model, inputs), trained, rtol=1e-5, atol=1e-5)
    saves = {"unmerged": hf_rmsnorm.save_pretrained(model, tmp_path / "unmerged")}
    if kind == "ln_tuning":  # merged, LN tuning swaps the tuned copy into the base layer's place
        model.merge_adapter()
        saves["merged"] = hf_rmsnorm.save_pretrained(model, tmp_path / "merged")
        torch.testing.assert_close(run(model, inputs), trained, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    for saved, block in saves.items():
        assert list(block["modules"]) == [f"transformer.h.{i}.{n}" for i in range(2) for n in ("ln_1", "ln_2")] + ["transformer.ln_f"]
        assert block["converted_norms"] == 5 and block["writers_centred"]
        for loaded in (hf_rmsnorm.from_pretrained(tmp_path / saved), AutoModelForCausalLM.from_pretrained(tmp_path / saved)):
            torch.testing.assert_close(run(loaded.eval(), inputs), trained, rtol=1e-5, atol=1e-5)
    wrapper = type(model.base_model.model.transformer.ln_f)
    copied = copy.deepcopy(model)
    merged = copied.merge_and_unload()  # a trained copy stands where the fused norm stood
    unpatch_model(merged if order == "patch_first" else copied)  # the record is the inner model's, or the PeftModel's
    assert not _fused(merged)
    torch.testing.assert_close(run(merged, inputs), trained, rtol=1e-5, atol=1e-5)
    unpatch_model(model)
    assert not _fused(model) and type(model.base_model.model.transformer.ln_f) is wrapper
    torch.testing.assert_close(run(model, inputs), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(model.merge_and_unload(), inputs), trained, rtol=1e-5, atol=1e-5)


def test_a_peft_layer_the_save_cannot_fold_is_refused_before_writing(tmp_path):
    """IA3's scales (like any PEFT layer but LoRA, modules_to_save and LN tuning) would have
    been left out of the save, leaving the base model without saying so: refused, naming the
    layer and what to do, with nothing written."""
    peft = pytest.importorskip("peft")
    model, _ = build("gpt2")
    model = peft.get_peft_model(model, peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn is a peft\.tuners\.ia3\..*cannot fold.*merge_and_unload\(\)"):
        hf_rmsnorm.save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_prompt_tuning_trains_as_unconverted_and_its_save_is_refused_saying_what_to_do(tmp_path, monkeypatch):
    """Prompt tuning on a converted GPT-2: the virtual tokens enter the stream at its start,
    which is centred at run time, so the converted model trains them as the unconverted one.
    There is no whole model to save (the tokens are not weights of GPT-2): the save is
    refused, writing nothing, and what it advises (PEFT's adapter save, loaded on the base
    model as loaded, then patched) runs as trained."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    base, inputs = build("gpt2")
    randomize_for_conversion(base)
    config = lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)  # noqa: E731
    torch.manual_seed(0)
    twin = peft.get_peft_model(copy.deepcopy(base), config())
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), config())
    assert patch_model(model).count("exact") == 5
    ids = inputs["input_ids"]
    curve = adam_losses(model, ids)
    assert curve[-1] < curve[0]
    torch.testing.assert_close(curve, adam_losses(twin, ids), rtol=1e-5, atol=1e-5)
    trained = run(twin, inputs)
    torch.testing.assert_close(run(model, inputs), trained, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"prompt-learning PeftModel .* no whole-model form.*peft_model\.save_pretrained\(dir\)"):
        hf_rmsnorm.save_pretrained(model, tmp_path / "whole")
    assert not (tmp_path / "whole").exists()
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    patch_model(loaded)
    torch.testing.assert_close(run(loaded, inputs), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["forward", "merged", "deepcopy", "torch.save", "second adapter"])
def test_an_adapter_trained_on_the_original_put_on_the_converted_model_warns(how, tmp_path, monkeypatch):
    """A LoRA adapter trained on the LayerNorm GPT-2, loaded onto the converted model: its
    updates to the stream writers are not centred, so the converted model computes something
    else (logits off by more than their own size), which had gone unsaid. One warning, with
    what to do, on the first forward through the adapter or where PEFT merges it, in copies
    of the model too, and as a second adapter of a PeftModel converted with a fresh one; none
    for a fresh adapter (nothing off the centre yet), none where the adapter goes on before
    patching (then exact), none once unpatched."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    base, inputs = build("gpt2")
    randomize_for_conversion(base)
    config = lambda init: peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=init)  # noqa: E731
    torch.manual_seed(0)
    trained = peft.get_peft_model(copy.deepcopy(base), config(False))
    trained.save_pretrained(tmp_path / "adapter")
    want = run(trained, inputs)
    message = {
        "merged": r"stream writer transformer\.h\.0\.attn\.c_proj was put back .*merged",
        "second adapter": r"put beside the stream writer .*h\.0\.attn\.c_proj\.lora_B\.default after patching \(another adapter",
    }.get(how, r"stream writer transformer\.h\.0\.attn\.c_proj now runs inside a peft\.tuners\.lora\.") + (
        r".*converted norms .* no longer see a centred stream.*put it on before patching")

    model = peft.get_peft_model(copy.deepcopy(base), config(True)) if how == "second adapter" else copy.deepcopy(base)
    patch_model(model)
    if how == "deepcopy":
        model = copy.deepcopy(model)
    elif how == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        model = torch.load(tmp_path / "model.pt", weights_only=False)
    with pytest.warns(UserWarning, match=message) as caught:
        if how == "second adapter":
            model.load_adapter(tmp_path / "adapter", adapter_name="original")
            model.set_adapter("original")
            adapted = model
        else:
            adapted = peft.PeftModel.from_pretrained(model, tmp_path / "adapter")
        got = run(adapted.merge_and_unload() if how == "merged" else adapted, inputs)
    assert sum("hf_rmsnorm" in str(w.message) for w in caught) == 1
    assert (got["logits"] - want["logits"]).abs().max() > want["logits"].abs().max()

    def quiet(make):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="hf_rmsnorm")
            return run(make(), inputs)

    fresh = copy.deepcopy(base)
    patch_model(fresh)
    quiet(lambda: peft.get_peft_model(fresh, config(True)))
    before = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    patch_model(before)
    torch.testing.assert_close(quiet(lambda: before), want, rtol=1e-5, atol=1e-5)
    undone = copy.deepcopy(base)
    patch_model(undone)
    unpatch_model(undone)
    torch.testing.assert_close(quiet(lambda: peft.PeftModel.from_pretrained(undone, tmp_path / "adapter")), want, rtol=1e-5, atol=1e-5)


def test_a_lora_classifier_saves_with_its_trained_head(tmp_path, monkeypatch):
    """LoRA for sequence classification puts the new head in modules_to_save: the save had
    written the wrapper's keys, and the reloaded classifier got a freshly initialised head.
    Converted GPT-2 classifier, one step: hf_rmsnorm.from_pretrained and plain transformers
    both load what was trained."""
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    base = randomize_for_conversion(AutoModelForSequenceClassification.from_config(config).eval())
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    assert patch_model(model).count("exact") == 5
    inputs = {"input_ids": torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))}
    model(**inputs).logits.pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    trained = run(model, inputs)
    hf_rmsnorm.save_pretrained(model, tmp_path / "saved")
    for load in (hf_rmsnorm.from_pretrained, AutoModelForSequenceClassification.from_pretrained):
        torch.testing.assert_close(run(load(tmp_path / "saved").eval(), inputs), trained, rtol=1e-4, atol=1e-4)
