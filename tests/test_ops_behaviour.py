"""Everything about the ops that is not raw numerics: determinism, the custom-op
registration, torch.compile, autocast, backend selection and the error messages."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_rmsnorm.ops import layer_norm, rms_norm
from hf_rmsnorm.ops import _norm
from reference import assert_close_to_fp64, fwd_bwd, norm_fp64, norm_torch_same_dtype, second_order

FNS = {"rms": rms_norm, "layer": layer_norm}


def _needs_interpreter(what):
    """Skip unless Triton runs here on CPU tensors (TRITON_INTERPRET=1); ``what`` says why."""
    pytest.importorskip("triton")
    from conftest import INTERPRETING

    if not INTERPRETING:
        pytest.skip(what)


def _inputs(m=64, n=300, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype).requires_grad_(True)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype).requires_grad_(True)
    dy = torch.randn(m, n, generator=g).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_eager_kernel_path_is_one_autograd_node_with_an_output_of_its_own(kind, launches, monkeypatch):
    """On (B, T, N) activations the eager path records one autograd node, straight onto x: the
    rows are viewed inside the Function, where autograd records nothing, so no view nodes cost
    host time around every norm. Its output is a tensor of its own, not a view made inside a
    custom Function, so a model may still change it in place."""
    _needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = _inputs(m=12, n=40, dtype=torch.float32)
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
    _needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = _inputs(m=12, n=40)
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
    _needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = _inputs(m=8, n=40)
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
        x, w, b, dy = _inputs()
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
    _needs_interpreter("the op runs Triton; on CPU tensors that needs TRITON_INTERPRET=1")
    x, w, b, _ = _inputs(m=9, n=33)
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
    _needs_interpreter("the op runs Triton; on CPU tensors that needs TRITON_INTERPRET=1")
    x, w, b, dy = _inputs(m=37, n=72)
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
    x, w, _, _ = _inputs(m=64, n=300, dtype=dtype)
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
    x, w, b, _ = _inputs(m=8, n=40, dtype=dtype)
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
    _needs_interpreter("runs the Triton path on CPU tensors; that needs TRITON_INTERPRET=1")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, dy = _inputs(m=8, n=40, dtype=torch.float32)
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
    x, w, b, dy = _inputs()
    layer_norm(x, w, b).backward(dy)
    if launches is not None:
        assert launches() == 0


def test_auto_backend_uses_torch_on_cpu_tensors(monkeypatch, launches):
    """auto never picks the (slow) interpreter for CPU tensors, even when it is enabled."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    x, w, b, _ = _inputs()
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
    problem = _norm.interpreter_problem(triton_version, numpy_version)
    if broken:
        assert f"Triton {triton_version}" in problem and f"NumPy {numpy_version}" in problem
        assert "triton>=3.7 or numpy<2.4" in problem
    else:
        assert problem is None


def test_interpreter_that_cannot_run_the_kernels_is_one_clear_error(tmp_path):
    """Triton < 3.7's interpreter with NumPy >= 2.4 fails inside the backward kernel with
    "only 0-dimensional arrays..."; the op says so up front instead. Run in a fresh process that
    reports those versions, since the check runs when the launcher module is imported."""
    pytest.importorskip("triton")
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


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_m,warps,tiles,stream,reload_w,stages", [
    (1, 1, 1, "", False, 1), (2, 4, 1, "", False, 1), (4, 2, 1, "", False, 1), (16, 4, 1, "", False, 1),
    (1, 2, 4, "", False, 2), (2, 4, 3, "evict_first", False, 3), (4, 2, 1, "", True, 1), (1, 2, 5, "", False, 3),
])
def test_every_launch_configuration_computes_the_same_norm(kind, dtype, block_m, warps, tiles, stream, reload_w, stages):
    """The launch parameters are tuned per GPU (scripts/tune_kernels.py sweeps them); every
    tile shape must compute the norm and its gradients, masked rows and columns included, and
    so must a forward program that takes several tiles (the last program's partly past M), the
    loads with a cache hint, a backward that loads the weight per tile and tile loops
    software-pipelined over 2 or 3 stages (the interpreter runs a pipelined loop as a plain
    one: what it checks here is the launch; tests/test_gpu.py compares the compiled bits)."""
    _needs_interpreter("calls the launchers on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    is_rms, eps = kind == "rms", 1e-5
    x, w, b, dy = _inputs(m=37, n=40, dtype=dtype)
    x, w, b = x.detach() * 2 + 0.5, w.detach(), b.detach()
    config = (block_m, 64, warps)  # 40 columns in a 64-wide tile, 37 rows in tiles of block_m
    y, mean, rstd = _triton_norm.norm_fwd(x, w, b, eps, 0.0, is_rms, 0, dtype, config=config, tiles=tiles, stream=stream,
                                          stages=stages)
    dx, part = _triton_norm.norm_bwd(dy, x, w, mean, rstd, 0.0, is_rms, 0, True, config=config, stream=stream,
                                     reload_w=reload_w, stages=stages)
    ours = [y, dx, *_triton_norm.sum_partials(part, [torch.float32, torch.float32])]
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), b.double(), dy.double())
    yardstick = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    for name, got, ref, truth_ in zip(("y", "dx", "dw", "db"), ours, yardstick, truth):
        assert_close_to_fp64(got.to(dtype) if name in ("dw", "db") else got, ref, truth_, dtype, f"{name} with tile {config}")


