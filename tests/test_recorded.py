"""Loading a converted model where its float64 copy, which the conversion is measured on, does
not fit (a big model on a GPU): the conversion its checkpoint records, rebuilt and checked in the
model's own dtype (hf_rmsnorm/patching/recorded.py), for conversions on disk and saves of
fine-tuned patched models; records that no longer describe the weights refused; and
convert_checkpoint's check of a model that fits in memory once."""

import json

import pytest
import torch

import hf_rmsnorm
from hf_rmsnorm.checkpoint import convert_checkpoint
from reference import rel_err
from test_checkpoint import FAMILIES, _cli, _close, _fine_tune, _no_leftovers, _save
from test_convert import build
from tiny_models import float64_truth, run

pytestmark = pytest.mark.usefixtures("torch_backend")


def _no_float64_copy(monkeypatch):
    """A machine where the float64 copy the conversion is measured on does not fit (a big model on a GPU)."""
    import hf_rmsnorm.patching.measure as measure

    monkeypatch.setattr(measure, "available_bytes", lambda device: 1024)


@pytest.mark.parametrize("name,kwargs", [("gpt2", {}), ("gpt2", {"keep_centered": True}), ("bert", {"allow_approximate": True})],
                         ids=["exact", "exact kept centred", "approximate"])
def test_where_the_conversion_cannot_be_measured_a_recorded_save_loads_and_a_bare_one_is_refused(name, kwargs, tmp_path, monkeypatch):
    """Loaded where the conversion cannot be measured (the float64 copy does not fit), a model
    fine-tuned converted without keep_centered would come back as its LayerNorm reading, a
    different model. Saved by hf_rmsnorm.save_pretrained, its block records the conversion, and
    the load rebuilds it from that record (saying it measured nothing; fine-tuned with
    keep_centered, its writers centred, the converted norms' inputs are checked centred in the
    model's dtype); saved bare (the model's own save_pretrained), only counts are known:
    refused, saying why and what to do."""
    model, inputs = build(name)
    hf_rmsnorm.patch_model(model, **kwargs)
    want = run(_fine_tune(model, inputs), inputs)
    model.save_pretrained(tmp_path / "bare")
    hf_rmsnorm.save_pretrained(model, tmp_path / "recorded")
    _no_float64_copy(monkeypatch)
    loaded = hf_rmsnorm.from_pretrained(tmp_path / "recorded").eval()
    report = loaded.hf_rmsnorm_report
    assert report.count("exact" if name == "gpt2" else "approximate") == 5, report  # tiny BERT has 5 LayerNorms too
    checked = "Verified on a probe batch" if kwargs.get("keep_centered") else "Neither measured nor verified here"
    assert "rebuilt from the record" in report.note and checked in report.note, report.note
    _close(run(loaded, inputs), want)
    if name == "gpt2" and not kwargs.get("keep_centered"):  # keep_centered would centre the writers saved uncentred: refused, the model left as it was
        plain = type(model).from_pretrained(tmp_path / "recorded").eval()
        with pytest.raises(ValueError, match="keep_centered would centre transformer.h.0.attn.c_proj"):
            hf_rmsnorm.patch_model(plain, keep_centered=True)
        assert not any(isinstance(m, hf_rmsnorm.FusedRMSNorm) for m in plain.modules())
    with pytest.raises(ValueError, match=r"saved from a patched model with 5 norms converted.*but 0 would be converted here: "
                                         r"kept as LayerNorm \(fused\): the exact conversion measures on a float64 copy.*"
                                         r"patch it where that copy fits, e.g. loaded on the CPU"):
        hf_rmsnorm.from_pretrained(tmp_path / "bare")


@pytest.mark.parametrize("name", [n for n, kinds in FAMILIES.items() if "exact" in kinds])
def test_a_conversion_on_disk_loads_converted_where_it_cannot_be_measured(name, tmp_path, monkeypatch):
    """Checkpoints are converted on disk because the model is big, and where a big model is
    loaded (a GPU) the float64 copy the conversion is measured on does not fit. The conversion
    is then rebuilt from the record in the checkpoint's block (its writers checked centred;
    Phi-MoE's, stored in another layout on disk, centred in memory) and checked in the model's
    own dtype: the conversion measured where the copy fits, outputs equal to the original's."""
    src, out = tmp_path / "in", tmp_path / "out"
    model, inputs = _save(name, src)
    block = convert_checkpoint(src, out, verify=False)
    measured = hf_rmsnorm.from_pretrained(out).hf_rmsnorm_report
    _no_float64_copy(monkeypatch)
    loaded = hf_rmsnorm.from_pretrained(out).eval()
    report = loaded.hf_rmsnorm_report
    assert "rebuilt from the record of its conversion on disk" in report.note and "Verified on a probe batch" in report.note, report.note
    assert {e["name"]: e["change"] for e in report} == {e["name"]: e["change"] for e in measured} == block["modules"]
    assert {k: sorted(v) for k, v in report.conversion.items()} == {k: sorted(v) for k, v in measured.conversion.items()}
    exact = {n for n, change in block["modules"].items() if change == "exact"}
    assert set(report.verification["input_centring"]) == exact and not report.verification["unreached"]
    assert all(r <= 5e-6 for r in report.verification["input_centring"].values()), report.verification
    _close(run(loaded, inputs), run(model, inputs), model, inputs)
    if name == "phimoe":  # transformers 5 holds the experts as 3-D parameters, saved per expert: centred at load;
        # transformers 4 holds and saves an nn.Linear per expert: centred on disk
        in_3d = any(p.dim() == 3 for n, p in model.named_parameters() if ".experts." in n)
        assert bool(block.get("not_centred_on_disk")) == in_3d == ("centred there and" in report.note), (in_3d, block, report.note)


