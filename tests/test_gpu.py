"""GPU-only checks: the compiled (not interpreted) kernels at full size, the CUDA autocast
policy, and torch.compile with Inductor on CUDA. Skipped with a reason on a CPU-only machine;
scripts/gpu_check.sh runs them on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from conftest import FNS, cpp_launch_or_skip, direct_launch_agrees
from hf_rmsnorm import FusedLayerNorm, FusedRMSNorm
from hf_rmsnorm.ops import layer_norm, rms_norm
from module_cases import CASES, aoti_package_and_check, export_and_check, onnx_export_and_check
from reference import assert_close_to_fp64, fwd_bwd, norm_fp64, norm_torch_same_dtype, second_order

pytestmark = pytest.mark.gpu
EPS = {"rms": 1e-6, "layer": 1e-5}


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")  # auto must pick Triton for CUDA tensors


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("shape", [(65536, 768), (16384, 2048), (16384, 4096), (16384, 8192), (8, 65536), (4, 3, 1000, 999)])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w_bf16", "w_fp32"])
def test_full_size_kernels_against_float64(kind, shape, w_dtype, launches):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(torch.bfloat16)
    n = shape[-1]
    w = (1 + 0.3 * torch.randn(n, device="cuda")).to(w_dtype)
    b = (0.1 * torch.randn(n, device="cuda")).to(w_dtype)
    dy = torch.randn(shape, device="cuda").to(torch.bfloat16)
    eps = EPS[kind]
    got = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps), x, w, b, dy)
    assert launches() == 2, "auto did not run the Triton kernels on CUDA"
    pt = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), b.double(), dy)
    assert got[0].dtype == pt[0].dtype
    for what, g, p, t in zip(["output", "grad x", "grad w", "grad b"], got, pt, truth):
        assert_close_to_fp64(g, p, t, torch.bfloat16, what)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_a_module_of_no_fixed_width_on_the_kernels(kind, launches):
    """normalized_shape=None on CUDA: each width the one instance meets (alternating, so a call
    settled at one width meets the other) against float64, forward and backward."""
    cls = FusedRMSNorm if kind == "rms" else FusedLayerNorm
    module = cls(None, eps=1e-6, elementwise_affine=False)
    for n in (128, 2048, 128, 2048):
        x = (torch.randn(64, n, device="cuda") * 2 + 0.5).to(torch.bfloat16).requires_grad_(True)
        dy = torch.randn_like(x)
        y = module(x)
        (gx,) = torch.autograd.grad(y, x, dy)
        x64 = x.detach().double().requires_grad_(True)
        y64 = norm_fp64(kind, x64, eps=1e-6)
        (gx64,) = torch.autograd.grad(y64, x64, dy.double())
        xs = x.detach().requires_grad_(True)
        ys = norm_torch_same_dtype(kind, xs, eps=1e-6)
        (gxs,) = torch.autograd.grad(ys, xs, dy)
        assert_close_to_fp64(y, ys, y64, torch.bfloat16, f"output at {n}")
        assert_close_to_fp64(gx, gxs, gx64, torch.bfloat16, f"grad of x at {n}")
    assert launches() > 0


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_weight_gradient_is_deterministic_on_the_gpu(kind):
    torch.manual_seed(0)
    x = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(2048, device="cuda", dtype=torch.float32)
    b = torch.zeros(2048, device="cuda", dtype=torch.float32)
    dy = torch.randn_like(x)
    first = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b), x, w, b, dy)
    for _ in range(3):
        again = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b), x, w, b, dy)
        assert all(torch.equal(a, c) for a, c in zip(first, again))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_cuda_autocast_follows_torch(kind):
    x = torch.randn(64, 512, device="cuda")
    w = torch.rand(512, device="cuda") + 0.5
    torch_fn = {"rms": lambda: F.rms_norm(x.bfloat16(), (512,), w, 1e-6), "layer": lambda: F.layer_norm(x.bfloat16(), (512,), w, None, 1e-5)}[kind]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, y_torch = FNS[kind](x.bfloat16(), w, eps=EPS[kind]), torch_fn()
        y_off = FNS[kind](x.bfloat16(), w.bfloat16(), eps=EPS[kind], follow_autocast=False)
    # torch's policy is the reference: float32 for layer_norm; rms_norm depends on the version
    # (2.11 leaves it in the input dtype)
    assert y.dtype == y_torch.dtype
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)
    else:  # one rounding to bf16 each, possibly on different sides of a tie
        torch.testing.assert_close(y.float(), y_torch.float(), rtol=1.6e-2, atol=1e-5)
    assert y_off.dtype == torch.bfloat16  # modules replacing autocast-blind HF code opt out


def test_torch_compile_inductor_fullgraph_on_cuda(launches):
    torch._dynamo.reset()
    lin = torch.nn.Linear(256, 256, device="cuda")
    w = torch.nn.Parameter(torch.rand(256, device="cuda") + 0.5)

    def f(x):
        return layer_norm(rms_norm(lin(x), w, cast_mode="input") + x, w).sum()

    x = torch.randn(32, 256, device="cuda")
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-3)
    assert launches() >= 2


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma", "t5", "olmo", "cohere", "nanochat", "llama4_text"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patched_models_on_cuda_under_autocast(name, dtype, launches):
    """Each norm's autocast behaviour (nn.LayerNorm: float32; HF RMSNorms: unaffected) is
    reproduced, so a patched model under AMP computes what the original did."""
    from hf_rmsnorm import patch_model
    from tiny_models import build, run

    model, inputs = build(name, dtype)
    model, inputs = model.cuda(), {k: v.cuda() for k, v in inputs.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = run(model, inputs)
    report = patch_model(model, probe_autocast=torch.bfloat16)
    assert not report.skipped
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(model, inputs)
    assert launches() > 0
    for k in ref:
        assert out[k].dtype == ref[k].dtype, k
        scale = ref[k].float().abs().max().item()
        torch.testing.assert_close(out[k].float(), ref[k].float(), rtol=3e-2, atol=3e-2 * scale)


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "whisper"])
def test_exact_conversion_on_cuda(name, launches):
    from hf_rmsnorm import patch_model
    from tiny_models import build, run

    model, inputs = build(name)
    model, inputs = model.cuda(), {k: v.cuda() for k, v in inputs.items()}
    ref = run(model, inputs)
    report = patch_model(model)
    assert report.count("exact") > 0 and report.verification["max_rel_diff"] <= 1e-5
    out = run(model, inputs)
    assert launches() > 0
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [768, 2048, 8192])
@pytest.mark.parametrize("has_bias", [False, True])
def test_backward_grid_is_sized_from_the_compiled_kernel(n, has_bias):
    """The backward's persistent grid is SMs x the programs per SM the compiled kernel's
    registers allow (1 to 8), and no program is left without a row of partial sums."""
    from hf_rmsnorm.ops import _triton_norm

    m = 16384
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    _, mean, rstd = _triton_norm.norm_fwd(x, w, None, 1e-5, 0.0, not has_bias, 0, torch.bfloat16)
    dx, part = _triton_norm.norm_bwd(torch.randn_like(x), x, w, mean, rstd, 0.0, not has_bias, 0, has_bias)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs = part.shape[0]
    assert programs % sms == 0 and 1 <= programs // sms <= 8
    assert part.shape[1] == (2 if has_bias else 1) * n and torch.isfinite(part).all()


@pytest.mark.parametrize("n", [768, 2048])
@pytest.mark.parametrize("cap", [96, 64])
def test_register_capped_backward_computes_the_same_bits(n, cap):
    """The launcher (LayerNorm on several-row tiles) and the tuning sweep cap the backward's
    registers (ptxas maxnreg, spilling below what the kernel needs); with the same grid, capped
    or not, it must compute the very same dx and partial sums."""
    from hf_rmsnorm.ops import _triton_norm

    g = torch.Generator(device="cuda").manual_seed(n + cap)
    x = torch.randn(4096, n, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4096, n, device="cuda", generator=g).bfloat16()
    w = (torch.rand(n, device="cuda", generator=g) + 0.5).bfloat16()
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).bfloat16()
    _, mean, rstd = _triton_norm.norm_fwd(x, w, b, 1e-5, 0.0, False, 0, torch.bfloat16)
    runs = [_triton_norm.norm_bwd(dy, x, w, mean, rstd, 0.0, False, 0, True, programs_per_sm=4, maxnreg=c)
            for c in (0, None, cap)]  # uncapped, the launcher's cap, this cap
    for plain, *capped in zip(*runs):
        for other in capped:
            assert torch.equal(plain, other)


@pytest.mark.parametrize("n", [768, 2048])
def test_cache_hints_and_weight_reloads_compute_the_same_bits(n):
    """The sweep times the row loads with an evict-first cache hint (a hint to the memory system
    only) and a backward that loads the weight per tile: forward and backward must give the
    very same bits as the shipped kernels."""
    from hf_rmsnorm.ops import _triton_norm

    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(4096, n, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4096, n, device="cuda", generator=g).bfloat16()
    w = (torch.rand(n, device="cuda", generator=g) + 0.5).bfloat16()
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).bfloat16()
    runs = []
    for stream, reload_w in (("", False), ("evict_first", False), ("", True)):
        y, mean, rstd = _triton_norm.norm_fwd(x, w, b, 1e-5, 0.0, False, 0, torch.bfloat16, stream=stream)
        runs.append([y, mean, rstd, *_triton_norm.norm_bwd(dy, x, w, mean, rstd, 0.0, False, 0, True, programs_per_sm=4,
                                                             stream=stream, reload_w=reload_w)])
    for other in runs[1:]:
        for shipped, variant in zip(runs[0], other):
            assert torch.equal(shipped, variant)


@pytest.mark.parametrize("n", [768, 8192])
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_forward_with_several_tiles_per_program_computes_the_same_bits(n, p_dtype):
    """Tiles per forward program only change which program normalises a row (and how often the
    parameters are loaded): y and the saved statistics must be the very same bits, rows past
    the end of the last program's tiles included (4097 rows: the last program has one)."""
    from hf_rmsnorm.ops import _triton_norm

    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(4097, n, device="cuda", generator=g).bfloat16()
    w = (torch.rand(n, device="cuda", generator=g) + 0.5).to(p_dtype)
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).to(p_dtype)
    for is_rms, bias in ((True, None), (False, b)):
        runs = [_triton_norm.norm_fwd(x, w, bias, 1e-5, 0.0, is_rms, 0, torch.bfloat16, tiles=t) for t in (1, 4)]
        for other in runs[1:]:
            for a, c in zip(runs[0], other):
                assert a is c is None or torch.equal(a, c)  # RMSNorm has no mean


