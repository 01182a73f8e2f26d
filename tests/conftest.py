"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter, which decides at kernel
definition time: TRITON_INTERPRET must be set before ``hf_rmsnorm.ops._triton_norm`` is first
imported, hence here, before any test module runs. Nothing here touches a device.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# On a GPU machine leave it unset so the GPU tests compile real kernels.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

HAS_TRITON = importlib.util.find_spec("triton") is not None

from hf_rmsnorm.ops import layer_norm, rms_norm  # noqa: E402  (after TRITON_INTERPRET is decided)

# the public ops by the kind names the float64 references take (reference.norm_fp64)
FNS = {"rms": rms_norm, "layer": layer_norm}


def pytest_configure(config):
    """torch.compile's cache in a folder of this test session (its xdist workers and the scripts
    they run inherit it), removed at the end, instead of the machine's /tmp/torchinductor_<user>.
    Two CI runs failed on a compiled library a killed earlier run had left there half-written
    ("invalid ELF header": inductor writes it in place), and nothing another run compiled
    belongs in a test's result. Set here, before any test module is imported: inductor sets the
    variable itself on its first compile. Left alone where it is set already."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        config._inductor_cache = tempfile.mkdtemp(prefix="hf_rmsnorm-tests-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config._inductor_cache


def pytest_unconfigure(config):
    folder = getattr(config, "_inductor_cache", None)
    if folder:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


def run_with_compiled_kernels(tmp_path, source: str) -> str:
    """Run ``source`` as a Python script in a child process without TRITON_INTERPRET (the
    kernels defined compiled, e.g. for ``benchmark_cpu.triton_without_gpu``), from the
    repository's root; its stdout, after asserting it exited 0 (its output's end in the message)."""
    script = tmp_path / "child.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# What every child of the C++ launch operator's tests starts with: the operator on, the
# repository's scripts and tests on the path, the stubbed launch's tools.
_OPERATOR_CHILD_PRELUDE = """\
import ctypes, math, os, sys
os.environ["HF_RMSNORM_CPP_LAUNCH"] = "1"
sys.path[:0] = [{scripts!r}, {tests!r}]
import torch
from benchmark_cpu import _NoLaunch, triton_without_gpu
from launch_stub import ADDRESS, as_float32, assert_launched_as, decode_launches, install, stub, triton_kinds
"""


def run_operator_child(tmp_path, child: str) -> str:
    """``child`` (a script template, ``{{`` and ``}}`` for braces) run after
    ``_OPERATOR_CHILD_PRELUDE`` with the kernels compiled (``run_with_compiled_kernels``); its
    stdout. Skips where the C++ launch operator cannot be tested here: no Triton, a Triton whose
    launchers it does not pack for, no C++ compiler."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops import _cpu_kernel
    from hf_rmsnorm.ops._direct import _DIRECT_TRITON

    if not _DIRECT_TRITON:
        pytest.skip("the C++ launch packs the parameters of Triton 3.6-3.9's launchers")
    if _cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler here to build the operator with")
    root = Path(__file__).resolve().parents[1]
    source = (_OPERATOR_CHILD_PRELUDE + child).format(scripts=str(root / "scripts"), tests=str(root / "tests"))
    return run_with_compiled_kernels(tmp_path, source)


def direct_launch_agrees(monkeypatch, kernels, run, what) -> None:
    """``run()`` (a list of tensors) launched through Triton's own launch, then directly
    (``_direct``): the very same bits, the direct call (after one that fills its cache) without
    calling Triton's ``JITFunction.run`` of any of ``kernels``; ``what`` names the case in a failure.
    The C++ launch operator is off meanwhile: on CUDA it would take the calls once the direct
    launch had taught it their plans (``cpp_launch_or_skip``'s tests check it)."""
    from hf_rmsnorm.ops import _cuda_launch, _direct

    monkeypatch.setattr(_cuda_launch, "ENABLED", False)
    monkeypatch.setattr(_direct, "_DIRECT_LAUNCH", False)
    tritons = run()
    monkeypatch.setattr(_direct, "_DIRECT_LAUNCH", True)
    run()  # the first call of each key goes through Triton

    def refuse(*args, **kwargs):
        raise AssertionError("the direct launch went through JITFunction.run")

    for kernel in kernels:
        kernel.run = refuse
    try:
        direct = run()
    finally:
        for kernel in kernels:
            del kernel.run
    for a, b in zip(tritons, direct, strict=True):
        assert a is b is None or torch.equal(a, b), what


def cpp_launch_or_skip(monkeypatch):
    """The C++ launch operator, on for one test whatever HF_RMSNORM_CPP_LAUNCH said at import, or
    a skip saying why it cannot serve here."""
    from hf_rmsnorm.ops import _cuda_launch

    if _cuda_launch.ops() is None:
        pytest.skip(f"the C++ launch operator is unavailable: {_cuda_launch.unavailable_reason()}")
    monkeypatch.setattr(_cuda_launch, "ENABLED", True)
    return _cuda_launch


