"""Numerics of rms_norm and layer_norm, forward and every gradient, on both backends (the
Triton one interpreted on CPU tensors), against a float64 reference with the STYLE.md error
budget: within 2x PyTorch's own same-dtype error plus a small atol."""

import pytest
import torch

from conftest import FNS
from hf_rmsnorm.ops import layer_norm_ref, rms_norm_ref
from reference import assert_close_to_fp64, fwd_bwd, norm_fp64, norm_torch_same_dtype

REFS = {"rms": rms_norm_ref, "layer": layer_norm_ref}
EPS = {"rms": 1e-6, "layer": 1e-5}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _strided_rows(dtype):  # unit column stride, row stride 100: the kernel reads it in place
    return torch.randn(6, 100).to(dtype)[:, :64]


def _strided_cols(dtype):  # every other column: the launcher must make it contiguous first
    return torch.randn(6, 128).to(dtype)[:, ::2]


def _transposed(dtype):  # (5, 7, 3) viewed from a (3, 7, 5) tensor
    return torch.randn(3, 7, 5).to(dtype).transpose(0, 2)


SHAPES = [(1, 1), (3, 5, 7), (17, 1023), (150, 40), (4, 4096), (2, 8192), (0, 16), _strided_rows, _strided_cols, _transposed, (7,)]
# 150x40: ten 16-row tiles over 4 backward programs, the last tile partly masked
SHAPE_IDS = ["1x1", "3x5x7", "17x1023", "150x40", "4x4096", "2x8192", "0rows", "strided_rows", "strided_cols", "transposed", "1d"]

# (weight, bias, offset, weight dtype: None = x's dtype, cast_mode)
AFFINES = {
    "plain": (False, False, 0.0, None, "float32"),
    "w": (True, False, 0.0, None, "float32"),
    "wb": (True, True, 0.0, None, "float32"),
    "w_offset": (True, False, 1.0, None, "float32"),
    "w_fp32": (True, True, 0.0, torch.float32, "float32"),
    "llama": (True, False, 0.0, None, "input"),
    "llama_w_fp32": (True, False, 0.0, torch.float32, "input"),
    "t5": (True, False, 0.0, None, "weight"),
    "t5_w_fp32": (True, False, 0.0, torch.float32, "weight"),
}

# every shape with weight+bias; every affine variant on two representative shapes
CASES = [(s, i, "wb") for s, i in zip(SHAPES, SHAPE_IDS)] + [
    (s, i, a) for s, i in zip(SHAPES[1:3], SHAPE_IDS[1:3]) for a in AFFINES if a != "wb"
]


