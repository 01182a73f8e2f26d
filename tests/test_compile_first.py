"""torch.compile of the fused modules in a process where nothing of this package ran eagerly
before (a user's training script), forward and backward against float64, at two shapes (the
second recompiled with dynamic sizes): on the CPU path's torch ops, the compiled CPU kernel's
path, and the Triton kernels (interpreted). The checks are in ``compile_child.py``."""

from pathlib import Path

import pytest

from conftest import run_child
from module_cases import CASES

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_compiling_before_any_eager_call_traces_and_matches_float64(backend, tmp_path):
    done = run_child(HERE / "compile_child.py", backend, tmp_path)
    assert len(done) == len(CASES) * 2, done  # each case in fp32 and bf16
