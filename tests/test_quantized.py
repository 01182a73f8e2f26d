"""Models whose linear layers keep their weights quantized (bitsandbytes' 8- and 4-bit layers,
QLoRA's base models; torchao's tensor subclasses). The exact conversion centres the layers that write the residual stream,
which a quantized weight cannot be (C W, rounded again to the levels of its scales, is not
centred): patch_model must leave such weights untouched, keep the LayerNorms they feed (fused,
the model's function unchanged) and say that quantization is why, not blame the model's layout.
Loaded from a conversion on disk where the float64 measurement cannot be made, the record's
conversion does not hold for such layers either, and is not rebuilt."""

import copy

import pytest
import torch
from torch import nn

import hf_rmsnorm
from tiny_models import build, randomize_for_conversion, run

pytestmark = pytest.mark.usefixtures("torch_backend")


class Int8Linear(nn.Linear):
    """A linear layer quantized as LLM.int8 stores it, without bitsandbytes: int8 codes, one
    absmax scale per output row, the weight rebuilt in the input's dtype for each call."""

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None)
        scale = weight.abs().amax(1).clamp_min(1e-12) / 127
        self.weight = nn.Parameter(torch.round(weight / scale[:, None]).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype), self.bias)


def _quantize_writers(model):
    """GPT-2 with every layer that writes its residual stream (the attention's and the MLP's
    c_proj, GPT-2's Conv1D: weight stored (in, out)) quantized to int8."""
    for name, module in list(model.named_modules()):
        if name.endswith(".c_proj"):
            model.set_submodule(name, Int8Linear(module.weight.detach().t(), module.bias))
    return model


def _assert_kept_because_quantized(report, layer_type: str, dtype: str, norms: int = 5):
    assert report.count("exact") == 0 and report.count("fused") == len(report) == norms, report
    for entry in report:
        assert entry["new"] == "FusedLayerNorm", entry
        assert f"keep their weights quantized ({layer_type}, {dtype}" in entry["reason"], entry["reason"]
        assert "post-LN" not in entry["reason"], entry["reason"]
    assert report.note.startswith("4 layers that may write the stream keep their weights quantized"), report.note