def make_inputs(shape, dtype, affine, seed=0):
    torch.manual_seed(seed)
    has_w, has_b, offset, w_dtype, cast_mode = AFFINES[affine]
    if callable(shape):
        x = shape(dtype)
        assert not x.is_contiguous()
    else:
        x = (torch.randn(shape) * 2 + 0.5).to(dtype)  # a non-zero mean: LayerNorm's centring matters
    n = x.shape[-1]
    w = (torch.randn(n) * 0.5 + (0.0 if offset else 1.0)).to(w_dtype or dtype) if has_w else None
    b = (torch.randn(n) * 0.1).to(w_dtype or dtype) if has_b else None
    return x, w, b, offset, cast_mode


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,shape_id,affine", CASES, ids=[f"{i}-{a}" for _, i, a in CASES])
def test_forward_and_gradients_against_float64(kind, dtype, shape, shape_id, affine, backend, launches, compiled_calls):
    x, w, b, offset, cast_mode = make_inputs(shape, dtype, affine)
    eps = EPS[kind]
    # every implementation and the fp64 truth see the same dy: representable in x's dtype
    dy = torch.randn(x.shape).to(dtype)

    y, *grads = fwd_bwd(lambda x, w, b: FNS[kind](x, w, b, eps, offset, cast_mode), x, w, b, dy)
    y64, *grads64 = fwd_bwd(lambda x, w, b: norm_fp64(kind, x, w, b, eps, offset), x.double(), w.double() if w is not None else None, b.double() if b is not None else None, dy)
    y_pt, *grads_pt = fwd_bwd(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps, offset, cast_mode), x, w, b, dy)

    assert y.shape == x.shape
    assert y.dtype == y_pt.dtype, "output dtype differs from PyTorch's for the same inputs"
    assert_close_to_fp64(y, y_pt, y64, dtype, "output")
    for name, g, g_pt, g64, t in zip("xwb", grads, grads_pt, grads64, (x, w, b)):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, f"grad of {name}: dtype/shape differ from the input's"
        assert_close_to_fp64(g, g_pt, g64, dtype, f"grad of {name}")

    if backend == "triton" and x.numel():
        assert launches() == 2, "the Triton forward and backward kernels did not both run"
    # the compiled CPU kernel takes RMSNorm on float32/bfloat16 rows of any layout, forward and backward
    takes_compiled = backend == "compiled" and kind == "rms" and dtype != torch.float16 and x.numel()
    assert compiled_calls() == (2 if takes_compiled else 0)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_weight_and_bias(kind, w_dtype, backend, launches):
    """Parameters that are strided views (every other element of a longer tensor, as a slice of
    a fused parameter would be): the kernels read parameters with unit stride, so they must be
    handed contiguous ones, and the gradients must reach the viewed elements of the base
    tensors, and only those."""
    torch.manual_seed(0)
    x = (torch.randn(6, 64) * 2 + 0.5).to(torch.bfloat16)
    w_base = (torch.randn(128) * 0.5 + 1).to(w_dtype)
    b_base = (torch.randn(128) * 0.1).to(w_dtype)
    dy = torch.randn(6, 64).to(torch.bfloat16)
    eps = EPS[kind]

    def views(fn):
        return lambda x, w, b: fn(x, w[::2], b[1::2])

    got = fwd_bwd(views(lambda x, w, b: FNS[kind](x, w, b, eps)), x, w_base, b_base, dy)
    pt = fwd_bwd(views(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps)), x, w_base, b_base, dy)
    truth = fwd_bwd(views(lambda x, w, b: norm_fp64(kind, x, w, b, eps)), x.double(), w_base.double(), b_base.double(), dy)
    for what, g, p, t in zip(["output", "grad x", "grad w", "grad b"], got, pt, truth):
        assert_close_to_fp64(g, p, t, torch.bfloat16, what)
    assert not got[2][1::2].any() and not got[3][::2].any()  # the elements no view holds get no gradient
    if backend == "triton":
        assert launches() == 2


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_lazily_negated_tensors_are_normalised_as_their_values(kind, backend, launches, compiled_calls):
    """A lazily negated tensor (the negation bit: ``torch._neg_view``, or the imaginary part of a
    conjugated complex tensor) keeps its values un-negated in memory, which is what the kernels
    read. As x, weight, bias and the output's gradient, each contiguous: output and gradients
    against float64, within twice PyTorch's own error, on every backend; the kernels still run."""
    torch.manual_seed(0)
    x = (torch.randn(6, 64) * 2 + 0.5).to(torch.bfloat16)
    w = (torch.randn(64) * 0.5 + 1).to(torch.bfloat16)
    b = (torch.randn(64) * 0.1).to(torch.bfloat16)
    dy = torch.randn(6, 64).to(torch.bfloat16)
    eps = EPS[kind]

    def negated(fn):  # the values of x, w and b, each held negated twice over
        return lambda x, w, b: fn(*(torch._neg_view(-t) for t in (x, w, b)))

    lazy_dy = torch._neg_view(-dy)
    assert all(t.is_neg() and t.is_contiguous() for t in (torch._neg_view(-x), lazy_dy))
    got = fwd_bwd(negated(lambda x, w, b: FNS[kind](x, w, b, eps)), x, w, b, lazy_dy)
    pt = fwd_bwd(negated(lambda x, w, b: norm_torch_same_dtype(kind, x, w, b, eps)), x, w, b, dy)
    truth = fwd_bwd(negated(lambda x, w, b: norm_fp64(kind, x, w, b, eps)), x.double(), w.double(), b.double(), dy)
    for what, g, p, t in zip(["output", "grad x", "grad w", "grad b"], got, pt, truth):
        assert_close_to_fp64(g, p, t, torch.bfloat16, what)
    if backend == "triton":
        assert launches() == 2
    if backend == "compiled" and kind == "rms":
        assert compiled_calls() == 2


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_reference_equals_float64_definition_in_float64(kind):
    """The torch reference itself (the CPU path) is the textbook formula: checked in fp64."""
    x, w, b, _, _ = make_inputs((4, 33), torch.float64, "wb")
    for offset in (0.0, 1.0):
        torch.testing.assert_close(REFS[kind](x, w, b, 1e-5, offset), norm_fp64(kind, x, w, b, 1e-5, offset), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("hidden", [65536, 65537])
def test_largest_rows_and_fallback_beyond_the_kernel_limit(kind, hidden, launches, monkeypatch):
    """65536 runs on the kernel; beyond it the torch path takes over instead of failing."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    x, w, b, _, _ = make_inputs((2, hidden), torch.bfloat16, "wb")
    y = FNS[kind](x, w, b, EPS[kind])
    y64 = norm_fp64(kind, x, w, b, EPS[kind])
    assert_close_to_fp64(y, norm_torch_same_dtype(kind, x, w, b, EPS[kind]), y64, torch.bfloat16, "output")
    if launches is not None:
        assert launches() == (1 if hidden <= 65536 else 0)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_float64_input_takes_the_torch_path_in_float64(kind, backend, launches):
    x, w, b, _, _ = make_inputs((5, 40), torch.float64, "wb")
    torch.testing.assert_close(FNS[kind](x, w, b, 1e-5), norm_fp64(kind, x, w, b, 1e-5), rtol=1e-12, atol=1e-12)
    if backend == "triton":
        assert launches() == 0
