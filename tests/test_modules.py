"""FusedRMSNorm / FusedLayerNorm: drop-in state_dicts and the same function as the modules
they stand in for (nn.LayerNorm and the HF RMSNorm flavours), on both backends."""

import pytest
import torch
from torch import nn

from hf_rmsnorm import FusedLayerNorm, FusedRMSNorm
from reference import assert_close_to_fp64, norm_fp64

transformers = pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 1.0)
    return module


def _same_keys_and_shapes(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)


def _check_same_function(ours, theirs, x, dtype, kind, eps, offset=0.0):
    """Output and parameter gradients of ``ours`` against ``theirs`` (both in dtype), with the
    float64 definition (not ``theirs`` in float64: HF modules cast to fp32 internally) as
    the ground truth."""
    params64 = {n: p.detach().double().requires_grad_(True) for n, p in theirs.named_parameters()}
    shape = tuple(getattr(theirs, "normalized_shape", x.shape[-1:]))

    def truth(inp):
        flat = inp.reshape(*inp.shape[: inp.dim() - len(shape)], -1)
        w, b = (params64[k].reshape(-1) if k in params64 else None for k in ("weight", "bias"))
        return norm_fp64(kind, flat, w, b, eps, offset).reshape(inp.shape)

    dy = torch.randn(x.shape).to(dtype)
    results = []
    for fn, inp, params in ((ours, x, list(ours.parameters())), (theirs, x, list(theirs.parameters())), (truth, x.double(), list(params64.values()))):
        inp = inp.detach().clone().requires_grad_(True)
        y = fn(inp)
        y.backward(dy.to(y.dtype))
        results.append((y.detach(), inp.grad, [p.grad for p in params]))
    (y, gx, gp), (y_pt, gx_pt, gp_pt), (y64, gx64, gp64) = results
    assert y.dtype == y_pt.dtype
    assert_close_to_fp64(y, y_pt, y64, dtype, "output")
    assert_close_to_fp64(gx, gx_pt, gx64, dtype, "grad of x")
    assert len(gp) == len(gp_pt) == len(gp64)
    for g, g_pt, g64 in zip(gp, gp_pt, gp64):
        assert_close_to_fp64(g, g_pt, g64, dtype, "parameter grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(bias=False), dict(elementwise_affine=False), dict(normalized_shape=(3, 16))],
    ids=["affine", "no_bias", "no_affine", "two_dims"],
)
def test_fused_layernorm_is_a_drop_in_for_nn_layernorm(kwargs, dtype, backend):
    shape = kwargs.pop("normalized_shape", 48)
    ln = _randomize(nn.LayerNorm(shape, eps=1e-5, **kwargs)).to(dtype)
    fused = FusedLayerNorm(shape, eps=1e-5, **kwargs).to(dtype)
    _same_keys_and_shapes(fused, ln)
    fused.load_state_dict(ln.state_dict())
    x = (torch.randn(4, 7, *((shape,) if isinstance(shape, int) else shape)) * 3 + 1).to(dtype)
    _check_same_function(fused, ln, x, dtype, "layer", 1e-5)


def _gemma_weights(module):
    with torch.no_grad():
        module.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))  # Gemma multiplies by (1 + w)
    return module


