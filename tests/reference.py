"""Independent references for the tests: the norms written from their definitions in float64,
and the error-budget rule from STYLE.md.

The float64 maths is the ground truth; the "PyTorch same-dtype" implementation is the
yardstick for how much error a given dtype makes unavoidable. A result passes when its error
against float64 is within 2x the yardstick's error plus a small atol (flash-attention's rule).
"""

import torch
import torch.nn.functional as F

# small absolute slack on top of 2x the yardstick's error, per dtype (about 1/64 of an ulp at 1.0)
ATOL = {torch.float32: 1e-6, torch.float16: 2e-5, torch.bfloat16: 1e-4, torch.float64: 1e-12}


def norm_fp64(kind, x, weight=None, bias=None, eps=1e-6, offset=0.0):
    """y = (x - [mean]) / sqrt(mean((x - [mean])²) + eps) * (offset + w) + b, in float64."""
    x = x.double()
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.double() + offset)
    if bias is not None:
        y = y + bias.double()
    return y


def norm_torch_same_dtype(kind, x, weight=None, bias=None, eps=1e-6, offset=0.0, cast_mode="float32"):
    """What plain PyTorch computes in the input's own dtype: its native op where one computes
    this function, otherwise the eager composition that HF modules use."""
    native_dtypes = all(p is None or p.dtype == x.dtype for p in (weight, bias))
    if cast_mode == "float32" and offset == 0.0 and native_dtypes:
        if kind == "layer":
            return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
        if bias is None:
            return F.rms_norm(x, x.shape[-1:], weight, eps)
    n = F.layer_norm(x, x.shape[-1:], None, None, eps) if kind == "layer" else F.rms_norm(x, x.shape[-1:], None, eps)
    if cast_mode == "weight":  # T5: w * n.to(w.dtype)
        n = n.to(weight.dtype)
    if cast_mode in ("input", "weight"):  # Llama: w * n, promoted
        y = n * (weight + offset) if weight is not None else n
        return y + bias if bias is not None else y
    y = n * (weight.to(x.dtype) + offset) if weight is not None else n
    return y + bias.to(x.dtype) if bias is not None else y


def norm_inputs(m=64, n=300, dtype=torch.bfloat16, seed=0):
    """Random (x, weight, bias, dy) for a norm over rows of n: x, weight and bias requiring
    gradients, weight near 1 and bias near 0, as a trained model has them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype).requires_grad_(True)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype).requires_grad_(True)
    dy = torch.randn(m, n, generator=g).to(dtype)
    return x, w, b, dy


def fwd_bwd(fn, x, w, b, dy):
    """Forward + backward of ``fn(x, w, b)`` on fresh leaves; returns [y, dx, dw, db] (None for an
    absent input). Gated norms pass ``(x, gate, weight)`` in those places."""
    x, w, b = (None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [None if t is None else t.grad for t in (x, w, b)]


def second_order(fn, x, w, b, dy):
    """Gradients of x and w, as a graph, then the gradient of their squared norm: what a
    gradient penalty computes. Returns [dx, dw, d²/dx, d²/dw] on fresh leaves."""
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    gx, gw = torch.autograd.grad((fn(x, w, b) * dy).sum(), (x, w), create_graph=True)
    ((gx**2).sum() + (gw**2).sum()).backward()
    return [gx.detach(), gw.detach(), x.grad, w.grad]


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_fp64(got, yardstick, truth, dtype, what):
    """|got - truth| <= 2 |yardstick - truth| + atol, elementwise max."""
    err, budget = max_err(got, truth), 2 * max_err(yardstick, truth) + ATOL[dtype]
    assert err <= budget, f"{what}: error {err:.3g} vs fp64 exceeds budget {budget:.3g} (2x PyTorch's same-dtype error + atol)"


def gated_fp64(x, gate, weight, eps, group_size, norm_before_gate, activation, offset=0.0):
    """The gated RMSNorm from its definition, in float64: act(z) = z/(1+e^-z) (silu) or
    1/(1+e^-z) (sigmoid); each group of ``group_size`` of h = x·act(z) (or of x, with the gate
    after) divided by its root mean square, times (offset + the weight) (times act(z), gate
    after)."""
    x = x.double()
    n_cols = x.shape[-1]
    size = group_size or n_cols
    a = None
    if gate is not None:
        z = gate.double()
        a = z / (1 + torch.exp(-z)) if activation == "silu" else 1 / (1 + torch.exp(-z))
    h = x * a if a is not None and not norm_before_gate else x
    groups = h.reshape(*h.shape[:-1], n_cols // size, size)
    y = (groups / torch.sqrt((groups * groups).mean(-1, keepdim=True) + eps)).reshape(h.shape)
    if weight is not None:
        y = y * (weight.double() + offset)
    return y * a if a is not None and norm_before_gate else y


def gated_torch_same_dtype(x, gate, weight, eps, group_size, norm_before_gate, activation, cast_mode, offset=0.0):
    """The gated norm as the HF classes compute it eagerly: Mamba2's ``w * n.to(dtype)`` and
    Qwen3-Next's ``(w * n.to(dtype)) * act(gate)`` (cast_mode "input"); Kimi's and FalconH1's
    all-fp32 order, cast at the end ("float32"), which Qwen4-Exp's grouped norm takes with its
    weight stored as w - 1 (``offset`` 1: ``n * (1 + w.float())``)."""
    dtype, n_cols = x.dtype, x.shape[-1]
    size = group_size or n_cols
    act = F.silu if activation == "silu" else torch.sigmoid
    h = x.float()
    if gate is not None and not norm_before_gate:
        h = h * act(gate.float())
    groups = h.unflatten(-1, (n_cols // size, size))
    n = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    if cast_mode == "input":
        y = n.to(dtype)
        if weight is not None:  # an offset added in fp32, the product rounded as without one
            y = weight * y if not offset else ((weight.float() + offset) * y).to(torch.promote_types(dtype, weight.dtype))
        return (y * act(gate.float())).to(dtype) if gate is not None and norm_before_gate else y
    y = (weight.float() + offset) * n if weight is not None else n
    return (y * act(gate.float()) if gate is not None and norm_before_gate else y).to(dtype)