def test_a_model_with_quantized_stream_writers_keeps_its_layernorms_and_says_why():
    model, inputs = build("gpt2")
    randomize_for_conversion(model)
    _quantize_writers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = run(copy.deepcopy(model), inputs)
    report = hf_rmsnorm.patch_model(model, probe_inputs=inputs)
    _assert_kept_because_quantized(report, "Int8Linear", "torch.int8")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the int8 codes above all
    got = run(model, inputs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    # on request, every LayerNorm becomes an RMSNorm, measured, and still no code changes
    hf_rmsnorm.unpatch_model(model)
    report = hf_rmsnorm.patch_model(model, probe_inputs=inputs, allow_approximate=True)
    assert report.count("approximate") == 5 and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _bitsandbytes_model(path, bits: int):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[dev]')")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"load_in_8bit": True} if bits == 8 else {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu")
    layer = model.get_submodule("transformer.h.0.attn.c_proj")
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit), type(layer)
    return model.eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_bitsandbytes_model_keeps_its_layernorms_fused_its_codes_untouched(bits, tmp_path):
    """QLoRA's start: a LayerNorm model loaded in 8 or 4 bits, then patched."""
    model, inputs = build("gpt2")
    randomize_for_conversion(model)
    model.save_pretrained(tmp_path / "full")
    model = _bitsandbytes_model(tmp_path / "full", bits)
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    with torch.no_grad():
        want = model(**inputs).logits
    report = hf_rmsnorm.patch_model(model, probe_inputs=inputs)
    _assert_kept_because_quantized(report, "Linear8bitLt" if bits == 8 else "Linear4bit", "torch.int8" if bits == 8 else "torch.uint8")
    assert before and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_a_torchao_model_keeps_its_layernorms_fused_its_weights_untouched():
    """torchao's weight-only int8 (``quantize_``): the weights become a tensor subclass that
    reports the float dtype it stands for and has no mean; patch_model raised NotImplementedError
    from centring one. BLOOM: its linear layers write the stream (GPT-2's Conv1D is no
    nn.Linear, which quantize_ takes)."""
    quantization = pytest.importorskip("torchao.quantization", reason="torchao is not installed (pip install -e '.[dev]')")
    model, inputs = build("bloom")
    randomize_for_conversion(model)
    model.eval()
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    layer = model.get_submodule("transformer.h.0.self_attention.dense")
    names, _ = layer.weight.__tensor_flatten__()  # the codes and scales inside the subclass
    stored = {n: getattr(layer.weight, n).clone() for n in names}
    kind = type(layer.weight).__name__
    want = run(copy.deepcopy(model), inputs)
    report = hf_rmsnorm.patch_model(model, probe_inputs=inputs)
    _assert_kept_because_quantized(report, "Linear", kind, norms=6)  # the embedding's LayerNorm too
    assert type(layer.weight).__name__ == kind and all(torch.equal(getattr(layer.weight, n), v) for n, v in stored.items())
    got = run(model, inputs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_a_conversion_on_disk_loaded_quantized_where_it_cannot_be_measured_is_not_rebuilt(tmp_path, monkeypatch):
    """A checkpoint converted on disk, loaded in 8 bits on a machine where the float64 copy does
    not fit: the record names writers that are now int8 codes, whose centring did not survive the
    quantization, so the record is not rebuilt. The model runs as its LayerNorm reading (the
    writers centred before quantization: what plain transformers loads), fused, saying why."""
    from hf_rmsnorm.checkpoint import convert_checkpoint
    import hf_rmsnorm.patching.measure as measure

    model, inputs = build("gpt2")
    randomize_for_conversion(model)
    model.save_pretrained(tmp_path / "full")
    convert_checkpoint(tmp_path / "full", tmp_path / "converted")
    plain = _bitsandbytes_model(tmp_path / "converted", 8)  # plain transformers: no patch, the LayerNorms
    with torch.no_grad():
        want = plain(**inputs).logits
    monkeypatch.setattr(measure, "available_bytes", lambda device: 1024)
    from transformers import BitsAndBytesConfig

    loaded = hf_rmsnorm.from_pretrained(tmp_path / "converted", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    report = loaded.hf_rmsnorm_report
    assert report.count("exact") == 0 and report.count("fused") == 5, report
    assert "keep their weights quantized (Linear8bitLt, torch.int8" in report.note and "move it to its device" not in report.note, report.note
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_qlora_on_a_patched_4bit_model_trains_as_on_the_unpatched_one(tmp_path):
    """QLoRA: a LayerNorm model loaded in 4 bits, prepared for k-bit training, LoRA adapters on,
    then patched. Three AdamW steps (dropout off, the same batch) give the unpatched model's
    losses and adapters, and the quantized codes stay as loaded."""
    peft = pytest.importorskip("peft")
    model, inputs = build("gpt2")
    randomize_for_conversion(model)
    model.save_pretrained(tmp_path / "full")
    model = peft.prepare_model_for_kbit_training(_bitsandbytes_model(tmp_path / "full", 4), use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    reference = copy.deepcopy(model)
    codes = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    report = hf_rmsnorm.patch_model(model, probe_inputs=inputs)
    assert report.count("fused") >= 4 and not any("post-LN" in e["reason"] for e in report), report
    ids = inputs["input_ids"]
    losses = {}
    for name, m in (("patched", model), ("reference", reference)):
        m.eval()  # dropout off: the two runs see the same function
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.setdefault(name, []).append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["patched"]), torch.tensor(losses["reference"]), rtol=1e-5, atol=0)
    assert losses["patched"][-1] < losses["patched"][0]
    trained = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in codes.items())
