"""Numerics of gated_rms_norm, forward and every gradient (x, gate, weight), on the torch path
and on the Triton kernels (interpreted on CPU tensors), against the float64 definition with
the STYLE.md error budget: within 2x the error of the HF classes' own eager composition in the
same dtype, plus a small atol."""

import pytest
import torch

from conftest import HAS_TRITON, INTERPRETING
from hf_rmsnorm.ops import gated_rms_norm, gated_rms_norm_ref
from reference import ATOL, assert_close_to_fp64, fwd_bwd, gated_fp64, gated_torch_same_dtype, max_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (norm_before_gate, activation, cast_mode): Mamba2 and its hybrids, Qwen3-Next / Qwen3.5,
# Kimi Linear, FalconH1's two orders
SETTINGS = {
    "mamba2": (False, "silu", "input"),
    "qwen3_next": (True, "silu", "input"),
    "kimi": (True, "sigmoid", "float32"),
    "falcon_h1": (True, "silu", "float32"),
    "falcon_h1_gate_first": (False, "silu", "float32"),
    "sigmoid_first": (False, "sigmoid", "input"),
}


def _strided(dtype):  # every other column: the launcher must make it contiguous
    return torch.randn(6, 96).to(dtype)[:, ::2]


# (x shape or maker, group_size)
SHAPES = {
    "6x64": ((6, 64), None),
    "5x40": ((5, 40), None),  # a row of no power of two: the tile masked
    "4x60_g20": ((4, 60), 20),  # groups of no power of two
    "3x5x48_g16": ((3, 5, 48), 16),  # three groups: a non-power-of-two group count
    "1000x48_g16": ((1000, 48), 16),  # 24 backward tiles over 8 programs: each loops, the last tile masked
    "33x128": ((33, 128), None),  # head_dim rows (Qwen3.5's gated delta net), 16 to a tile
    "1x8192_g1024": ((1, 8192), 1024),  # Mamba2-sized row, 8 groups
    "0rows": ((0, 32), 8),
    "strided": (_strided, 16),
}
CASES = [(s, "mamba2") for s in SHAPES] + [(s, "qwen3_next") for s in SHAPES] + [
    ("3x5x48_g16", k) for k in SETTINGS if k not in ("mamba2", "qwen3_next")
]


def kernel_runs(backend, dtype):
    """Whether a kernel computes a call on this backend: Triton's any of DTYPES, the compiled CPU
    kernel float32 and bfloat16 (float16 takes torch ops there)."""
    return backend == "triton" or (backend == "compiled" and dtype != torch.float16)


def make(shape, dtype, w_dtype=None, seed=0):
    torch.manual_seed(seed)
    x = shape(dtype) if callable(shape) else (torch.randn(shape) * 2 + 0.3).to(dtype)
    gate = (torch.randn(x.shape) * 2).to(dtype)
    if callable(shape):
        gate = gate.t().contiguous().t()  # column-major: also not in rows
    weight = (torch.randn(x.shape[-1]) * 0.3 + 1).to(w_dtype or dtype)
    return x, gate, weight


