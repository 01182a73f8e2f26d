"""The fused modules, one of each kind a model gets, with their float64 definitions: what the
tests of tracing and distribution (torch.export, DTensor) run through those paths and check
against float64, forward and every gradient."""

import torch

from hf_rmsnorm import FusedGatedRMSNorm, FusedLayerNorm, FusedRMSNorm
from reference import gated_fp64, norm_fp64

N, GROUP = 32, 8

# name -> (a module of N features, its float64 definition of (x, gate, {parameter name: value}))
CASES = {
    "rmsnorm": (lambda: FusedRMSNorm(N), lambda x, z, p: norm_fp64("rms", x, p["weight"])),
    "rmsnorm+bias (exact conversion)": (lambda: FusedRMSNorm(N, bias=True),
                                        lambda x, z, p: norm_fp64("rms", x, p["weight"], p["bias"])),
    "rmsnorm, Gemma's offset": (lambda: FusedRMSNorm(N, offset=1.0), lambda x, z, p: norm_fp64("rms", x, p["weight"], offset=1.0)),
    "layernorm": (lambda: FusedLayerNorm(N), lambda x, z, p: norm_fp64("layer", x, p["weight"], p["bias"], eps=1e-5)),
    "gated, Mamba2's order in groups": (lambda: FusedGatedRMSNorm(N, group_size=GROUP),
                                        lambda x, z, p: gated_fp64(x, z, p["weight"], 1e-6, GROUP, False, "silu")),
    "gated, Qwen3-Next's order": (lambda: FusedGatedRMSNorm(N, norm_before_gate=True),
                                  lambda x, z, p: gated_fp64(x, z, p["weight"], 1e-6, None, True, "silu")),
}


def make(case: str, dtype) -> torch.nn.Module:
    """The case's module in ``dtype``, its parameters random (weights near 1, biases near 0)."""
    module = CASES[case][0]().to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name == "weight" else 0.0))
    return module


def call(norm, x, gate):
    """The norm as a model's layer calls it: on x, and on the gate where it takes one."""
    return norm(x, gate) if isinstance(norm, FusedGatedRMSNorm) else norm(x)


def inputs(dtype, seed=1, rows=(3, 5)):
    """(x, gate, dy) of shape (*rows, N) in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*rows, N, generator=g).to(dtype) for _ in range(3))


def assert_matches_fp64(case, dtype, y, grads: dict, x, gate, params: dict, dy):
    """y and the gradients (``grads``: "x", "gate" and each parameter's name -> what the call
    gave) against the case's float64 definition at the same inputs and parameter values: fp32 to
    a tight tolerance, bf16 to the format's few roundings (the kernels round a value once or
    twice, a weight gradient's fp32 sum once), relative to the tensor's largest value."""
    x64, z64 = x.double().requires_grad_(True), gate.double().requires_grad_(True)
    p64 = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    truth = CASES[case][1](x64, z64, p64)
    truth.backward(dy.double())
    want = {"x": x64.grad, **{k: v.grad for k, v in p64.items()}}
    if z64.grad is not None:  # the gated norms
        want["gate"] = z64.grad
    for what, expected, got in [("y", truth.detach(), y)] + [(f"d{k}", v, grads.get(k)) for k, v in want.items()]:
        assert got is not None, f"{case}: no {what}"
        rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2**-6, 2**-6 * expected.abs().max().item())
        torch.testing.assert_close(got.detach().double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{case}, {what}: {m}")


class Calling(torch.nn.Module):
    """A model's layer around the norm: what torch.export takes (x and the gate as inputs)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, gate):
        return call(self.norm, x, gate)


def run_and_check(case, dtype, fn, params: dict, x, gate, dy):
    """``fn(x, gate)`` called on copies of x and the gate that require grad, then its backward
    with ``dy``: y and every gradient (``params``: name -> the parameter ``fn`` reads) against
    the case's float64 definition. Returns y."""
    xs, zs = x.clone().requires_grad_(True), gate.clone().requires_grad_(True)
    y = fn(xs, zs)
    y.backward(dy)
    grads = {"x": xs.grad, "gate": zs.grad, **{k: v.grad for k, v in params.items()}}
    assert_matches_fp64(case, dtype, y, grads, x, gate, params, dy)
    return y


