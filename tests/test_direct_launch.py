"""The direct launch (``_direct.launch`` with ``_DIRECT_LAUNCH``) must pick the compiled
kernel Triton's own launch picks and pass its launcher the same arguments.

On a CPU machine the kernels are compiled for sm_90 by Triton's own compiler and every launch is
a no-op that records its arguments (``benchmark_cpu.triton_without_gpu``), in a child process:
the kernels must be defined compiled, and this suite defines them for the interpreter. Whether
the launched kernel computes the same bits is the GPU suite's part
(``test_gpu.py::test_direct_launch_computes_the_same_bits``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import run_with_compiled_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_argument_facts_determine_tritons_specialisation():
    """The direct cache's key: two arguments with the same facts must get the same
    specialisation from Triton (the converse is not needed: a finer key only sends a call
    through Triton's own path once more). Triton's own specialisation function is the reference."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops._direct import _DIRECT_TRITON, _arg_facts

    if not _DIRECT_TRITON:  # and Triton's specialisation function may not exist (3.2 has none)
        pytest.skip("the direct launch is off for this Triton release")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    base = torch.zeros(64, dtype=torch.bfloat16)
    wide = torch.zeros(64, dtype=torch.float32)
    values = [
        0, 1, 2, 15, 16, 17, 32, 1024, 1000, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 16,
        2**32, 2**63 - 16, 2**63, 2**63 + 16, 2**64 - 16, True, False, 0.0, 1.0, 1e-6, 1e300, None,
        base, base[8:], base[1:], base[2:], base[9:], wide, wide[4:], wide[1:], base.to(torch.float16),
    ]
    specs = [native_specialize_impl(CUDABackend, v, False, True, True) for v in values]
    facts = list(_arg_facts(values)[0])
    for i in range(len(values)):
        for j in range(len(values)):
            if facts[i] == facts[j]:
                assert specs[i] == specs[j], (values[i], values[j], facts[i], specs[i], specs[j])
    # the values span more than ten of Triton's specialisations (aligned and unaligned pointers,
    # 16-divisible integers, 1, the integer widths), so the check above has pairs to tell apart
    assert len(set(facts)) >= len(set(specs)) > 10


# The child: the package's Triton path on CPU tensors for norms of several shapes and alignments,
# each launch recorded; every recorded launch is then replayed through Triton's launch and
# through the direct one, which must pick the same compiled kernel (the same launcher object)
# and pass it the same arguments, object for object. The cases run in one process, in an order
# where each differs from an earlier one in one specialised fact (alignment, 16-divisibility, a
# row count of 1, a dtype), so a key that missed a fact would replay an earlier kernel.
_CHILD = textwrap.dedent('''
    import sys
    sys.path.insert(0, {scripts!r})
    import torch
    from benchmark_cpu import _NoLaunch, triton_without_gpu

    with triton_without_gpu():
        from hf_rmsnorm.ops import _direct as D
        from hf_rmsnorm.ops import _triton_gated as GT
        from hf_rmsnorm.ops import _triton_norm as T
        from hf_rmsnorm.ops import gated_rms_norm, layer_norm, rms_norm
        from triton import knobs

        recorded = []
        launch = T._launch

        def record(kernel, grid, args, meta, meta_key=None):
            recorded.append((kernel, grid, args, meta, meta_key))
            return launch(kernel, grid, args, meta, meta_key)

        def inputs(m, n, dtype=torch.bfloat16, w_dtype=None, shift=0, start=0):
            # shift > 0: rows inside wider ones (row stride n + shift); start > 0: the data
            # starts that many elements into its buffer (for bf16, 1: not 16-byte aligned, 8: aligned)
            flat = torch.randn(start + m * (n + shift), dtype=dtype)
            x = flat[start:].view(m, n + shift)[:, shift:].detach().requires_grad_(True)
            w = torch.randn(n + start, dtype=w_dtype or dtype)[start:].detach().requires_grad_(True)
            b = torch.randn(n, dtype=w_dtype or dtype, requires_grad=True)
            return x, w, b

        cases = [
            ("rms", inputs(16, 1024), False, 0.0),
            ("rms", inputs(16, 1024, start=1), False, 0.0),
            ("rms", inputs(16, 1024, start=8), False, 0.0),
            ("rms", inputs(16, 1024, shift=1), False, 0.0),
            ("rms", inputs(16, 1000), False, 0.0),
            ("rms", inputs(16, 1024, w_dtype=torch.float32), False, 0.0),
            ("rms", inputs(16, 1024), False, 1.0),
            ("rms", inputs(16, 1024), True, 0.0),
            ("layer", inputs(16, 1024), True, 0.0),
            ("layer", inputs(1, 1024), True, 0.0),
            ("layer", inputs(16, 1024, dtype=torch.float16), True, 0.0),
            ("layer", inputs(16, 1024, shift=8), True, 0.0),
        ]
        # the gated norm's: (x, gate, weight), group size, norm_before_gate
        def gated_inputs(m, n, w_dtype=None, start=0, gate_stride=None):
            x = torch.randn(start + m * n, dtype=torch.bfloat16)[start:].view(m, n).requires_grad_(True)
            wide = gate_stride or n  # the gate a slice of a wider projection's rows (Mamba2's mixer)
            z = torch.randn(m, wide, dtype=torch.bfloat16)[:, wide - n:].detach().requires_grad_(True)
            return x, z, torch.randn(n, dtype=w_dtype or torch.bfloat16, requires_grad=True)

        gated_cases = [
            (gated_inputs(16, 1024), 128, True),  # Qwen3-Next's order, 8 heads a row
            (gated_inputs(16, 1024), None, False),  # one group: G = 1, which Triton specialises on
            (gated_inputs(16, 1024, gate_stride=3000), 128, False),  # rows of another stride
            (gated_inputs(16, 1024, w_dtype=torch.float32), 128, True),
            (gated_inputs(1, 1024), 128, True),  # one row
            (gated_inputs(16, 1000), 100, True),  # 16 divides neither N nor S
            (gated_inputs(16, 1024, start=1), 128, True),  # x not 16-byte aligned
        ]
        T._launch = GT._launch = record
        for kind, (x, w, b), with_bias, offset in cases:
            fn = rms_norm if kind == "rms" else layer_norm
            params = (w, b) if with_bias else (w,)
            y = fn(x, *params, offset=offset)
            torch.autograd.grad(y, (x, *params), torch.randn_like(y))
        for (x, z, w), size, before in gated_cases:
            y = gated_rms_norm(x, z, w, group_size=size, norm_before_gate=before)
            torch.autograd.grad(y, (x, z, w), torch.randn_like(y))
        T._launch = GT._launch = launch
        assert len(recorded) == 3 * len(cases) + 2 * len(gated_cases), len(recorded)

        def launcher_calls(call):
            _NoLaunch.calls = []
            call()
            calls, _NoLaunch.calls = _NoLaunch.calls, None
            assert len(calls) == 1, len(calls)
            return calls[0]

        def same(a, b):
            if isinstance(b, torch.Tensor):  # the direct launch passes its data pointer, which Triton's launcher reads from it
                return type(a) is int and a == b.data_ptr()
            return a is b or (type(a) is type(b) and a == b)

        direct = 0
        D._DIRECT_LAUNCH = True
        for kernel, grid, args, meta, meta_key in recorded:
            assert meta_key == tuple(meta.items()), (meta_key, meta)  # a launch plan's key of its meta
            tritons = launcher_calls(lambda: kernel[grid](*args, **meta))
            T._launch(kernel, grid, args, meta, meta_key)  # fills the direct cache where this key is new
            run = kernel.run

            def refuse(*a, **k):
                raise AssertionError("the direct launch went through JITFunction.run")

            kernel.run = refuse
            try:
                ours = launcher_calls(lambda: T._launch(kernel, grid, args, meta, meta_key))
            finally:
                kernel.run = run
            assert ours[0] is tritons[0], ("another compiled kernel", kernel, meta)
            assert len(ours[1]) == len(tritons[1]), (len(ours[1]), len(tritons[1]))
            # the launch metadata and the enter and exit hooks: Triton passes its (empty) hook
            # chains and the metadata built for them, the direct launch none of the three
            assert ours[1][6:9] == (None, None, None), ours[1][6:9]
            assert all(isinstance(h, knobs.HookChain) and not h.calls for h in tritons[1][7:9]), tritons[1][7:9]
            for k, (a, b) in enumerate(zip(ours[1], tritons[1])):
                if not 6 <= k < 9:
                    assert same(a, b), (kernel, k, a, b)
            direct += 1
        print("direct launches checked:", direct, "compiled kernels:", len(D._DIRECT))

        # The backward's programs on CUDA come from the registers of one specialisation per plan
        # (_backward_specimen): the kernel a launch on contiguous, aligned rows, 4096 of them, runs.
        for kind, n, w_dtype, with_bias in (("layer", 1024, torch.bfloat16, True), ("rms", 1000, torch.float32, False),
                                            ("rms", 8192, torch.bfloat16, False), ("layer", 768, torch.float16, False)):
            x = torch.randn(4096, n, dtype=torch.bfloat16)
            dy, dx, w = torch.randn_like(x), torch.empty_like(x), torch.randn(n, dtype=w_dtype)
            is_rms, columns = kind == "rms", (1 + with_bias) * n
            meta = T._bwd_plan(x, dy, w, n, is_rms, 0, with_bias, columns, None, None, None, "", False, None)[1]
            rstd, part = torch.empty(4096), torch.empty(4, columns)
            launched = T._norm_bwd_kernel[(4,)](x, w, dy, dx, part, None if is_rms else rstd, rstd, n, n, 4096, n, 0.5, **meta)
            specimen = T._backward_specimen(x, dy, w, is_rms, columns, meta)
            assert specimen is launched, (kind, n, w_dtype)
            # and not the kernel of a row count that 16 does not divide
            odd = T._norm_bwd_kernel[(4,)](x[:4095], w, dy, dx, part, None if is_rms else rstd, rstd, n, n, 4095, n, 0.5, **meta)
            assert specimen is not odd
        print("backward specimens checked")
''')


def test_direct_launch_passes_the_launcher_what_triton_passes(tmp_path):
    pytest.importorskip("triton")
    from hf_rmsnorm.ops._direct import _DIRECT_TRITON

    if not _DIRECT_TRITON:
        pytest.skip("the direct launch is off for this Triton release")
    stdout = run_with_compiled_kernels(tmp_path, _CHILD.format(scripts=str(ROOT / "scripts")))
    assert "direct launches checked: 50" in stdout, stdout
    assert "backward specimens checked" in stdout, stdout


@pytest.mark.parametrize("value,expected", [(None, True), ("1", True), ("0", False), (" 0 ", False), ("yes", None), ("", None)])
def test_the_environment_turns_the_direct_launch_off_and_rejects_other_values(value, expected):
    """On by default since run 10 (H200: the same bits as Triton's launch, less host time);
    ``HF_RMSNORM_DIRECT_LAUNCH=0`` goes back to Triton's launch; any other value than 0 or 1 is
    refused at import with one message saying what it takes, in a fresh interpreter (the module
    reads it once)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "HF_RMSNORM_DIRECT_LAUNCH"}
    if value is not None:
        env["HF_RMSNORM_DIRECT_LAUNCH"] = value
    proc = subprocess.run([sys.executable, "-c", "from hf_rmsnorm.ops import _direct; print(_direct._DIRECT_LAUNCH)"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if expected is None:
        assert proc.returncode != 0
        assert f"HF_RMSNORM_DIRECT_LAUNCH={value.strip()!r}: expected 1" in proc.stderr and "or 0" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == str(expected)


@pytest.mark.parametrize("backend", ["cuda", "hip"])
def test_the_direct_launch_is_for_nvidia_gpus_only(backend, monkeypatch):
    """The direct launch's key holds what Triton's NVIDIA backend specialises an argument on;
    AMD's backend specialises on more, so on any target but an NVIDIA GPU every launch goes
    through Triton's own ``run``, also after a key's first call. A JITFunction whose ``run``
    returns a stand-in compiled kernel, under a stand-in driver for each target: no compiler
    and no GPU needed."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from hf_rmsnorm.ops import _direct

    if not _direct._DIRECT_TRITON:
        pytest.skip("the direct launch is off for this Triton release")

    def body(X, n, BLOCK: triton.language.constexpr):
        pass

    kernel = triton.runtime.jit.JITFunction(body)
    calls = []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            calls.append(("direct", args[9:]))

        def launch_metadata(self, grid, stream, *args):  # asked for when a launch hook is set
            calls.append(("metadata", args))
            return None

    compiled = Compiled()

    def run(*args, grid, warmup, **meta):
        calls.append(("triton", args))
        return compiled

    class Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32) if backend == "cuda" else GPUTarget("hip", "gfx942", 64)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

    monkeypatch.setattr(kernel, "run", run)
    monkeypatch.setattr(_direct, "_DIRECT_LAUNCH", True)
    monkeypatch.setattr(_direct, "_DIRECT", {})
    saved = driver._active
    driver.set_active(Driver())
    try:
        x = torch.zeros(16)
        for _ in range(3):
            assert _direct.launch(kernel, (1,), (x, 16), {"BLOCK": 16}, (("BLOCK", 16),)) is compiled
        # with a launch hook (a profiler's), the hook's metadata and the launcher get the tensor
        hooked = triton.knobs.HookChain()
        hooked.add(lambda metadata: None)
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hooked)
        calls.append("hooked")
        _direct.launch(kernel, (1,), (x, 16), {"BLOCK": 16}, (("BLOCK", 16),))
    finally:
        driver._active = saved
    if backend == "cuda":  # Triton's run compiles on the first call, the launcher runs the rest
        # with the tensor's data pointer, which Triton's launcher takes as it is (no driver query)
        assert calls == [("triton", (x, 16)), ("direct", (x.data_ptr(), 16, 16)), ("direct", (x.data_ptr(), 16, 16)),
                         "hooked", ("metadata", (x, 16, 16)), ("direct", (x, 16, 16))]
    else:
        assert calls == [("triton", (x, 16))] * 3 + ["hooked", ("triton", (x, 16))]