# HF RMSNorm flavour -> (how its weights are randomised, the FusedRMSNorm arguments, offset)
HF_RMSNORMS = {
    "llama": (LlamaRMSNorm, _randomize, dict(cast_mode="input"), 0.0),
    "gemma": (GemmaRMSNorm, _gemma_weights, dict(offset=1.0, cast_mode="float32"), 1.0),
    "t5": (T5LayerNorm, _randomize, dict(cast_mode="weight"), 0.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("flavour", list(HF_RMSNORMS))
def test_fused_rmsnorm_matches_the_hf_rmsnorm_flavours(flavour, dtype, backend):
    cls, randomise, kwargs, offset = HF_RMSNORMS[flavour]
    hf = randomise(cls(64, eps=1e-6)).to(dtype)
    fused = FusedRMSNorm(64, eps=1e-6, follow_autocast=False, **kwargs).to(dtype)
    _same_keys_and_shapes(fused, hf)
    fused.load_state_dict(hf.state_dict())
    _check_same_function(fused, hf, torch.randn(3, 5, 64).to(dtype), dtype, "rms", 1e-6, offset=offset)


def test_fused_rmsnorm_matches_llama_with_fp32_weight_and_bf16_activations(backend):
    """Mixed precision: the output dtype is promoted exactly as Llama's ``w * x.to(dtype)``."""
    hf = _randomize(LlamaRMSNorm(64))
    fused = FusedRMSNorm(64, cast_mode="input", follow_autocast=False)
    fused.load_state_dict(hf.state_dict())
    x = torch.randn(6, 64).to(torch.bfloat16)
    y, y_hf = fused(x), hf(x)
    assert y.dtype == y_hf.dtype == torch.float32
    # same casts in the same order: equal up to fp32 rounding of the statistics
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)


def test_fused_rmsnorm_matches_t5_with_mixed_dtypes(backend):
    """T5 rounds to the weight's dtype: fp32 weight + bf16 input gives an unrounded fp32 output;
    bf16 weight + fp32 input gives bf16."""
    for w_dtype, x_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        hf = _randomize(T5LayerNorm(64)).to(w_dtype)
        fused = FusedRMSNorm(64, cast_mode="weight", follow_autocast=False).to(w_dtype)
        fused.load_state_dict(hf.state_dict())
        x = torch.randn(6, 64).to(x_dtype)
        y, y_hf = fused(x), hf(x)
        assert y.dtype == y_hf.dtype == w_dtype
        torch.testing.assert_close(y, y_hf)


def test_fresh_modules_start_as_identity_affine():
    x = torch.randn(5, 32)
    torch.testing.assert_close(FusedRMSNorm(32)(x), FusedRMSNorm(32, elementwise_affine=False)(x))
    torch.testing.assert_close(FusedRMSNorm(32, offset=1.0)(x), FusedRMSNorm(32, elementwise_affine=False)(x))
    assert torch.equal(FusedRMSNorm(32, offset=1.0).weight, torch.zeros(32))
    torch.testing.assert_close(FusedLayerNorm(32)(x), nn.LayerNorm(32)(x))


def test_device_and_dtype_arguments_and_parameters_are_ordinary():
    m = FusedRMSNorm(16, bias=True, dtype=torch.bfloat16, device="cpu")
    assert m.weight.dtype == m.bias.dtype == torch.bfloat16
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m(torch.randn(3, 16, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    before = m.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m.weight)


@pytest.mark.parametrize("cls", [FusedRMSNorm, FusedLayerNorm])
def test_the_forward_reads_the_parameters_the_module_holds_now(cls):
    """The forward reads weight and bias from ``_parameters`` (quicker than ``nn.Module``'s
    attribute lookup): what it uses must still be whatever the module holds now: a new
    Parameter, a bias registered as None (``bias=False`` registers it so, as nn.Linear does),
    or, after a ``del``, a plain tensor attribute of that name. Against float64."""
    kind = "rms" if cls is FusedRMSNorm else "layer"
    m = cls(32, bias=False)
    assert "bias" in m._parameters and m.bias is None and [n for n, _ in m.named_parameters()] == ["weight"]
    x = torch.randn(4, 32)
    w, b = torch.randn(32), torch.randn(32)
    m.weight = nn.Parameter(w.clone())
    with torch.no_grad():
        torch.testing.assert_close(m(x).double(), norm_fp64(kind, x, w, None, m.eps), rtol=2e-6, atol=2e-6)
        del m.bias
        m.bias = b.clone()  # a plain attribute now, not a parameter
        assert "bias" not in m._parameters
        torch.testing.assert_close(m(x).double(), norm_fp64(kind, x, w, b, m.eps), rtol=2e-6, atol=2e-6)


def _settled(module):
    """``module`` after one call of 16 float32 values, which settles a FusedRMSNorm on the
    compiled CPU kernel where it serves (with ``HF_RMSNORM_BACKEND=auto``)."""
    with torch.no_grad():
        module(torch.randn(2, 16))
    return module


def _cpu_kernel_or_skip():
    from hf_rmsnorm.ops import _cpu_kernel

    if _cpu_kernel.op() is None:
        pytest.skip(f"the compiled CPU kernel is not available here: {_cpu_kernel.unavailable_reason()}")


@pytest.mark.parametrize("case", ["as_built", "strided_weight", "no_rows", "fp16_bias", "backend_torch"])
def test_the_rms_modules_cpu_shortcut_takes_the_kernel_only_where_it_can(case, monkeypatch, compiled_calls):
    """FusedRMSNorm's CPU shortcut hands its parameters to the compiled operator without
    checking their layout in Python (``_kernel_call_for_module``): the operator checks them and
    refuses, and the module then answers through torch ops. Whatever the case, the output is
    the norm (against float64); the kernel runs exactly where it can: contiguous parameters of
    its dtypes, at least one row, ``HF_RMSNORM_BACKEND`` not ``torch``."""
    _cpu_kernel_or_skip()
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch" if case == "backend_torch" else "auto")
    g = torch.Generator().manual_seed(3)
    m = FusedRMSNorm(64, eps=1e-5, bias=True)
    w, b = 1 + 0.3 * torch.randn(64, generator=g), 0.1 * torch.randn(64, generator=g)
    x = torch.randn(0 if case == "no_rows" else 5, 64, generator=g) * 2 + 0.5
    if case == "strided_weight":  # every other value of a longer tensor: not contiguous
        m.weight = nn.Parameter(torch.stack([w, torch.full_like(w, 7.0)], dim=1).reshape(-1)[::2])
        assert not m.weight.is_contiguous()
    else:
        m.weight = nn.Parameter(w.clone())
    m.bias = nn.Parameter(b.clone().half() if case == "fp16_bias" else b.clone())
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    truth = norm_fp64("rms", x, w, m.bias.detach().float(), 1e-5)
    torch.testing.assert_close(y.double(), truth, rtol=2e-6, atol=2e-6)
    assert compiled_calls() == (1 if case == "as_built" else 0)


@pytest.mark.parametrize("transform", ["forward_ad", "jvp", "vmap", "grad_x"])
# only FusedRMSNorm settles on the CPU (FusedLayerNorm calls torch's own layer_norm there)
@pytest.mark.parametrize("cls,settled", [(FusedRMSNorm, False), (FusedRMSNorm, True), (FusedLayerNorm, False)],
                         ids=["rms", "rms_settled", "layer"])
def test_modules_under_torch_func_transforms_and_forward_ad(cls, settled, transform, compiled_calls):
    """A module's CPU shortcut, and a FusedRMSNorm's settled call, must not take the compiled
    kernel under a transform (it has no forward mode and no functorch rules): the tangents and
    gradients are the norm's, against float64, and the kernel did not run."""
    from test_ops_behaviour import _transformed

    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(6, 24, generator=g) * 2 + 0.5, torch.randn(6, 24, generator=g)
    w, b = 1 + 0.3 * torch.randn(24, generator=g), 0.1 * torch.randn(24, generator=g)
    m = cls(24, eps=1e-5, bias=True)
    m.weight, m.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    kind = "rms" if cls is FusedRMSNorm else "layer"
    if settled:
        _cpu_kernel_or_skip()
        _settle_on_the_cpu_kernel(m, x)
    calls = compiled_calls()
    got = _transformed(transform, lambda x, w, b: m(x), x, w, b, t)
    truth = _transformed(transform, lambda x, w, b: norm_fp64(kind, x, w, b, 1e-5), x.double(), w.double(), b.double(),
                         t.double())
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)
    assert compiled_calls() == calls


@pytest.mark.parametrize("cls,kind,torch_cls", [(FusedRMSNorm, "rms", nn.RMSNorm), (FusedLayerNorm, "layer", nn.LayerNorm)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_module_without_a_shape_normalises_the_last_dim_at_any_width(cls, kind, torch_cls, dtype, backend):
    """normalized_shape=None, as the weightless HF norms (Llama 4's q/k norm, NanoChat's) have
    it: one instance takes any width, each call against torch's own module of that width and
    float64; widths alternate so that a call settled at one width meets another."""
    eps = 1e-6
    module = cls(None, eps=eps, elementwise_affine=False)
    for width in (64, 24, 64, 24):
        x = (torch.randn(3, 5, width) * 2 + 0.5).to(dtype)
        _check_same_function(module, torch_cls(width, eps=eps, elementwise_affine=False).to(dtype), x, dtype, kind, eps)


def test_extra_repr_is_readable():
    assert repr(FusedRMSNorm(None, elementwise_affine=False)).startswith("FusedRMSNorm(None, eps=1e-06, elementwise_affine=False")
    assert repr(FusedLayerNorm(768)) == "FusedLayerNorm(768, eps=1e-05, elementwise_affine=True, bias=True, cast_mode=float32)"
    r = repr(FusedRMSNorm(2048, eps=1e-6, offset=1.0, cast_mode="float32", follow_autocast=False))
    assert r == "FusedRMSNorm(2048, eps=1e-06, elementwise_affine=True, bias=False, offset=1.0, cast_mode=float32, follow_autocast=False)"
    assert "(3, 16)" in repr(FusedLayerNorm((3, 16)))


@pytest.mark.parametrize(
    "ctor,message",
    [
        (lambda: FusedRMSNorm(0.5), "normalized_shape must be a positive int"),
        (lambda: FusedRMSNorm(None), r"normalized_shape=None \(the last dim, any width\) is for a norm without parameters"),
        (lambda: FusedLayerNorm(None, bias=False), "pass the weight's shape, or elementwise_affine=False"),
        (lambda: FusedRMSNorm(8, cast_mode="llama"), "cast_mode must be one of"),
        (lambda: FusedRMSNorm(8, elementwise_affine=False, offset=1.0), "needs elementwise_affine=True"),
        (lambda: FusedLayerNorm(8, eps=-1e-5), "eps must be a non-negative number"),
        (lambda: FusedRMSNorm(8, eps="1e-6"), "eps must be a non-negative number"),
        (lambda: FusedRMSNorm(8, eps=float("nan")), "eps must be a non-negative number, got nan"),
    ],
)
def test_bad_construction_is_a_clear_error(ctor, message):
    with pytest.raises(ValueError, match=message):
        ctor()


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"normalises the last dims \(3, 16\), but got an input of shape \(2, 16, 3\)"):
        FusedLayerNorm((3, 16))(torch.randn(2, 16, 3))


# (module, weight/bias dtype: None = x's): every way a module reaches its torch reference
SHORTCUT_CASES = {
    "layernorm": (lambda: FusedLayerNorm(64), None),
    "layernorm_fp32_params": (lambda: FusedLayerNorm(64), torch.float32),
    "layernorm_no_affine": (lambda: FusedLayerNorm(64, elementwise_affine=False), None),
    "layernorm_any_width": (lambda: FusedLayerNorm(None, elementwise_affine=False), None),
    "rmsnorm_any_width": (lambda: FusedRMSNorm(None, elementwise_affine=False), None),
    "llama": (lambda: FusedRMSNorm(64, cast_mode="input", follow_autocast=False), None),
    "gemma": (lambda: FusedRMSNorm(64, offset=1.0, follow_autocast=False), None),
    "t5_fp32_weight": (lambda: FusedRMSNorm(64, cast_mode="weight", follow_autocast=False), torch.float32),
    "converted_rms_bias": (lambda: FusedRMSNorm(64, eps=1e-5, bias=True), None),
}


def _module_against_its_op(case, dtype, after_each=lambda run, module: None, first=lambda module, x: None) -> None:
    """A module of ``SHORTCUT_CASES`` and its functional op with the module's arguments: output,
    every gradient and the no-grad output must be the very bits; ``after_each(run, module)`` is
    called after each of the two has run, ``first(module, x)`` before either."""
    from hf_rmsnorm.ops import layer_norm, rms_norm

    build, p_dtype = SHORTCUT_CASES[case]
    module = _randomize(build()).to(p_dtype or dtype)
    fn = layer_norm if isinstance(module, FusedLayerNorm) else rms_norm
    x = (torch.randn(3, 5, 64) * 2 + 0.5).to(dtype)
    first(module, x)
    dy = torch.randn(3, 5, 64)
    results = []
    for run in (module, lambda x: fn(x, module.weight, module.bias, module.eps, module.offset, module.cast_mode,
                                     follow_autocast=module.follow_autocast)):
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        y = run(leaf)
        y.backward(dy.to(y.dtype))
        results.append([y.detach(), leaf.grad] + [p.grad for p in module.parameters()])
        with torch.no_grad():
            results[-1].append(run(x))
        after_each(run, module)
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(SHORTCUT_CASES))
def test_modules_off_cuda_compute_the_bits_of_the_functional_op(case, dtype, monkeypatch):
    """Off CUDA a module goes straight to its torch reference, past the functional op's per-call
    checks: output and every gradient must be the very bits the functional op gives."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    _module_against_its_op(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(SHORTCUT_CASES))
def test_modules_on_the_kernels_compute_the_bits_of_the_functional_op(case, dtype, monkeypatch, launches):
    """On the kernels (CUDA, or the interpreter with ``HF_RMSNORM_BACKEND=triton``) a module with
    one normalised dimension goes to them past the functional op's per-call checks
    (``kernels_for_module``): output, every gradient and the no-grad output must be the very bits
    the functional op gives, the kernels must have run, and the general path's checks must not
    have (host time per norm in a training forward)."""
    from conftest import needs_interpreter
    from hf_rmsnorm.ops import _norm

    needs_interpreter("runs the kernels on CPU tensors")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    checks = []
    check_inputs = _norm.check_inputs
    monkeypatch.setattr(_norm, "check_inputs", lambda *a: checks.append(a) or check_inputs(*a))

    def checked(run, module):  # the module's two calls: none; the op's: two
        assert len(checks) == (0 if run is module else 2)
        checks.clear()

    _module_against_its_op(case, dtype, checked)
    assert launches() == 6  # forward and backward, then the forward without grad, twice


def _settle_on_the_cpu_kernel(module, x):
    """Call ``module`` once without grad: a FusedRMSNorm the compiled CPU kernel served keeps its
    settled call for the next ones (``rms_norm.settle_on_cpu``)."""
    from hf_rmsnorm.ops import _cpu_kernel

    with torch.no_grad():
        module(x)
    assert module._settled is not None and module._settled[1] is _cpu_kernel.settled_token


class _SettledCalls:
    """Records what the compiled CPU kernel's settled operator answered: True where it computed,
    False where it left the call to the general way (None)."""

    def __init__(self, monkeypatch):
        from hf_rmsnorm.ops import _cpu_kernel

        real, self.answers = _cpu_kernel.settled_op, []

        def settled_op(*args):
            y = real(*args)
            self.answers.append(y is not None)
            return y

        monkeypatch.setattr(_cpu_kernel, "settled_op", settled_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in SHORTCUT_CASES if not c.startswith("layernorm")])
def test_a_settled_rms_module_on_the_cpu_computes_the_bits_of_the_functional_op(case, dtype, monkeypatch,
                                                                                compiled_calls):
    """After its first call on the compiled CPU kernel, a FusedRMSNorm's calls of the same kind
    go to the kernel in one C++ call (``_cpu_kernel.settled_op``), past the module's shortcut:
    output, every gradient and the no-grad output must be the very bits the functional op gives,
    with the shortcut not asked and the settled operator computing every module call."""
    _cpu_kernel_or_skip()
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    settled, shortcut = _SettledCalls(monkeypatch), []

    def first(module, x):
        _settle_on_the_cpu_kernel(module, x)
        module._kernel = lambda *args: shortcut.append(args)  # the shortcut, should anything ask it

    _module_against_its_op(case, dtype, first=first)
    assert shortcut == [] and settled.answers == [True, True]  # with grad, without
    assert compiled_calls() == 1 + 3 + 3  # settling; forward, backward, no-grad forward by each


# (what changes after the module settled, what it then holds, and x): each goes the general way
_AFTER_SETTLING = {
    "autocast": lambda m, x: (m, x),  # the call is made under CPU autocast (below)
    "backend_torch": lambda m, x: (m, x),  # HF_RMSNORM_BACKEND=torch from then on (below)
    "bfloat16_input": lambda m, x: (m, x.bfloat16()),
    "float16_bias": lambda m, x: (_with(m, bias=m.bias.detach().half()), x),
    "strided_weight": lambda m, x: (_with(m, weight=torch.stack([m.weight.detach()] * 2, 1).reshape(-1)[::2]), x),
    "no_weight": lambda m, x: (_with(m, weight=None), x),
    "no_rows": lambda m, x: (m, x[:0]),
    "negative_view": lambda m, x: (m, torch._neg_view(-x)),  # the values of x, negated lazily twice over
    "tensor_subclass": lambda m, x: (m, _Doubling(x)),
}


def _with(module, **params):
    for name, value in params.items():
        setattr(module, name, None if value is None else nn.Parameter(value.clone() if value.is_contiguous() else value))
    return module


class _Doubling(torch.Tensor):
    """A tensor subclass whose ops see the values doubled (what a kernel reading its memory would
    miss): torch ops on it compute on 2x."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device)

    def __init__(self, data):
        self.data_ = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda a: a.data_ * 2 if isinstance(a, _Doubling) else a  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


@pytest.mark.parametrize("case", list(_AFTER_SETTLING))
def test_a_settled_rms_module_leaves_to_the_general_way_what_its_kind_does_not_cover(case, monkeypatch,
                                                                                    compiled_calls):
    """Whatever differs from the call a FusedRMSNorm settled on (a dtype, a parameter replaced, no
    rows, a lazily negated or wrapped input, autocast, the torch backend) is refused by the settled
    operator and goes the general way: the output is the norm of what the module holds and gets,
    against float64 (or, under autocast, the functional op's own answer there)."""
    from hf_rmsnorm.ops import rms_norm

    _cpu_kernel_or_skip()
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    g = torch.Generator().manual_seed(6)
    m = _randomize(FusedRMSNorm(64, eps=1e-5, bias=True))
    x = torch.randn(5, 64, generator=g) * 2 + 0.5
    _settle_on_the_cpu_kernel(m, x)
    m, x = _AFTER_SETTLING[case](m, x)
    settled = _SettledCalls(monkeypatch)
    if case == "backend_torch":
        monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    calls = compiled_calls()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = m(x)
        if case == "autocast":
            truth = rms_norm(x, m.weight, m.bias, m.eps, follow_autocast=True)
    assert settled.answers == [False]
    if case != "autocast":
        values = x.data_ * 2 if case == "tensor_subclass" else x.resolve_neg()
        weight, bias = (None if p is None else p.detach().float() for p in (m.weight, m.bias))
        truth = norm_fp64("rms", values.float(), weight, bias, m.eps).to(y.dtype)
    assert y.shape == x.shape and y.dtype == truth.dtype
    torch.testing.assert_close(y.double(), truth.double(), rtol=1e-2 if y.dtype == torch.bfloat16 else 2e-6,
                               atol=1e-2 if y.dtype == torch.bfloat16 else 2e-6)
    if case == "backend_torch":
        assert compiled_calls() == calls


def test_a_settled_rms_module_copied_or_pickled_settles_afresh():
    """A module's settled call names a kind of this process's operator table: a copy or an
    unpickled module (possibly in another process) holds a stale token, goes the general way once,
    settles again, and computes as the original."""
    import copy
    import pickle

    from hf_rmsnorm.ops import _cpu_kernel

    _cpu_kernel_or_skip()
    m = _randomize(FusedRMSNorm(64, eps=1e-5, bias=True))
    x = torch.randn(5, 64)
    _settle_on_the_cpu_kernel(m, x)
    with torch.no_grad():
        for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert twin._settled[1] is not _cpu_kernel.settled_token
            assert torch.equal(twin(x), m(x)) and twin._settled[1] is _cpu_kernel.settled_token


def test_torch_jit_trace_of_a_settled_rms_module_records_the_checked_operator():
    """torch.jit.trace records the operators a call makes and replays them as they are: a
    settled call's operator, whose answer depends on more than its arguments (None included),
    must not be among them. The trace records the operator that checks its arguments (and raises
    where they differ), replays the module's bits, and tracing does not warn."""
    import warnings

    _cpu_kernel_or_skip()
    m = _randomize(FusedRMSNorm(64, eps=1e-5, bias=True))
    x = torch.randn(5, 64)
    _settle_on_the_cpu_kernel(m, x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # the trace may not generalise
        traced = torch.jit.trace(m, x)
        kinds = [node.kind().split("::")[-1] for node in traced.graph.nodes()]
        assert "rms_norm" in kinds and "rms_norm_settled" not in kinds
        assert torch.equal(traced(x), m(x))


@pytest.mark.parametrize("cls", [FusedRMSNorm, FusedLayerNorm])
def test_torch_jit_trace_of_a_module_on_the_kernels_replays_the_kernels(cls, monkeypatch, launches):
    """On the kernels (CUDA; here the interpreter) torch.jit.trace records the kernels' custom op,
    whose trace then replays on other inputs: the output and x's gradient are the eager module's
    very bits (the launchers, had they run while the trace recorded, would have seen x's sizes
    as tensors and failed)."""
    from conftest import needs_interpreter

    needs_interpreter("runs the kernels on CPU tensors")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    m = _randomize(cls(64, eps=1e-5, bias=True))
    g = torch.Generator().manual_seed(7)
    x, other = (torch.randn(5, 64, generator=g) * 2 + 0.5 for _ in range(2))
    traced = torch.jit.trace(m, x.requires_grad_(True), check_trace=False)
    assert "norm_fwd" in [node.kind().split("::")[-1] for node in traced.graph.nodes()]
    dy = torch.randn(5, 64, generator=g)
    results = []
    for run in (traced, m):
        leaf = other.clone().requires_grad_(True)
        y = run(leaf)
        y.backward(dy)
        results.append((y.detach(), leaf.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert launches() > 0


@pytest.mark.parametrize("case", ["autocast", "float64_weight", "offset_without_weight", "vmap", "torch_backend"])
def test_the_kernel_shortcut_leaves_to_the_general_path_what_it_does_not_check(case, monkeypatch, launches):
    """Whatever the module's shortcut to the kernels does not settle goes the general way, which
    applies autocast's policy, takes the torch path for other dtypes, refuses what is wrong with
    one message, or composes torch ops under torch.func: each against float64 (or the error)."""
    from conftest import needs_interpreter
    from hf_rmsnorm.ops import _norm

    needs_interpreter("runs the kernels on CPU tensors")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch" if case == "torch_backend" else "triton")
    g = torch.Generator().manual_seed(5)
    m = FusedLayerNorm(32)
    w, b = 1 + 0.3 * torch.randn(32, generator=g), 0.1 * torch.randn(32, generator=g)
    m.weight, m.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    x = torch.randn(4, 32, generator=g) * 2 + 0.5
    checks = []
    check_inputs = _norm.check_inputs
    monkeypatch.setattr(_norm, "check_inputs", lambda *a: checks.append(a) or check_inputs(*a))
    if case == "offset_without_weight":  # the offset is added to a weight that is gone
        m.offset = 1.0
        del m.weight
        m.weight = None
        with pytest.raises(ValueError, match="offset is added to the weight, but weight is None"):
            m(x)
        return
    if case == "autocast":
        from hf_rmsnorm.ops import layer_norm

        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x.bfloat16())
            assert len(checks) == 1
            assert torch.equal(y, layer_norm(x.bfloat16(), m.weight, m.bias, m.eps))  # the policy normalize applies
        torch.testing.assert_close(y.double(), norm_fp64("layer", x.bfloat16(), w, b, m.eps), rtol=2e-2, atol=2e-2)
        return
    elif case == "float64_weight":
        m.double()
        y = m(x.double())
        truth = norm_fp64("layer", x, w, b, m.eps)
    elif case == "vmap":
        y = torch.func.vmap(m)(x.unsqueeze(1)).squeeze(1)
        truth = norm_fp64("layer", x, w, b, m.eps)
    else:
        y = m(x)
        truth = norm_fp64("layer", x, w, b, m.eps)
    torch.testing.assert_close(y.double(), truth, rtol=1e-5, atol=1e-5)
    # the general path decided (with the torch backend the CPU shortcut, straight to torch ops)
    assert len(checks) == (0 if case == "torch_backend" else 1)
    assert launches() == 0


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: FusedRMSNorm(16)(torch.ones(2, 16, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
        (lambda: FusedLayerNorm(16).to("meta")(torch.randn(2, 16)), ValueError, "weight is on meta but x is on cpu"),
        # not handed to the compiled CPU kernel, which would read a meta tensor's null pointer as "no weight"
        (lambda: FusedRMSNorm(16, bias=True).to("meta")(torch.randn(2, 16)), ValueError, "weight is on meta but x is on cpu"),
        (lambda: FusedLayerNorm(16)(torch.randn(2, 15)), ValueError, r"normalises the last dims \(16,\)"),
        (lambda: FusedRMSNorm(16)(torch.randn(2, 15)), ValueError, r"normalises the last dims \(16,\)"),
        # without a weight whose length the kernel would check
        (lambda: FusedRMSNorm(16, elementwise_affine=False)(torch.randn(2, 15)), ValueError,
         r"normalises the last dims \(16,\)"),
        # the same after a call of the right kind settled the module on the compiled CPU kernel
        (lambda: _settled(FusedRMSNorm(16, elementwise_affine=False))(torch.randn(2, 15)), ValueError,
         r"normalises the last dims \(16,\)"),
        (lambda: _settled(FusedRMSNorm(16, bias=True)).to("meta")(torch.randn(2, 16)), ValueError,
         "weight is on meta but x is on cpu"),
        (lambda: FusedRMSNorm(None, elementwise_affine=False)(torch.tensor(2.0)), ValueError,
         "normalises the last dim, but got a 0-dim input"),
        (lambda: FusedLayerNorm(None, elementwise_affine=False)(torch.tensor(2.0)), ValueError,
         "normalises the last dim, but got a 0-dim input"),
    ],
    ids=["int_input", "other_device", "rmsnorm_other_device", "layernorm_shape", "rmsnorm_shape",
         "rmsnorm_no_affine_shape", "settled_no_affine_shape", "settled_other_device", "rmsnorm_any_width_0dim",
         "layernorm_any_width_0dim"],
)
@pytest.mark.parametrize("backend", ["auto", "triton"])  # triton: the module's shortcut to the kernels defers them
def test_bad_input_to_a_module_off_cuda_is_still_a_clear_error(call, error, message, backend, monkeypatch):
    """Wrong input gets the general way's one message, on every way a module takes (the shortcut,
    a settled call, the kernels' shortcut)."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", backend)
    with pytest.raises(error, match=message):
        call()