def test_forward_tiles_per_program_follow_the_parameter_dtype():
    """Several tiles per forward program exactly where the parameters' elements are wider than
    the rows' on one-row tiles (the mixed-precision forward), and only while the grid keeps
    enough programs to fill the GPU."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    many = 1 << 20  # rows: enough programs at any tile
    tiles = _triton_norm._FWD_TILES
    assert tiles > 1
    # (rows per tile, bytes of an x element, bytes of the widest parameter element) -> tiles per program
    cases = {
        (1, 2, 2): 1,  # bf16 rows, bf16 parameters
        (1, 2, 4): tiles,  # bf16 (or fp16) rows, fp32 parameters: the mixed-precision forward
        (2, 2, 4): 1,  # several-row tiles share their parameter loads already
        (1, 4, 4): 1,  # fp32 rows and parameters
        (1, 4, 2): 1,  # fp32 rows, narrower parameters
        (1, 2, 0): 1,  # no parameters
    }
    for (block_m, x_size, p_size), expected in cases.items():
        assert _triton_norm.fwd_tiles(many, block_m, x_size, p_size) == expected, (block_m, x_size, p_size)
    # a short batch keeps one tile a program: too few programs otherwise
    smallest = _triton_norm._MIN_FWD_PROGRAMS * tiles
    assert _triton_norm.fwd_tiles(smallest, 1, 2, 4) == tiles
    assert _triton_norm.fwd_tiles(smallest - 1, 1, 2, 4) == 1
    # what the launcher reads off the tensors: the widest parameter element
    bf16, fp32 = (torch.empty(3, dtype=d) for d in (torch.bfloat16, torch.float32))
    assert [_triton_norm.param_size(*p) for p in ((bf16, None), (fp32, None), (bf16, fp32), (None, None))] == [2, 4, 4, 0]


def test_forward_tile_shares_wide_parameters_between_two_rows():
    """With parameters wider than the rows, the one-row forward tiles become two-row tiles of
    32 values a thread (RMSNorm without a bias to 8192 columns, with one or LayerNorm to 4096);
    bf16 parameters keep the one-row tiles, and several-row tiles (up to 1024 columns) stay as
    they are."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for is_rms, has_bias, widest in ((True, False, 8192), (True, True, 4096), (False, True, 4096), (False, False, 4096)):
        for n in (768, 1100, 2048, 4096, 8192, 16384):
            narrow = _triton_norm.fwd_config(n, is_rms, False, has_bias)
            wide = _triton_norm.fwd_config(n, is_rms, True, has_bias)
            if narrow[0] == 1 and n <= widest:
                assert wide[:2] == (2, narrow[1]) and 2 * wide[1] == 32 * 32 * wide[2], (is_rms, n, wide)
            else:
                assert wide == narrow, (is_rms, n)


