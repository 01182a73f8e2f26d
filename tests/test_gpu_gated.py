"""GPU-only checks of the gated norm: its compiled (not interpreted) kernels at full size against
float64, the weight gradient's determinism, torch.compile with Inductor, and patched hybrid
models on CUDA. Skipped with a reason on a CPU-only machine; scripts/gpu_check.sh runs them."""

import pytest
import torch

from conftest import cpp_launch_or_skip, direct_launch_agrees
from hf_rmsnorm import patch_model
from hf_rmsnorm.ops import gated_rms_norm
from reference import assert_close_to_fp64, fwd_bwd, gated_fp64, gated_torch_same_dtype

pytestmark = pytest.mark.gpu

# (shape, group_size, norm_before_gate, activation, cast_mode)
CASES = {
    "qwen3.5_heads": ((262144, 128), None, True, "silu", "input"),  # 8 x 1024 tokens x 32 heads
    "mamba2_8_groups": ((16384, 8192), 1024, False, "silu", "input"),
    "kimi_sigmoid": ((16384, 2048), None, True, "sigmoid", "float32"),
    "falcon_h1_ten_groups": ((4, 3, 100, 960), 96, False, "silu", "float32"),  # a group count of no power of two
    "widest_row": ((8, 65536), None, False, "silu", "input"),
}


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")  # auto must pick Triton for CUDA tensors


def _inputs(shape, w_dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 0.3).to(torch.bfloat16)
    gate = (torch.randn(shape, device="cuda", generator=g) * 2).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(shape[-1], device="cuda", generator=g)).to(w_dtype)
    dy = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    return x, gate, w, dy


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w_bf16", "w_fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_full_size_gated_kernels_against_float64(case, w_dtype, gated_runs):
    shape, size, before, activation, cast_mode = CASES[case]
    x, gate, w, dy = _inputs(shape, w_dtype)
    ours = fwd_bwd(lambda x, g, w: gated_rms_norm(x, g, w, 1e-6, group_size=size, norm_before_gate=before,
                                               activation=activation, cast_mode=cast_mode), x, gate, w, dy)
    assert gated_runs() == 2, "auto did not run the gated Triton kernels on CUDA"
    theirs = fwd_bwd(lambda x, g, w: gated_torch_same_dtype(x, g, w, 1e-6, size, before, activation, cast_mode), x, gate, w, dy)
    truth = fwd_bwd(lambda x, g, w: gated_fp64(x, g, w, 1e-6, size, before, activation), x.double(), gate.double(), w.double(), dy)
    assert ours[0].dtype == theirs[0].dtype
    for what, got, want, t64 in zip(("output", "grad x", "grad gate", "grad w"), ours, theirs, truth):
        assert_close_to_fp64(got, want, t64, torch.bfloat16, what)


def test_backward_grid_is_sized_from_the_compiled_kernel():
    """The persistent backward launches as many programs an SM as its compiled registers let
    run at once (read without a launch); none of those reads fell back."""
    from hf_rmsnorm.ops import _triton_gated

    for shape, size in (((262144, 128), None), ((16384, 8192), 1024)):
        x, gate, w, dy = _inputs(shape, torch.bfloat16)
        fwd_bwd(lambda x, g, w: gated_rms_norm(x, g, w, group_size=size), x, gate, w, dy)
    assert _triton_gated._PER_SM and not _triton_gated.PER_SM_FAILED, _triton_gated.PER_SM_FAILED
    assert all(1 <= n <= _triton_gated._BWD_PROGRAMS_PER_SM for n in _triton_gated._PER_SM.values())


def test_gated_weight_gradient_is_deterministic_on_the_gpu():
    x, gate, w, dy = _inputs((16384, 4096), torch.float32)
    runs = [fwd_bwd(lambda x, g, w: gated_rms_norm(x, g, w, group_size=512), x, gate, w, dy) for _ in range(3)]
    assert all(torch.equal(r[3], runs[0][3]) for r in runs[1:]), "the weight gradient changed between identical runs"


def test_gated_torch_compile_inductor_fullgraph_on_cuda(gated_runs):
    torch._dynamo.reset()
    x, gate, w, dy = _inputs((64, 8, 128), torch.bfloat16)

    def fn(x, g, w):
        return gated_rms_norm(x * 2, g, w, norm_before_gate=True) * 3

    eager = fwd_bwd(fn, x, gate, w, dy)
    compiled = fwd_bwd(torch.compile(fn, fullgraph=True), x, gate, w, dy)  # fullgraph: a break raises
    assert gated_runs() >= 4
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("name", ["mamba2", "qwen3_next", "qwen4_exp"])
def test_patched_hybrid_models_on_cuda(name, gated_runs):
    from tiny_models import build, run

    model, inputs = build(name)
    model, inputs = model.cuda(), {k: v.cuda() for k, v in inputs.items()}
    want = run(model, inputs)
    report = patch_model(model)
    assert any(e["new"] == "FusedGatedRMSNorm" for e in report)
    got = run(model, inputs)
    assert gated_runs() > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