def check(x, gate, weight, size, setting, dtype, eps=1e-6, offset=0.0):
    before, activation, cast_mode = SETTINGS[setting]
    dy = torch.randn(x.shape).to(dtype)
    ours = fwd_bwd(lambda x, g, w: gated_rms_norm(x, g, w, eps, group_size=size, norm_before_gate=before,
                                                  activation=activation, cast_mode=cast_mode, offset=offset),
                   x, gate, weight, dy)
    truth = fwd_bwd(lambda x, g, w: gated_fp64(x, g, w, eps, size, before, activation, offset),
                    *(t.double() if t is not None else None for t in (x, gate, weight)), dy)
    yardstick = fwd_bwd(lambda x, g, w: gated_torch_same_dtype(x, g, w, eps, size, before, activation, cast_mode, offset),
                        x, gate, weight, dy)
    assert ours[0].shape == x.shape
    assert ours[0].dtype == yardstick[0].dtype, "output dtype differs from the HF classes' for the same inputs"
    assert_close_to_fp64(ours[0], yardstick[0], truth[0], dtype, "output")
    for name, got, want, t64, t in zip(("x", "gate", "weight"), ours[1:], yardstick[1:], truth[1:], (x, gate, weight)):
        if t is None:
            assert got is None
            continue
        assert got.dtype == t.dtype and got.shape == t.shape, f"grad of {name}: dtype/shape differ from the input's"
        assert_close_to_fp64(got, want, t64, dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_id,setting", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_forward_and_gradients_against_float64(shape_id, setting, dtype, backend, gated_runs):
    shape, size = SHAPES[shape_id]
    x, gate, weight = make(shape, dtype)
    check(x, gate, weight, size, setting, dtype)
    assert gated_runs() == (2 if kernel_runs(backend, dtype) and x.numel() else 0)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("variant", ["fp32_weight", "no_weight", "no_gate"])
def test_weight_in_fp32_without_weight_and_without_gate(setting, variant, backend, gated_runs):
    """bf16 activations with an fp32 weight (a mixed-precision model), no weight, and a call
    without a gate (Mamba2's norm(x) is then a grouped RMSNorm)."""
    x, gate, weight = make((4, 3, 48), torch.bfloat16, w_dtype=torch.float32 if variant == "fp32_weight" else None)
    check(x, None if variant == "no_gate" else gate, None if variant == "no_weight" else weight, 16, setting, torch.bfloat16)
    assert gated_runs() == (2 if backend != "torch" else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_an_offset_is_added_to_the_weight(setting, dtype, backend, gated_runs):
    """A weight stored as a difference from one (Qwen4-Exp's grouped norms, Gemma's): ``offset``
    1 multiplies by 1 + w, on every path, forward and every gradient (the weight's is the same
    as without the offset), against float64; with and without a gate (the grouped norm has
    none)."""
    x, gate, weight = make((4, 3, 48), dtype)
    weight = (weight.float() - 1).to(dtype)  # about 0: the offset carries the scale
    check(x, gate, weight, 16, setting, dtype, offset=1.0)
    check(x, None, weight, 16, setting, dtype, offset=1.0)
    assert gated_runs() == (4 if kernel_runs(backend, dtype) else 0)


def test_an_offset_needs_a_weight():
    x, gate, _ = make((4, 48), torch.float32)
    with pytest.raises(ValueError, match="offset is added to the weight, but there is no weight"):
        gated_rms_norm(x, gate, None, offset=1.0)
    with pytest.raises(ValueError, match="offset must be a finite number"):
        gated_rms_norm(x, gate, torch.ones(48), offset=float("nan"))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reference_is_the_definition_in_float64(setting):
    before, activation, cast_mode = SETTINGS[setting]
    x, gate, weight = make((5, 48), torch.float64)
    got = gated_rms_norm_ref(x, gate, weight, 1e-6, 16, before, activation, cast_mode)
    assert got.dtype == torch.float64
    assert max_err(got, gated_fp64(x, gate, weight, 1e-6, 16, before, activation)) <= ATOL[torch.float64]


@pytest.mark.parametrize("backend", ["compiled", "triton"], indirect=True)
@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)], ids=str)
def test_kernels_round_where_the_torch_path_rounds(dtype, w_dtype, backend, monkeypatch, gated_runs):
    """The kernels make the HF classes' roundings where the torch path makes them (Qwen3-Next's
    weighted row rounded before the gate; Mamba2's output promoted with an fp32 weight): with
    half-precision outputs, at most 1 % of the elements differ (the statistics are summed in
    another order, or in float64 by the compiled CPU kernel, which can move the rounded
    normalised row by an ulp, and the weight, near 1, up to two ulps of the output). A rounding
    left out differs in a quarter of them."""
    if not kernel_runs(backend, dtype):
        pytest.skip(f"no kernel computes {dtype} on the {backend} backend")
    x, gate, weight = make((64, 48), dtype, w_dtype)
    for before, activation, cast_mode in SETTINGS.values():
        outs = {}
        for path in ("torch", backend):
            monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto" if path == "compiled" else path)
            outs[path] = gated_rms_norm(x, gate, weight, group_size=16, norm_before_gate=before, activation=activation, cast_mode=cast_mode)
        ours, theirs = outs[backend], outs["torch"]
        assert ours.dtype == theirs.dtype == gated_torch_same_dtype(x, gate, weight, 1e-6, 16, before, activation, cast_mode).dtype
        if ours.dtype == torch.float32:
            torch.testing.assert_close(ours, theirs, rtol=2.4e-7, atol=0)
            continue
        differ = ours != theirs
        assert differ.float().mean() <= 0.01
        two_ulps = 2 * torch.finfo(ours.dtype).eps * theirs.float().abs()  # an ulp is at most eps·|value|
        assert ((ours.float() - theirs.float()).abs()[differ] <= two_ulps[differ]).all()
    assert gated_runs() == len(SETTINGS)