def test_layernorm_forward_takes_two_row_tiles_at_4096_columns():
    """LayerNorm with a bias on 2049-4096 columns (the 4096-wide tile) shares a
    two-row tile of 32 values a thread with bf16 parameters too (measured faster on an H200,
    runs 8 and 9); RMSNorm, LayerNorm without a bias, and the other widths keep their tiles."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for n in (3000, 4096):
        assert _triton_norm.fwd_config(n, False, False, True) == (2, 4096, 8)
        assert _triton_norm.fwd_config(n, False, True, True) == (2, 4096, 8)  # fp32 parameters: the same
        assert _triton_norm.fwd_config(n, True, False, True)[0] == 1
        assert _triton_norm.fwd_config(n, False, False, False)[0] == 1
    assert [_triton_norm.fwd_config(n, False, False, True)[0] for n in (2048, 8192)] == [1, 1]


def test_backward_tile_with_a_wide_weight():
    """A weight wider than the rows changes only the two-row 8192-column RMSNorm backward tile
    (32 warps instead of 16: the 16-warp one spills with an fp32 weight under Triton 3.6)."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for n in (768, 2048, 4096, 8192):
        for has_bias in (False, True):
            narrow, wide = (_triton_norm.bwd_config(n, has_bias, w) for w in (False, True))
            if n == 8192 and not has_bias:
                assert narrow == (2, 8192, 16) and wide == (2, 8192, 32)
            else:
                assert wide == narrow, (n, has_bias)


def test_tile_loops_pipelined_only_where_measured_faster():
    """3 stages (run 9, H200: LayerNorm's backward 11-28 % faster at 2048-8192 columns, its
    mixed-precision forward at 8192 14 %) for LayerNorm with a bias: the backward on one-row
    tiles of bf16/fp16 rows and parameters (the two-row tile below 1024 columns spills under
    Triton 3.9 pipelined), the forward where a program has several tiles. Nowhere else (RMSNorm's
    backward was level or slower; fp32 rows, fp32 parameters in the backward and RMSNorm with a
    bias were not timed pipelined), never past 8192 columns, and only where the tile's buffers
    fit the shared memory one block may use: on a 64 KiB GPU (Turing, AMD's) the 8192-column
    backward stays plain."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    h100 = 227 * 1024
    piped = {(n, is_rms, has_bias) for n in (768, 2048, 4096, 4100, 8192, 16384) for is_rms in (True, False)
             for has_bias in (True, False)
             if _triton_norm.bwd_stages(h100, *_triton_norm.bwd_config(n, has_bias)[:2], is_rms, has_bias, 2, 2) > 1}
    assert piped == {(n, False, True) for n in (2048, 4096, 4100, 8192)}
    assert {_triton_norm.bwd_stages(h100, *_triton_norm.bwd_config(n, True)[:2], False, True, 2, 2) for n in (2048, 8192)} == {3}
    assert _triton_norm.bwd_stages(None, 1, 8192, False, True, 2, 2) == 3  # the interpreter: no shared memory to count
    assert _triton_norm.bwd_stages(h100, 1, 8192, False, True, 4, 4) == 1  # fp32 rows
    assert _triton_norm.bwd_stages(h100, 1, 8192, False, True, 2, 4) == 1  # fp32 parameters on bf16 rows
    # 2 tiles in flight x (x, dy) x 8192 bf16 columns = 64 KiB, + 16 KiB for the reductions
    assert [_triton_norm.bwd_stages(kib * 1024, 1, 8192, False, True, 2, 2) for kib in (64, 79, 80, 99)] == [1, 1, 3, 3]
    assert _triton_norm.bwd_stages(64 * 1024, 1, 4096, False, True, 2, 2) == 3  # 48 KiB
    assert _triton_norm.bwd_stages(h100, 2, 1024, False, True, 2, 2) == 1  # the two-row tile
    # forward: several tiles a program (fwd_tiles), LayerNorm with a bias only
    assert [_triton_norm.fwd_stages(h100, t, 1, n, False, True, 2) for t, n in ((1, 8192), (8, 4096), (8, 8192), (8, 16384))] == [1, 3, 3, 1]
    assert _triton_norm.fwd_stages(h100, 8, 1, 8192, True, True, 2) == 1  # RMSNorm with a bias
    assert _triton_norm.fwd_stages(h100, 8, 1, 8192, False, False, 2) == 1  # LayerNorm without one
    # 2 tiles in flight x 8192 bf16 columns = 32 KiB, + 16 KiB for the reductions
    assert [_triton_norm.fwd_stages(kib * 1024, 8, 1, 8192, False, True, 2) for kib in (47, 48)] == [1, 3]


def test_programs_per_sm_count_registers_threads_and_shared_memory():
    """The backward's persistent grid launches as many programs per SM as fit at once; a
    pipelined kernel's shared memory can be what limits them (1 KiB a program held by the
    system)."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    per_sm = _triton_norm._programs_per_sm
    assert per_sm(128, 16) == 1  # 512 threads x 128 registers: all 65536
    assert per_sm(113, 8) == 2  # 113 -> 120 registers a thread: 2 x 256 x 120 = 61440
    assert per_sm(32, 4) == 8 and per_sm(32, 4, cap=32) == 16  # threads: 2048 / 128
    # registers allow 4 programs of 4 warps at 128 registers; 100 KiB of shared memory holds 3
    # programs of 32 KiB (+1 KiB each), 228 KiB all 4
    assert per_sm(128, 4, shared=32768) == 4  # no SM size given: registers and threads only
    assert per_sm(128, 4, shared=32768, sm_shared=100 * 1024) == 3
    assert per_sm(128, 4, shared=32768, sm_shared=228 * 1024) == 4
    assert per_sm(64, 4, shared=100 * 1024, sm_shared=100 * 1024) == 1  # never fewer than one