def run_child(child: Path, backend: str, tmp_path, processes: int = 1, timeout: int = 300) -> list:
    """Run ``child`` in a fresh Python process, or in ``processes`` CPU processes under torchrun
    (gloo), with ``HF_RMSNORM_BACKEND=backend`` (``triton``: the interpreter, the path CUDA
    tensors take); fail with the children's own messages if it fails, skip where it printed
    "skip <reason>", else return (rank 0's) "ok ..." lines. ``timeout``: seconds, for a child
    that hangs (a collective some ranks never join); the children here take 5-30 s."""
    launcher = [sys.executable]
    if processes > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        if torchrun is None:
            pytest.skip("torchrun is not installed")
        launcher = [torchrun, "--standalone", "--nproc_per_node", str(processes)]
    if backend == "triton" and not (HAS_TRITON and INTERPRETING):
        pytest.skip("Triton on CPU tensors needs triton and TRITON_INTERPRET=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_RMSNORM_BACKEND": backend}
    proc = subprocess.run([*launcher, str(child)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=timeout)
    # the children's own messages (a traceback, a library's abort), not torchrun's notices
    said = "\n".join(line for line in proc.stderr.splitlines() if line and not line.startswith("W"))
    assert proc.returncode == 0, f"exit {proc.returncode}, {len(proc.stdout.splitlines())} check(s) done:\n{said[-4000:]}"
    for line in proc.stdout.splitlines():
        if line.startswith("skip "):
            pytest.skip(line.removeprefix("skip "))
    return [line for line in proc.stdout.splitlines() if line.startswith("ok ")]


def needs_interpreter(what: str) -> None:
    """Skip unless Triton runs here on CPU tensors (TRITON_INTERPRET=1); ``what`` says why."""
    pytest.importorskip("triton")
    if not INTERPRETING:
        pytest.skip(what)


def _round_bf16_like_the_gpu():
    """Triton's interpreter converts fp32 -> bf16 by truncating the mantissa; a GPU's
    ``cvt.rn.bf16.f32`` rounds to nearest even, as torch does. Without this shim every bf16
    kernel output is off by up to one ulp *in the interpreter only*, and the tests would be
    measuring the interpreter instead of the kernel. tests/test_interpreter_shim.py proves
    the shim is in force and rounds like torch."""
    import numpy as np
    from triton.runtime import interpreter
    import triton.language as tl

    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view(np.uint16).reshape(data.shape)
        return original(data, src, dst, rounding_mode)

    convert.hf_rmsnorm_shim = True
    interpreter._convert_float = convert


if INTERPRETING and HAS_TRITON:
    _round_bf16_like_the_gpu()

# "torch": torch ops only; "compiled": the CPU path as shipped (HF_RMSNORM_BACKEND=auto), where
# RMSNorm runs the compiled CPU kernel; "triton": the Triton kernels, interpreted on CPU tensors
BACKENDS = ["torch", "compiled", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test on each backend."""
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed (pip install -e '.[dev]')")
    if request.param == "triton" and not INTERPRETING:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (the GPU suite covers CUDA)")
    if request.param == "compiled":
        from hf_rmsnorm.ops import _cpu_kernel

        if _cpu_kernel.op() is None:
            pytest.skip(f"the compiled CPU kernel is not available here: {_cpu_kernel.unavailable_reason()}")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "auto" if request.param == "compiled" else request.param)
    return request.param


@pytest.fixture
def torch_backend(monkeypatch):
    """The torch reference ops: for the conversion and checkpoint tests, which are about what a
    model computes, not about the kernels (interpreted, their many small norms take minutes).
    Used by the modules that need it throughout: ``pytestmark = pytest.mark.usefixtures("torch_backend")``."""
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "torch")


@pytest.fixture
def gated_runs():
    """Runs of a gated-norm kernel during the test, forward and backward: Triton launches (the
    C++ launch operator's among them: it counts its forwards there, its backwards in its own
    counts), and the compiled CPU kernel's gated calls."""
    from hf_rmsnorm.ops import _cpu_kernel

    def runs():
        launches = 0
        if HAS_TRITON:
            from hf_rmsnorm.ops import _cuda_launch, _triton_gated

            launches = sum(_triton_gated.LAUNCHES.values()) + _cuda_launch.launch_counts(gated=True)[1]
        return launches + _cpu_kernel.gated_calls()

    before = runs()
    return lambda: runs() - before


@pytest.fixture
def compiled_calls():
    """Counts the compiled CPU kernel's calls (forward and backward) made during the test."""
    from hf_rmsnorm.ops import _cpu_kernel

    before = _cpu_kernel.calls()
    return lambda: _cpu_kernel.calls() - before


@pytest.fixture(scope="session")
def library_without_operators(tmp_path_factory):
    """(path, namespace) of a library that loads but registers no operator in that namespace,
    as the operators' libraries did under torch 2.6-2.10 before their namespace macro was
    expanded (_op_shared.h); built with the operators' own builder."""
    from hf_rmsnorm.ops import _cpu_kernel

    cxx = _cpu_kernel._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler here to build with")
    folder = tmp_path_factory.mktemp("no_operators")
    source = folder / "empty.cpp"
    source.write_text("#include <torch/library.h>\n")
    namespace = "hf_rmsnorm_no_operators"
    error = _cpu_kernel._compile(cxx, folder / "empty.so", namespace, False, c_source=None, op_source=source)
    assert error is None, error
    return folder / "empty.so", namespace


@pytest.fixture
def launches():
    """Counts the norm passes run on Triton during the test (proof that the kernels ran): one
    per forward and one per backward (whose partial-sum kernel is not counted apart)."""
    if not HAS_TRITON:
        return None
    from hf_rmsnorm.ops import _triton_norm

    def passes():
        return _triton_norm.LAUNCHES["norm_fwd"] + _triton_norm.LAUNCHES["norm_bwd"]

    before = passes()
    return lambda: passes() - before


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run scripts/gpu_check.sh on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
