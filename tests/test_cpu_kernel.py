"""The compiled CPU RMSNorm (ops/_cpu_kernel.py): how it is built, cached and refused, and what
does not depend on the machine. Its numerics on every shape and affine are in test_ops.py (the
"compiled" backend), against float64."""

import os
import re
import subprocess

import pytest
import torch

from hf_rmsnorm.ops import _cpu_kernel, rms_norm
from reference import assert_close_to_fp64, fwd_bwd, norm_fp64, norm_inputs, norm_torch_same_dtype

needs_kernel = pytest.mark.skipif(
    _cpu_kernel.op() is None, reason=f"the compiled CPU kernel is not available here: {_cpu_kernel.unavailable_reason()}"
)
# the library this process loaded (None without one): the fresh_build fixture forgets it
BUILT = _cpu_kernel.built_path()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The kernel's module as in a new process, its cache in an empty folder."""
    monkeypatch.setenv(_cpu_kernel.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    for name, value in (("_op", _cpu_kernel._UNBUILT), ("_ops", None), ("_path", None), ("_reason", None), ("_gated", None)):
        monkeypatch.setattr(_cpu_kernel, name, value)
    return tmp_path


def _library_copier(monkeypatch):
    """Stands in for the compiler: copies the library this process built at import (needs_kernel)
    to where a build would write. For tests of where a build goes and how it is announced; that
    a build compiles and is cached is test_the_build_is_cached_and_loaded_without_compiling_again's,
    and each real build costs about 40 s of a 2-core CI machine."""
    import shutil

    assert BUILT is not None and BUILT.exists()
    compiled = []

    def copy(cxx, out, namespace, openmp, **kwargs):
        compiled.append(out)
        shutil.copy(BUILT, out)

    monkeypatch.setattr(_cpu_kernel, "_compile", copy)
    return compiled


def _norm_and_grads(dtype, threads, m=96, n=768):
    x, w, b, dy = norm_inputs(m, n, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fwd_bwd(lambda x, w, b: rms_norm(x, w, b, 1e-6), x, w, b, dy), (x, w, b, dy)
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_do_not_depend_on_the_thread_count(dtype, monkeypatch, compiled_calls):
    """y and dx are computed row by row, so two threads give the same bits as one; the
    parameter gradients are summed per thread in float64, so they may differ in the last bit
    only, and both stay within the float64 budget."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    (y1, dx1, dw1, db1), _ = _norm_and_grads(dtype, 1)
    (y2, dx2, dw2, db2), (x, w, b, dy) = _norm_and_grads(dtype, 2)
    assert compiled_calls() == 4
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = norm_fp64("rms", x.detach().double(), w64, b64, 1e-6)
    g64 = torch.autograd.grad(y64, (w64, b64), dy.double())
    _, _, dw_pt, db_pt = fwd_bwd(lambda x, w, b: norm_torch_same_dtype("rms", x, w, b, 1e-6), x, w, b, dy)
    for name, g1, g2, g_pt, g_64 in (("w", dw1, dw2, dw_pt, g64[0]), ("b", db1, db2, db_pt, g64[1])):
        assert_close_to_fp64(g1, g_pt, g_64, dtype, f"grad of {name}, one thread")
        assert_close_to_fp64(g2, g_pt, g_64, dtype, f"grad of {name}, two threads")


@needs_kernel
def test_non_finite_rows_stay_in_their_rows(monkeypatch, compiled_calls):
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    x = torch.randn(4, 64)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    y = rms_norm(x, torch.ones(64), None, 1e-6)
    assert compiled_calls() == 1
    assert y[1].isnan().all() and y[2].isnan().any()  # inf / inf
    torch.testing.assert_close(y[[0, 3]].double(), norm_fp64("rms", x[[0, 3]]), rtol=2e-6, atol=1e-6)


def _assert_the_torch_ops_serve(compiled_calls):
    """RMSNorm on the CPU, forward and backward, right (against float64) and off the kernel."""
    x, w, b, dy = norm_inputs(8, 64, torch.float32)
    y, dx, _, _ = fwd_bwd(lambda x, w, b: rms_norm(x, w, b, 1e-6), x, w, b, dy)
    assert compiled_calls() == 0
    y64, dx64, _, _ = fwd_bwd(lambda x, w, b: norm_fp64("rms", x, w, b, 1e-6), x.double(), w.double(), b.double(), dy.double())
    y_pt, dx_pt, _, _ = fwd_bwd(lambda x, w, b: norm_torch_same_dtype("rms", x, w, b, 1e-6), x, w, b, dy)
    assert_close_to_fp64(y, y_pt, y64, torch.float32, "output")
    assert_close_to_fp64(dx, dx_pt, dx64, torch.float32, "grad of x")


def test_without_a_compiler_the_torch_ops_serve(fresh_build, monkeypatch, compiled_calls):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-cxx"))
    assert _cpu_kernel.op() is None
    assert "no-such-cxx" in _cpu_kernel.unavailable_reason()
    _assert_the_torch_ops_serve(compiled_calls)
    assert _cpu_kernel.gated_ops() is None  # and the gated norm takes torch ops too


def test_a_failed_build_says_why_and_leaves_nothing_behind(fresh_build, monkeypatch, tmp_path_factory):
    # a "compiler" that answers --version and fails every build, with a message
    cxx = tmp_path_factory.mktemp("cxx") / "c++"
    cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fake c++ 1.0"; exit 0; }\necho "fatal: out of luck" >&2\nexit 3\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    assert _cpu_kernel.op() is None
    reason = _cpu_kernel.unavailable_reason()
    assert "exited with 3" in reason and "out of luck" in reason
    assert list(fresh_build.iterdir()) == []  # no half-written library to load next time


@pytest.mark.skipif(_cpu_kernel.op() is None, reason="no C++ compiler here to build with")
@pytest.mark.slow
def test_the_build_is_cached_and_loaded_without_compiling_again(fresh_build, monkeypatch):
    assert _cpu_kernel.op() is not None
    built = [p.name for p in fresh_build.iterdir()]
    assert len(built) == 1 and built[0].startswith("cpu_rms_norm-") and built[0].endswith(".so")

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the library")

    monkeypatch.setattr(_cpu_kernel, "_op", _cpu_kernel._UNBUILT)
    monkeypatch.setattr(_cpu_kernel, "_compile", no_compiling)
    assert _cpu_kernel.op() is not None
    assert [p.name for p in fresh_build.iterdir()] == built


@pytest.mark.skipif(_cpu_kernel.op() is None, reason="no C++ compiler here to build with")
def test_an_unwritable_cache_builds_in_a_private_folder(fresh_build, monkeypatch):
    compiled = _library_copier(monkeypatch)
    blocker = fresh_build / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(_cpu_kernel.CACHE_ENV, str(blocker / "cache"))  # under a file: cannot be made
    assert _cpu_kernel.op() is not None, _cpu_kernel.unavailable_reason()
    folder = _cpu_kernel.built_path().parent
    assert len(compiled) == 1 and compiled[0].parent == folder
    assert folder.name.startswith("hf_rmsnorm-") and (folder.stat().st_mode & 0o077) == 0  # the user's alone
    x, w, b, dy = norm_inputs(8, 64, torch.float32)
    y = rms_norm(x, w, b, 1e-6)
    torch.testing.assert_close(y.double(), norm_fp64("rms", x, w, b, 1e-6), rtol=2e-6, atol=1e-6)


@needs_kernel
def test_torch_backend_and_float16_take_the_torch_ops(monkeypatch, compiled_calls):
    x, w, b, dy = norm_inputs(8, 64, torch.float32)
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    fwd_bwd(lambda x, w, b: rms_norm(x, w, b, 1e-6), x, w, b, dy)
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    fwd_bwd(lambda x, w, b: rms_norm(x, w, b, 1e-6), *(t.half() for t in (x, w, b, dy)))
    assert compiled_calls() == 0
    fwd_bwd(lambda x, w, b: rms_norm(x, w, b, 1e-6), x, w, b, dy)
    assert compiled_calls() == 2


def test_an_installed_package_carries_every_header_its_sources_include():
    """The operators are built on first use from the sources in the installed package, so every
    file a source includes locally must be package data too; else a wheel's build fails and the
    slow path serves everywhere, with only a log line to say so."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hf_rmsnorm.ops"]
    ops = root / "hf_rmsnorm" / "ops"
    sources = [p for p in ops.iterdir() if p.suffix in (".c", ".cpp")]
    assert sources and all(any(fnmatch.fnmatch(p.name, pat) for pat in patterns) for p in sources)
    local = {name for p in sources for name in re.findall(r'#include "([^"]+)"', p.read_text())}
    assert "_op_shared.h" in local  # what both operators share
    for name in local:
        assert (ops / name).is_file() and any(fnmatch.fnmatch(name, pat) for pat in patterns), name


@pytest.mark.slow
def test_the_sources_build_without_warnings(tmp_path):
    """-Wall -Wextra -Werror, with and without OpenMP: the C file and the operator stay clean
    (torch's headers are system headers there). The operator has no OpenMP in it: it is built
    once, the C file alone again without OpenMP (what a compiler without it builds)."""
    cxx = _cpu_kernel._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler here")
    warnings = ("-Wall", "-Wextra", "-Werror")
    assert not re.search(r"#\s*pragma\s+omp|\bomp_\w+\(|<omp\.h>", _cpu_kernel._OP_SOURCE.read_text())
    out = tmp_path / "k.so"
    error = _cpu_kernel._compile(cxx, out, "hf_rmsnorm_warnings", True, extra=warnings)
    assert error is None, error
    assert os.path.getsize(out) > 0
    error = _cpu_kernel._run([cxx, "-x", "c", *_cpu_kernel._FLAGS, *warnings, "-c", str(_cpu_kernel._SOURCE),
                              "-o", str(tmp_path / "k.o")])
    assert error is None, error


def test_results_do_not_depend_on_the_vector_width(tmp_path):
    """The C file is built once with a clone per vector width (AVX-512, AVX2, SSE) and the loader
    picks the CPU's widest; -ffp-contract=off and no reassociation make every clone round the
    same way. Here each width this CPU runs is built on its own (no clones) and unoptimised
    scalar code beside them: the plain and gated forward and backward give the same bits, NaN,
    infinite and saturating gates included."""
    import ctypes
    import platform

    cxx = _cpu_kernel._compiler()
    if cxx is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler on x86-64")
    cpu_flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    widths = [w for w, flag in (("-mavx512f", "avx512f"), ("-mavx2", "avx2")) if f" {flag}" in cpu_flags]
    source = _cpu_kernel._SOURCE.read_text().replace('__attribute__((target_clones("avx512f", "avx2", "default")))', "")
    (tmp_path / "k.c").write_text(source)
    g = torch.Generator().manual_seed(0)
    m, n, s = 16, 256, 64
    x, z, dy = (torch.randn(m, n, generator=g) for _ in range(3))
    z = z * 60
    z[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 88.9, -88.9])
    w = torch.randn(n, generator=g) * 0.3 + 1
    bf16 = x.bfloat16()
    outputs = {}
    for build in [*widths, "-mno-avx", "-O0"]:
        lib = tmp_path / f"k{build}.so"
        flags = [f for f in _cpu_kernel._FLAGS if build != "-O0" or f != "-O3"]
        subprocess.run([cxx, "-x", "c", *flags, *([build] if build != "-O0" else ["-O0"]), "-shared", str(tmp_path / "k.c"),
                        "-o", str(lib), "-lm"], check=True, capture_output=True)
        k = ctypes.CDLL(str(lib))
        p, i64, f32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
        k.rms_norm_forward.argtypes = [p, p, p, p, p, i64, i64, f64, f32, ctypes.c_int]
        k.gated_rms_norm_forward.argtypes = [p, i64, p, i64, p, p, p, i64, i64, i64, f64, f32, ctypes.c_int]
        k.gated_rms_norm_backward.argtypes = [p, i64, p, i64, p, i64, p, p, p, p, p, i64, i64, i64, f32, ctypes.c_int]
        one = 1 << 8  # one thread
        y, yb = torch.empty(m, n), torch.empty(m, n, dtype=torch.bfloat16)
        k.rms_norm_forward(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), None, m, n, 1e-6, 0.0, one)
        # bf16 rows, the normalised row rounded (Llama's order), a bf16 output
        k.rms_norm_forward(bf16.data_ptr(), w.data_ptr(), None, yb.data_ptr(), None, m, n, 1e-6, 0.0, one | 1 | 8 | 16)
        results = [y, yb]
        for flags in (0, 64, 128, 64 | 128):  # gate first / after, silu / sigmoid
            gy, rstd = torch.empty(m, n), torch.empty(m * n // s)
            dx, dz, dw = torch.empty(m, n), torch.empty(m, n), torch.empty(n)
            k.gated_rms_norm_forward(x.data_ptr(), n, z.data_ptr(), n, w.data_ptr(), gy.data_ptr(), rstd.data_ptr(),
                                     m, n, s, 1e-6, 0.0, one | flags)
            k.gated_rms_norm_backward(dy.data_ptr(), n, x.data_ptr(), n, z.data_ptr(), n, w.data_ptr(), rstd.data_ptr(),
                                      dx.data_ptr(), dz.data_ptr(), dw.data_ptr(), m, n, s, 0.0, one | flags)
            results += [gy, rstd, dx, dz, dw]
        outputs[build] = results
    first = outputs.pop("-O0")
    assert first[2].isnan().any() and not first[2][1:].isnan().any()  # the NaN gate reached its own row only
    for build, results in outputs.items():
        for a, b in zip(first, results):
            # the same bits, NaN's sign and payload aside (vector and scalar code differ there)
            nan = a.isnan()
            assert torch.equal(nan, b.isnan()), build
            bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
            assert torch.equal(a.view(bits)[~nan], b.view(bits)[~nan]), build


@needs_kernel
@pytest.mark.parametrize("with_weight", [False, True], ids=["x_only", "x_and_weight"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_tensors_without_cpu_memory_take_the_torch_ops(grad, with_weight, monkeypatch, compiled_calls):
    """Fake tensors (what torch.export and shape propagation trace with) report the CPU as their
    device but have no memory behind ``data_ptr``: they go through torch ops, which give the
    output's shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    with FakeTensorMode():
        x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=grad)
        w = torch.randn(16, requires_grad=grad) if with_weight else None
        y = rms_norm(x, w, None, 1e-6, cast_mode="input")
        # bf16 rows and an fp32 weight: promoted to fp32
        assert y.shape == (4, 16) and y.dtype == (torch.float32 if with_weight else torch.bfloat16)
        if grad:
            y.sum().backward()
            assert x.grad.shape == x.shape and (w is None or w.grad.shape == w.shape)
    assert compiled_calls() == 0
    # nothing made under the fake mode is kept for later calls (the torch path caches its eps)
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")
    x = torch.randn(4, 16)
    torch.testing.assert_close(rms_norm(x, None, None, 1e-6).double(), norm_fp64("rms", x), rtol=2e-6, atol=1e-6)


@needs_kernel
def test_the_kernels_autograd_node_keeps_autograds_rules(monkeypatch, compiled_calls):
    """The kernel's graph node is written in C++ as torch's own are: it must keep what autograd
    promises for any op. Its edges reach x and the weight (none for an absent bias); a saved
    input changed in place is an error, not a silently wrong gradient; its saved tensors are
    freed by a backward without retain_graph; a frozen weight gets no gradient."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    x, w, _, dy = norm_inputs(6, 32, torch.float32)
    y = rms_norm(x, w, None, 1e-6)
    assert y.grad_fn.name() == "RMSNormBackward"
    assert [f.variable if f is not None else None for f, _ in y.grad_fn.next_functions] == [x, w, None]

    with torch.no_grad():
        w.mul_(2)  # after the forward saved it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)

    y = rms_norm(x, w, None, 1e-6)
    y.backward(dy, retain_graph=True)
    first = x.grad.clone()
    y.backward(dy)  # the graph kept once: the same gradient again, accumulated
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(dy)

    x.grad = w.grad = None
    w.requires_grad_(False)  # frozen, as with LoRA
    calls = compiled_calls()
    y = rms_norm(x, w, None, 1e-6)
    y.backward(dy)
    assert compiled_calls() == calls + 2 and w.grad is None
    y64, dx64, _, _ = fwd_bwd(lambda x, w, b: norm_fp64("rms", x, w, b, 1e-6), x.double(), w.double(), None, dy.double())
    y_pt, dx_pt, _, _ = fwd_bwd(lambda x, w, b: norm_torch_same_dtype("rms", x, w, b, 1e-6), x, w, None, dy)
    assert_close_to_fp64(x.grad, dx_pt, dx64, torch.float32, "grad of x, frozen weight")

    with torch.inference_mode():
        assert rms_norm(x, w, None, 1e-6).grad_fn is None


@needs_kernel
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_and_saved_tensor_hooks_see_the_kernels_node(reentrant, monkeypatch, compiled_calls):
    """HF's gradient checkpointing recomputes the forward in the backward; the non-reentrant
    kind does it through saved-tensor hooks, which a C++ node must route its saved tensors
    through (as do CPU offloading and memory profilers). The gradients are the bits computed
    without checkpointing, and the hooks see what the node keeps: x, the parameters, rstd."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto")
    torch.manual_seed(0)
    x, w, b, _ = norm_inputs(8, 32, torch.float32)
    lin = torch.nn.Linear(32, 32)

    def block(x):
        return lin(rms_norm(lin(x), w, b, 1e-6)).tanh()

    def grads(fn):
        for p in (x, w, b):
            p.grad = None
        fn(x).pow(2).sum().backward()
        return [p.grad.clone() for p in (x, w, b)]

    plain = grads(block)
    checkpointed = grads(lambda x: checkpoint(block, x, use_reentrant=reentrant))
    assert all(torch.equal(g, h) for g, h in zip(plain, checkpointed))
    assert compiled_calls() == 2 + 3  # plain: forward, backward; checkpointed: one forward more

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t):
        rms_norm(x, w, b, 1e-6).sum().backward()
    assert packed == [(8, 32), (32,), (32,), (8,)]


@pytest.mark.skipif(_cpu_kernel.op() is None, reason="no C++ compiler here to build with")
@pytest.mark.slow
def test_a_cached_library_that_does_not_load_is_built_again(fresh_build, monkeypatch):
    """A damaged file in the cache (or one built against a newer C library, in a cache shared
    between machines) is replaced by a fresh build, once; the kernel then serves."""
    built = fresh_build / BUILT.name  # where a build of these sources goes
    built.write_bytes(b"not a library")
    loads = []
    real = _cpu_kernel._operators

    def operators(path, namespace):
        loads.append(path.read_bytes()[:4])
        if path.read_bytes() == b"not a library":  # this process has the namespace already: ask the loader
            torch.ops.load_library(str(path))
        return real(path, namespace)

    monkeypatch.setattr(_cpu_kernel, "_operators", operators)
    assert _cpu_kernel.op() is not None, _cpu_kernel.unavailable_reason()
    assert len(loads) == 2 and loads[0] == b"not " and loads[1] != b"not "  # refused, rebuilt, loaded
    assert [p.name for p in fresh_build.iterdir()] == [built.name] and built.read_bytes() != b"not a library"


def test_a_library_without_its_operators_is_said_and_the_torch_ops_serve(fresh_build, monkeypatch, compiled_calls,
                                                                        library_without_operators):
    """A library that loads but registers nothing where Python looks (the operators' schemas
    under another namespace, as torch 2.6-2.10 made of them before _op_shared.h expanded the
    namespace macro) raised AttributeError out of patch_model. It is now a reason, said once,
    with no second build (which would repeat the fault), and the torch ops serve."""
    import shutil

    built, namespace = library_without_operators
    path = fresh_build / "cpu_rms_norm-test.so"  # in the cache, where a library the loader refuses is built again
    builds = []

    def build():
        builds.append(1)
        shutil.copy(built, path)
        return path, namespace, None

    monkeypatch.setattr(_cpu_kernel, "_build", build)
    assert _cpu_kernel.op() is None and _cpu_kernel.gated_ops() is None
    reason = _cpu_kernel.unavailable_reason()
    assert f"registered no operator {namespace}::rms_norm" in reason and str(path) in reason
    assert builds == [1] and _cpu_kernel.torch_ops_reason() == reason
    _assert_the_torch_ops_serve(compiled_calls)


@pytest.mark.slow
def test_the_namespace_macro_is_expanded_before_torch_stringises_it(tmp_path):
    """Up to torch 2.10, TORCH_LIBRARY(ns, m) stringised ``ns`` as written, so the operators'
    schemas, defined in a namespace named by the macro HF_RMSNORM_NS, went to a namespace called
    "HF_RMSNORM_NS". Here TORCH_LIBRARY is redefined to stringise as those versions did, and one
    library defines an operator both ways: through HF_RMSNORM_LIBRARY (what the sources use) the
    schema reaches the build's namespace; handed to TORCH_LIBRARY directly (the control) it does
    not. (Were the macro not expanded, both blocks would define the same names and the build
    would fail.)"""
    import sys
    from pathlib import Path

    cxx = _cpu_kernel._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler here")
    shared = Path(_cpu_kernel.__file__).with_name("_op_shared.h")
    source = tmp_path / "library.cpp"
    source.write_text(
        f'#include "{shared}"\n'
        "#undef TORCH_LIBRARY\n"
        "#define TORCH_LIBRARY(ns, m) \\\n"
        "    static void init_##ns(torch::Library &); \\\n"
        "    static torch::Library library_##ns(torch::Library::DEF, #ns, std::nullopt, __FILE__, __LINE__); \\\n"
        "    static const bool registered_##ns = (init_##ns(library_##ns), true); \\\n"
        "    static void init_##ns(torch::Library &m)\n"
        "static int64_t one() { return 1; }\n"
        "HF_RMSNORM_LIBRARY(HF_RMSNORM_NS, m) { m.def(\"one() -> int\", &one); }\n"
        "TORCH_LIBRARY(HF_RMSNORM_NS, m) { m.def(\"one() -> int\", &one); }\n"
    )
    namespace = "hf_rmsnorm_macro_test"
    error = _cpu_kernel._compile(cxx, tmp_path / "library.so", namespace, False, c_source=None, op_source=source)
    assert error is None, error
    # in a child process: the control's namespace must not outlive the test in this one
    found = subprocess.run(
        [sys.executable, "-c", "import sys, torch; torch.ops.load_library(sys.argv[1]); "
         "print(sorted(n for n in torch._C._dispatch_get_all_op_names() if n.endswith('::one')))", str(tmp_path / "library.so")],
        capture_output=True, text=True, timeout=300,
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == repr(sorted([f"{namespace}::one", "HF_RMSNORM_NS::one"]))


def test_the_sources_name_their_namespace_through_the_expanding_macro():
    """Every TORCH_LIBRARY block of the operators goes through HF_RMSNORM_LIBRARY(_IMPL)."""
    from pathlib import Path

    ops = Path(_cpu_kernel.__file__).parent
    for source in ops.glob("*.cpp"):
        text = source.read_text()
        assert "HF_RMSNORM_LIBRARY(HF_RMSNORM_NS, m)" in text, source.name
        assert not re.search(r"\bTORCH_LIBRARY(_IMPL)?\(HF_RMSNORM_NS", text), source.name


@needs_kernel
def test_the_operator_refuses_tensors_its_flags_do_not_describe():
    """The operator is visible in torch.ops; called with tensors other than its flags say (a
    dtype, a device, a length), it raises instead of reading memory wrongly."""
    op = _cpu_kernel.op()
    x, w = torch.randn(4, 16), torch.randn(16)
    fp32 = _cpu_kernel.dtype_flags(torch.float32, torch.float32, None, torch.float32, False)
    bf16_x = _cpu_kernel.dtype_flags(torch.bfloat16, torch.float32, None, torch.float32, False)
    torch.testing.assert_close(op(x, w, None, 1e-6, 0.0, fp32, "float32").double(), norm_fp64("rms", x, w), rtol=2e-6, atol=1e-6)
    for args, message in (
        ((x, w, None, 1e-6, 0.0, bf16_x, "float32"), "x must be a non-empty CPU tensor of BFloat16"),
        ((x, w.bfloat16(), None, 1e-6, 0.0, fp32, "float32"), "weight must be a contiguous CPU tensor of 16 Float"),
        ((x, torch.randn(15), None, 1e-6, 0.0, fp32, "float32"), "weight must be a contiguous CPU tensor of 16"),
        ((x, torch.randn(32)[::2], None, 1e-6, 0.0, fp32, "float32"), "weight must be a contiguous"),
        ((x, w, torch.empty(16, device="meta"), 1e-6, 0.0, fp32, "float32"), "bias must be"),
        ((torch.empty(0, 16), w, None, 1e-6, 0.0, fp32, "float32"), "non-empty"),
    ):
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_the_cli_builds_the_kernel_ahead_of_time_or_says_why_not(fresh_build, monkeypatch, capsys):
    """``hf-rmsnorm build-cpu-kernel``: the build a container image or an offline machine wants
    done before the first call; where it cannot be done, why, and a non-zero exit."""
    from hf_rmsnorm.cli import main

    if BUILT is not None:
        compiled = _library_copier(monkeypatch)
        assert main(["build-cpu-kernel"]) == 0 and len(compiled) == 1
        path = _cpu_kernel.built_path()
        assert path.parent == fresh_build and path.exists() and str(path) in capsys.readouterr().out
    for name, value in (("_op", _cpu_kernel._UNBUILT), ("_reason", None)):
        monkeypatch.setattr(_cpu_kernel, name, value)
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-cxx"))
    assert main(["build-cpu-kernel"]) == 1
    err = capsys.readouterr().err
    assert "no-such-cxx" in err and "RMSNorm and the gated norms on the CPU will run torch ops" in err
