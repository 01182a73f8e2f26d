"""torch.onnx.export of the fused modules and of patched models, run in ONNX Runtime. ONNX has no
operator for the kernels' custom ops (nor for the compiled CPU kernel's), so while either of
torch's ONNX exporters traces, the norms must take the torch composition: on the Triton backend
(interpreted here, what a CUDA model runs) and on the CPU's compiled kernel alike. The graphs
are checked against the float64 definitions and against the unpatched models, at a shape other
than the traced one."""

import copy

import numpy as np
import pytest
import torch

from hf_rmsnorm import patch_model
from module_cases import CASES, onnx_export_and_check, onnx_session

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[dev]')")
pytest.importorskip("onnxscript", reason="torch.onnx's default exporter needs onnxscript (pip install -e '.[dev]')")
pytest.importorskip("onnx")

# torch.onnx's default exporter (torch.export underneath) and its TorchScript one (torch.jit.trace
# underneath; deprecated, still what optimum and older code call)
EXPORTERS = {"dynamo": True, "torchscript": False}


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("case", list(CASES))
def test_a_module_exported_to_onnx_computes_its_function(case, exporter, backend, tmp_path):
    """Each fused module, exported at one shape and run at another: the float64 definition."""
    onnx_export_and_check(case, EXPORTERS[exporter], tmp_path / "module.onnx")


class Logits(torch.nn.Module):
    """The model's logits from token ids and a mask: what an ONNX graph of a language model takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# the backends with a kernel that must step aside while the exporter traces (on the torch backend
# the norms are the composition anyway, and each module's export is tested on every backend above);
# a model's export takes 15-25 s of a 2-core CI machine
@pytest.mark.parametrize("backend", ["triton", "compiled"], indirect=True)
@pytest.mark.parametrize("name,target", [("gpt2", "rmsnorm"), ("gpt2", "layernorm"), ("bloom", "rmsnorm"),
                                         ("llama", "rmsnorm")])
@pytest.mark.slow
def test_a_patched_model_exported_to_onnx_gives_the_unpatched_models_logits(name, target, backend, tmp_path):
    """GPT-2 converted exactly (its tied embedding centred at run time) or fused as LayerNorm,
    BLOOM converted (its embedding LayerNorm kept, the mean taken off after it), Llama's RMSNorm
    fused: the exported graph, run at a longer sequence than the traced one, gives the unpatched
    model's logits. (torch.onnx's dynamo exporter, the default from torch 2.9: its TorchScript one
    fails on transformers 5's masking for the unpatched models too.)"""
    from tiny_models import build, randomize_for_conversion

    if not hasattr(torch.compiler, "is_exporting"):
        pytest.skip(f"torch {torch.__version__}'s ONNX exporter fails on the unpatched models too (transformers' masking under vmap)")
    model, _ = build(name)
    randomize_for_conversion(model)
    model.eval()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size

    def batch(length):
        ids = torch.randint(0, vocab, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, : length // 3] = 0  # a left-padded row
        return ids, mask

    report = patch_model(model, target=target, probe_inputs=dict(zip(("input_ids", "attention_mask"), batch(8))))
    converts = target == "rmsnorm" and name != "llama"  # (BLOOM's embedding LayerNorm stays one, fused)
    assert report and not report.skipped and (report.count("exact") >= 3) == converts, report
    axes = {0: "batch", 1: "sequence"}
    path = tmp_path / "model.onnx"
    torch.onnx.export(Logits(model).eval(), batch(8), str(path), input_names=["input_ids", "attention_mask"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes}, dynamo=True, verbose=False)
    session = onnx_session(path)
    ids, mask = batch(13)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = Logits(reference)(ids, mask)
    assert np.isfinite(got).all()
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
