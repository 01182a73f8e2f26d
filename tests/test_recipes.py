"""recipes/finetune.py end to end on the CPU: the offline default, 2 processes against 1,
kill-and-resume, the exact variant's equality and the approximate one's recovery, and bad
input failing before any training."""

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune.py"
TINY = ["--model", "offline:tiny-gpt2", "--per-device-batch-size", "8", "--max-eval-texts", "32", "--quiet", "--cpu"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private cache, so the tiny decoder is pretrained once for these tests."""
    return {**os.environ, "HF_RMSNORM_CACHE": str(tmp_path_factory.mktemp("cache")), "HF_RMSNORM_BACKEND": "torch"}


def _recipe(env, *args, launcher=(sys.executable,), timeout=600):
    proc = subprocess.run([*launcher, str(RECIPE), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return proc


def _runs(out):
    return json.loads((Path(out) / "results.json").read_text())["runs"]


def test_offline_default_writes_all_outputs_with_finite_numbers(env, tmp_path):
    import torch

    import hf_rmsnorm

    proc = _recipe(env, "--max-steps", 2, "--eval-steps", 1, "--max-eval-texts", 16, "--max-length", 32, "--quiet", "--cpu", "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(tmp_path)
    assert [(r["model"], r["variant"]) for r in runs] == [(m, v) for m in ("offline:tiny-gpt2", "offline:minilm") for v in ("baseline", "layernorm", "rmsnorm")]
    for r in runs:
        m = r["metrics"]
        for key in ("eval_before_conversion", "eval_after_conversion", "eval_after_finetune", "tokens_per_second", "step_time_ms_median", "peak_memory_bytes"):
            assert math.isfinite(m[key]) and (key.startswith("eval") or m[key] > 0), (r["variant"], key, m[key])
        assert len(r["curve"]) == 3
    by = {(r["model"], r["variant"]): r for r in runs}
    # the exact conversion costs nothing: after conversion == the baseline before it
    exact = by[("offline:tiny-gpt2", "rmsnorm")]
    assert "5 exact" in exact["report"]
    before = by[("offline:tiny-gpt2", "baseline")]["metrics"]["eval_before_conversion"]
    assert abs(exact["metrics"]["eval_after_conversion"] - before) <= 1e-6 * before
    assert exact["metrics"]["recovery"] is None
    # the post-LN encoder takes the approximate path: it costs something, and recovery is reported
    approx = by[("offline:minilm", "rmsnorm")]
    assert "13 approximate" in approx["report"]
    assert approx["metrics"]["eval_after_conversion"] < approx["metrics"]["eval_before_conversion"]
    assert math.isfinite(approx["metrics"]["recovery"])
    assert (tmp_path / "results.md").read_text().count("| offline:") == 6
    assert (tmp_path / "results.png").stat().st_size > 10_000
    # the offline corpus is this interpreter's docstrings: the results say which, and which texts
    sys.path.insert(0, str(ROOT / "recipes"))
    import offline

    texts = offline.stdlib_corpus()
    data = json.loads((tmp_path / "results.json").read_text())["environment"]["data"]
    assert data == {"source": f"the standard-library docstrings of Python {platform.python_version()}", "texts": len(texts),
                    "sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16], "train_texts": len(texts) - (len(texts) + 9) // 10,
                    "eval_texts": 16}
    assert f"{len(texts)} texts (sha256 {data['sha256']})" in (tmp_path / "results.md").read_text()
    # the fine-tuned converted model reloads with its conversion, as trained: without
    # --keep-centered its writers left the centre, and they are kept as saved
    saved = tmp_path / "models" / "tiny-gpt2" / "rmsnorm"
    assert json.loads((saved / "config.json").read_text())["hf_rmsnorm"]["writers_centred"] is False
    model = hf_rmsnorm.from_pretrained(saved)
    assert model.hf_rmsnorm_report.count("exact") == 5 and "keep their saved values" in model.hf_rmsnorm_report.note
    assert isinstance(model.transformer.ln_f, hf_rmsnorm.FusedRMSNorm)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_run_that_pretrains_the_tiny_decoder_second_keeps_the_cached_copy(tmp_path, monkeypatch):
    """Two runs on one fresh cache pretrain the same tiny decoder at once: the one that finishes
    second finds the folder there, keeps it and leaves none of its own copy behind (it stayed
    in the cache as a temporary folder; a rename racing the other run's raised)."""
    from transformers import GPT2LMHeadModel

    sys.path.insert(0, str(ROOT / "recipes"))
    import offline

    monkeypatch.setenv("HF_RMSNORM_CACHE", str(tmp_path))
    texts = ["a few words to learn", "and a few more of them"] * 4
    save = GPT2LMHeadModel.save_pretrained

    def the_other_run_finishes_first(model, folder, *args, **kwargs):
        save(model, folder.with_name(folder.name.split(".tmp-")[0]), *args, **kwargs)
        save(model, folder, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", the_other_run_finishes_first)
    model = offline.tiny_decoder(texts, steps=2, log=lambda line: None)
    (cached,) = tmp_path.iterdir()
    assert ".tmp" not in cached.name
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", save)
    lines = []
    again = offline.tiny_decoder(texts, steps=2, log=lines.append)
    assert lines == [f"using the cached pretrained tiny decoder {cached}"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_two_processes_follow_one_process(env, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    common = ["--model", "offline:tiny-gpt2", "--variants", "baseline,rmsnorm", "--max-steps", 4, "--eval-steps", 2, "--max-eval-texts", 32, "--quiet", "--cpu"]
    one = _recipe(env, *common, "--per-device-batch-size", 8, "--output-dir", tmp_path / "one")
    two = _recipe(env, *common, "--per-device-batch-size", 4, "--output-dir", tmp_path / "two", launcher=(torchrun, "--nproc_per_node", "2"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "two" / "results.md").read_text()
    for a, b in zip(_runs(tmp_path / "one"), _runs(tmp_path / "two")):
        # same global batch; per-process token means averaged by DDP differ from one global
        # token mean only through unequal padding: 1e-3 relative
        for ca, cb in zip(a["curve"], b["curve"]):
            assert abs(ca["eval_loss"] - cb["eval_loss"]) <= 1e-3 * ca["eval_loss"], (a["variant"], ca, cb)


def test_accelerate_launch_with_two_mpi_processes(env, tmp_path):
    """The documented CPU multi-process path: accelerate launch through MPI (gloo)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if shutil.which("mpirun") is None or accelerate is None:
        pytest.skip("needs mpirun (Debian's openmpi-bin; .ci/run installs it) and accelerate")
    mpi_env = {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    proc = _recipe(mpi_env, *TINY, "--variants", "baseline,rmsnorm", "--max-steps", 2, "--eval-steps", 1, "--output-dir", tmp_path,
                   launcher=(accelerate, "launch", "--config_file", ROOT / "recipes" / "configs" / "cpu_2proc.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "results.md").read_text()
    assert all(math.isfinite(r["metrics"]["eval_after_finetune"]) for r in _runs(tmp_path))


def test_processes_accelerate_does_not_join_are_refused(env, tmp_path):
    """An FSDP config without GPUs: Accelerate sets up no process group, so each of the
    launched processes would train alone and all would write the same files. The recipe says
    so and exits before any work (on a GPU machine this config runs; see configs/fsdp.yaml)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate is not installed")
    if torch.cuda.is_available():
        pytest.skip("with GPUs Accelerate runs FSDP")
    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\n"
                      "mixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n")
    out = tmp_path / "out"
    proc = _recipe(env, "--model", "offline:tiny-gpt2", "--quiet", "--output-dir", out,
                   launcher=(accelerate, "launch", "--config_file", config), timeout=300)
    assert proc.returncode != 0
    assert "launched as 2 processes, but Accelerate joined 1" in proc.stderr, proc.stderr[-3000:]
    assert "pretraining" not in proc.stdout and not out.exists()


def test_kill_and_resume_reaches_the_same_loss(env, tmp_path):
    common = [*TINY, "--variants", "rmsnorm", "--max-steps", 6, "--eval-steps", 3, "--checkpointing-steps", 3]
    whole = _recipe(env, *common, "--output-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = _recipe(env, *common, "--stop-after-steps", 3, "--output-dir", tmp_path / "cut")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (tmp_path / "cut" / "results.json").exists()
    assert (tmp_path / "cut" / "checkpoints" / "tiny-gpt2" / "rmsnorm" / "step_3" / "progress.json").is_file()
    resumed = _recipe(env, *common, "--resume-from-checkpoint", "latest", "--output-dir", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed rmsnorm" in resumed.stdout + resumed.stderr
    a, b = _runs(tmp_path / "whole")[0], _runs(tmp_path / "cut")[0]
    assert [c["step"] for c in a["curve"]] == [c["step"] for c in b["curve"]]
    for ca, cb in zip(a["curve"], b["curve"]):
        assert abs(ca["eval_loss"] - cb["eval_loss"]) <= 1e-6 * ca["eval_loss"]


def test_bf16_gradient_accumulation_and_checkpointing_flags(env, tmp_path):
    proc = _recipe(env, *TINY, "--variants", "rmsnorm", "--max-steps", 2, "--eval-steps", 1, "--mixed-precision", "bf16",
                   "--gradient-accumulation-steps", 2, "--gradient-checkpointing", "--keep-centered", "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision bf16" in (tmp_path / "results.md").read_text()
    assert "total batch 16" in proc.stdout  # 8 per device x 2 accumulation steps
    run = _runs(tmp_path)[0]
    assert all(math.isfinite(c["eval_loss"]) for c in run["curve"])
    config = json.loads((tmp_path / "models" / "tiny-gpt2" / "rmsnorm" / "config.json").read_text())
    assert config["hf_rmsnorm"]["writers_centred"] is True  # kept centred while training


def test_lora_trains_the_adapters_alone_and_keep_centered_follows_the_baseline(env, tmp_path):
    """--lora-rank: adapters on every linear layer but the head train, nothing else (the saved
    baseline, its adapters merged, differs from the pretrained model in the adapted layers
    alone). Put on before patching, the writers' adapters are centred with them, so with
    --keep-centered the converted model follows the baseline's eval curve, and both saved
    models compute the same function, in plain transformers too."""
    import hf_rmsnorm
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    proc = _recipe(env, *TINY, "--variants", "baseline,rmsnorm", "--max-steps", 4, "--eval-steps", 2, "--lora-rank", 4,
                   "--keep-centered", "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA rank 4" in (tmp_path / "results.md").read_text()
    runs = {r["variant"]: r for r in _runs(tmp_path)}
    base, conv = runs["baseline"], runs["rmsnorm"]
    for a, b in zip(base["curve"], conv["curve"]):
        assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 * a["eval_loss"], (a, b)
    saved = tmp_path / "models" / "tiny-gpt2"
    plain = {v: AutoModelForCausalLM.from_pretrained(saved / v).eval() for v in runs}
    # rank 4 x (inputs + outputs) per adapted layer: GPT-2's linear layers are Conv1D, the head is not adapted
    adapted = [m.weight.shape for m in plain["baseline"].modules() if isinstance(m, Conv1D)]
    assert all(r["metrics"]["trainable_parameters"] == sum(4 * (i + o) for i, o in adapted) for r in runs.values())
    # (a loss going down in 4 steps is no test of that: the eval loss of this tiny decoder,
    # pretrained at run time on the interpreter's own docstrings, moved by +-2e-4 either way)
    [pretrained] = Path(env["HF_RMSNORM_CACHE"]).glob("tiny-gpt2-bytes-*")
    before = AutoModelForCausalLM.from_pretrained(pretrained).state_dict()
    after = plain["baseline"].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {f"{n}.weight" for n, m in plain["baseline"].named_modules() if isinstance(m, Conv1D)}, sorted(moved)
    assert json.loads((saved / "rmsnorm" / "config.json").read_text())["hf_rmsnorm"]["writers_centred"] is True
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    want = plain["baseline"](ids).logits
    torch.testing.assert_close(plain["rmsnorm"](ids).logits, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_rmsnorm.from_pretrained(saved / "rmsnorm").eval()(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_lora_on_modules_the_model_lacks_stops_with_peft_s_reason(env, tmp_path):
    """Which modules a model has is known once it is loaded: the recipe stops there, with
    PEFT's message under the option's name, and writes no results."""
    proc = _recipe(env, *TINY, "--variants", "rmsnorm", "--max-steps", 2, "--lora-rank", 2, "--lora-target-modules", "q_proj",
                   "--output-dir", tmp_path)
    assert proc.returncode != 0
    assert "--lora-target-modules q_proj:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()


def _json_without_text(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"body": f"sentence number {i} is long enough to use"}) + "\n" for i in range(30)))
    return path


BAD = [
    ("unknown model path", lambda p: ["--model", "./no/such/model"], "no such local path"),
    ("dataset without a text column", lambda p: [*TINY, "--dataset", _json_without_text(p)], "no 'text' column"),
    ("zero steps", lambda p: ["--max-steps", 0], "--max-steps must be positive"),
    ("approximate without rmsnorm", lambda p: ["--variants", "baseline", "--allow-approximate"], "apply to the rmsnorm variant"),
    ("unknown variant", lambda p: ["--variants", "baseline,fp8"], "--variants takes"),
    ("stop without checkpoints", lambda p: ["--stop-after-steps", 2], "needs --checkpointing-steps"),
    ("negative LoRA rank", lambda p: ["--lora-rank", -1], "--lora-rank must be 0 (no LoRA) or positive"),
]


@pytest.mark.parametrize("case,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_fast_with_a_clear_message(case, args, message, env, tmp_path):
    proc = _recipe(env, *args(tmp_path), "--output-dir", tmp_path / "out", timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "pretraining" not in proc.stdout and not (tmp_path / "out" / "checkpoints").exists()