def test_a_conversion_on_disk_loaded_in_bfloat16_where_it_cannot_be_measured(tmp_path, monkeypatch):
    """In bfloat16, the dtype a big model is loaded in: the converted norms' inputs measure
    centred to within bfloat16's rounding, and the outputs are as close to the float64
    original's as the bfloat16 original's are (STYLE.md's rule, bfloat16's tolerance)."""
    src, out = tmp_path / "in", tmp_path / "out"
    model, inputs = _save("gpt2", src)
    convert_checkpoint(src, out, verify=False)
    original = type(model).from_pretrained(src, dtype=torch.bfloat16).eval()
    _no_float64_copy(monkeypatch)
    loaded = hf_rmsnorm.from_pretrained(out, dtype=torch.bfloat16).eval()
    report = loaded.hf_rmsnorm_report
    assert report.count("exact") == 5 and "Verified on a probe batch" in report.note, report.note
    assert set(report.verification["dtypes"].values()) == {"bfloat16"}
    truth, want, got = float64_truth(model, inputs), run(original, inputs), run(loaded, inputs)
    for k in truth:
        assert rel_err(got[k], truth[k]) <= 2 * rel_err(want[k], truth[k]) + 2e-2, k


def test_a_record_that_no_longer_describes_the_weights_is_not_used(tmp_path, monkeypatch):
    """A record serves only while it describes the weights. Writers off the centre mean the
    weights changed since the conversion on disk (plain transformers fine-tunes the LayerNorm
    model it loads and saves the block along): kept as LayerNorm, saying why; where the copy
    fits, that model is measured and converted as any. A record whose start centring is lost
    leaves the first norm's input uncentred: the check in the model's dtype refuses it,
    restoring the model (strict), or warns (strict=False)."""
    src, out, tuned = tmp_path / "in", tmp_path / "out", tmp_path / "tuned"
    model, inputs = _save("gpt2", src)
    convert_checkpoint(src, out, verify=False)
    plain = type(model).from_pretrained(out).eval()
    with torch.no_grad():
        plain.transformer.h[1].mlp.c_proj.bias.add_(0.5)  # what a fine-tuning step may do
    plain.save_pretrained(tuned)
    assert json.loads((tuned / "config.json").read_text())["hf_rmsnorm"]["stream_writers"]  # the block went along
    want = run(plain, inputs)
    with monkeypatch.context() as m:
        _no_float64_copy(m)
        kept = hf_rmsnorm.from_pretrained(tuned).eval()
    report = kept.hf_rmsnorm_report
    assert report.count("exact") == 0 and report.count("fused") == 5, report
    assert "transformer.h.1.mlp.c_proj.bias (and 0 more) is not centred as its conversion on disk left it" in report.note
    assert "loaded on the CPU" in report.note and "convert_checkpoint.py" not in report.note
    _close(run(kept, inputs), want)
    measured = hf_rmsnorm.from_pretrained(tuned).eval()
    assert measured.hf_rmsnorm_report.count("exact") == 5
    _close(run(measured, inputs), want, plain, inputs)

    config = json.loads((out / "config.json").read_text())
    assert config["hf_rmsnorm"]["runtime_centring"] == ["transformer.h.0"]  # GPT-2's tied embedding, centred at run time
    config["hf_rmsnorm"]["runtime_centring"] = []
    (out / "config.json").write_text(json.dumps(config))
    _no_float64_copy(monkeypatch)
    with pytest.raises(RuntimeError, match=r"records failed verification: transformer.h.0.ln_1's input has \|mean\|/rms .* in "
                                           r"float32, more than rounding there explains \(5e-06\).*the model was restored"):
        hf_rmsnorm.from_pretrained(out)
    loose = type(model).from_pretrained(out).eval()
    with pytest.raises(RuntimeError, match="records failed verification"):
        hf_rmsnorm.patch_model(loose)
    assert not any(isinstance(mod, hf_rmsnorm.FusedRMSNorm) for mod in loose.modules())
    _close(run(loose, inputs), run(model, inputs), model, inputs)
    with pytest.warns(UserWarning, match="records failed verification"):
        assert hf_rmsnorm.patch_model(loose, strict=False).count("exact") == 5