# (rows, columns, group size, gate after the norm, row stride of the gate, x's start in its buffer): calls
# that compile to different kernels (heads of 128 after the norm; 8 groups with the gate a slice of a wider
# projection; one group; an odd width; one row; x one element into its buffer)
LAUNCH_CASES = ((8192, 128, None, True, 128, 0), (4097, 4096, 512, False, 8320, 0), (4097, 2048, None, False, 2048, 0),
                (333, 960, 96, False, 960, 0), (1, 8192, 1024, True, 8192, 0), (4097, 1024, 128, True, 1024, 1))


def _launch_case(g, m, n, size, before, gate_stride, start, w_dtype):
    """The inputs of a LAUNCH_CASES row, and a forward+backward on leaves over their storage
    (fwd_bwd's clone would lay x and the gate out afresh): [y, dx, dgate, dweight]."""
    x = torch.randn(start + m * n, device="cuda", generator=g).bfloat16()[start:].view(m, n)
    gate = torch.randn(m, gate_stride, device="cuda", generator=g).bfloat16()[:, gate_stride - n:]
    w = (torch.rand(n, device="cuda", generator=g) + 0.5).to(w_dtype)
    dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()

    def run():
        leaves = [t.detach().requires_grad_(True) for t in (x, gate, w)]
        y = gated_rms_norm(*leaves, group_size=size, norm_before_gate=before)
        y.backward(dy)
        return [y.detach(), *(t.grad for t in leaves)], y.grad_fn

    return run


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w_bf16", "w_fp32"])
def test_gated_cpp_launch_computes_the_same_bits(w_dtype, monkeypatch):
    """The C++ launch operator's gated norm (the default on CUDA) launches the kernels the Python
    path launches with the parameters Triton's launcher packs, and folds the weight gradient's
    partials with the same torch ops (tests/test_cuda_launch_gated.py checks that on the CPU):
    here its outputs and its node's gradients must be the Python path's very bits, also on a
    side stream; once a call of each kind has registered the forward's plan and the next the
    backward's, both kernels are its own launches."""
    cpp = cpp_launch_or_skip(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(7)
    side = torch.cuda.Stream()
    for case in LAUNCH_CASES:
        run = _launch_case(g, *case, w_dtype)
        monkeypatch.setattr(cpp, "ENABLED", False)
        python, _ = run()
        monkeypatch.setattr(cpp, "ENABLED", True)
        run()  # registers the forward's plan
        run()  # and the backward's
        before = cpp.launch_counts(gated=True)
        ours, node = run()
        assert cpp.launch_counts(gated=True) == [c + 1 for c in before] and node.name() == "HFGatedNormBackward", case
        for a, c in zip(python, ours, strict=True):
            assert torch.equal(a, c), case
        with torch.cuda.stream(side):  # the operator launches on the current stream
            side.wait_stream(torch.cuda.default_stream())
            on_side, _ = run()
        torch.cuda.synchronize()
        for a, c in zip(python, on_side, strict=True):
            assert torch.equal(a, c), ("side stream", case)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w_bf16", "w_fp32"])
def test_gated_direct_launch_computes_the_same_bits(w_dtype, monkeypatch):
    """The gated kernels through the direct launch (tests/test_direct_launch.py checks the kernel
    it picks and the arguments it passes on the CPU): the very bits of Triton's launch, forward
    and every gradient, for calls that compile to different kernels (heads of 128 after the
    norm; 8 groups with the gate a slice of a wider projection; one group; an odd width; one row;
    x one element into its buffer), and the second call of each skips Triton's run."""
    from hf_rmsnorm.ops import _direct, _triton_gated

    if not _direct._DIRECT_TRITON:
        pytest.skip("the direct launch is off for this Triton release")
    g = torch.Generator(device="cuda").manual_seed(7)
    for case in LAUNCH_CASES:
        run = _launch_case(g, *case, w_dtype)
        kernels = (_triton_gated._gated_fwd_kernel, _triton_gated._gated_bwd_kernel)
        direct_launch_agrees(monkeypatch, kernels, lambda: run()[0], case)
