"""The fused modules under tensor parallelism's DTensors, in two CPU processes (gloo, through
torchrun): parameters replicated, activations replicated or sharded along the sequence or
the hidden dim (where torch's own F.rms_norm fails: it adds eps in place). A
DTensor dispatches torch's ops by its own sharding rules, which cover the torch composition but
not every in-place op of the CPU path's hand-written backward (no rule for ``unsqueeze_``), nor
the kernels' custom op: the norms must take the composition for them (``_norm.hand_written_ok``,
``_norm.kernel_tensors``). The checks themselves are
in ``dtensor_child.py``, against float64."""

from pathlib import Path

import pytest

from conftest import run_child
from module_cases import CASES

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.slow
def test_modules_on_replicated_and_sharded_dtensors_match_float64(backend, tmp_path):
    """``auto``: the CPU path; ``triton`` (the interpreter): the path CUDA tensors take, where a
    DTensor must not reach the kernels (``_norm.kernel_tensors``)."""
    done = run_child(HERE / "dtensor_child.py", backend, tmp_path, processes=2)
    assert len(done) == len(CASES) * 2 * 3, done  # each case in fp32 and bf16, replicated and sharded two ways
