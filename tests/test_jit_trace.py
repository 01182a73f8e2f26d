"""torch.jit.trace of the fused modules on the CPU, on each backend: the trace holds the ops
one call ran (the compiled CPU kernel's operator, the Triton kernels' custom op, or torch ops)
and replays them for every later call, with gradients or without, at other shapes. Nothing
recorded may be work that only holds for the traced call: an autograd.Function's forward is
recorded without its backward, and torch ops written in place or with ``out=`` fail under
autograd when replayed with gradients. Checked against float64."""

import pytest
import torch

from module_cases import CASES, trace_and_check


@pytest.mark.parametrize("traced_with_grad", [True, False], ids=["traced with grad", "traced without"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_a_traced_module_replays_its_function_with_and_without_gradients(case, dtype, traced_with_grad, backend):
    trace_and_check(case, dtype, traced_with_grad)