def test_under_autocast_it_computes_what_it_computes_without(backend):
    x, gate, weight = make((4, 48), torch.float32)
    want = gated_rms_norm(x, gate, weight, group_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gated_rms_norm(x, gate, weight, group_size=16)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_torch_compile_fullgraph_traces_the_custom_op(backend, gated_runs):
    torch._dynamo.reset()
    x, gate, weight = make((2, 5, 48), torch.float32)
    weight.requires_grad_(True)

    def fn(x, gate, weight):
        return gated_rms_norm(x * 2, gate, weight, group_size=16, norm_before_gate=True).sum(-1)

    eager = fn(x, gate, weight)
    (dw,) = torch.autograd.grad(eager.sum(), weight)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    out = compiled(x, gate, weight)
    (dw_c,) = torch.autograd.grad(out.sum(), weight)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw_c, dw, rtol=1e-6, atol=1e-6)
    # eager and compiled on the Triton kernels; on the compiled CPU kernel only the eager forward
    # and backward (it has no meta kernel: the compiler traces and fuses the torch ops)
    assert gated_runs() == {"torch": 0, "compiled": 2, "triton": 4}[backend]


@pytest.mark.parametrize("call,message", [
    (lambda x, g, w: gated_rms_norm(x, g, w, group_size=5), "group_size 5 does not divide the normalised dimension 48"),
    (lambda x, g, w: gated_rms_norm(x, g, w, group_size=0), "group_size must be a positive int"),
    (lambda x, g, w: gated_rms_norm(x, g[:, :8], w), "gate has shape (4, 8); it must have shape (4, 48)"),
    (lambda x, g, w: gated_rms_norm(x, g, w[:8]), "weight has shape (8,); it must have shape (48,)"),
    (lambda x, g, w: gated_rms_norm(x, g, w, activation="gelu"), "activation must be one of ('silu', 'sigmoid'), got 'gelu'"),
    (lambda x, g, w: gated_rms_norm(x, g, w, cast_mode="weight"), "cast_mode must be one of ('input', 'float32')"),
    (lambda x, g, w: gated_rms_norm(x, g, w, eps=-1.0), "eps must be a non-negative number"),
    (lambda x, g, w: gated_rms_norm(x, g, w, eps=float("nan")), "eps must be a non-negative number, got nan"),
    (lambda x, g, w: gated_rms_norm(x.long(), g, w), "x must be a floating-point tensor"),
    (lambda x, g, w: gated_rms_norm(x, g.long(), w), "gate must be a floating-point tensor or None, got dtype torch.int64"),
])
def test_bad_arguments_say_what_was_wrong(call, message):
    x, gate, weight = make((4, 48), torch.float32)
    with pytest.raises((ValueError, TypeError)) as info:
        call(x, gate, weight)
    assert message in str(info.value)