@pytest.mark.parametrize("n", [768, 2048, 4096, 8192])
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_pipelined_tile_loops_compute_the_same_bits(n, p_dtype):
    """Software pipelining (2 stages, and the 3 the launcher picks for a norm with a bias) only
    moves when a tile's row loads are issued: the backward's dx and partial sums with the same
    grid, and the forward's y and statistics with several tiles a program, must be the very
    same bits as without it, the last program's tiles partly past the end (4097 rows) included;
    at 768 columns on the two-row tile, whose register cap the launcher drops when pipelined."""
    from hf_rmsnorm.ops import _triton_norm

    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(4097, n, device="cuda", generator=g).bfloat16()
    dy = torch.randn(4097, n, device="cuda", generator=g).bfloat16()
    w = (torch.rand(n, device="cuda", generator=g) + 0.5).to(p_dtype)
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).to(p_dtype)
    shared = _triton_norm.block_shared(x.device)
    for is_rms in (True, False):  # ships for both with a bias
        assert _triton_norm.bwd_stages(shared, *_triton_norm.bwd_config(n, True)[:2], True, 2) == 3
    for is_rms in (True, False):
        fwd = [_triton_norm.norm_fwd(x, w, b, 1e-5, 0.0, is_rms, 0, torch.bfloat16, tiles=8, stages=s) for s in (1, None, 2, 3)]
        _, mean, rstd = fwd[0]
        bwd = [_triton_norm.norm_bwd(dy, x, w, mean, rstd, 0.0, is_rms, 0, True, programs_per_sm=1, stages=s)
               for s in (1, None, 2, 3)]
        for plain, *piped in (*zip(*fwd), *zip(*bwd)):
            for other in piped:
                assert plain is other is None or torch.equal(plain, other)  # RMSNorm has no mean


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_direct_launch_computes_the_same_bits(kind, p_dtype, monkeypatch):
    """The direct launch (``_DIRECT_LAUNCH``) runs the compiled kernel Triton would pick with
    the arguments Triton would pass (tests/test_direct_launch.py checks both on the CPU): here
    its outputs and gradients must be the very bits of Triton's launch, for widths, row counts
    and alignments that compile to different kernels (aligned rows; rows starting one element
    into their buffer; an odd width; one row), and its second call must skip Triton's run."""
    from hf_rmsnorm.ops import _direct, _triton_norm

    if not _direct._DIRECT_TRITON:
        pytest.skip("the direct launch is off for this Triton release")
    g = torch.Generator(device="cuda").manual_seed(7)
    for m, n, start in ((4097, 2048, 0), (4097, 2048, 1), (333, 999, 0), (1, 8192, 0), (65536, 768, 0)):
        flat = torch.randn(start + m * n, device="cuda", generator=g).bfloat16()
        x = flat[start:].view(m, n)
        dy = torch.randn(m, n, device="cuda", generator=g).bfloat16()
        w = (torch.rand(n, device="cuda", generator=g) + 0.5).to(p_dtype)
        b = (0.1 * torch.randn(n, device="cuda", generator=g)).to(p_dtype)

        def run():  # fwd_bwd's clone would align x: its leaf here is a view of the same storage
            leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
            y = FNS[kind](*leaves)
            y.backward(dy)
            return [y.detach(), *(t.grad for t in leaves)]

        kernels = (_triton_norm._norm_fwd_kernel, _triton_norm._norm_bwd_kernel, _triton_norm._sum_rows_kernel)
        direct_launch_agrees(monkeypatch, kernels, run, (m, n, start))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: x on one while the other is current")
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_a_norm_on_a_gpu_that_is_not_the_current_one(kind):
    """A model spread over GPUs (``device_map="auto"``) runs every layer with the first GPU
    current. The kernels must run on x's GPU all the same (Triton launches on the current one):
    forward, backward and without grad, against float64, and the current device left as it was."""
    g = torch.Generator(device="cuda:1").manual_seed(3)
    x = torch.randn(1000, 1024, device="cuda:1", generator=g).bfloat16()
    w = (torch.rand(1024, device="cuda:1", generator=g) + 0.5).bfloat16()
    b = (0.1 * torch.randn(1024, device="cuda:1", generator=g)).bfloat16()
    dy = torch.randn(1000, 1024, device="cuda:1", generator=g).bfloat16()
    eps = EPS[kind]
    torch.cuda.set_device(0)
    pt = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), b.double(), dy)
    with torch.no_grad():
        y = FNS[kind](x, w, b, eps)
    assert torch.cuda.current_device() == 0 and y.device == x.device
    assert_close_to_fp64(y, pt[0], truth[0], torch.bfloat16, "output without grad")
    got = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps), x, w, b, dy)
    for what, g, p, t in zip(["output", "grad x", "grad w", "grad b"], got, pt, truth):
        assert_close_to_fp64(g, p, t, torch.bfloat16, what)
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("target", ["rmsnorm", "layernorm"])
def test_a_dispatched_model_whose_final_norm_sits_on_another_device(target):
    """A device_map with GPT-2's final norm on the GPU and the rest on the CPU: the norm's
    accelerate hook carries the hidden states over and the lm_head's carries them back. Patched
    (the final norm on the kernels, the blocks' on the CPU path), the fused norm must keep its
    hook and the model its function, against the dispatched model unpatched."""
    from accelerate import dispatch_model

    from hf_rmsnorm import patch_model
    from tiny_models import build, run

    model, inputs = build("gpt2")
    cpu = ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h", "lm_head"]
    dispatch_model(model, device_map={**dict.fromkeys(cpu, "cpu"), "transformer.ln_f": 0}, main_device="cpu")
    assert model.transformer.ln_f.weight.is_cuda and model.lm_head.weight.device.type == "cpu"
    ref = run(model, inputs)
    report = patch_model(model, target=target)
    assert "transformer.ln_f" in {e["name"] for e in report.changed}
    assert model.transformer.ln_f.weight.is_cuda
    out = run(model, inputs)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("is_rms", [True, False])
