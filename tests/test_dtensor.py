"""The fused modules under tensor parallelism's DTensors, in two CPU processes (gloo, through
torchrun): parameters replicated, activations replicated or sharded along the sequence. A
DTensor dispatches torch's ops by its own sharding rules, which cover the torch composition but
not every in-place op of the CPU path's hand-written backward (no rule for ``unsqueeze_``), nor
the kernels' custom op: the norms must take the composition for them (``_norm.hand_written_ok``,
``_norm.kernel_tensors``). The checks themselves are
in ``dtensor_child.py``, against float64."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_TRITON, INTERPRETING
from module_cases import CASES

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_modules_on_replicated_and_sequence_sharded_dtensors_match_float64(backend, tmp_path):
    """``auto``: the CPU path; ``triton`` (the interpreter): the path CUDA tensors take, where a
    DTensor must not reach the kernels (``_norm.kernel_tensors``)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    if backend == "triton" and not (HAS_TRITON and INTERPRETING):
        pytest.skip("Triton on CPU tensors needs triton and TRITON_INTERPRET=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_RMSNORM_BACKEND": backend}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "dtensor_child.py")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    # the children's own messages (a traceback, a library's abort), not torchrun's notices
    said = "\n".join(line for line in proc.stderr.splitlines() if line and not line.startswith("W"))
    assert proc.returncode == 0, f"exit {proc.returncode}, {len(proc.stdout.splitlines())} case(s) done:\n{said[:4000]}"
    done = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == len(CASES) * 2 * 2, proc.stdout  # each case in fp32 and bf16, replicated and sharded
