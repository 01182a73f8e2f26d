"""The compiled CPU RMSNorm (``_cpu_rms_norm.c``): built once per machine, cached, loaded with
ctypes.

torch has a fused LayerNorm for the CPU and no fused RMSNorm, so as torch ops an RMSNorm makes
three or more passes over the activations where ``nn.LayerNorm`` makes one, and a model whose
LayerNorms were converted exactly ran slower on the CPU than before. One pass per row needs
compiled code; a plain C file built with the machine's C compiler on first use (as Triton builds
its own launcher) gives it without a build step at install time.

Where no compiler is found, or the build fails, :func:`library` returns None and the torch ops
serve, as before; :func:`unavailable_reason` says why. The build is cached under
``HF_RMSNORM_CACHE`` (default ``~/.cache/hf_rmsnorm``), keyed on the source, the compiler and
the flags, and written under a temporary name then renamed, so that processes starting together
never load a half-written file.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

CACHE_ENV = "HF_RMSNORM_CACHE"
_SOURCE = Path(__file__).with_name("_cpu_rms_norm.c")
# -ffp-contract=off: no fused multiply-adds, so every CPU rounds the same way (see the source)
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno")
# Below this many elements one thread does the call: waking a second costs more than it saves
# (the grain torch's own CPU kernels use).
_PARALLEL_MIN = 32768
# dtype -> the code the C functions take
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}

# calls made, by function: what the tests read to know the kernel ran (one add per call)
CALLS: collections.Counter = collections.Counter()

_UNBUILT = object()
_lib = _UNBUILT
_reason: Optional[str] = None
_threads_ok = True  # False where the library's OpenMP is not the one torch already runs


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_rmsnorm"


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(cc: str, out: Path, openmp: bool) -> Optional[str]:
    """Build the library at ``out``; None on success, else the compiler's complaint."""
    cmd = [cc, *_FLAGS, *(["-fopenmp"] if openmp else []), str(_SOURCE), "-o", str(out), "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)}: {e}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"{' '.join(cmd)} exited with {done.returncode}: {last}"
    return None


def _build() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (install one, e.g. gcc, or name it in CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"the C compiler {cc} does not run: {e}"
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (_SOURCE.read_text(), cc, version, " ".join(_FLAGS), platform.machine(), sys.platform))
    ).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"hf_rmsnorm-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        path = directory / f"cpu_rms_norm-{key}{suffix}"
        try:
            if not path.exists():
                directory.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                try:
                    # with OpenMP where the compiler has it; without, one thread a call
                    error = _compile(cc, tmp, openmp=True) and _compile(cc, tmp, openmp=False)
                    if error:
                        return None, f"building the CPU kernel failed: {error}"
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            return ctypes.CDLL(str(path)), None
        except OSError as e:
            reason = f"could not build or load {path}: {e}"
    return None, reason


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, f32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_double
    lib.rms_norm_forward.restype = i
    lib.rms_norm_forward.argtypes = [p, i, p, i, p, i, f32, p, i, p, i64, i64, f64, i, i]
    lib.rms_norm_backward.restype = i
    lib.rms_norm_backward.argtypes = [p, i, p, i, p, p, i, f32, i, p, i, p, p, i64, i64, i]


def _openmp_runtimes() -> int:
    """How many OpenMP runtimes this process has mapped (Linux; 1 elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 1
    names = {line.split()[-1] for line in maps.splitlines() if any(k in line for k in ("libgomp", "libiomp", "libomp"))}
    return max(len(names), 1)


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built on the first call; None where they cannot be had."""
    global _lib, _reason, _threads_ok
    if _lib is _UNBUILT:
        lib, _reason = _build()
        if lib is not None:
            _declare(lib)
            # Linked with -fopenmp, the library asks for libgomp.so.1; where torch has loaded
            # its own under that name, the loader hands over torch's, one thread pool for both.
            # A second runtime would keep its own threads spinning beside torch's: then the
            # kernels run on one thread.
            _threads_ok = _openmp_runtimes() == 1
        _lib = lib
    return _lib


def unavailable_reason() -> Optional[str]:
    """Why :func:`library` is None (None while it is not, or before it was first asked)."""
    return _reason


def _threads(rows: int, n: int) -> int:
    return torch.get_num_threads() if _threads_ok and rows * n >= _PARALLEL_MIN else 1


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _code(t: Optional[Tensor]) -> int:
    return 0 if t is None else DTYPE_CODE[t.dtype]


def forward(
    lib: ctypes.CDLL, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, offset: float,
    round_n: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(y, rstd) for contiguous x (the caller's to ensure); rstd is float32, one per row."""
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty(x.shape, dtype=out_dtype)
    rstd = torch.empty(rows, dtype=torch.float32)
    status = lib.rms_norm_forward(
        x.data_ptr(), DTYPE_CODE[x.dtype], _ptr(weight), _code(weight), _ptr(bias), _code(bias), offset,
        y.data_ptr(), DTYPE_CODE[out_dtype], rstd.data_ptr(), rows, n, eps, round_n, _threads(rows, n),
    )
    if status:
        raise MemoryError(f"rms_norm on the CPU: no memory for a few rows of {n} floats")
    CALLS["forward"] += 1
    return y, rstd


def backward(
    lib: ctypes.CDLL, dy: Tensor, x: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    offset: float, round_n: bool, needs: tuple[bool, bool, bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias), each None where ``needs`` says it is not wanted."""
    n = x.shape[-1]
    rows = x.numel() // n
    threads = _threads(rows, n)
    dy = dy.contiguous()  # autograd may hand over an expanded or strided gradient
    if dy.dtype not in DTYPE_CODE:
        dy = dy.float()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None
    dw_part = torch.empty(threads, n, dtype=torch.float64) if needs[1] else None
    db_part = torch.empty(threads, n, dtype=torch.float64) if needs[2] else None
    status = lib.rms_norm_backward(
        dy.data_ptr(), DTYPE_CODE[dy.dtype], x.data_ptr(), DTYPE_CODE[x.dtype], rstd.data_ptr(), _ptr(weight),
        _code(weight), offset, round_n, _ptr(dx), _code(dx), _ptr(dw_part), _ptr(db_part), rows, n, threads,
    )
    if status:
        raise MemoryError(f"rms_norm backward on the CPU: no memory for a few rows of {n} floats")
    CALLS["backward"] += 1
    dw = (dw_part[0] if threads == 1 else dw_part.sum(0)).to(weight.dtype) if needs[1] else None
    db = (db_part[0] if threads == 1 else db_part.sum(0)).to(bias.dtype) if needs[2] else None
    return dx, dw, db
