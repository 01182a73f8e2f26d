"""The compiled CPU kernel's gated norm (the second half of ops/_cpu_rms_norm.c): what does not
depend on the machine, where it hands calls to torch ops, and what its operators refuse. Its
numerics on every shape, order and dtype are in test_ops_gated.py and test_gated_norms.py (the
"compiled" backend), against float64."""

import pytest
import torch

from hf_rmsnorm.ops import _cpu_kernel, gated_rms_norm
from hf_rmsnorm.ops.gated_rms_norm import _cpu_flags
from reference import assert_close_to_fp64, fwd_bwd, gated_fp64, gated_torch_same_dtype

pytestmark = pytest.mark.skipif(
    _cpu_kernel.op() is None, reason=f"the compiled CPU kernel is not available here: {_cpu_kernel.unavailable_reason()}"
)
MAMBA2 = dict(group_size=256, norm_before_gate=False, activation="silu", cast_mode="input")
QWEN3_NEXT = dict(norm_before_gate=True, activation="silu", cast_mode="input")


def inputs(m, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, gate, dy = ((torch.randn(m, n, generator=g) * 2 + 0.3).to(dtype) for _ in range(3))
    weight = (torch.randn(n, generator=g) * 0.3 + 1).to(dtype)
    return x, gate, weight, dy


@pytest.fixture(autouse=True)
def compiled_backend(monkeypatch):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")


@pytest.mark.parametrize("settings", [MAMBA2, QWEN3_NEXT], ids=["mamba2", "qwen3_next"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_do_not_depend_on_the_thread_count(dtype, settings, gated_runs):
    """y, dx and dgate are computed row by row, so two threads give the same bits as one; the
    weight's gradient is summed per thread in float64 (thread order), within the float64 budget
    either way."""
    x, gate, weight, dy = inputs(96, 768, dtype)  # above the operator's one-thread size

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fwd_bwd(lambda x, g, w: gated_rms_norm(x, g, w, **settings), x, gate, weight, dy)
        finally:
            torch.set_num_threads(before)

    one, two = run(1), run(2)
    assert gated_runs() == 4
    assert all(torch.equal(a, b) for a, b in zip(one[:3], two[:3]))
    size, before, act, cast_mode = settings.get("group_size"), settings["norm_before_gate"], "silu", settings["cast_mode"]
    truth = fwd_bwd(lambda x, g, w: gated_fp64(x, g, w, 1e-6, size, before, act), *(t.double() for t in (x, gate, weight, dy)))
    yardstick = fwd_bwd(lambda x, g, w: gated_torch_same_dtype(x, g, w, 1e-6, size, before, act, cast_mode), x, gate, weight, dy)
    assert_close_to_fp64(one[3], yardstick[3], truth[3], dtype, "grad of weight, one thread")
    assert_close_to_fp64(two[3], yardstick[3], truth[3], dtype, "grad of weight, two threads")


def test_non_finite_values_stay_in_their_groups(gated_runs):
    x, gate, weight, _ = inputs(4, 64, torch.float32)
    x[1, 3], x[2, 40] = float("nan"), float("inf")
    y = gated_rms_norm(x, gate, weight, group_size=32)
    assert gated_runs() == 1
    assert y[1, :32].isnan().all() and not y[1, 32:].isnan().any()
    assert y[2, 32:].isnan().any() and not y[2, :32].isnan().any()  # inf / inf, in its group only
    want = gated_fp64(*(t.double() for t in (x, gate, weight)), 1e-6, 32, False, "silu")
    keep = torch.tensor([0, 3])
    torch.testing.assert_close(y[keep].double(), want[keep], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("with_params", [False, True], ids=["x_only", "x_gate_weight"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_tensors_without_cpu_memory_take_the_torch_ops(grad, with_params, gated_runs):
    """Fake tensors (torch.export, shape propagation) report the CPU but have no memory: torch
    ops give the output's shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=grad)
        gate, weight = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(16, requires_grad=grad)
        if not with_params:
            gate = weight = None
        y = gated_rms_norm(x, gate, weight, **MAMBA2 | dict(group_size=8))
        # bf16 rows and an fp32 weight: promoted
        assert y.shape == (4, 16) and y.dtype == (torch.float32 if with_params else torch.bfloat16)
        if grad:
            y.sum().backward()
            assert x.grad.shape == x.shape and (weight is None or weight.grad.shape == weight.shape)
    assert gated_runs() == 0


def test_forward_mode_and_torch_func_take_the_torch_ops(gated_runs):
    """The compiled kernel has no forward-mode derivative and no functorch rules: under
    torch.func.jvp (and vmap) the call is composed of torch ops, and the tangent is right."""
    x, gate, weight, _ = inputs(6, 48, torch.float32)
    v = torch.randn(6, 48)

    def f(x):
        return gated_rms_norm(x, gate, weight, group_size=16, norm_before_gate=True)

    y, tangent = torch.func.jvp(f, (x,), (v,))
    per_row = torch.func.vmap(lambda x, g: gated_rms_norm(x, g, weight, group_size=16, norm_before_gate=True))
    batched = per_row(x.unsqueeze(1), gate.unsqueeze(1)).squeeze(1)
    assert gated_runs() == 0
    x64, g64, w64 = (t.double() for t in (x, gate, weight))
    y64, t64 = torch.func.jvp(lambda x: gated_fp64(x, g64, w64, 1e-6, 16, True, "silu"), (x64,), (v.double(),))
    torch.testing.assert_close(y.double(), y64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(tangent.double(), t64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(batched, y, rtol=2e-6, atol=1e-6)


def test_the_operators_refuse_tensors_their_flags_do_not_describe():
    """The operators are visible in torch.ops; called with tensors other than their flags say
    (a dtype, a shape, a group size, the forward's statistics), they raise instead of reading
    memory wrongly."""
    fwd, bwd = _cpu_kernel.gated_ops()
    x, gate, weight, dy = inputs(4, 16, torch.float32)
    flags = _cpu_flags(torch.float32, gate, weight, False, "silu", "input")
    y, rstd = fwd(x, gate, weight, 1e-6, 0.0, 8, flags, True)
    want = gated_fp64(*(t.double() for t in (x, gate, weight)), 1e-6, 8, False, "silu")
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=1e-6)
    assert rstd.shape == (8,) and fwd(x, gate, weight, 1e-6, 0.0, 8, flags, False)[1] is None
    for call, message in (
        (lambda: fwd(x.bfloat16(), gate, weight, 1e-6, 0.0, 8, flags, False), "x must be a non-empty CPU tensor of Float"),
        (lambda: fwd(x, gate.bfloat16(), weight, 1e-6, 0.0, 8, flags, False), "gate must be a non-empty CPU tensor of Float"),
        (lambda: fwd(x, gate[:, :8], weight, 1e-6, 0.0, 8, flags, False), "the gate's shape"),
        (lambda: fwd(x, gate, weight[:8], 1e-6, 0.0, 8, flags, False), "weight must be a contiguous CPU tensor of 16"),
        (lambda: fwd(x, gate, weight, 1e-6, 0.0, 5, flags, False), "no such call"),
        (lambda: fwd(x, gate, weight, 1e-6, 0.0, 0, flags, False), "no such call"),
        (lambda: bwd(dy, x, gate, weight, rstd[:4], 0.0, 8, flags, True, True, True), "rstd must be the forward's, 8"),
        (lambda: bwd(dy[:2], x, gate, weight, rstd, 0.0, 8, flags, True, True, True), "the gradient's shape"),
    ):
        with pytest.raises(RuntimeError, match=message):
            call()
    dx, dz, dw = bwd(dy, x, gate, weight, rstd, 0.0, 8, flags, True, False, False)
    assert dx.shape == x.shape and dz is None and dw is None  # only what is wanted


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_torch_jit_trace_records_torch_ops_that_a_saved_trace_can_hold(grad, gated_runs, tmp_path):
    """torch.jit.trace of a gated module on the CPU records torch ops, not the kernel's Python
    autograd.Function (which torch.jit.save refuses) nor this build's operator (which another
    process lacks): the saved trace loads and computes the module's function, gradients
    included."""
    from hf_rmsnorm import FusedGatedRMSNorm

    m = FusedGatedRMSNorm(48, eps=1e-5, group_size=16)
    x, gate, _, dy = inputs(6, 48, torch.float32)
    m.weight.data = torch.randn(48) * 0.3 + 1
    m.weight.requires_grad_(grad)
    traced = torch.jit.trace(m, (x, gate), check_trace=False)
    assert gated_runs() == 0
    assert not [n.kind() for n in traced.graph.nodes() if n.kind().startswith(("prim::PythonOp", "hf_rmsnorm"))]
    torch.jit.save(traced, tmp_path / "norm.pt")
    loaded = torch.jit.load(tmp_path / "norm.pt")
    xs = [t.clone().requires_grad_(grad) for t in (x, x)]
    got, want = loaded(xs[0], gate), m(xs[1], gate)
    assert gated_runs() == 1
    truth = gated_fp64(*(t.double() for t in (x, gate, m.weight.detach())), 1e-5, 16, False, "silu")
    assert_close_to_fp64(got.detach(), want.detach(), truth, torch.float32, "output")
    if grad:
        (got * dy).sum().backward()
        (want * dy).sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