def test_backward_register_cap_only_where_measured():
    """The launcher caps the backward's registers for LayerNorm with a bias on several-row tiles
    (up to 1024 columns), the one case the sweep measured faster, and nowhere else: a cap above
    a kernel's own register count would raise it."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    capped = {(n, is_rms, has_bias) for n in (64, 768, 1024, 1025, 2048, 8192) for is_rms in (True, False)
              for has_bias in (True, False) if _triton_norm.bwd_maxnreg(_triton_norm.bwd_config(n, has_bias)[0], is_rms, has_bias)}
    assert capped == {(64, False, True), (768, False, True), (1024, False, True)}


@pytest.mark.parametrize(
    "kind,n,bias,block_m,tiles,bwd_warps",
    [("rms", 1100, True, 2, 1, 4), ("layer", 1100, True, 2, 1, 4), ("layer", 4100, True, 1, 8, 16), ("rms", 4100, False, 2, 1, 32)],
)
def test_mixed_precision_parameters_share_their_loads_between_rows(kind, n, bias, block_m, tiles, bwd_warps, monkeypatch, launches):
    """bf16 rows with an fp32 weight (and bias), through the public function: the forward puts
    two rows in a tile (1100 columns; RMSNorm to 8192), or, for LayerNorm past 4096 columns,
    several one-row tiles in a program (the grid minimum lowered so that 37 rows qualify); the
    RMSNorm backward past 4096 columns without a bias takes its 32-warp two-row tile. Either way
    the result is still the norm, forward and gradients."""
    _needs_interpreter("calls the launchers on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    monkeypatch.setattr(_triton_norm, "_MIN_FWD_PROGRAMS", 1)
    picked = []  # (rows a tile, tiles a program) of each forward launch
    fwd_tiles = _triton_norm.fwd_tiles
    monkeypatch.setattr(_triton_norm, "fwd_tiles", lambda *a: picked.append((a[1], fwd_tiles(*a))) or picked[-1][1])
    bwd_tiles = []  # the backward's (BLOCK_M, BLOCK_N, warps)
    bwd_config = _triton_norm.bwd_config
    monkeypatch.setattr(_triton_norm, "bwd_config", lambda *a: bwd_tiles.append(bwd_config(*a)) or bwd_tiles[-1])
    x, _, _, dy = _inputs(m=37, n=n, dtype=torch.bfloat16)
    _, w, b, _ = _inputs(m=1, n=n, dtype=torch.float32, seed=1)
    b = b if bias else None
    x = (x.detach() * 2 + 0.5).requires_grad_(True)
    eps = 1e-5
    ours = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps), x, w, b, dy)
    assert picked == [(block_m, tiles)] and launches() == 2
    assert tiles == 1 or tiles == _triton_norm._FWD_TILES
    assert [t[2] for t in bwd_tiles] == [bwd_warps]
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), None if b is None else b.double(), dy.double())
    yardstick = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    for name, got, ref, truth_ in zip(("y", "dx", "dw", "db"), ours, yardstick, truth):
        if truth_ is None:  # no bias
            assert got is None, name
            continue
        assert got.dtype == ref.dtype, name
        assert_close_to_fp64(got, ref, truth_, torch.bfloat16, name)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_pipelined_backward_through_the_public_function(kind, monkeypatch, launches):
    """bf16 rows of 4100 columns (an 8192-wide one-row tile) take the pipelined backward for
    LayerNorm (3 stages) and the plain one for RMSNorm with a bias, through the public
    function: forward and gradients are the norm's either way (the interpreter runs the loop
    unpipelined; the GPU tests compare the compiled pipelined kernel's bits with the plain
    one's)."""
    _needs_interpreter("calls the launchers on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    stages = []
    bwd_stages = _triton_norm.bwd_stages
    monkeypatch.setattr(_triton_norm, "bwd_stages", lambda *a: stages.append(bwd_stages(*a)) or stages[-1])
    x, w, b, dy = _inputs(m=19, n=4100, dtype=torch.bfloat16)
    x = (x.detach() * 2 + 0.5).requires_grad_(True)
    eps = 1e-5
    ours = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps), x, w, b, dy)
    assert stages == [3 if kind == "layer" else 1] and launches() == 2
    truth = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps), x.double(), w.double(), b.double(), dy.double())
    yardstick = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps), x, w, b, dy)
    for name, got, ref, truth_ in zip(("y", "dx", "dw", "db"), ours, yardstick, truth):
        assert got.dtype == ref.dtype, name
        assert_close_to_fp64(got, ref, truth_, torch.bfloat16, name)