def export_and_check(case, dtype, device="cpu"):
    """Export the case's module (in a ``Calling``) and check the program against float64: called
    with gradients, every gradient; then without, the same y. Returns the ExportedProgram."""
    x, gate, dy = (t.to(device) for t in inputs(dtype))
    exported = torch.export.export(Calling(make(case, dtype).to(device)), (x, gate))
    program = exported.module()
    params = {k.removeprefix("norm."): v for k, v in program.named_parameters()}
    y = run_and_check(case, dtype, program, params, x, gate, dy)
    with torch.no_grad():
        torch.testing.assert_close(program(x, gate), y.detach(), rtol=0, atol=0)
    return exported


def trace_and_check(case, dtype, traced_with_grad: bool, device="cpu"):
    """torch.jit.trace the case's module (in a ``Calling``), with x requiring grad or not, and
    replay the trace against float64: at the traced shape and at another, with gradients, then
    without. A trace records the ops one call ran and replays them for every later call,
    whatever it sees then."""
    norm = make(case, dtype).to(device)
    wrapper = Calling(norm)
    x, gate, _ = (t.to(device) for t in inputs(dtype))
    with torch.set_grad_enabled(traced_with_grad):
        traced = torch.jit.trace(wrapper, (x.clone().requires_grad_(traced_with_grad), gate), check_trace=False)
    params = dict(norm.named_parameters())
    for rows in ((3, 5), (2, 7)):
        x, gate, dy = (t.to(device) for t in inputs(dtype, seed=2, rows=rows))
        y = run_and_check(case, dtype, traced, params, x, gate, dy)
        norm.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch.testing.assert_close(traced(x, gate), y.detach(), rtol=0, atol=0)


def onnx_export_and_check(case, dynamo: bool, path, device="cpu"):
    """Export the case's module (fp32, in a ``Calling``) on ``device`` with torch.onnx (its
    default exporter, or with ``dynamo=False`` its TorchScript one), at one shape with the leading
    dims dynamic; run the file in ONNX Runtime (CPU) at another shape and check it against the
    float64 definition (``onnx_session`` asserts ONNX's standard operators only)."""
    module = Calling(make(case, torch.float32).to(device)).eval()
    x, gate, _ = (t.to(device) for t in inputs(torch.float32))
    rows = {0: "batch", 1: "sequence"}
    torch.onnx.export(module, (x, gate), str(path), input_names=["x", "gate"], dynamic_axes={"x": rows, "gate": rows},
                      dynamo=dynamo, verbose=False)
    session = onnx_session(path)
    x, gate, _ = inputs(torch.float32, seed=2, rows=(2, 7))
    (got,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, gate))})
    params = {k.removeprefix("norm."): v.detach().cpu().double() for k, v in module.named_parameters()}
    want = CASES[case][1](x.double(), gate.double(), params)
    torch.testing.assert_close(torch.from_numpy(got).double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case}: {m}")


def aoti_package_and_check(case, path, device="cpu"):
    """Export the case's module (fp32, in a ``Calling``) on ``device`` with its leading dims
    dynamic, compile the program to an AOTInductor package at ``path``, and run the package at
    another shape against the float64 definition. Returns the ExportedProgram and the package's
    inputs and float64 outputs (for a run elsewhere)."""
    module = Calling(make(case, torch.float32).to(device)).eval()
    x, gate, _ = (t.to(device) for t in inputs(torch.float32))
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("sequence", min=2, max=64)}
    program = torch.export.export(module, (x, gate), dynamic_shapes=(dims, dims))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    x, gate, _ = (t.to(device) for t in inputs(torch.float32, seed=2, rows=(2, 7)))
    params = {k.removeprefix("norm."): v.detach().cpu().double() for k, v in module.named_parameters()}
    want = CASES[case][1](x.cpu().double(), gate.cpu().double(), params)
    got = torch._inductor.aoti_load_package(str(path))(x, gate)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case}: {m}")
    return program, (x, gate), want


def onnx_session(path):
    """The ONNX file at ``path`` in an ONNX Runtime session (CPU), after asserting that every
    node is one of ONNX's standard operators (ONNX has none for the kernels' custom op)."""
    import onnx
    import onnxruntime

    foreign = {f"{n.domain}::{n.op_type}" for n in onnx.load(str(path)).graph.node if n.domain not in ("", "ai.onnx")}
    assert not foreign, f"{path.name}: operators outside ONNX's standard set: {sorted(foreign)}"
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
