"""The compiled CPU RMSNorm: ``_cpu_rms_norm.c`` (the arithmetic, plain C) inside a torch
operator with its autograd in C++ (``_cpu_rms_norm_op.cpp``), built once per machine and cached.

torch has a fused LayerNorm for the CPU and no fused RMSNorm, so as torch ops an RMSNorm makes
three or more passes over the activations where ``nn.LayerNorm`` makes one, and a model whose
LayerNorms were converted exactly ran slower on the CPU than before. One pass per row needs
compiled code; built with the machine's C++ compiler and torch's own headers on first use (as
Triton builds its own launcher, and about 15 s once), it needs no build step at install time.
It is a torch operator rather than C functions called from Python because at a few tokens a call
a Python-defined op costs more than the arithmetic (``_cpu_rms_norm_op.cpp`` has the numbers).

Where no compiler is found, or the build fails, :func:`op` returns None and the torch ops serve,
as before; :func:`unavailable_reason` says why. The build is cached under :func:`cache_dir`
(``HF_RMSNORM_CACHE``, default ``~/.cache/hf_rmsnorm``), keyed on the sources, the compiler, the
command lines and torch's version, and written under a temporary name then renamed, so that processes
starting together never load a half-written file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from ._norm import selected_backend

CACHE_ENV = "HF_RMSNORM_CACHE"
_SOURCE = Path(__file__).with_name("_cpu_rms_norm.c")
_OP_SOURCE = Path(__file__).with_name("_cpu_rms_norm_op.cpp")
# the C file: -ffp-contract=off, no fused multiply-adds, so every CPU rounds the same way (see
# the source); -fno-trapping-math: no floating-point exceptions are relied on, which lets GCC turn
# a comparison's select into a vector blend for AVX2 and SSE (without it only the AVX-512 clone
# of the gated norm's exponential vectorised: "control flow in loop"); neither changes a value
_FLAGS = ("-O3", "-fPIC", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
# the operator around it: C++20, what torch's own extension builder uses for these headers
_OP_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC")
# the dtypes the C functions read and write
DTYPES = frozenset({torch.float32, torch.bfloat16})

_log = logging.getLogger(__name__)
_UNBUILT = object()
_BUILD_LOCK = threading.Lock()
_op = _UNBUILT
_ops = None  # the operators' namespace, torch.ops.<name>, once loaded
_gated = None  # gated_ops()'s pair, once loaded
_path: Optional[Path] = None  # the library loaded
_reason: Optional[str] = None
# the Python half of each namespace loaded (the second-derivative operator), kept alive
_PYTHON_IMPLS: dict = {}


def cache_dir() -> Path:
    """Where the package keeps what it builds or downloads for later runs (this kernel, the
    recipes' tiny offline model): ``HF_RMSNORM_CACHE``, else ``$XDG_CACHE_HOME/hf_rmsnorm``,
    else ``~/.cache/hf_rmsnorm``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_rmsnorm"


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _run(cmd: list) -> Optional[str]:
    """None where ``cmd`` succeeded, else what went wrong in one line."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)}: {e}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"{' '.join(cmd)} exited with {done.returncode}: {last}"
    return None


def _compile(cxx: str, out: Path, namespace: str, openmp: bool, extra: tuple = (), c_source: Optional[Path] = _SOURCE,
             op_source: Path = _OP_SOURCE) -> Optional[str]:
    """Build the library at ``out``: the C file (if any) compiled as C, then the operator
    around it linked against torch. None on success, else the compiler's complaint. ``extra``:
    flags for both steps (the tests' warnings)."""
    from torch.utils import cpp_extension  # torch's headers and libraries; imported only to build

    omp = ["-fopenmp"] if openmp else []
    obj = out.with_suffix(".o")
    try:
        if c_source is not None:
            error = _run([cxx, "-x", "c", *_FLAGS, *extra, *omp, "-c", str(c_source), "-o", str(obj)])
            if error:
                return error
        libs = cpp_extension.library_paths()
        return _run([
            cxx, *_OP_FLAGS, *extra, *omp, f"-DHF_RMSNORM_NS={namespace}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            # torch's headers as system headers: their warnings are torch's, not this file's
            *(a for p in cpp_extension.include_paths() for a in ("-isystem", p)), str(op_source),
            *([str(obj)] if c_source is not None else []), "-o", str(out),
            *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu", "-lm", "-ldl",
        ])
    finally:
        obj.unlink(missing_ok=True)


def _build() -> tuple[Optional[Path], str, Optional[str]]:
    """(the CPU kernel's library path, its operators' namespace, None), or (None, "", why not)."""
    return build_library("cpu_rms_norm", _SOURCE, _OP_SOURCE, openmp=True, what="the CPU kernel")


def build_library(stem: str, c_source: Optional[Path], op_source: Path, openmp: bool,
                  what: str) -> tuple[Optional[Path], str, Optional[str]]:
    """Build (or find built) the torch operator library of ``op_source`` (with ``c_source``
    compiled in as C, if given) in :func:`cache_dir`: (its path, its operators' namespace,
    None), or (None, "", why not, naming ``what``). ``openmp``: try with OpenMP first."""
    cxx = _compiler()
    if cxx is None:
        return None, "", "no C++ compiler found (install one, e.g. g++, or name it in CXX)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "", f"the C++ compiler {cxx} does not run: {e}"
    facts = (  # this file too: it holds the build's command lines; and the headers the sources include
        c_source.read_text() if c_source is not None else "", op_source.read_text(), Path(__file__).read_text(),
        *(h.read_text() for h in sorted(op_source.parent.glob("*.h"))), cxx,
        version, torch.__version__, str(torch.version.git_version), platform.machine(), sys.platform,
    )
    key = hashlib.sha256(b"\0".join(s.encode() for s in facts)).hexdigest()[:16]
    namespace = f"hf_rmsnorm_{stem.split('_')[0]}_{key}"
    reason = None
    for place in ("cache", "private"):
        # where the cache cannot be written, a fresh folder of this process's own (mkdtemp is
        # private to the user): never a fixed name in a shared /tmp, whose library someone
        # else could have put there
        directory = cache_dir() if place == "cache" else None
        try:
            if directory is None:
                directory = Path(tempfile.mkdtemp(prefix="hf_rmsnorm-"))
            path = directory / f"{stem}-{key}.so"
            if not path.exists():
                directory.mkdir(parents=True, exist_ok=True)
                # a name of its own per build: processes (or threads) building at once never
                # write into the same file, and the rename below is atomic
                fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=directory)
                os.close(fd)
                tmp = Path(name)
                try:
                    _log.info("building %s into %s (once per machine)", what, path)
                    # with OpenMP where asked and the compiler has it; without, one thread a call
                    for with_openmp in (True, False) if openmp else (False,):
                        error = _compile(cxx, tmp, namespace, with_openmp, c_source=c_source, op_source=op_source)
                        if error is None:
                            break
                    if error:
                        return None, "", f"building {what} failed: {error}"
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            return path, namespace, None
        except OSError as e:
            reason = f"could not build {what} in {directory or 'a temporary folder'}: {e}"
    return None, "", reason


def _openmp_runtimes() -> int:
    """How many OpenMP runtimes this process has mapped (Linux; 1 elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 1
    names = {line.split()[-1] for line in maps.splitlines() if any(k in line for k in ("libgomp", "libiomp", "libomp"))}
    return max(len(names), 1)


def op():
    """The operator ``rms_norm(x, weight, bias, eps, offset, flags, cast_mode)``, built on the
    first call; None where it cannot be had. ``flags``: :func:`dtype_flags` of the call's dtypes
    (the output's among them); the caller checks everything else (rms_norm.py,
    ``_compiled_kernel``)."""
    if _op is _UNBUILT:
        with _BUILD_LOCK:  # one build per process, however many threads ask at once
            _load()
    return _op


def _load() -> None:
    global _op, _ops, _path, _reason, settled_op, settled_token, _gated
    if _op is not _UNBUILT:
        return
    for attempt in (1, 2):
        path, namespace, _reason = _build()
        if path is None:
            _op = None
            return
        try:
            ops = _operators(path, namespace)
            break
        except OperatorsMissing as e:
            _op, _reason = None, str(e)
            return
        except (OSError, RuntimeError) as e:
            # a file the loader refuses: damaged, or built where a newer C library was
            # (a cache shared between machines). Built again once, here.
            _reason = f"could not load the CPU kernel {path}: {e}"
            if attempt == 2 or path.parent != cache_dir():
                _op = None
                return
            _log.warning("%s; building it again", _reason)
            path.unlink(missing_ok=True)
    # Linked with -fopenmp, the library asks for libgomp.so.1; where torch has loaded its own
    # under that name, the loader hands over torch's, one thread pool for both. A second
    # runtime would keep its own threads spinning beside torch's: then the kernel runs on one
    # thread.
    ops.set_parallel(_openmp_runtimes() == 1)
    # the C++ callables behind the overloads: OpOverload.__call__ only forwards to them, and that
    # Python frame is 0.4 of the ≈ 11 µs a one-token module call takes on the CI CPU
    settled_op, settled_token = _callable(ops.rms_norm_settled.default), object()
    _SETTLED_KINDS.clear()  # ids of the library loaded before, if another was
    _gated = _callable(ops.gated_rms_norm_fwd.default), _callable(ops.gated_rms_norm_bwd.default)
    _ops, _path, _op = ops, path, _callable(ops.rms_norm.default)


def _callable(overload):
    return getattr(overload, "_op", overload)


def settle(flags: int, cast_mode: str, n: int, has_weight: bool, has_bias: bool) -> int:
    """The id of this kind of call (``dtype_flags``, the cast mode, the row's length, which
    parameters it has) for :data:`settled_op`, registered once per kind in this process. Only
    after :func:`op` loaded the operator."""
    key = (flags, cast_mode, n, has_weight, has_bias)
    kind = _SETTLED_KINDS.get(key)
    if kind is None:
        kind = _SETTLED_KINDS[key] = _ops.settle(flags, cast_mode, n, has_weight, has_bias)
    return kind


# ``settle``'s ids, by the kind of call: this process's, as the operator's table is
_SETTLED_KINDS: dict = {}
# ``settled_op(x, weight, bias, eps, offset, kind)``: y, or None where the call is not of that
# kind or this thread asks for the general way (autocast, a transform or Python mode, a tangent,
# HF_RMSNORM_BACKEND other than auto); None until :func:`op` loaded the operator
settled_op = None
# what a module's settled tuple holds for this library's kinds (rms_norm.settle_on_cpu): new at
# each load, so that a tuple from another load (another build, in the tests) settles afresh
settled_token = object()


def _operators(path: Path, namespace: str):
    """torch.ops.<namespace>, loaded (:func:`load_library`) with its Python half registered."""
    ops = load_library(path, namespace, "rms_norm", "the CPU kernel")
    if namespace not in _PYTHON_IMPLS:
        from .rms_norm import graph_backward  # imported here: rms_norm.py imports this module

        impl = torch.library.Library(namespace, "IMPL")
        impl.impl("rms_norm_graph_backward", graph_backward, "CompositeImplicitAutograd")
        _PYTHON_IMPLS[namespace] = impl
    return ops


class OperatorsMissing(Exception):
    """A library that loaded without registering its operators where Python looks for them: a
    build fault that building again would repeat, so no second build is tried."""


def load_library(path: Path, namespace: str, probe: str, what: str):
    """torch.ops.<namespace>, loading the library at ``path`` unless this process already has
    (another file of the same build, e.g. after the cache was moved). Raises OSError or
    RuntimeError where the loader refuses the file, :class:`OperatorsMissing` where it loads but
    ``namespace::probe`` is still not there."""
    ops = getattr(torch.ops, namespace)
    if not _has_operator(ops, probe):
        torch.ops.load_library(str(path))
        if not _has_operator(ops, probe):
            raise OperatorsMissing(
                f"{what} {path} loaded under torch {torch.__version__} but registered no operator "
                f"{namespace}::{probe}: a build fault (please report it with this message)"
            )
    return ops


def _has_operator(ops, name: str) -> bool:
    try:
        getattr(ops, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def gated_ops():
    """The gated RMSNorm's operators ``(forward, backward)`` (``_cpu_rms_norm_op.cpp`` has their
    schemas; ``gated_rms_norm.py`` calls them), or None where the library cannot be had or
    ``HF_RMSNORM_BACKEND=torch`` asks for torch ops."""
    return None if op_unless_torch_ops() is None else _gated


def built_path() -> Optional[Path]:
    """The library file :func:`op` was loaded from (None while it is not loaded)."""
    return _path


def calls() -> int:
    """How many times the compiled kernel has run in this process, forward and backward calls
    together, plain and gated norms (0 before it was built): what the tests read to know which
    path a call took."""
    return sum(_ops.calls()) if _ops is not None else 0


def gated_calls() -> int:
    """:func:`calls` of the gated norm only."""
    return sum(_ops.calls()[2:]) if _ops is not None else 0


def op_unless_torch_ops():
    """:func:`op`, or None with ``HF_RMSNORM_BACKEND=torch`` (asked on every CPU call)."""
    return None if selected_backend() == "torch" else op()


def torch_ops_reason() -> Optional[str]:
    """Why RMSNorm calls on CPU tensors run torch ops in this process rather than the compiled
    kernel, or None where they run the kernel (float32/bfloat16 calls; what the reports say)."""
    if selected_backend() == "torch":
        return TORCH_BACKEND
    return unavailable_reason() if op() is None else None


TORCH_BACKEND = "HF_RMSNORM_BACKEND=torch"


def unavailable_reason() -> Optional[str]:
    """Why :func:`op` is None (None while it is not, or before it was first asked)."""
    return _reason


# the bits of the C functions' ``flags`` (FLAG_* in the source); the gated functions' gate dtype
# takes the bias's bit
X_BF16, W_BF16, B_BF16, Y_BF16, ROUND_N = 1, 2, 4, 8, 16
Z_BF16, ROUND_M, NORM_BEFORE_GATE, SIGMOID = B_BF16, 32, 64, 128


def dtype_flags(x: torch.dtype, weight: Optional[torch.dtype], bias: Optional[torch.dtype], y: torch.dtype, round_n: bool) -> int:
    """The ``flags`` bits for these dtypes (each float32 or bfloat16; None: no such parameter)."""
    bf16 = torch.bfloat16
    return (
        (X_BF16 if x == bf16 else 0) | (W_BF16 if weight == bf16 else 0) | (B_BF16 if bias == bf16 else 0)
        | (Y_BF16 if y == bf16 else 0) | (ROUND_N if round_n else 0)
    )
