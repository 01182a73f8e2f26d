"""The compiled CPU RMSNorm (``_cpu_rms_norm.c``): built once per machine, cached, loaded with
ctypes.

torch has a fused LayerNorm for the CPU and no fused RMSNorm, so as torch ops an RMSNorm makes
three or more passes over the activations where ``nn.LayerNorm`` makes one, and a model whose
LayerNorms were converted exactly ran slower on the CPU than before. One pass per row needs
compiled code; a plain C file built with the machine's C compiler on first use (as Triton builds
its own launcher) gives it without a build step at install time.

Where no compiler is found, or the build fails, :func:`library` returns None and the torch ops
serve, as before; :func:`unavailable_reason` says why. The build is cached under
:func:`cache_dir` (``HF_RMSNORM_CACHE``, default ``~/.cache/hf_rmsnorm``), keyed on the source,
the compiler and the flags, and written under a temporary name then renamed, so that processes
starting together never load a half-written file.
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
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ._norm import selected_backend

CACHE_ENV = "HF_RMSNORM_CACHE"
_SOURCE = Path(__file__).with_name("_cpu_rms_norm.c")
# -ffp-contract=off: no fused multiply-adds, so every CPU rounds the same way (see the source)
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno")
# Below this many elements one thread does the call: waking a second costs more than it saves
# (the grain torch's own CPU kernels use).
_PARALLEL_MIN = 32768
# the dtypes the C functions read and write
DTYPES = frozenset({torch.float32, torch.bfloat16})

# calls made, by function: what the tests read to know the kernel ran (one add per call)
CALLS: collections.Counter = collections.Counter()

_UNBUILT = object()
_BUILD_LOCK = threading.Lock()
_lib = _UNBUILT
_reason: Optional[str] = None
_threads_ok = True  # False where the library's OpenMP is not the one torch already runs


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
    reason = None
    for place in ("cache", "private"):
        # where the cache cannot be written, a fresh folder of this process's own (mkdtemp is
        # private to the user): never a fixed name in a shared /tmp, whose library someone
        # else could have put there
        directory = cache_dir() if place == "cache" else None
        try:
            if directory is None:
                directory = Path(tempfile.mkdtemp(prefix="hf_rmsnorm-"))
            path = directory / f"cpu_rms_norm-{key}{suffix}"
            if not path.exists():
                directory.mkdir(parents=True, exist_ok=True)
                # a name of its own per build: processes (or threads) building at once never
                # write into the same file, and the rename below is atomic
                fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=directory)
                os.close(fd)
                tmp = Path(name)
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
            reason = f"could not build or load the CPU kernel in {directory or 'a temporary folder'}: {e}"
    return None, reason


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, f32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_double
    lib.rms_norm_forward.restype = i
    lib.rms_norm_forward.argtypes = [p, p, p, p, p, i64, i64, f64, f32, i]
    lib.rms_norm_backward.restype = i
    lib.rms_norm_backward.argtypes = [p, p, p, p, p, p, p, i64, i64, f32, i]


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
    if _lib is _UNBUILT:
        with _BUILD_LOCK:  # one build per process, however many threads ask at once
            _load()
    return _lib


def _load() -> None:
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


def torch_ops_reason() -> Optional[str]:
    """Why RMSNorm calls on CPU tensors run torch ops in this process rather than the compiled
    kernel, or None where they run the kernel (float32/bfloat16 calls; what the reports say)."""
    if selected_backend() == "torch":
        return TORCH_BACKEND
    return unavailable_reason() if library() is None else None


TORCH_BACKEND = "HF_RMSNORM_BACKEND=torch"


def unavailable_reason() -> Optional[str]:
    """Why :func:`library` is None (None while it is not, or before it was first asked)."""
    return _reason


# the bits of the C functions' ``flags`` (FLAG_* in the source)
X_BF16, W_BF16, B_BF16, Y_BF16, ROUND_N, THREADS_SHIFT = 1, 2, 4, 8, 16, 8


def dtype_flags(x: torch.dtype, weight: Optional[torch.dtype], bias: Optional[torch.dtype], y: torch.dtype, round_n: bool) -> int:
    """The ``flags`` bits for these dtypes (each float32 or bfloat16; None: no such parameter)."""
    bf16 = torch.bfloat16
    return (
        (X_BF16 if x == bf16 else 0) | (W_BF16 if weight == bf16 else 0) | (B_BF16 if bias == bf16 else 0)
        | (Y_BF16 if y == bf16 else 0) | (ROUND_N if round_n else 0)
    )


def _threads(rows: int, n: int) -> int:
    return torch.get_num_threads() if _threads_ok and rows * n >= _PARALLEL_MIN else 1


def forward(
    lib: ctypes.CDLL, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, offset: float,
    flags: int, out_dtype: torch.dtype, with_rstd: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """(y, rstd) for contiguous x (the caller's to ensure); rstd, float32 one per row, only
    ``with_rstd``. ``flags``: :func:`dtype_flags` of these tensors."""
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty_like(x) if out_dtype == x.dtype else torch.empty_like(x, dtype=out_dtype)
    rstd = x.new_empty(rows, dtype=torch.float32) if with_rstd else None
    status = lib.rms_norm_forward(
        x.data_ptr(), weight.data_ptr() if weight is not None else None, bias.data_ptr() if bias is not None else None,
        y.data_ptr(), rstd.data_ptr() if with_rstd else None, rows, n, eps, offset,
        flags | (_threads(rows, n) << THREADS_SHIFT),
    )
    if status:
        raise MemoryError(f"rms_norm on the CPU: no memory for a few rows of {n} floats")
    CALLS["forward"] += 1
    return y, rstd


def backward(
    lib: ctypes.CDLL, dy: Tensor, x: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    offset: float, flags: int, needs: tuple[bool, bool, bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias), each None where ``needs`` says it is not wanted; ``flags`` as the
    forward's (dy's dtype takes the output's bit)."""
    n = x.shape[-1]
    rows = x.numel() // n
    dy = dy.contiguous()  # autograd may hand over an expanded or strided gradient
    if dy.dtype not in DTYPES:
        dy = dy.float()
    flags = (flags & ~Y_BF16) | (Y_BF16 if dy.dtype == torch.bfloat16 else 0) | (_threads(rows, n) << THREADS_SHIFT)
    # the parameters' gradients are summed and rounded to their dtypes in the call: a float64
    # buffer and a .to() here cost more than the arithmetic at a few rows
    dx, dw, db = (torch.empty_like(t) if need else None for t, need in zip((x, weight, bias), needs))
    status = lib.rms_norm_backward(
        dy.data_ptr(), x.data_ptr(), rstd.data_ptr(), weight.data_ptr() if weight is not None else None,
        dx.data_ptr() if dx is not None else None, dw.data_ptr() if dw is not None else None,
        db.data_ptr() if db is not None else None, rows, n, offset, flags,
    )
    if status:
        raise MemoryError(f"rms_norm backward on the CPU: no memory for a few rows of {n} floats")
    CALLS["backward"] += 1
    return dx, dw, db