def test_eager_function_and_custom_op_agree_bit_for_bit_on_cuda(is_rms):
    from hf_rmsnorm.ops import _norm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16()
    w = (torch.rand(1024, device="cuda", generator=g) + 0.5).bfloat16()
    b = (0.1 * torch.randn(1024, device="cuda", generator=g)).bfloat16()
    dy = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16()
    from hf_rmsnorm.ops import layer_norm_ref, rms_norm_ref

    reference = rms_norm_ref if is_rms else layer_norm_ref  # used only for second derivatives
    ops = (lambda *args: _norm._NormFunction.apply(*args, reference), lambda *args: _norm._norm_fwd_op(*args)[0])
    results = [fwd_bwd(lambda x, w, b: op(x, w, b, 1e-5, 0.0, is_rms, 0), x, w, b, dy) for op in ops]
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_second_derivatives_on_cuda(kind, launches):
    """create_graph=True on CUDA: the forward on the kernel, the gradients through torch's
    CUDA norms (which autograd must be able to differentiate again)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 512, device="cuda", generator=g) * 2 + 0.5
    w = 1 + 0.3 * torch.randn(512, device="cuda", generator=g)
    b = 0.1 * torch.randn(512, device="cuda", generator=g)
    dy = torch.randn(64, 512, device="cuda", generator=g)
    fn = lambda x, w, b: FNS[kind](x, w, b, 1e-5)  # noqa: E731
    got = second_order(fn, x, w, b, dy)
    assert launches() == 1
    truth = second_order(lambda x, w, b: norm_fp64(kind, x, w, b, 1e-5), x.double(), w.double(), b.double(), dy.double())
    yardstick = second_order(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, 1e-5), x, w, b, dy)
    for name, got_, y_, t in zip(("dx", "dw", "d2x", "d2w"), got, yardstick, truth):
        assert_close_to_fp64(got_, y_, t, torch.float32, name)


def test_training_benchmark_charges_each_variant_its_own_peak_memory():
    """The training benchmark times a model's variants side by side on one GPU: each row's peak
    memory must still be what that variant takes alone, not its neighbours' parameters and
    optimizer state as well (they are as large as its own: a 5 % tolerance still catches them)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import benchmark_training as bt

    device = torch.device("cuda")
    batch = torch.randint(0, 256, (2, 32), device=device)
    variants = ["as shipped", "layernorm", "norms -> Identity"]
    together = bt.time_group("llama-1b", bt.QUICK, "bf16 params", variants, batch, device, 1, 2)
    alone = [bt.time_group("llama-1b", bt.QUICK, "bf16 params", [v], batch, device, 1, 2)[0] for v in variants]
    assert [r["timed_with"] for r in together] == [3, 3, 3] and [r["timed_with"] for r in alone] == [1, 1, 1]
    for t, a in zip(together, alone):
        assert a["peak_memory_bytes"] > 0
        assert t["peak_memory_bytes"] == pytest.approx(a["peak_memory_bytes"], rel=0.05), t["variant"]


