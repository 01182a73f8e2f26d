"""scripts/benchmark_cpu.py: each patched module against the module it replaces on the CPU, the
Triton path's host time with its launches stubbed, and the launch path both ways."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_cpu_benchmark(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_cpu.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_benchmark_cpu_quick_times_every_replacement_and_the_host_path(tmp_path):
    pytest.importorskip("triton")  # --host runs the Triton path's launchers (stubbed)
    proc = _run_cpu_benchmark("--quick", "--host", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "cpu.json").read_text())
    assert result["environment"]["threads"] >= 1 and result["environment"]["torch"]
    cases = {r["case"] for r in result["modules"]}
    skipped = result["skipped_cases"]  # classes this transformers lacks (Qwen4-Exp's in 4.x)
    assert all("has no such class" in why for why in skipped.values())
    assert len(cases) + len(skipped) == 8 and "LayerNorm → RMSNorm+bias (exact conversion)" in cases
    assert "MambaRMSNormGated → FusedGatedRMSNorm" in cases  # called with a gate
    for r in result["modules"]:
        assert r["original_us"] > 0 and r["patched_us"] > 0
        assert r["ratio"] == pytest.approx(r["patched_us"] / r["original_us"])
    assert len(result["modules"]) == len(cases) * 2 * 2 * 2  # cases × dtypes × shapes × modes
    host = {(r["call"], r["mode"]) for r in result["host"]}
    assert ("layer_norm(x, w, b)", "forward + backward") in host and len(host) == 19
    assert ("FusedGatedRMSNorm module, 8 groups", "forward + backward") in host
    markdown = (tmp_path / "cpu.md").read_text()
    assert "| LlamaRMSNorm → FusedRMSNorm | bf16 |" in markdown and "kernel launches stubbed" in markdown


def test_benchmark_cpu_times_only_the_cases_asked_for(tmp_path):
    proc = _run_cpu_benchmark("--quick", "--cases", "rmsnormgated", "--dtypes", "bf16", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = {r["case"] for r in json.loads((tmp_path / "cpu.json").read_text())["modules"]}
    assert cases == {"MambaRMSNormGated → FusedGatedRMSNorm", "Qwen3NextRMSNormGated → FusedGatedRMSNorm"}
    proc = _run_cpu_benchmark("--quick", "--cases", "BatchNorm", "--out", str(tmp_path / "none"))
    assert proc.returncode == 2 and "--cases 'BatchNorm' names none of: LayerNorm → FusedLayerNorm" in proc.stderr
    assert not (tmp_path / "none").exists()


def test_benchmark_cpu_rejects_an_unknown_dtype(tmp_path):
    proc = _run_cpu_benchmark("--quick", "--dtypes", "fp8", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--dtypes: unknown ['fp8']" in proc.stderr
    assert not (tmp_path / "cpu.json").exists()


def test_benchmark_cpu_times_the_launch_path_both_ways_in_a_run_of_its_own(tmp_path):
    """--launcher: every public call and a module's through Triton's launch path (compiled
    kernels, no-op launches), with Triton's run, with the direct launch and, where a compiler
    builds it, through the C++ launch operator; not in one run with --host."""
    pytest.importorskip("triton")
    from hf_rmsnorm.ops._direct import _DIRECT_TRITON

    if not _DIRECT_TRITON:
        pytest.skip("the direct launch is off for this Triton release")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_cpu.py"), "--launcher", "--no-modules",
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "cpu.json").read_text())["launcher"]
    gated = ("gated_rms_norm(x, z, w, heads of 128)", "FusedGatedRMSNorm module, 8 groups")
    assert {(r["call"], r["mode"]) for r in rows} == {
        (call, mode) for call in ("rms_norm(x, w)", "rms_norm(x, w, b)", "layer_norm(x, w, b)", "FusedLayerNorm module",
                                  *gated)
        for mode in ("forward, no grad", "forward, with grad", "forward + backward")}
    assert all(r["triton_us"] > 0 and r["direct_us"] > 0 for r in rows)
    from hf_rmsnorm.ops import _cpu_kernel

    # the C++ launch operator launches the plain norms' kernels and the gated ones
    if _cpu_kernel._compiler() is not None:
        assert all(r["cpp_us"] > 0 for r in rows)
    assert "| layer_norm(x, w, b) | forward + backward | 2×8×1024 |" in (tmp_path / "cpu.md").read_text()
    # a norm call inside a (two-block) model's forward and in a loop: the operator launches each
    # of the five norms where it is on, never where the norms launch from Python
    in_model = json.loads((tmp_path / "cpu.json").read_text())["in_model"]
    cpp_rows = ["FusedLayerNorm, C++ operator by the general way", "FusedLayerNorm, C++ operator, settled (the default)"]
    assert [r["call"] for r in in_model] == ["torch nn.LayerNorm", "FusedLayerNorm, launched from Python"] + (
        cpp_rows if _cpu_kernel._compiler() is not None else [])
    assert all(r["norms"] == 5 and r["in_model_us"] > 0 and r["in_loop_us"] > 0 for r in in_model)
    assert [r["operator_launches"] for r in in_model] == [0, 0, 5, 5][:len(in_model)]
    assert "| FusedLayerNorm, launched from Python | 5 |" in (tmp_path / "cpu.md").read_text()
    both = _run_cpu_benchmark("--quick", "--host", "--launcher", "--out", str(tmp_path / "both"))
    assert both.returncode == 2 and "--host and --launcher need separate runs" in both.stderr
    assert not (tmp_path / "both").exists()