def test_eager_paths_and_custom_op_agree_bit_for_bit(gated_runs, monkeypatch):
    """Eager calls take the autograd.Function (through its C++ apply, or Function.apply where a
    torch.func wrapper must be unwrapped), or no autograd node at all where nothing needs a
    gradient; torch.compile (and torch.jit.trace) the custom op: the same launches, so the same
    bits, forward and every gradient."""
    if not (HAS_TRITON and INTERPRETING):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    import importlib

    from hf_rmsnorm.ops.gated_rms_norm import _fwd_op, _GatedFunction

    module = importlib.import_module("hf_rmsnorm.ops.gated_rms_norm")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, gate, weight = make((6, 48), torch.bfloat16)
    dy = torch.randn(6, 48).to(torch.bfloat16)
    args = (16, True, False, True)  # group_size, norm_before_gate, sigmoid, cast_input
    op = fwd_bwd(lambda x, g, w: _fwd_op(x, g, w, 1e-6, 0.0, *args)[0], x, gate, weight, dy)

    calls = []  # which way each call went
    forward, apply = _GatedFunction.forward, module._apply_gated
    monkeypatch.setattr(_GatedFunction, "forward", staticmethod(lambda *a: calls.append("node") or forward(*a)))
    monkeypatch.setattr(module, "_apply_gated", lambda *a: calls.append("C++ apply") or apply(*a))

    def public(x, g, w):
        return gated_rms_norm(x, g, w, 1e-6, group_size=16, norm_before_gate=True, activation="silu", cast_mode="input")

    eager = fwd_bwd(public, x, gate, weight, dy)
    assert calls == ["C++ apply", "node"]
    with torch.no_grad():
        no_grad = public(x, gate, weight)
    assert calls == ["C++ apply", "node"] and no_grad.grad_fn is None
    # Function.apply's Python, taken where an input is a functorch wrapper
    monkeypatch.setattr(module, "_needs_function_apply", lambda *tensors: True)
    applied = fwd_bwd(public, x, gate, weight, dy)
    assert calls == ["C++ apply", "node", "node"]
    assert gated_runs() == 2 + 2 + 1 + 2
    for got in (eager, applied):
        assert all(torch.equal(a, b) for a, b in zip(got, op))
    assert torch.equal(no_grad, op[0])


