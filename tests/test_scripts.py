"""The benchmark entry points run end to end (tiny shapes on the CPU) and write what they
promise; the numbers themselves are not asserted (benchmarks are not tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_kernels.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_benchmark_kernels_quick_writes_json_and_markdown(tmp_path):
    proc = _run("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    env = result["environment"]
    assert env["device"] and env["copy_gbps"] > 0 and env["torch"]
    assert result["modes"] == ["fwd", "fwd+bwd"]
    ours = [p for p in result["results"] if p.startswith("hf_rmsnorm")]
    assert len(ours) == 3 and "torch F.layer_norm" in result["results"] and "HF eager RMSNorm" in result["results"]
    assert not result["errors"], (result["errors"], proc.stderr[-3000:])
    for name, per in result["results"].items():
        for m, n in result["shapes"]:
            for mode in result["modes"]:
                r = per[f"{m}x{n}"][mode]
                assert r["time_us"] > 0 and r["gbps"] > 0 and 0 < r["frac_copy"], (name, m, n, mode)
    markdown = (tmp_path / "kernels.md").read_text()
    assert "| hf_rmsnorm LayerNorm |" in markdown and "copy bandwidth" in markdown
    assert markdown.strip() in proc.stdout


@pytest.mark.slow
def test_benchmark_kernels_gated_times_the_gated_norms_over_their_own_floor(tmp_path):
    """--gated: ours and the HF classes (Qwen3-Next's gate after the norm, Mamba2's before it in
    groups) on the gated shapes, each byte of the gate counted; every gradient taken, the HF
    modules' weight included."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_kernels import GATED_PROVIDERS, PROVIDERS, QUICK_GATED_SHAPES, floor_bytes, make_step

    eager = [p for p in GATED_PROVIDERS if PROVIDERS[p][2] is None]  # no compile, no GPU-only peer
    proc = _run("--quick", "--gated", "--out", str(tmp_path), "--providers", ",".join(eager + ["fla FusedRMSNormGated"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert [tuple(s) for s in result["shapes"]] == QUICK_GATED_SHAPES and list(result["results"]) == eager
    if not torch.cuda.is_available():  # flash-linear-attention's kernel, the peer, runs on GPUs only
        assert result["skipped"]["fla FusedRMSNormGated"] in (
            "flash-linear-attention (fla-core) not installed", "flash-linear-attention's kernels need a GPU")
    for per in result["results"].values():
        for m, n in QUICK_GATED_SHAPES:
            for mode in result["modes"]:
                r = per[f"{m}x{n}"][mode]
                assert r["kind"] == "gated"
                assert r["gbps"] == pytest.approx(floor_bytes(m, n, torch.bfloat16, mode, gated=True) / (r["time_us"] * 1e-6) / 1e9)
    assert floor_bytes(4, 8, torch.bfloat16, "fwd+bwd", gated=True) == 16 * 4 * 8  # x, gate, y; x, gate, dy, dx, dgate
    for name in eager:
        grads = make_step(name, 8, 64, "fwd+bwd", torch.bfloat16, torch.bfloat16, torch.device("cpu"))()
        assert len(grads) == 3 and all(g is not None for g in grads), name  # x, weight, gate


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason a machine without a GPU gets")
def test_benchmark_kernels_times_the_cpp_launch_only_when_named_and_says_why_not_here(tmp_path):
    """The rows launched one way (the C++ launch operator, or from Python) are not in a default
    run; named, on a machine without a GPU, they are skipped with the reason, and the row beside
    them is timed."""
    proc = _run("--quick", "--out", str(tmp_path), "--modes", "fwd", "--providers",
                "hf_rmsnorm LayerNorm,hf_rmsnorm LayerNorm (C++ launch),hf_rmsnorm LayerNorm (Python launch)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert list(result["results"]) == ["hf_rmsnorm LayerNorm"]
    assert result["skipped"] == {
        "hf_rmsnorm LayerNorm (C++ launch)": "the C++ launch operator launches on CUDA GPUs only",
        "hf_rmsnorm LayerNorm (Python launch)":
            "off CUDA the norms launch from Python anyway: the same row as the provider without '(Python launch)'"}
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_kernels import DEFAULT_PROVIDERS, PROVIDERS

    assert [p for p in PROVIDERS if p not in DEFAULT_PROVIDERS and PROVIDERS[p][1] != "gated"] == [
        "hf_rmsnorm RMSNorm (C++ launch)", "hf_rmsnorm LayerNorm (C++ launch)",
        "hf_rmsnorm RMSNorm (Python launch)", "hf_rmsnorm LayerNorm (Python launch)"]
    # on (off) for the provider's call only
    pytest.importorskip("triton")
    from benchmark_kernels import _launched

    from hf_rmsnorm.ops import _cuda_launch

    for cpp in (True, False):
        before = _cuda_launch.ENABLED
        call = _launched(lambda x, w, b: (lambda x: _cuda_launch.ENABLED), cpp)(None, None, None)
        assert call(None) is cpp and _cuda_launch.ENABLED is before


def test_benchmark_rejects_an_unknown_provider(tmp_path):
    proc = _run("--quick", "--out", str(tmp_path), "--providers", "apex")
    assert proc.returncode == 2
    assert "unknown provider(s) ['apex']" in proc.stderr
    assert not (tmp_path / "kernels.json").exists()


@pytest.mark.slow
def test_benchmark_training_quick_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_training.py"), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "training.json").read_text())
    rows = {(r["model"], r["precision"], r["variant"]) for r in result["results"]}
    for precision in ("bf16 params", "fp32 params + bf16 autocast"):
        assert {("gpt2-medium", precision, v) for v in ("as shipped", "layernorm", "rmsnorm", "norms -> Identity")} <= rows
        assert ("llama-1b", precision, "rmsnorm") not in rows  # nothing to convert in an RMSNorm model
    gpt2_rms = next(r for r in result["results"] if r["model"] == "gpt2-medium" and r["variant"] == "rmsnorm")
    assert " 5 exact" in gpt2_rms["report"]
    # patch_model's own time, for the rows that patch
    assert all((r["patch_seconds"] is None) == (r["variant"] in ("as shipped", "norms -> Identity")) for r in result["results"])
    assert all(r["patch_seconds"] > 0 for r in result["results"] if r["patch_seconds"] is not None)
    assert all(0 < r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] and r["steps"] == 2 for r in result["results"])
    # the collector's time inside the timed steps: never more than the slowest step itself
    assert all(0 <= r["gc_ms_per_step"] <= r["gc_ms_max"] <= r["step_ms_max"] for r in result["results"])
    assert all(len(r["step_ms_each"]) == 2 and max(r["step_ms_each"]) == pytest.approx(r["step_ms_max"], abs=0.01)
               for r in result["results"])
    # the host's part of each step: issued before the step ended (on the CPU the step is all host)
    assert all(len(r["host_ms_each"]) == 2 and all(0 < h <= t for h, t in zip(r["host_ms_each"], r["step_ms_each"]))
               for r in result["results"])
    assert all(r["allocator_events"] == {} for r in result["results"])  # the CPU allocator counts none
    # each phase's end on the host, in order and within the step (no GPU times on the CPU)
    for r in result["results"]:
        ends = [r["phase_ms"][p] for p in ("forward", "backward", "optimizer")]
        assert all(set(e) == {"host"} for e in ends)
        assert 0 < ends[0]["host"] <= ends[1]["host"] <= ends[2]["host"] <= r["step_ms_max"]
    # a model's variants were timed side by side, in turn
    assert {r["timed_with"] for r in result["results"] if r["model"] == "gpt2-medium"} == {4}
    assert {r["timed_with"] for r in result["results"] if r["model"] == "llama-1b"} == {3}
    assert "| gpt2-medium | bf16 params | rmsnorm |" in (tmp_path / "training.md").read_text()


def test_benchmark_generation_quick_writes_json_and_markdown(tmp_path):
    script = str(ROOT / "scripts" / "benchmark_generation.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--batches", "1,2", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "generation.json").read_text())
    rows = {(r["model"], r["batch"], r["variant"]): r for r in result["results"]}
    for batch in (1, 2):
        assert {("gpt2-medium", batch, v) for v in ("as shipped", "layernorm", "rmsnorm", "norms -> Identity")} <= set(rows)
        assert ("llama-1b", batch, "rmsnorm") not in rows  # nothing to convert in an RMSNorm model
        # the patched models generate what the model as shipped generates (greedy, fp32)
        for model, variant in (("gpt2-medium", "layernorm"), ("gpt2-medium", "rmsnorm"), ("llama-1b", "layernorm")):
            assert rows[model, batch, variant]["tokens_differing"] == 0, (model, batch, variant)
    for r in result["results"]:
        assert 0 < r["generate_ms_min"] <= r["generate_ms"] <= r["generate_ms_max"] and r["rounds"] == 2
        assert r["tokens_per_second"] == pytest.approx(r["batch"] * r["new_tokens"] / r["generate_ms"] * 1e3)
    assert "| gpt2-medium | fp32 | 2 | 8 + 4 | rmsnorm |" in (tmp_path / "generation.md").read_text()
    bad = subprocess.run([sys.executable, script, "--quick", "--batches", "one", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--batches takes comma-separated integers, got 'one'" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_benchmark_training_profile_attributes_the_norms(tmp_path):
    """--profile: each row's profiled time by kind; the patched row spends time in norms that the
    Identity row does not have, and its difference list against the Identity row shows them
    (among the largest differences, or after them: on a loaded CPU other operators' times
    can differ by more than the norms take)."""
    script = str(ROOT / "scripts" / "benchmark_training.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--profile", "--models", "llama-1b", "--variants",
                           "layernorm,norms -> Identity", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_training import kernel_kind

    rows = json.loads((tmp_path / "training.json").read_text())["results"]
    norm_us = {(r["precision"], r["variant"]): sum(us for name, us in r["kernel_us_per_step"].items() if kernel_kind(name) == "norm")
               for r in rows}
    for precision in ("bf16 params", "fp32 params + bf16 autocast"):
        assert norm_us[(precision, "layernorm")] > 0 and norm_us[(precision, "norms -> Identity")] == 0
    md = (tmp_path / "training.md").read_text()
    assert "Kernel time per step by kind" in md and md.count("against the Identity row") == 2
    section = md.split("llama-1b, bf16 params, layernorm:")[1].split("\n\n")[1]
    assert " norm: `" in section


def _training_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark_training

    return benchmark_training


def test_training_variants_take_steps_in_turn_and_a_failing_one_drops_out():
    bt = _training_module()
    order = []

    class Fake:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at, self.error, self.steps = name, fail_at, None, 0

        def timed_step(self, batch):
            if self.steps == self.fail_at:
                raise RuntimeError("boom")
            self.steps += 1
            order.append(self.name)

    runs = [Fake("a"), Fake("b", fail_at=2), Fake("c")]
    bt.time_in_turn(runs, None, 4)
    # each round one step of every run still going, starting one run later each round
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "a", "c"]
    assert runs[1].error == "RuntimeError: boom" and runs[1].steps == 2
    assert runs[0].error is None and runs[0].steps == runs[2].steps == 4


def test_gpu_sampler_gives_each_row_the_readings_within_its_own_steps():
    """The sampler reads on a thread while the steps run; each row's summary holds only the
    readings taken within that row's steps (medians, the power-capped share, the count), here two
    rows whose GPU state differs, with gaps between their steps; a reader that fails ends the
    sampling quietly, and no reader (no GPU, no NVML) samples nothing."""
    import time

    bt = _training_module()
    state = {"now": (1000, 300.0, False)}
    spans = {"a": [], "b": []}
    with bt.GpuSampler(lambda: state["now"], interval=0.002) as sampler:
        for _ in range(2):
            for row, reading in (("a", (1000, 300.0, False)), ("b", (1500, 450.0, True))):
                state["now"] = reading
                time.sleep(0.02)  # a gap: a reading taken before the switch falls outside every step
                start = time.perf_counter()
                time.sleep(0.05)
                spans[row].append((start, time.perf_counter()))
    a, b = sampler.summary(spans["a"]), sampler.summary(spans["b"])
    assert (a["sm_clock_mhz"], a["power_w"], a["power_capped_share"]) == (1000, 300.0, 0.0) and a["samples"] >= 10
    assert (b["sm_clock_mhz"], b["power_w"], b["power_capped_share"]) == (1500, 450.0, 1.0) and b["samples"] >= 10
    assert a["samples"] + b["samples"] < len(sampler.samples)  # the gaps' readings belong to no row

    calls = []

    def failing():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("NVML went away")
        return (900, 200.0, False)

    with bt.GpuSampler(failing, interval=0.001) as sampler:
        time.sleep(0.05)
    assert len(sampler.samples) == 3 and len(calls) == 4
    with bt.GpuSampler(None) as sampler:
        time.sleep(0.01)
    assert sampler.samples == [] and sampler.summary([(0, float("inf"))]) == {}
    import torch

    assert bt.nvml_reader(torch.device("cpu")) is None


def test_training_markdown_shows_the_gpu_readings_of_each_row():
    bt = _training_module()
    row = {"model": "llama-1b", "precision": "bf16 params", "variant": "norms -> Identity", "step_ms": 100.0,
           "step_ms_min": 99.0, "step_ms_max": 101.0, "tokens_per_second": 81920.0, "peak_memory_bytes": 2**30,
           "host_ms": 20.0, "gc_ms_per_step": 0.0, "gc_ms_max": 0.0, "allocator_events": {},
           "gpu_while_timed": {"sm_clock_mhz": 1755.0, "power_w": 612.4, "power_capped_share": 0.25, "samples": 240}}
    env = {"device": "GPU", "batch": [8, 1024], "torch": "t", "triton": "t", "transformers": "t", "date": "d"}
    md = bt._markdown(env, [row])
    assert "| llama-1b | bf16 params | norms -> Identity | 1755 | 612 | 25% | 240 |" in md
    assert "The GPU while each row's steps ran" not in bt._markdown(env, [{**row, "gpu_while_timed": {}}])


def test_training_launch_variants_set_their_launch_path_in_their_own_steps_only(monkeypatch):
    """The "+triton", "+python" and "+cpp" rows patch as their plain twins do, and each step runs
    with the direct launch off exactly when its own variant asks for it, and with the C++ launch
    operator on exactly when its own variant asks for it or, for a plain row, the environment
    does (the variants step in turn); the other rows keep the package's defaults."""
    pytest.importorskip("triton")
    import torch

    bt = _training_module()
    from hf_rmsnorm.ops import _cuda_launch, _direct

    device = torch.device("cpu")
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(_direct, "_DIRECT_LAUNCH", _direct._DIRECT_LAUNCH)  # restored afterwards
    monkeypatch.setattr(_cuda_launch, "ENABLED", _cuda_launch.ENABLED)
    for env, default, cpp_env, cpp_default in ((None, True, None, True), ("0", False, "0", False)):
        for name, value in ((_direct.DIRECT_LAUNCH_ENV, env), (_cuda_launch.CPP_LAUNCH_ENV, cpp_env)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        seen = []
        runs = []
        for variant in ("rmsnorm", "rmsnorm+triton", "rmsnorm+python", "rmsnorm+cpp", "as shipped"):
            run = bt.prepare("gpt2-medium", bt.QUICK, "bf16 params", variant, batch, device, warmup=0)
            run.model.register_forward_pre_hook(
                lambda m, a, v=variant: seen.append((v, _direct._DIRECT_LAUNCH, _cuda_launch.ENABLED)))
            runs.append(run)
        assert runs[0].summary == runs[1].summary == runs[2].summary == runs[3].summary
        assert " 0 exact" not in runs[1].summary
        bt.time_in_turn(runs, batch, 2)
        assert sorted(set(seen)) == [("as shipped", default, cpp_default), ("rmsnorm", default, cpp_default),
                                     ("rmsnorm+cpp", default, True), ("rmsnorm+python", default, False),
                                     ("rmsnorm+triton", False, False)]
        assert len(seen) == 10


@pytest.mark.slow
def test_training_group_that_does_not_fit_at_once_is_timed_one_variant_at_a_time(tmp_path, monkeypatch):
    """Out of memory while a second model is alive: the group's variants are then each built
    and timed alone, and every row is there and says so."""
    import weakref

    import torch

    bt = _training_module()
    alive = weakref.WeakSet()
    real_prepare = bt.prepare

    def prepare(*args):
        if len(alive):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        run = real_prepare(*args)
        if run is not None:
            alive.add(run.model)
        return run

    monkeypatch.setattr(bt, "prepare", prepare)
    batch = torch.randint(0, 256, (2, 32))
    variants = ["as shipped", "layernorm", "rmsnorm", "norms -> Identity"]
    rows = bt.time_group("gpt2-medium", bt.QUICK, "bf16 params", variants, batch, torch.device("cpu"), 1, 2)
    assert [r["variant"] for r in rows] == variants
    assert all("error" not in r and r["timed_with"] == 1 and r["did_not_fit_together"] and r["steps"] == 2 for r in rows), rows
    assert "Timed alone, after its group did not fit the device at once: gpt2-medium, bf16 params, as shipped;" in bt._markdown(
        {"device": "CPU", "batch": [2, 32], "torch": "t", "triton": "t", "transformers": "t", "date": "d"}, rows)


def test_kernel_kinds_of_typical_gpu_kernel_names():
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_training import kernel_kind

    cases = {
        "_norm_bwd_kernel": "norm",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64>>": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
        "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
    }
    for name, kind in cases.items():
        assert kernel_kind(name) == kind, name


@pytest.mark.slow
def test_benchmark_training_times_only_the_rows_asked_for(tmp_path):
    script = str(ROOT / "scripts" / "benchmark_training.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--models", "gpt2-medium", "--variants", "layernorm",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "training.json").read_text())["results"]
    assert {(r["model"], r["variant"]) for r in rows} == {("gpt2-medium", "layernorm")} and len(rows) == 2
    assert all(r["timed_with"] == 1 and not r["did_not_fit_together"] for r in rows)
    assert "Timed alone" not in (tmp_path / "training.md").read_text()
    bad = subprocess.run([sys.executable, script, "--quick", "--variants", "fused", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and "--variants takes a subset of" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_kernels_compile_for_hopper_vectorised_and_without_spills():
    """The real (not interpreted) compile for sm_90, no GPU needed: every kernel builds, moves
    memory in 16-byte vectors, and keeps rows up to 8192 in registers (no stack), short of
    8 bytes where the launcher caps the registers (LayerNorm's backward at 768 columns: with
    fp32 parameters it spills 8 B under the H200's Triton 3.6 too, and ran faster capped) or
    pipelines the tile loop (LayerNorm's fp32-parameter backward at 4096 columns spills 8 B
    under Triton 3.9, none under 3.6, and ran 16 % faster pipelined); the tile loops the
    launcher pipelines compile to asynchronous copies, and the programs per SM count shared
    memory as well as registers."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--arch", "90"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0 and "cuobjdump" in proc.stderr:
        pytest.skip("this Triton build ships no NVIDIA tools")
    if proc.returncode == 2 and "needs Triton 3.6 or newer" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    # the weight-gradient sums: every load a 16-byte vector, nothing spilled, whatever the width
    sums = [line.split(" | ") for line in lines if line.startswith("| sum")]
    assert len(sums) == 30 and all("(≤16 B)" in r[10].split(",")[0] and r[7] == "0" for r in sums), sums
    rows = [line.split(" | ") for line in lines if (line.startswith("| fwd") or line.startswith("| bwd"))]
    gated = [r for r in rows if r[1].startswith("gated")]
    rows = [r for r in rows if not r[1].startswith("gated")]
    assert len(rows) == 60  # 6 variants x 5 shapes x forward and backward
    # the gated norm's kernels at the --gated benchmark's shapes: 16-byte vectors, nothing spilled
    assert len(gated) == 10
    for r in gated:
        assert r[7] == "0" and "(≤16 B)" in r[10] and r[10].count("≤16 B") == 2, r
    pipelined = 0
    for r in rows:
        kernel, norm, shape, tile, warps, regs, per_sm, stack, shared, memory = (
            r[0].strip("| "), r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), r[7], int(r[9]), r[10])
        assert "(≤16 B)" in memory and memory.count("≤16 B") == 2, (kernel, norm, shape, memory)
        if not shape.endswith("65536"):
            assert int(stack) <= (8 if "regs" in tile or "stages" in tile else 0), (kernel, norm, shape, tile, stack)
        # a tile loop the launcher pipelines really is pipelined: its row loads are
        # asynchronous copies into shared memory (the compiler may decline to pipeline a loop)
        assert ("stages" in tile) == ("async copies" in memory), (kernel, norm, shape, tile, memory)
        pipelined += "stages" in tile
        # programs per SM: as many as fit in 65536 registers (handed out 8 a thread at a time),
        # 2048 threads and 228 KiB of shared memory (1 KiB a program for the system), up to the
        # backward grid's 8 and the hardware's 32 blocks
        threads, allotted = 32 * warps, -(-regs // 8) * 8

        def fits(programs):
            return (programs * threads <= 2048 and programs * threads * allotted <= 65536
                    and programs * (shared + 1024) <= 228 * 1024)

        cap = 8 if kernel == "bwd" else 32
        assert fits(per_sm) and (per_sm == cap or not fits(per_sm + 1)), r
    # the backward with a bias at 768-8192 columns (RMSNorm+bias and LayerNorm, each with bf16
    # and with fp32 parameters), the fp32-parameter forward with a bias at 8192 (LayerNorm,
    # RMSNorm+bias) and LayerNorm's at 768 (four two-row tiles a program)
    assert pipelined == 19


@pytest.mark.slow
def test_tune_kernels_quick_sweeps_around_the_shipped_configuration(tmp_path):
    """Under the interpreter: every candidate runs, the shipped tile comes first in each group
    and the table says which one was fastest; on the shape asked for (``--shapes``, here fewer
    rows than the quick default's 40)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_kernels.py"), "--quick", "--shapes", "24x96",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "tuning.json").read_text())["results"]
    assert not [r for r in rows if "error" in r]
    assert {r["shape"] for r in rows} == {"24x96"}
    from hf_rmsnorm.ops._triton_norm import bwd_config, bwd_maxnreg, bwd_stages, fwd_config

    m, n = (int(v) for v in rows[0]["shape"].split("x"))
    firsts = {}
    for r in rows:
        firsts.setdefault((r["pass"], r["kind"]), r)
    assert firsts[("fwd", "rms")]["config"] == list(fwd_config(n))
    assert firsts[("fwd", "layer")]["config"] == list(fwd_config(n, False))
    assert firsts[("bwd", "rms")]["config"] == list(bwd_config(n))
    assert firsts[("bwd", "layer")]["config"] == list(bwd_config(n, True))
    assert len({tuple(r["config"]) for r in rows if r["pass"] == "bwd"}) > 2  # a real sweep
    # bf16 and fp32 parameters: the shipped tile and its neighbours, every tile count on the
    # shipped tile, the shipped count first
    for kind in ("rms", "layer", "rms/fp32w", "layer/fp32w"):
        group = [r for r in rows if r["pass"] == "fwd" and r["kind"] == kind]
        assert group[0]["config"] == list(fwd_config(n, kind.startswith("rms"), kind.endswith("fp32w"), kind.startswith("layer"))), kind
        assert group[0]["tiles"] == 1  # what the launcher picks for 24 rows: too few for more programs
        assert {r["tiles"] for r in group if r["config"] == group[0]["config"]} >= {1, 2, 4, 8}, kind
        assert len({tuple(r["config"]) for r in group}) > 2, kind
    for pass_ in ("fwd", "bwd", "bwd+sums"):  # the cache-hinted loads, on the shipped tile
        hinted = [r for r in rows if r["pass"] == pass_ and r["stream"] == "evict_first"]
        assert {r["kind"] for r in hinted} == {"rms", "layer"}, pass_
        assert all(r["config"] == firsts[(pass_, r["kind"])]["config"] for r in hinted), pass_
    # the weight loaded per tile, with the launcher's register cap (LayerNorm's several-row tiles)
    # and capped at 96
    shipped_caps = {"rms": bwd_maxnreg(bwd_config(n)[0], True, False), "layer": bwd_maxnreg(bwd_config(n, True)[0], False, True)}
    assert shipped_caps == {"rms": None, "layer": 80}  # 96 columns: tiles of 16 rows
    for pass_ in ("bwd", "bwd+sums"):
        reloading = {(r["kind"], r["maxnreg"]) for r in rows if r["pass"] == pass_ and r["reload_w"]}
        assert reloading == {(kind, cap) for kind in ("rms", "layer") for cap in (shipped_caps[kind], 96)}, pass_
        # the register caps on the shipped tile: LayerNorm's uncapped as well
        capped = {(r["kind"], r["maxnreg"]) for r in rows if r["pass"] == pass_ and not r["reload_w"] and not r["stream"]
                  and r["programs_per_sm"] is None and r["config"] == firsts[(pass_, r["kind"])]["config"]}
        # (None for LayerNorm: its pipelined rows, which the launcher runs uncapped)
        assert capped == {("rms", None), ("rms", 96), ("rms", 80), ("layer", 80), ("layer", 0), ("layer", 96),
                          ("layer", None), ("rms/fp32w", None), ("rms+bias", None), ("layer/fp32w", 80),
                          ("layer/fp32w", None), ("rms+bias/fp32w", None)}, pass_
        # RMSNorm with an fp32 weight: the shipped tile first, then the one-row tile
        fp32w = [r for r in rows if r["pass"] == pass_ and r["kind"] == "rms/fp32w"]
        assert [r["config"][0] for r in fp32w] == [bwd_config(n)[0], 1], pass_
        # the tile loop plain and pipelined over 3 stages, on the shipped tile otherwise as
        # shipped, each with the register cap the launcher gives it (LayerNorm's several-row
        # tile: capped plain, uncapped pipelined)
        for kind, is_rms, bias in (("rms", True, False), ("layer", False, True)):
            staged = [r["stages"] for r in rows if r["pass"] == pass_ and r["kind"] == kind and not r["reload_w"]
                      and not r["stream"] and r["programs_per_sm"] is None
                      and r["maxnreg"] == bwd_maxnreg(r["config"][0], is_rms, bias, r["stages"])
                      and r["config"] == firsts[(pass_, kind)]["config"]]
            assert sorted(staged) == [1, 3], (pass_, kind, staged)
        # the backwards with a bias, on their shipped tile: the launcher's stage count first (the
        # table's "shipped" row; plain on these narrow rows), then the other
        for kind, config in (("rms+bias", bwd_config(n, True)), ("layer/fp32w", bwd_config(n, True, True)),
                             ("rms+bias/fp32w", bwd_config(n, True, True))):
            group = [r for r in rows if r["pass"] == pass_ and r["kind"] == kind]
            picked = bwd_stages(None, *config[:2], True, 2)
            assert picked == 1
            assert [(r["config"], r["stages"]) for r in group] == [(list(config), 1), (list(config), 3)], (pass_, kind)
    # the forward's tile loop likewise, on the shipped tile with 8 tiles a program
    for kind in ("rms", "layer", "rms/fp32w", "layer/fp32w"):
        group = [r for r in rows if r["pass"] == "fwd" and r["kind"] == kind]
        staged = [r["stages"] for r in group if r["tiles"] == 8 and r["config"] == group[0]["config"] and not r["stream"]]
        assert sorted(staged) == [1, 3], (kind, staged)
    # RMSNorm with fp32 weight and bias: the shipped tile as the launcher runs it, then 8 tiles a
    # program plain and pipelined, nothing else
    group = [(r["config"], r["tiles"], r["stages"]) for r in rows if r["pass"] == "fwd" and r["kind"] == "rms+bias/fp32w"]
    config = list(fwd_config(n, True, True, True))
    assert group[0] == (config, 1, 1) and sorted(group[1:]) == [(config, 8, 1), (config, 8, 3)], group
    # the partial-row sums alone, the shipped tile first, for both norms
    from hf_rmsnorm.ops._triton_norm import _sum_config

    for kind in ("rms", "layer"):
        sums = [r for r in rows if r["pass"] == "sums" and r["kind"] == kind]
        assert len(sums) >= 2 and sums[0]["config"] == list(_sum_config(*sums[0]["partials"])), kind
    assert "| bwd | layer |" in (tmp_path / "tuning.md").read_text()


@pytest.mark.parametrize("mode,recorded", [("fwd", False), ("fwd, grad", True)])
def test_forward_steps_with_and_without_autograd_recording(mode, recorded, launches, monkeypatch):
    """profile_norms.py's forward rows: without grad no graph; with grad, as in a training
    forward, the call records its autograd node (part of the host time a training step pays)."""
    from conftest import needs_interpreter

    needs_interpreter("runs the kernels on CPU tensors")
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_kernels import make_step

    y = make_step("hf_rmsnorm LayerNorm", 8, 96, mode, torch.bfloat16, torch.bfloat16, torch.device("cpu"))()
    assert (y.grad_fn is not None) == recorded and launches() == 1


@pytest.mark.slow
def test_profile_splits_our_host_time_into_our_python_and_the_launcher(launches, monkeypatch):
    """profile_norms.py's stubbed host time, run here on CPU tensors (the GPU run does the same
    after the real calls): this package's forward and backward issue every launch, each a
    no-op, the real kernels are back afterwards; and the table shows host, stubbed and their
    difference for our rows, dashes for a peer's."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    from benchmark_kernels import make_step
    from profile_norms import empty_function_step, host_us, launch_ab_host_us, launches_stubbed, one_thread_host_us, to_markdown

    from hf_rmsnorm.ops import _cuda_launch, _direct, _triton_norm

    kernel = _triton_norm._norm_bwd_kernel
    step = make_step("hf_rmsnorm LayerNorm", 8, 32, "fwd+bwd", torch.bfloat16, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(_cuda_launch, "ENABLED", True)  # the default on CUDA
    with launches_stubbed():
        # the Python path's launches stubbed: the C++ operator, which would launch the real
        # kernels, off meanwhile
        assert _triton_norm._norm_bwd_kernel is not kernel and _cuda_launch.ENABLED is False
        us = host_us(step, 3)
    assert us > 0 and launches() == 2 * (5 + 3)  # a forward and a backward per call, warm-up included
    assert _triton_norm._norm_bwd_kernel is kernel and _cuda_launch.ENABLED is True
    if not _direct._DIRECT_TRITON:  # Triton 3.2 (torch 2.6): no direct launch to set against Triton's
        pytest.skip("the launch A/B needs the direct launch, off for this Triton release (the stubbed host time passed)")
    # the launch A/B column: Triton's launch and the direct one in turn, 3 rounds of each (here
    # the interpreter's kernels, which the direct launch leaves to Triton), each on as timed
    # and off again afterwards
    monkeypatch.setenv("HF_RMSNORM_BACKEND", "triton")
    seen = []
    monkeypatch.setattr(_direct, "_DIRECT_LAUNCH", False)
    kernel_call = _triton_norm._norm_fwd_kernel.run
    monkeypatch.setattr(_triton_norm._norm_fwd_kernel, "run",
                        lambda *a, **k: seen.append(_direct._DIRECT_LAUNCH) or kernel_call(*a, **k))
    ab = launch_ab_host_us(step, 2, rounds=3)
    assert len(ab) == 2 and min(ab) > 0 and launches() == 2 * (5 + 3) + 6 * 2 * (5 + 2)
    assert seen == [d for d in (False, True) * 3 for _ in range(5 + 2)]
    assert _direct._DIRECT_LAUNCH is False
    # the autograd floor row: a forward that computes nothing, a backward that passes dy on
    (dx,) = empty_function_step(4, 8, torch.device("cpu"))()
    assert dx.shape == (4, 8) and dx.dtype == torch.bfloat16
    # the backward on the calling thread: the same launches, autograd's threading back on afterwards
    assert one_thread_host_us(step, 2) > 0 and launches() == 2 * (5 + 3) + 7 * 2 * (5 + 2)
    assert torch._C._is_multithreading_enabled()

    def row(provider, host, stubbed=None, ab=None, one=None, cpp=None):
        r = {"shape": "8192x1024", "provider": provider, "mode": "fwd+bwd", "host_us": host, "wall_us": 400.0,
             "kernel_us": 30.0, "launches_per_step": 3, "kernels": {}, "host_one_thread_us": one}
        return ({**r, "host_stubbed_us": stubbed, "host_triton_ab_us": ab[0], "host_direct_us": ab[1], "host_cpp_us": cpp}
                if stubbed is not None else r)

    md = to_markdown([row("hf_rmsnorm LayerNorm", 350.0, 120.0, (345.0, 310.0), 250.0, cpp=150.0),
                      {**row("hf_rmsnorm LayerNorm", 360.0, 120.0, (345.0, 310.0), 250.0), "shape": "8x8"},
                      row("torch F.layer_norm", 122.0, one=100.0),
                      {**row("torch F.layer_norm", 20.0), "mode": "fwd", "host_one_thread_us": None}], "GPU", "v")
    # launcher = the direct launch's host time − stubbed (host is the default path's: the C++ one on CUDA)
    assert "| 8192x1024 | hf_rmsnorm LayerNorm | fwd+bwd | 350 | 120 | 190 | 345 / 310 / 150 | 250 | 400 | 30 | 3 |" in md
    assert "| 8x8 | hf_rmsnorm LayerNorm | fwd+bwd | 360 | 120 | 190 | 345 / 310 / – | 250 | 400 | 30 | 3 |" in md
    assert "| 8192x1024 | torch F.layer_norm | fwd+bwd | 122 | – | – | – | 100 | 400 | 30 | 3 |" in md
    assert "| 8192x1024 | torch F.layer_norm | fwd | 20 | – | – | – | – | 400 | 30 | 3 |" in md


def test_tuning_table_lists_the_narrowest_rows_first_whatever_order_they_ran_in():
    sys.path.insert(0, str(ROOT / "scripts"))
    from tune_kernels import to_markdown

    def row(shape, us):
        return {"pass": "fwd", "kind": "rms", "shape": shape, "config": [1, 1024, 4], "programs_per_sm": None,
                "time_us": us, "frac_copy": 0.9}

    env = {"device": "GPU", "copy_gbps": 1000.0, "torch": "t", "triton": "t", "date": "d"}
    md = to_markdown(env, [row("16384x8192", 130.0), row("16384x8192", 128.0), row("65536x768", 50.0)])
    table = [line for line in md.splitlines() if line.startswith("| fwd |")]
    assert [line.split(" | ")[2] for line in table] == ["65536x768", "16384x8192"]
    assert "| 130 µs | 90% | (1, 1024, 4) | auto | 128 µs |" in table[1]  # the first row of a group is the shipped one


@pytest.mark.parametrize(
    "script,args",
    [("tune_kernels.py", []), ("tune_kernels.py", ["--quick"]), ("profile_norms.py", ["--shapes", "64x64"])],
    ids=["tune", "tune_quick_without_interpreter", "profile"],
)
def test_gpu_only_scripts_refuse_a_cpu_run_with_one_clear_message(script, args, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the scripts would run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 2
    assert "GPU" in proc.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_prints_the_tables(tmp_path):
    """`gpu_check.sh --quick` on a CPU: the one script a GPU session runs, step by step, with
    its archive and the tables printed last (the GPU tests skip here with their reason)."""
    import torch

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the dry run would time the real kernels")
    out = tmp_path / "gpu"
    # tune left out: the quick sweep is test_tune_kernels_quick_sweeps_around_the_shipped_configuration's,
    # at one shape either way, and took 4 of this test's 6.5 minutes on a slow 2-core machine
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OUT": str(out),
           "STEPS": "tests,bench,training,mixed,fp32,trainprof,direct,cpp,cppkernels,gated,gemmprobe,generate", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--quick"], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-2000:])
    steps = (out / "steps.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in steps] == [
        f"== {s}" for s in ("tests", "bench", "training", "mixed", "fp32", "trainprof", "direct", "cpp", "cppkernels",
                             "gated", "gemmprobe", "generate")]
    assert all(": exit 0 in" in line for line in steps), steps
    for name in ("kernels_bf16", "kernels_bf16_fp32w", "kernels_fp32", "training", "trainprof/training", "direct/training",
                 "cpp/training", "cpp/kernels_cpp", "kernels_gated", "generate/generation",
                 "gemm_probe/gemm_probe"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file(), name
    assert (out / "all.tgz").is_file()
    assert "| llama-1b |" in proc.stdout and "== generate: exit 0" in proc.stdout.splitlines()[-1]
    assert "| **the layer** | all |" in proc.stdout
    assert "| hf_rmsnorm gated: gate after |" in proc.stdout
    assert "| gpt2-medium | fp32 | 1 | 8 + 4 | rmsnorm |" in proc.stdout
    assert "| gpt2-medium | bf16 params | rmsnorm+triton |" in proc.stdout
    assert "| gpt2-medium | bf16 params | rmsnorm+python |" in proc.stdout


@pytest.mark.parametrize("script", ["tune_kernels.py", "profile_norms.py"])
@pytest.mark.parametrize("shapes", ["8192x", "8192*1024", "0x1024", ","])
def test_gpu_scripts_refuse_a_malformed_shape_with_one_clear_message(script, shapes, tmp_path):
    """``--shapes`` is checked before anything runs (GPU or not): exit 2, the message names the
    bad shape and how to write one, and nothing is written."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--quick" if script == "tune_kernels.py" else "--iters=1",
                           "--shapes", shapes, "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--shapes" in last and "MxN, e.g. 8192x1024" in last, last
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_host_probe_says_it_needs_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "host_probe.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())