def test_a_record_is_read_by_the_names_of_the_class_that_loads_it(tmp_path, monkeypatch):
    """The record names the modules of the class it was written for (GPT2LMHeadModel's
    ``transformer.h.0``); loaded as the base model (GPT2Model's ``h.0``), or wrapped by PEFT
    (``base_model.model.transformer.h.0``), it is the same conversion. Where the record names
    no writers (an older one; a model type outside the architecture table, converted when
    loaded), the load says so instead of advising a conversion on disk."""
    import peft
    from transformers import AutoModel

    src, out = tmp_path / "in", tmp_path / "out"
    model, inputs = _save("gpt2", src)
    convert_checkpoint(src, out, verify=False)
    _no_float64_copy(monkeypatch)
    base = hf_rmsnorm.from_pretrained(out, model_class=AutoModel).eval()
    assert base.hf_rmsnorm_report.count("exact") == 5 and base.hf_rmsnorm_report.conversion["runtime_centring"] == ["h.0"]
    _close(run(base, inputs), run(model.transformer, inputs))
    part = type(model).from_pretrained(out).eval()  # a selection: the final norm left a LayerNorm, as it computes the same
    report = hf_rmsnorm.patch_model(part, exclude="*.ln_f")
    assert report.count("exact") == 4 and "Verified on a probe batch" in report.note, report
    _close(run(part, inputs), run(model, inputs), model, inputs)
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    wrapped = peft.get_peft_model(type(model).from_pretrained(out), lora).eval()
    want = run(wrapped, inputs)
    report = hf_rmsnorm.patch_model(wrapped)
    assert report.count("exact") == 5 and "Verified on a probe batch" in report.note, report.note
    assert report.conversion["runtime_centring"] == ["base_model.model.transformer.h.0"]
    _close(run(wrapped, inputs), want)
    config = json.loads((out / "config.json").read_text())
    del config["hf_rmsnorm"]["stream_writers"]
    (out / "config.json").write_text(json.dumps(config))
    report = hf_rmsnorm.from_pretrained(out).hf_rmsnorm_report
    assert report.count("exact") == 0 and "its checkpoint's conversion on disk names no stream writers" in report.note, report.note


def test_a_model_that_fits_in_memory_once_is_checked_as_it_will_load(tmp_path, monkeypatch, capsys):
    """The check after writing compares IN and OUT where the model fits in memory three times
    over. Where it fits once (a big model on a big CPU machine), OUT is loaded converted alone
    and checked as it will be where it runs: here the float64 copy does not fit either, so the
    record in the model's dtype. A record the weights do not bear out (its start centring lost)
    fails the conversion with nothing left behind; a model that fits not even once is said
    unverified."""
    import hf_rmsnorm.checkpoint as checkpoint
    import hf_rmsnorm.patching.measure as measure

    src, out = tmp_path / "in", tmp_path / "out"
    model, inputs = _save("gpt2", src)
    size = (src / "model.safetensors").stat().st_size
    monkeypatch.setattr(measure, "available_bytes", lambda device: 2 * size)  # once, not thrice; float64 takes 2.25x
    capsys.readouterr()
    assert _cli(src, out) == 0
    printed = capsys.readouterr()
    block = json.loads((out / "config.json").read_text())["hf_rmsnorm"]
    assert set(block["verification"]["loaded_converted"]["input_centring"]) == set(block["modules"])  # all five exact
    assert "rebuilt from the record" in block["verification"]["note"] and "Verified on a probe batch" in block["verification"]["note"]
    assert "verification (the model loaded converted, not compared with the input): rebuilt" in printed.out
    assert "NOT VERIFIED" not in printed.err

    plan = checkpoint._plan

    def without_start(*args):
        writers, planned = plan(*args)
        return writers, dict(planned, runtime_centring=[])

    monkeypatch.setattr(checkpoint, "_plan", without_start)
    assert _cli(src, tmp_path / "bad") == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars
    assert err.startswith("hf-rmsnorm convert: verification failed: patch_model: the conversion its checkpoint records failed "
                          "verification: transformer.h.0.ln_1's input"), err
    assert not (tmp_path / "bad").exists()
    _no_leftovers(tmp_path, tmp_path / "bad")
    monkeypatch.setattr(checkpoint, "_plan", plan)
    monkeypatch.setattr(measure, "available_bytes", lambda device: size)
    assert _cli(src, tmp_path / "small") == 0
    assert "NOT VERIFIED: the model (0.0 GiB) does not fit in memory" in capsys.readouterr().err
    _close(run(hf_rmsnorm.from_pretrained(tmp_path / "small"), inputs), run(model, inputs))