@pytest.mark.parametrize("setting", ["mamba2", "qwen3_next"])
def test_a_tensor_left_behind_by_a_finished_transform_is_a_valid_input(setting, backend, gated_runs):
    """A tensor that escaped a torch.func transform (a functorch wrapper whose transform has
    ended) is an ordinary input to torch's ops, and to this one: the output and the weight's
    gradient against float64. (The kernel path hands such inputs to ``Function.apply``, which
    unwraps them, as the plain norms do; here the C++ apply also gets through, since the rows'
    reshape unwraps x, so this checks the result, and
    ``test_eager_paths_and_custom_op_agree_bit_for_bit`` which way a call goes.)"""
    before, activation, cast_mode = SETTINGS[setting]
    x, gate, weight = make((6, 48), torch.float32)
    leaked = []

    def keep(x):
        leaked.append(x)
        return x.sum()

    torch.func.grad(keep)(x)
    left = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(left)
    weight = weight.requires_grad_(True)
    y = gated_rms_norm(left, gate, weight, 1e-6, group_size=16, norm_before_gate=before, activation=activation,
                       cast_mode=cast_mode)
    (y * y).sum().backward()
    w64 = weight.detach().double().requires_grad_(True)
    y64 = gated_fp64(x.double(), gate.double(), w64, 1e-6, 16, before, activation)
    (y64 * y64).sum().backward()
    torch.testing.assert_close(y.detach().double(), y64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    assert gated_runs() == (2 if backend != "torch" else 0)


def test_rows_beyond_the_triton_kernels_limit_take_another_path(backend, gated_runs):
    """Beyond Triton's limit (65536) rows take the CPU path as shipped: the compiled CPU kernel,
    which has none, wherever it was built; torch ops with HF_RMSNORM_BACKEND=torch."""
    from hf_rmsnorm.ops import _cpu_kernel

    x, gate, weight = make((2, 2 * 65536), torch.float32)
    got = gated_rms_norm(x, gate, weight, group_size=65536 * 2, norm_before_gate=True)
    assert gated_runs() == (0 if backend == "torch" or _cpu_kernel.op() is None else 1)
    want = gated_fp64(x, gate, weight, 1e-6, None, True, "silu")
    assert max_err(got, want) <= 4 * torch.finfo(torch.float32).eps * want.abs().max().item()


@pytest.mark.parametrize("setting", ["mamba2", "qwen3_next"])
def test_second_derivatives_are_right(setting, backend, gated_runs):
    """A gradient penalty (create_graph=True) through the gated norm: the kernels' backward has
    no derivative of its own, so the gradients are then taken as a graph of torch ops; the
    second derivatives of x and weight against float64, within the budget."""
    from reference import second_order

    before, activation, cast_mode = SETTINGS[setting]
    x, gate, weight = make((6, 48), torch.float32)
    dy = torch.randn(6, 48)

    def fn(impl):
        return lambda x, w, g: impl(x, g, w)  # second_order differentiates its first two arguments

    got = second_order(fn(lambda x, g, w: gated_rms_norm(x, g, w, group_size=16, norm_before_gate=before,
                                                         activation=activation, cast_mode=cast_mode)), x, weight, gate, dy)
    truth = second_order(fn(lambda x, g, w: gated_fp64(x, g, w, 1e-6, 16, before, activation)),
                         x.double(), weight.double(), gate.double(), dy.double())
    yardstick = second_order(fn(lambda x, g, w: gated_torch_same_dtype(x, g, w, 1e-6, 16, before, activation, cast_mode)),
                             x, weight, gate, dy)
    for what, a, b, t in zip(("dx", "dw", "d2/dx", "d2/dw"), got, yardstick, truth):
        assert_close_to_fp64(a, b, t, torch.float32, what)
    assert gated_runs() == (1 if backend != "torch" else 0)  # the forward on the kernels, the backward as a graph


@pytest.mark.parametrize("setting", ["mamba2", "qwen3_next"])
def test_a_gate_split_off_a_projection_is_read_in_place(setting, backend, gated_runs, monkeypatch):
    """Mamba2's mixer passes x and its gate as slices of one projection's output (rows wider
    than the slice): the kernels read them with their row stride, copying nothing, and compute
    what they compute on contiguous copies, gradients included."""
    before, activation, cast_mode = SETTINGS[setting]
    torch.manual_seed(0)
    proj = (torch.randn(2, 5, 3 * 48) * 2).to(torch.bfloat16)
    weight = (torch.randn(48) * 0.3 + 1).to(torch.bfloat16)
    dy = torch.randn(2, 5, 48).to(torch.bfloat16)
    kwargs = dict(group_size=16, norm_before_gate=before, activation=activation, cast_mode=cast_mode)

    def split_and_norm(dense):
        p, w = proj.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        x, gate = p[..., :48], p[..., 48:96]  # row stride 144, unit column stride
        if dense:
            x, gate = x.contiguous(), gate.contiguous()
        y = gated_rms_norm(x, gate, w, **kwargs)
        y.backward(dy)
        return y.detach(), p.grad, w.grad

    copies = []
    with monkeypatch.context() as m:
        original = torch.Tensor.contiguous
        m.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(tuple(t.shape)) or original(t, *a, **k))
        strided = split_and_norm(dense=False)
    dense = split_and_norm(dense=True)
    assert all(torch.equal(a, b) for a, b in zip(strided, dense))
    if backend == "triton":  # (the compiled kernel's views are taken in C++, which no patch sees)
        assert not [s for s in copies if s[-1] == 48 and len(s) > 1], copies  # no activation was copied
    assert gated_runs() == (4 if backend != "torch" else 0)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.float32),
                                           (torch.float64, None)], ids=str)
