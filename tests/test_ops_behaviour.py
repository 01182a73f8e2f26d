"""Everything about the ops that is not raw numerics: determinism, the custom-op
registration, torch.compile, autocast, backend selection and the error messages."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import FNS, needs_interpreter
from hf_rmsnorm.ops import layer_norm, rms_norm
from hf_rmsnorm.ops import _norm
from reference import assert_close_to_fp64, fwd_bwd, norm_fp64, norm_inputs, norm_torch_same_dtype, second_order


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_eager_kernel_path_is_one_autograd_node_with_an_output_of_its_own(kind, launches, monkeypatch):
    """On (B, T, N) activations the eager path records one autograd node, straight onto x: the
    rows are viewed inside the Function, where autograd records nothing, so no view nodes cost
    host time around every norm. Its output is a tensor of its own, not a view made inside a
    custom Function, so a model may still change it in place."""
    needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = norm_inputs(m=12, n=40, dtype=torch.float32)
    x = (x.detach() * 2 + 0.5).view(3, 4, 40).requires_grad_(True)
    dy = dy.view(3, 4, 40)
    y = FNS[kind](x, w, b, 1e-5)
    assert y.shape == x.shape and y.is_contiguous() and y._base is None
    assert type(y.grad_fn).__name__ == "_NormFunctionBackward"
    assert y.grad_fn.next_functions[0][0].variable is x
    y.mul_(3)  # in place on the output, then differentiated through
    y.backward(dy)
    assert launches() == 2
    got = [x.grad, w.grad, b.grad]
    yardstick = fwd_bwd(lambda x, w, b: 3 * norm_torch_same_dtype(kind, x, w, b, 1e-5), x, w, b, dy)[1:]
    truth = fwd_bwd(lambda x, w, b: 3 * norm_fp64(kind, x, w, b, 1e-5), x.double(), w.double(), b.double(), dy)[1:]
    for name, g, y_, t in zip(("dx", "dw", "db"), got, yardstick, truth):
        assert_close_to_fp64(g, y_, t, torch.float32, name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_kernel_path_under_activation_checkpointing_gives_the_same_gradients(reentrant, monkeypatch):
    """HF's gradient_checkpointing re-runs the forward in the backward: the statistics saved
    inside the Function (not returned) must be saved and recomputed like any activation, and
    the gradients must be the very bits of the plain run."""
    needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = norm_inputs(m=12, n=40)
    x, dy = x.detach().view(3, 4, 40), dy.view(3, 4, 40)

    def block(x, w, b):  # two norms and something between them, as in a decoder layer
        return rms_norm(torch.tanh(layer_norm(x, w, b)), w)

    runs = (block, lambda *args: checkpoint(block, *args, use_reentrant=reentrant))
    for a, c in zip(*(fwd_bwd(run, x, w, b, dy) for run in runs)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_backward_runs_no_fill_for_the_statistics(kind, launches, monkeypatch):
    """The forward also returns the per-row statistics, which nobody differentiates; autograd
    must not materialise zero gradients for them (on a GPU each is a fill kernel of M floats,
    one per norm per training step)."""
    needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = norm_inputs(m=8, n=40)
    y = FNS[kind](x, w, b if kind == "layer" else None)
    with Ops() as ops:
        y.backward(dy)
    assert launches() == 2 and x.grad is not None and w.grad is not None
    fills = [name for name in ops.names if name in ("zeros", "zeros_like", "fill_", "zero_", "full", "new_zeros")]
    assert not fills, fills


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_gradients_are_bit_identical_across_runs(kind, backend, launches):
    # 64 rows over several backward programs: the weight gradient is a cross-program sum
    runs = []
    for _ in range(2):
        x, w, b, dy = norm_inputs()
        FNS[kind](x, w, b).backward(dy)
        runs.append((x.grad, w.grad, b.grad))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)
    if backend == "triton":
        assert launches() == 4


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("rounding", [0, 1, 2])
def test_custom_op_registration_passes_opcheck(is_rms, rounding, monkeypatch):
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    needs_interpreter("the op runs Triton; on CPU tensors that needs TRITON_INTERPRET=1")
    x, w, b, _ = norm_inputs(m=9, n=33)
    for weight, bias in ((w, b), (w, None), (None, None)):
        if weight is None and rounding == 2:
            continue  # rounding to the weight's dtype needs a weight
        torch.library.opcheck(
            _norm._norm_fwd_op, (x.detach().requires_grad_(), weight, bias, 1e-5, 0.0, is_rms, rounding)
        )


@pytest.mark.parametrize("is_rms", [True, False])
def test_eager_function_and_custom_op_are_the_same_computation(is_rms):
    """Eager mode takes the autograd.Function, torch.compile the custom op: both must give
    bit-identical outputs and gradients, so compiling a model never changes its numbers."""
    needs_interpreter("the op runs Triton; on CPU tensors that needs TRITON_INTERPRET=1")
    x, w, b, dy = norm_inputs(m=37, n=72)
    from hf_rmsnorm.ops import layer_norm_ref, rms_norm_ref

    reference = rms_norm_ref if is_rms else layer_norm_ref  # used only for second derivatives
    ops = (lambda *args: _norm._NormFunction.apply(*args, reference), lambda *args: _norm._norm_fwd_op(*args)[0])
    results = [fwd_bwd(lambda x, w, b: op(x, w, b, 1e-5, 0.0, is_rms, 0), x, w, b, dy) for op in ops]
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("cast_mode", ["input", "weight"])
def test_torch_path_inference_shortcut_is_bit_identical(dtype, cast_mode, monkeypatch):
    """Without gradients the torch path multiplies in HF's order (w * y.to(dtype)) in one
    pass; it must round exactly like the general path that training takes."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    x, w, _, _ = norm_inputs(m=64, n=300, dtype=dtype)
    x, w = (x.detach() * 3 + 0.5), w.detach().requires_grad_(True)
    trained = rms_norm(x, w, cast_mode=cast_mode)  # w requires grad: the general path
    with torch.no_grad():
        inferred = rms_norm(x, w, cast_mode=cast_mode)
    assert trained.dtype == inferred.dtype == dtype
    assert torch.equal(trained.detach(), inferred)


