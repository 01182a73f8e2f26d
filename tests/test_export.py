"""torch.export of the fused modules and of a patched model. An exported program is one graph
for every later call, with gradients or without, so nothing in it may depend on whether the
export's trace saw parameters that require grad (it does not: torch.export traces with fake
tensors). Checked against float64 definitions and against the unpatched model, in both modes."""

import copy

import pytest
import torch

from hf_rmsnorm import FusedGatedRMSNorm, FusedLayerNorm, FusedRMSNorm, patch_model
from reference import gated_fp64, norm_fp64

if not hasattr(torch.compiler, "is_exporting"):
    pytest.skip(f"torch {torch.__version__} does not say when torch.export traces (torch.compiler.is_exporting, 2.7+)",
                allow_module_level=True)

N, GROUP = 32, 8


def _randomized(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name == "weight" else 0.0))
    return module


# name -> (module, its float64 definition of (x, gate, params))
CASES = {
    "rmsnorm": (lambda: FusedRMSNorm(N), lambda x, z, p: norm_fp64("rms", x, p["weight"])),
    "rmsnorm+bias (exact conversion)": (lambda: FusedRMSNorm(N, bias=True),
                                        lambda x, z, p: norm_fp64("rms", x, p["weight"], p["bias"])),
    "rmsnorm, Gemma's offset": (lambda: FusedRMSNorm(N, offset=1.0), lambda x, z, p: norm_fp64("rms", x, p["weight"], offset=1.0)),
    "layernorm": (lambda: FusedLayerNorm(N), lambda x, z, p: norm_fp64("layer", x, p["weight"], p["bias"], eps=1e-5)),
    "gated, Mamba2's order in groups": (lambda: FusedGatedRMSNorm(N, group_size=GROUP),
                                        lambda x, z, p: gated_fp64(x, z, p["weight"], 1e-6, GROUP, False, "silu")),
    "gated, Qwen3-Next's order": (lambda: FusedGatedRMSNorm(N, norm_before_gate=True),
                                  lambda x, z, p: gated_fp64(x, z, p["weight"], 1e-6, None, True, "silu")),
}


class _Call(torch.nn.Module):
    """The norm as a model's layer calls it: on x, and on the gate where it takes one."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, gate):
        return self.norm(x, gate) if isinstance(self.norm, FusedGatedRMSNorm) else self.norm(x)


def _close(got, want, dtype, what):
    """fp32: a tight tolerance; bf16: the format's few roundings (the kernels round once or
    twice a value; a weight gradient's fp32 sum once), relative to the tensor's largest value."""
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2**-6, 2**-6 * want.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_an_exported_module_computes_its_function_with_and_without_gradients(case, dtype, backend):
    make, definition = CASES[case]
    g = torch.Generator().manual_seed(1)
    x, gate, dy = (torch.randn(3, 5, N, generator=g).to(dtype) for _ in range(3))
    program = torch.export.export(_Call(_randomized(make()).to(dtype)), (x, gate)).module()
    params = dict(program.named_parameters())
    params = {k.removeprefix("norm."): v for k, v in params.items()}
    xs, zs = x.clone().requires_grad_(True), gate.clone().requires_grad_(True)
    y = program(xs, zs)
    y.backward(dy)
    x64, z64 = x.double().requires_grad_(True), gate.double().requires_grad_(True)
    p64 = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    truth = definition(x64, z64, p64)
    truth.backward(dy.double())
    _close(y.detach(), truth.detach(), dtype, f"{case}, y")
    pairs = [("x", xs.grad, x64.grad)] + [(k, v.grad, p64[k].grad) for k, v in params.items()]
    if "gated" in case:
        pairs.append(("gate", zs.grad, z64.grad))
    for what, got, want in pairs:
        assert got is not None, f"{case}: no gradient reached {what}"
        _close(got, want, dtype, f"{case}, d{what}")
    with torch.no_grad():
        torch.testing.assert_close(program(x, gate), y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("target", ["rmsnorm", "layernorm"])
def test_an_exported_patched_gpt2_trains_as_the_unpatched_model(target):
    """GPT-2 converted exactly to RMSNorm (biases: the affine the CPU path writes in place
    outside autograd) or fused as LayerNorm: the exported program's logits are the unpatched
    model's, and so are the gradients of every parameter the conversion left as it was (the
    function is the same whatever their values; the centred writers' are other parameters)."""
    from tiny_models import build, randomize_for_conversion

    model, inputs = build("gpt2")
    randomize_for_conversion(model)
    reference = copy.deepcopy(model)
    patch_model(model, target=target, probe_inputs=inputs)
    program = torch.export.export(model, (), inputs).module()
    logits = program(**inputs).logits
    (logits.square().mean()).backward()
    want = reference(**inputs).logits
    (want.square().mean()).backward()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    before = dict(reference.named_parameters())
    kept = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert len(kept) >= 10 and any("ln_" in name for name in kept), kept
    grads = dict(program.named_parameters())
    for name in kept:
        torch.testing.assert_close(grads[name].grad, before[name].grad, rtol=1e-3, atol=1e-6,
                                   msg=lambda m: f"{target}, {name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(program(**inputs).logits, logits.detach(), rtol=0, atol=0)