# Last in the file: a bad launch by the C++ launch operator would leave the CUDA context unusable
# for every test after it, and these tests say so most precisely (they passed in run 15, and the
# whole file with the operator on, the default since).
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cpp_launch_computes_the_same_bits(kind, p_dtype, monkeypatch):
    """The C++ launch operator (the default on CUDA) launches the kernels the Python path
    launches with the parameters Triton's launcher packs (tests/test_cuda_launch.py checks both on
    the CPU): here its outputs and its node's gradients must be the Python path's very bits, for
    row counts, widths and alignments that compile to different kernels, rows of rank 3, on a
    side stream; once a call of each kind has registered the forward's plans and the next the
    backward's, all three kernels are its own launches."""
    cpp = cpp_launch_or_skip(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(11)
    side = torch.cuda.Stream()
    for m, n, start, lead in ((4097, 2048, 0, ()), (4097, 2048, 1, ()), (333, 999, 0, ()), (1, 8192, 0, ()),
                              (65536, 768, 0, ()), (512, 1024, 0, (8,))):
        rows = m * (lead[0] if lead else 1)
        flat = torch.randn(start + rows * n, device="cuda", generator=g).bfloat16()
        x = flat[start:].view(*lead, m, n)
        dy = torch.randn(*lead, m, n, device="cuda", generator=g).bfloat16()
        w = (torch.rand(n, device="cuda", generator=g) + 0.5).to(p_dtype)
        b = (0.1 * torch.randn(n, device="cuda", generator=g)).to(p_dtype)

        def run():
            leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
            y = FNS[kind](*leaves)
            y.backward(dy)
            return [y.detach(), *(t.grad for t in leaves)], y.grad_fn

        monkeypatch.setattr(cpp, "ENABLED", False)
        python, _ = run()
        monkeypatch.setattr(cpp, "ENABLED", True)
        run()  # registers the forward's plan
        run()  # and the backward's
        before = cpp.launch_counts()
        ours, node = run()
        # the forward, the backward and the partial sums, each launched by the operator
        assert cpp.launch_counts() == [c + 1 for c in before] and node.name() == "HFNormBackward", (m, n, start, node)
        for a, c in zip(python, ours):
            assert torch.equal(a, c), (m, n, start, lead)
        with torch.cuda.stream(side):  # the operator launches on the current stream
            assert cpp.ops().current_stream(x.get_device()) == side.cuda_stream
            side.wait_stream(torch.cuda.default_stream())
            on_side, _ = run()
        torch.cuda.synchronize()
        for a, c in zip(python, on_side):
            assert torch.equal(a, c), ("side stream", m, n, start, lead)
    with torch.no_grad():
        before = cpp.launches()
        y = FNS[kind](x, w, b)
        assert cpp.launches() == before + 1 and y.grad_fn is None
        assert torch.equal(y, python[0])


def test_cpp_launch_in_a_cuda_graph_and_with_second_derivatives(monkeypatch):
    """The operator's launch captured in a CUDA graph replays with new inputs; create_graph=True
    through its node gives the Python path's second derivative."""
    cpp = cpp_launch_or_skip(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(256, 1024, device="cuda", generator=g).bfloat16()
    w = (torch.rand(1024, device="cuda", generator=g) + 0.5).bfloat16()
    b = (0.1 * torch.randn(1024, device="cuda", generator=g)).bfloat16()
    for _ in range(2):  # the plan, then the operator's own launch
        expected = layer_norm(x, w, b)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer_norm(static_x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = cpp.launches()
    with torch.cuda.graph(graph):
        static_y = layer_norm(static_x, w, b)
    assert cpp.launches() == before + 1
    fresh = torch.randn(256, 1024, device="cuda", generator=g).bfloat16()
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(cpp, "ENABLED", False)
    assert torch.equal(static_y, layer_norm(fresh, w, b))
    assert torch.equal(expected, layer_norm(x, w, b))

    def second(enabled):
        monkeypatch.setattr(cpp, "ENABLED", enabled)
        xs, ws = x.float().requires_grad_(True), w.float().requires_grad_(True)
        for _ in range(2):
            y = rms_norm(xs, ws)
        (gx,) = torch.autograd.grad(y, (xs,), torch.ones_like(y), create_graph=True)
        return torch.autograd.grad((gx * gx).sum(), (ws,))[0], y.grad_fn.name()

    python, _ = second(False)
    ours, name = second(True)
    assert name == "HFNormBackward"
    torch.testing.assert_close(ours, python)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_cpp_launch_settled_module_calls_compute_the_same_bits(kind, monkeypatch):
    """A module's calls after one on the kernels go straight to the operator with the family that
    call settled (``_module_calls.kernels_settled``): the general way is not asked, all three kernels are
    the operator's launches, and the output and gradients are the Python path's very bits."""
    cpp = cpp_launch_or_skip(monkeypatch)
    from hf_rmsnorm import modules

    g = torch.Generator(device="cuda").manual_seed(5)
    m = (FusedRMSNorm if kind == "rms" else FusedLayerNorm)(2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(torch.rand(2048, device="cuda", generator=g) + 0.5)
    x = torch.randn(4, 512, 2048, device="cuda", generator=g).bfloat16()
    dy = torch.randn(x.shape, device="cuda", generator=g).bfloat16()

    def run():
        leaf = x.detach().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        y = m(leaf)
        y.backward(dy)
        return [y.detach(), leaf.grad, *(p.grad for p in m.parameters())]

    monkeypatch.setattr(cpp, "ENABLED", False)
    python = run()
    assert m._settled is None  # nothing to settle with the operator off
    monkeypatch.setattr(cpp, "ENABLED", True)
    run()  # registers the forward's plan
    run()  # and the backward's; settled
    assert m._settled is not None
    general = []
    real = modules.kernels_for_module
    monkeypatch.setattr(modules, "kernels_for_module", lambda *a, **k: general.append(1) or real(*a, **k))
    before = cpp.launch_counts()
    ours = run()
    assert general == [] and cpp.launch_counts() == [c + 1 for c in before]
    assert len(ours) == len(python) == (3 if kind == "rms" else 4)
    for a, b in zip(python, ours):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_lazily_negated_tensors_on_cuda_give_the_bits_of_their_values(kind):
    """The kernels read memory, where a lazily negated tensor (the negation bit) holds its values
    un-negated. x, weight, bias and the output's gradient given so, each contiguous: the output
    and gradients are the very bits of the same values given plainly, by the functional op and by
    a module that settled on the C++ launch operator with plain calls (which must refuse them)."""
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(64, 2048, device="cuda", generator=g).bfloat16()
    w = (torch.rand(2048, device="cuda", generator=g) + 0.5).bfloat16()
    b = (0.1 * torch.randn(2048, device="cuda", generator=g)).bfloat16()
    dy = torch.randn(64, 2048, device="cuda", generator=g).bfloat16()

    def lazily(t):  # t's values, held negated twice over
        return torch._neg_view(-t)

    eps = EPS[kind]
    plain = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps), x, w, b, dy)
    lazy = fwd_bwd(lambda x, w, b: FNS[kind](lazily(x), lazily(w), lazily(b), eps), x, w, b, lazily(dy))
    assert all(torch.equal(a, c) for a, c in zip(plain, lazy))
    m = (FusedRMSNorm if kind == "rms" else FusedLayerNorm)(2048, eps=eps, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        for _ in range(3):  # the operator's plans learnt, the module settled
            want = m(x)
        assert torch.equal(m(lazily(x)), want)


@pytest.mark.parametrize("cls", [FusedRMSNorm, FusedLayerNorm])
def test_torch_jit_trace_on_cuda_replays_the_kernels(cls):
    """torch.jit.trace of a module on CUDA, settled first: the trace records the kernels' custom
    op (not the C++ launch operator, whose answer depends on its plans), and replays the eager
    module's very bits on another input."""
    g = torch.Generator(device="cuda").manual_seed(8)
    m = cls(2048, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(torch.rand(2048, device="cuda", generator=g) + 0.5)
    x, other = (torch.randn(64, 2048, device="cuda", generator=g).bfloat16() for _ in range(2))
    with torch.no_grad():
        for _ in range(3):  # the operator's plans learnt, the module settled
            m(x)
        traced = torch.jit.trace(m, x, check_trace=False)
        assert "norm_fwd" in [node.kind().split("::")[-1] for node in traced.graph.nodes()]
        assert torch.equal(traced(other), m(other))


@pytest.mark.parametrize("case", list(CASES))
def test_an_exported_module_on_cuda_holds_the_kernels_and_runs_with_and_without_gradients(case):
    """torch.export on CUDA: the program holds the kernels' custom op (not the composition), and
    calling it with gradients gives float64's numbers (tests/test_export.py has the CPU side)."""
    if not hasattr(torch.compiler, "is_exporting"):
        pytest.skip("torch.export's programs serve both modes from torch 2.7 (torch.compiler.is_exporting)")
    exported = export_and_check(case, torch.bfloat16, "cuda")
    assert any(str(n.target).startswith("hf_rmsnorm.") for n in exported.graph.nodes if n.op == "call_function"), case


def test_an_aoti_package_on_cuda_calls_the_kernels_and_computes_the_function(tmp_path):
    """AOTInductor on CUDA (torch.export, then ``aoti_compile_and_package``): the program holds the
    kernels' custom op, the package calls back into this process for it, and at another shape
    gives float64's numbers (tests/test_export.py has the CPU side). One case: each package is a
    C++ compile, and gpu_check's test step has a limit."""
    if not hasattr(torch.compiler, "is_exporting"):
        pytest.skip("torch.export's programs serve both modes from torch 2.7 (torch.compiler.is_exporting)")
    program, _, _ = aoti_package_and_check("rmsnorm+bias (exact conversion)", tmp_path / "norm.pt2", "cuda")
    assert {str(n.target) for n in program.graph.nodes if "hf_rmsnorm" in str(n.target)} == {"hf_rmsnorm.norm_fwd.default"}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("case", ["rmsnorm", "layernorm", "gated, Mamba2's order in groups"])
def test_a_module_exported_to_onnx_on_cuda_holds_standard_operators_only(case, dynamo, tmp_path):
    """torch.onnx.export on CUDA, where eager calls and torch.export take the kernels: the
    ONNX graph holds the torch composition, and ONNX Runtime computes the float64 definition
    (tests/test_onnx.py has the CPU side, every case, the kernels interpreted; three cases here
    keep gpu_check's test step inside its limit)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed here (its wheels can travel in .whl/)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed here (its wheels can travel in .whl/)")
    onnx_export_and_check(case, dynamo, tmp_path / "module.onnx", "cuda")
