"""Run by tests/test_compile_first.py in a fresh process: torch.compile (fullgraph, dynamo with
AOTAutograd) of each fused module *before anything of this package has run eagerly*, forward
and backward against float64, at a first shape and then at another (dynamo then recompiles
with dynamic sizes). A process that compiles first is what a user's training script is; a test
process has usually run the same norms eagerly before and filled their caches, which hid a
store into one (a traced tensor put into a module-level dict inside the autograd.Function's
forward: dynamo refuses it). Prints "ok <case>" per case; a mismatch raises."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from module_cases import CASES, Calling, inputs, make, run_and_check  # noqa: E402

for case in CASES:
    for dtype in (torch.float32, torch.bfloat16):
        torch._dynamo.reset()
        wrapper = Calling(make(case, dtype))
        compiled = torch.compile(wrapper, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
        for rows in ((3, 5), (2, 7)):  # the second: recompiled with dynamic sizes
            params = {k.removeprefix("norm."): v for k, v in wrapper.named_parameters()}
            run_and_check(case, dtype, compiled, params, *inputs(dtype, rows=rows))
            wrapper.zero_grad(set_to_none=True)
        print(f"ok {case}, {dtype}", flush=True)