def test_torch_path_outside_autograd_computes_the_same_bits_in_its_own_buffers(setting, dtype, w_dtype, monkeypatch):
    """Under no_grad the torch path writes each step into a buffer of its own (fewer large
    temporaries, fewer page faults on the CPU): the same bits as the path autograd records, and
    the caller's x, gate and weight untouched."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    before, activation, cast_mode = SETTINGS[setting]
    x, gate, weight = make((4, 3, 48), dtype, w_dtype)
    kept = [t.clone() for t in (x, gate, weight)]
    kwargs = dict(group_size=16, norm_before_gate=before, activation=activation, cast_mode=cast_mode)
    with torch.no_grad():
        in_place = gated_rms_norm(x, gate, weight, **kwargs)
        no_gate = gated_rms_norm(x, None, weight, **kwargs)
    recorded = gated_rms_norm(x, gate, weight.clone().requires_grad_(True), **kwargs)
    recorded_no_gate = gated_rms_norm(x, None, weight.clone().requires_grad_(True), **kwargs)
    assert in_place.dtype == recorded.dtype and torch.equal(in_place, recorded.detach())
    assert torch.equal(no_gate, recorded_no_gate.detach())
    assert all(torch.equal(t, k) for t, k in zip((x, gate, weight), kept))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the overflows meant here
@pytest.mark.parametrize("backend", ["compiled", "triton"], indirect=True)
@pytest.mark.parametrize("setting", ["mamba2", "qwen3_next", "kimi"])
def test_saturated_and_non_finite_gates_give_what_the_torch_path_gives(setting, backend, gated_runs):
    """Gates far beyond the activation's saturation, infinite and NaN: the activation saturates
    to exactly 0 or the identity, silu(-inf) is NaN, and NaN spreads to its group, as on the
    torch path (the compiled CPU kernel computes its own exponential)."""
    before, activation, cast_mode = SETTINGS[setting]
    x, gate, weight = make((4, 48), torch.float32)
    # (+1e15, not more: silu is the identity there, and with the gate first a larger one's square
    # overflows float32's sum of squares, but not the compiled kernel's float64 one)
    extremes = torch.tensor([-1e30, -200.0, -88.8, -88.0, 88.0, 88.8, 200.0, 1e15, -float("inf"), float("inf"),
                             float("nan"), 0.0])
    gate[:, :12] = extremes
    gate[2:, :12] = extremes.nan_to_num(nan=1.0, posinf=50.0, neginf=-50.0)  # and rows where only the finite ones are
    kwargs = dict(group_size=16, norm_before_gate=before, activation=activation, cast_mode=cast_mode)
    got = gated_rms_norm(x, gate, weight, **kwargs)
    assert gated_runs() == 1
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_RMSNORM_BACKEND", "torch")
        want = gated_rms_norm(x, gate, weight, **kwargs)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_each_dtype_gets_a_backward_grid_of_its_own(monkeypatch):
    """The backward's programs come from the compiled kernel's registers, which depend on the
    dtypes (Mamba2's 1024-element groups: 96 registers in bf16 and 80 in fp32 for sm_90 under
    Triton 3.9, 2 programs an SM against 3), so its launch plan is kept per dtype: a bf16 call
    after an fp32 one with the same settings must not take the fp32 call's grid, else the grid,
    and the weight gradient's bits, would depend on which call a process made first. The
    programs a group fit stand in here for the GPU's count (the CPU has none)."""
    if not (HAS_TRITON and INTERPRETING):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    from hf_rmsnorm.ops import _triton_gated as G

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    monkeypatch.setattr(G, "_PLANS", {})
    fits = {torch.float32: 1, torch.bfloat16: 3}
    monkeypatch.setattr(G, "_per_group", lambda key, dy, x, z, w, meta, groups: fits[x.dtype])
    grids, launch = [], G._launch

    def record(kernel, grid, *rest):
        if kernel is G._gated_bwd_kernel:
            grids.append(grid)
        return launch(kernel, grid, *rest)

    monkeypatch.setattr(G, "_launch", record)
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        x, gate, weight = make((512, 32), dtype)  # 2 groups of 16, 4 tiles of 128 rows each
        dy = torch.randn(512, 32).to(dtype)
        ours = fwd_bwd(lambda x, g, w: gated_rms_norm(x, g, w, group_size=16), x, gate, weight, dy)
        truth = fwd_bwd(lambda x, g, w: gated_fp64(x, g, w, 1e-6, 16, False, "silu"),
                        x.double(), gate.double(), weight.double(), dy)
        yardstick = fwd_bwd(lambda x, g, w: gated_torch_same_dtype(x, g, w, 1e-6, 16, False, "silu", "input"),
                            x, gate, weight, dy)
        assert_close_to_fp64(ours[3], yardstick[3], truth[3], dtype, "grad w")  # every program's sums counted
    assert grids == [(2,), (6,), (2,)], grids