@pytest.mark.parametrize("rows,n,config", [
    (1, 5, None), (37, 13, None), (300, 40, None), (5, 1100, None),
    (1000, 12, None),  # the whole strip in one tile of 1024 rows
    (1100, 12, None),  # one tile and a partial second
    (300, 40, (64, 8, 1)), (300, 40, (16, 32, 4)),  # other tile shapes (the tuning sweep's)
])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str)
def test_partial_sums_are_column_sums_in_each_parameters_dtype(rows, n, config, dtypes):
    """The backward's second kernel: column sums of the (programs, N or 2N) fp32 partials,
    the weight's half and the bias's half each in its parameter's dtype, strips that straddle
    the boundary between the halves (N not a multiple of the strip) included, with the tile
    the launcher picks or another."""
    _needs_interpreter("calls the launcher on CPU tensors; that needs TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_norm

    part = torch.randn(rows, n * len(dtypes), generator=torch.Generator().manual_seed(rows + n))
    if config is None and rows >= 1000:
        assert _triton_norm._sum_config(rows, n * len(dtypes))[0] == 1024
    sums = _triton_norm.sum_partials(part, list(dtypes), config=config)
    truth = part.double().sum(0).split(n)
    # Higham's bound for fp32 summation in any order, (rows - 1) u sum|x| with u = 2**-24,
    # plus one rounding to the parameter's dtype (at most half its eps, relative)
    bound = ((rows - 1) * 2.0**-24 * part.double().abs().sum(0)).split(n)
    for got, truth_, bound_, dtype in zip(sums, truth, bound, dtypes):
        assert got.dtype == dtype and got.shape == (n,)
        err = (got.double() - truth_).abs()
        # the fp32 sum is within bound_ of the truth; rounding it moves it by half an eps at most
        assert (err <= bound_ + torch.finfo(dtype).eps / 2 * (truth_.abs() + bound_)).all(), f"column sums of {rows}x{n}: error {err.max():.3g}"


# (weight, bias, offset, cast_mode) for the CPU path's hand-written backward
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
    x, w, b, _ = _inputs(m=19, n=40)
    trained = FNS[kind](x, w, b)
    with torch.no_grad():
        inferred = FNS[kind](x, w, b)
    assert trained.grad_fn is not None and inferred.grad_fn is None
    assert torch.equal(trained.detach(), inferred)
    if backend == "triton":
        assert launches() == 2


def test_host_side_tile_arithmetic_matches_triton():
    """The launchers size grids with plain-Python integer helpers (Triton's are slow to call
    from host code); they must agree with Triton's own."""
    triton = pytest.importorskip("triton")
    from hf_rmsnorm.ops import _triton_norm

    for n in [1, 2, 3, 5, 8, 9, 100, 767, 768, 1024, 1025, 4097, 65535, 65536]:
        assert _triton_norm._pow2_at_least(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16):
            assert _triton_norm._ceil_div(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_second_derivatives_are_right_on_every_path(kind, backend, launches):
    """The backward passes are hand-written (kernels, and the CPU's closed form); asked for
    create_graph=True they must still give the right second derivatives, not drop the norm's."""
    x, w, b, dy = _inputs(m=6, n=24, dtype=torch.float32)
    # leading dimensions: the eager Function views x's rows inside, the graph must still reach x
    x = x.detach().view(2, 3, 24) * 2 + 0.5
    dy = dy.float().view(2, 3, 24)
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