class _Block(torch.nn.Module):
    def __init__(self, n=48):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)
        self.w1 = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.w2 = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.b2 = torch.nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        h = rms_norm(self.lin(x), self.w1, cast_mode="input")
        return layer_norm(h + x, self.w2, self.b2).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_traces_without_graph_breaks(compiler, backend, launches):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(2, 5, 48)

    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend=compiler)  # fullgraph: a break raises
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    if backend == "triton":
        assert launches() >= 4, "the compiled graph did not call the Triton kernels"


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_behaves_like_torchs_own_norm(kind, dtype, backend):
    """On the CPU, torch's autocast leaves layer_norm/rms_norm alone; so must we (the CUDA
    policy, float32, is covered by tests/test_gpu.py)."""
    x, w, b, _ = norm_inputs(m=8, n=40, dtype=dtype)
    w32 = w.detach().float()
    ours = {"rms": lambda: rms_norm(x, w32), "layer": lambda: layer_norm(x, w32, b.detach().float())}[kind]
    theirs = {"rms": lambda: F.rms_norm(x, (40,), w32, 1e-6), "layer": lambda: F.layer_norm(x, (40,), w32, b.detach().float(), 1e-5)}[kind]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_torch = ours(), theirs()
    assert y.dtype == y_torch.dtype
    torch.testing.assert_close(y.float(), y_torch.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_kernel_path_under_autocast_computes_the_bits_it_computes_without(kind, monkeypatch, launches):
    """The kernels run without disabling autocast around them (a context per call costs host
    time): autocast must cast none of their inputs, forward or backward. On the CPU the
    policy leaves norms alone, so under autocast the result is the very bits of the same
    call without it."""
    needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = norm_inputs(m=8, n=40, dtype=torch.float32)
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(fwd_bwd(FNS[kind], x, w, b, dy))
    assert launches() == 4
    for a, c in zip(*results):
        assert a.dtype == c.dtype == torch.float32 and torch.equal(a, c)


@pytest.mark.parametrize("is_rms", [True, False])
def test_autocast_to_float32_policy_only_applies_off_cpu(is_rms):
    assert not _norm._autocast_to_float32("cpu", is_rms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _norm._autocast_to_float32("cpu", is_rms)
    assert not _norm._autocast_to_float32("meta", is_rms)  # no autocast there at all


@pytest.mark.parametrize("value", ["torch", "TORCH", " auto "])
def test_backend_env_is_case_and_space_insensitive(value, monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", value)
    assert _norm.selected_backend() == value.strip().lower()


def test_torch_backend_never_launches_kernels(monkeypatch, launches):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    x, w, b, dy = norm_inputs()
    layer_norm(x, w, b).backward(dy)
    if launches is not None:
        assert launches() == 0


def test_auto_backend_uses_torch_on_cpu_tensors(monkeypatch, launches):
    """auto never picks the (slow) interpreter for CPU tensors, even when it is enabled."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    x, w, b, _ = norm_inputs()
    rms_norm(x, w)
    if launches is not None:
        assert launches() == 0


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HF_RMSNORM_BACKEND='cuda' is not a backend; use one of auto, triton, torch"):
        rms_norm(torch.randn(2, 4))


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 4))


def test_triton_backend_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    monkeypatch.setattr(_norm, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        layer_norm(torch.randn(2, 4))
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")  # auto quietly takes the torch path
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer_norm(x), norm_fp64("layer", x, eps=1e-5).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True),  # torch 2.11's Triton with today's NumPy: the backward's tile loop fails
    ("3.2.0", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False),  # NumPy still converts one-element arrays (with a warning)
    ("3.7.0", "2.4.6", False),  # the interpreter squeezes the array first
    ("3.10.0+git1a2b3c", "3.0.0", False),
])
def test_interpreter_version_rule(triton_version, numpy_version, broken):
    from hf_rmsnorm.ops._triton_norm import interpreter_problem

    problem = interpreter_problem(triton_version, numpy_version)
    if broken:
        assert f"Triton {triton_version}" in problem and f"NumPy {numpy_version}" in problem
        assert "triton>=3.7 or numpy<2.4" in problem
    else:
        assert problem is None


def test_interpreter_that_cannot_run_the_kernels_is_one_clear_error(tmp_path):
    """Triton < 3.7's interpreter with NumPy >= 2.4 fails inside the backward kernel with
    "only 0-dimensional arrays..."; the op says so up front instead. Run in a fresh process that
    reports those versions, since the check runs when the launcher module is imported."""
    triton = pytest.importorskip("triton")
    if not hasattr(triton, "knobs"):  # the child poses as Triton 3.6 and imports what 3.6 has
        pytest.skip(f"the child process poses as Triton 3.6, whose triton.knobs Triton {triton.__version__} lacks")
    script = tmp_path / "old_interpreter.py"
    script.write_text(
        "import numpy, triton, torch\n"
        "triton.__version__, numpy.__version__ = '3.6.0', '2.4.6'\n"
        "from hf_rmsnorm.ops import rms_norm\n"
        "x = torch.randn(3, 8, requires_grad=True)\n"
        "try:\n"
        "    rms_norm(x).sum().backward()\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
        "    raise SystemExit(3)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_RMSNORM_BACKEND": "triton"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Triton 3.6.0's interpreter (TRITON_INTERPRET=1) cannot run these kernels with NumPy 2.4.6" in done.stdout
    assert "Install triton>=3.7 or numpy<2.4" in done.stdout
    assert "0-dimensional" not in done.stdout + done.stderr


BAD_INPUTS = [
    ("integer x", dict(x=torch.arange(8).reshape(2, 4)), TypeError, "floating-point tensor, got dtype torch.int64"),
    ("scalar x", dict(x=torch.tensor(1.0)), ValueError, "at least one dimension"),
    ("wrong weight shape", dict(weight=torch.ones(5)), ValueError, r"weight has shape \(5,\) but x's last dimension is 4"),
    ("2-d weight", dict(weight=torch.ones(1, 4)), ValueError, r"must have shape \(4,\)"),
    ("wrong bias shape", dict(bias=torch.ones(3)), ValueError, r"bias has shape \(3,\)"),
    ("integer weight", dict(weight=torch.ones(4, dtype=torch.int32)), TypeError, "weight must be floating point"),
    ("weight on another device", dict(weight=torch.ones(4, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    ("negative eps", dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
    ("NaN eps", dict(eps=float("nan")), ValueError, "eps must be a non-negative number, got nan"),
    ("unknown cast mode", dict(cast_mode="bf16"), ValueError, r"cast_mode must be one of \('float32', 'input', 'weight'\)"),
    ("weight cast mode without weight", dict(weight=None, cast_mode="weight"), ValueError, "rounds to the weight's dtype"),
    ("offset without weight", dict(weight=None, offset=1.0), ValueError, "offset is added to the weight"),
    ("not a tensor", dict(x=[[1.0, 2.0]]), TypeError, "x must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("case,kwargs,exc,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_one_clear_error(kind, case, kwargs, exc, message, backend):
    args = dict(x=torch.randn(2, 4), weight=torch.ones(4), bias=None, eps=1e-5)
    args.update(kwargs)
    with pytest.raises(exc, match=message) as info:
        FNS[kind](**args)
    assert str(info.value).startswith(f"{kind}_norm: ")


GRADCHECK_AFFINES = [
    (False, False, 0.0, "float32"),
    (True, False, 0.0, "float32"),
    (True, True, 0.0, "float32"),
    (True, True, 1.0, "float32"),
    (True, False, 0.0, "input"),
    (True, True, 0.5, "weight"),
]


@pytest.mark.parametrize("affine", GRADCHECK_AFFINES, ids=lambda a: f"w{a[0]:d}b{a[1]:d}o{a[2]:g}-{a[3]}")
@pytest.mark.parametrize("grads", ["all", "x only", "parameters only"])
def test_cpu_rms_path_backward_passes_gradcheck(affine, grads, monkeypatch):
    """The CPU torch path differentiates RMSNorm by a closed form, not by autograd: checked
    against finite differences in float64 (3-D input, a frozen weight as with LoRA, frozen x)."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    has_w, has_b, offset, cast_mode = affine
    if grads == "parameters only" and not has_w:
        pytest.skip("no parameters to differentiate")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2 + 0.3
    w = 1 + 0.3 * torch.randn(7, generator=g, dtype=torch.float64) if has_w else None
    b = 0.1 * torch.randn(7, generator=g, dtype=torch.float64) if has_b else None
    x.requires_grad_(grads != "parameters only")
    for p in (w, b):
        if p is not None:
            p.requires_grad_(grads != "x only")
    assert torch.autograd.gradcheck(lambda x, w, b: rms_norm(x, w, b, 1e-3, offset, cast_mode), (x, w, b))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_inference_builds_no_graph_and_matches_the_training_path(kind, backend, launches):
    """Under no_grad no autograd node is made (less host time per call); the numbers are the
    ones training computes, bit for bit."""
    x, w, b, _ = norm_inputs(m=19, n=40)
    trained = FNS[kind](x, w, b)
    with torch.no_grad():
        inferred = FNS[kind](x, w, b)
    assert trained.grad_fn is not None and inferred.grad_fn is None
    assert torch.equal(trained.detach(), inferred)
    if backend == "triton":
        assert launches() == 2


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_second_derivatives_are_right_on_every_path(kind, layout, backend, launches):
    """The backward passes are hand-written (kernels, and the CPU's closed form); asked for
    create_graph=True they must still give the right second derivatives, not drop the norm's.
    A strided x is copied for the kernels: the graph must still reach x itself."""
    x, w, b, dy = norm_inputs(m=6, n=24, dtype=torch.float32)
    # leading dimensions: the eager Function views x's rows inside, the graph must still reach x
    x = x.detach().view(2, 3, 24) * 2 + 0.5
    dy = dy.float().view(2, 3, 24)
    if layout == "strided":
        x, dy = x.transpose(0, 1), dy.transpose(0, 1)
        assert not x.is_contiguous()
    fn = lambda x, w, b: FNS[kind](x, w, b, 1e-5)  # noqa: E731
    got = second_order(fn, x, w, b, dy)
    truth = second_order(lambda x, w, b: norm_fp64(kind, x, w, b, 1e-5), x.double(), w.double(), b.double(), dy.double())
    yardstick = second_order(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, 1e-5), x, w, b, dy)
    for name, g, y_, t in zip(("dx", "dw", "d2x", "d2w"), got, yardstick, truth):
        assert_close_to_fp64(g, y_, t, torch.float32, name)
    if backend == "triton":
        assert launches() == 1, "the forward should still run on the kernel"


@pytest.mark.parametrize("cast_mode", ["float32", "input", "weight"])
def test_cpu_rms_path_second_derivatives_pass_gradgradcheck(cast_mode, monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    w = (1 + 0.3 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w, b: rms_norm(x, w, b, 1e-3, 0.5, cast_mode), (x, w, b))


def _transformed(transform, fn, x, w, b, t):
    """One torch.func transform (or forward-mode AD) of ``fn(x, w, b)``; ``t`` a tangent /
    cotangent shaped like x."""
    import torch.autograd.forward_ad as fwAD

    if transform == "forward_ad":
        with fwAD.dual_level():
            return fwAD.unpack_dual(fn(fwAD.make_dual(x, t), w, b)).tangent
    if transform == "jvp":
        return torch.func.jvp(lambda x: fn(x, w, b), (x,), (t,))[1]
    if transform == "vmap":  # over a leading dimension of x
        return torch.vmap(lambda x: fn(x, w, b))(x.view(2, -1, x.shape[-1]))
    if transform == "grad_x":
        return torch.func.grad(lambda x: (fn(x, w, b) * t).sum())(x)
    if transform == "grad_weight":
        return torch.func.grad(lambda w: (fn(x, w, b) * t).sum())(w)
    if transform == "vjp_under_vmap":  # per-sample gradients, the usual DP-SGD pattern
        return torch.vmap(lambda xi, ti: torch.func.vjp(lambda w: fn(xi, w, b), w)[1](ti)[0])(x, t)
    raise ValueError(transform)


@pytest.mark.parametrize("transform", ["forward_ad", "jvp", "vmap", "grad_x", "grad_weight", "vjp_under_vmap"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_torch_func_transforms_and_forward_ad_are_right_on_every_path(kind, transform, backend, compiled_calls):
    """The hand-written pieces (the compiled CPU kernel, the closed-form backward, the Triton
    kernels' autograd) have no forward mode and no functorch rules: under a transform the op is
    composed of torch ops instead, whose derivatives torch knows. Before, forward-mode AD through
    the compiled kernel silently returned no tangent, and the transforms raised."""
    x, w, b, t = (v.detach().float() for v in norm_inputs(m=6, n=24, dtype=torch.float32))
    x = x * 2 + 0.5
    got = _transformed(transform, lambda x, w, b: FNS[kind](x, w, b, 1e-5), x, w, b, t)
    assert got is not None, "no tangent: the transform's derivative was dropped"
    truth = _transformed(transform, lambda x, w, b: norm_fp64(kind, x, w, b, 1e-5), x.double(), w.double(), b.double(), t.double())
    yardstick = _transformed(transform, lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, 1e-5), x, w, b, t)
    assert_close_to_fp64(got, yardstick, truth, torch.float32, transform)
    assert compiled_calls() == 0


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_a_tensor_left_behind_by_a_finished_transform_is_a_valid_input(kind, backend):
    """A tensor that escaped a torch.func transform (a functorch wrapper whose transform has
    ended) is an ordinary input to torch's ops. ``autograd.Function.apply`` unwraps it; the
    kernel path, which calls autograd's C++ apply directly where it can, must do so too: the
    output and the weight's gradient against float64."""
    x, w, b, _ = (v.detach().float() for v in norm_inputs(m=6, n=24, dtype=torch.float32))
    leaked = []

    def keep(x):
        leaked.append(x)
        return x.sum()

    torch.func.grad(keep)(x * 2 + 0.5)
    left = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(left)
    w = w.requires_grad_(True)
    y = FNS[kind](left, w, b, 1e-5)
    (y * y).sum().backward()
    x64, w64 = (x * 2 + 0.5).double(), w.detach().double().requires_grad_(True)
    y64 = norm_fp64(kind, x64, w64, b.double(), 1e-5)
    (y64 * y64).sum().backward()
    torch.testing.assert_close(y.detach().double(), y64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
