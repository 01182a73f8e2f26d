"""torch.export of the fused modules and of a patched model. An exported program is one graph
for every later call, with gradients or without, so nothing in it may depend on whether the
export's trace saw parameters that require grad (it does not: torch.export traces with fake
tensors). Checked against float64 definitions and against the unpatched model, in both modes."""

import copy

import pytest
import torch

from hf_rmsnorm import patch_model
from module_cases import CASES, export_and_check

if not hasattr(torch.compiler, "is_exporting"):
    pytest.skip(f"torch {torch.__version__} does not say when torch.export traces (torch.compiler.is_exporting, 2.7+)",
                allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_an_exported_module_computes_its_function_with_and_without_gradients(case, dtype, backend):
    export_and_check(case, dtype)


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




@pytest.mark.slow
@pytest.mark.parametrize("backend", ["compiled", "triton"], indirect=True)
def test_an_aoti_package_of_a_fused_module_computes_its_function(backend, tmp_path, launches):
    """Deployment through AOTInductor (torch.export, then ``aoti_compile_and_package``): the
    RMSNorm an exact conversion makes, exported with dynamic leading dims and compiled to a
    package, gives float64's numbers at another shape. Where the kernels serve (the interpreter
    here, as CUDA tensors) the program holds their custom op, which the package calls back into
    this process for (the kernel runs); on the CPU it holds torch's ops alone, so the package
    runs in a process that never imports hf_rmsnorm. (A module, not a patched model: the model's
    export is checked above, and each package costs a C++ compile.)"""
    import subprocess
    import sys

    from hf_rmsnorm.ops import _cpu_kernel
    from module_cases import aoti_package_and_check

    if _cpu_kernel._compiler() is None:
        pytest.skip("AOTInductor compiles C++: no compiler here")
    before = launches()
    program, (x, gate), want = aoti_package_and_check("rmsnorm+bias (exact conversion)", tmp_path / "norm.pt2")
    held = {str(node.target) for node in program.graph.nodes if "hf_rmsnorm" in str(node.target)}
    assert held == ({"hf_rmsnorm.norm_fwd.default"} if backend == "triton" else set())
    assert launches() - before == (1 if backend == "triton" else 0)  # the package's call (export traces fakes)
    if backend == "triton":
        return
    torch.save((x, gate), tmp_path / "inputs.pt")
    child = ("import sys, torch\n"
             "y = torch._inductor.aoti_load_package(sys.argv[1])(*torch.load(sys.argv[2]))\n"
             "assert 'hf_rmsnorm' not in sys.modules\n"
             "torch.save(y, sys.argv[3])\n")
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "norm.pt2"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt").double(), want, rtol=1e-4, atol=1e-5)
