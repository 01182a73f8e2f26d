"""``scripts/probe_gemm_data.py``, the probe of issue 7's Llama matmul gap: it must time the
GEMMs on the very tensors each variant's linears multiplied. Checked on the CPU against what
autograd computed itself (each weight's gradient) and against a float64 RMSNorm of the layer's
input; the timings are not asserted (benchmarks are not tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "probe_gemm_data.py"


def _probe_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import probe_gemm_data

    return probe_gemm_data


@pytest.mark.parametrize("precision", ["bf16 params", "fp32 params + bf16 autocast"])
def test_capture_records_what_each_linear_multiplied(precision):
    pg = _probe_module()
    from benchmark_training import QUICK, prepare

    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    layer = 1
    for variant in ("norms -> Identity", "layernorm"):
        run = prepare("llama-1b", QUICK, precision, variant, batch, device, warmup=1)
        decoder = pg.decoder_layers(run.model)[layer]
        entering = []
        hook = decoder.register_forward_pre_hook(lambda m, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]),
                                                 with_kwargs=True)
        try:
            tensors = pg.capture(run, batch, layer)
        finally:
            hook.remove()
        linears = pg.linears_of_layer(run.model, layer)
        assert set(tensors) == set(linears) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
        for name, entry in tensors.items():
            assert entry["x"].dtype == entry["dy"].dtype == entry["w"].dtype == torch.bfloat16, name  # as the GEMMs got them
            assert entry["x"].shape == (64, linears[name].in_features) and entry["dy"].shape == (64, linears[name].out_features)
            # the weight's gradient, which autograd computed itself, is dyᵀ·x of what was captured
            ref = entry["dy"].double().t() @ entry["x"].double()
            grad = linears[name].weight.grad.double()
            torch.testing.assert_close(grad, ref, rtol=2**-7, atol=1e-2 * ref.abs().max().item(), msg=f"{variant} {name}")
        # what q_proj multiplied: the residual stream itself, or its RMSNorm (float64 here)
        h = entering[0].detach().double().reshape(-1, entering[0].shape[-1])
        if variant == "norms -> Identity":
            expected = h
        else:
            norm = decoder.input_layernorm
            expected = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
        torch.testing.assert_close(tensors["self_attn.q_proj"]["x"].double(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())
        # the control: Gaussian x and dy of the same RMS, shape and dtype; the weight itself
        control = pg.gaussian_like(tensors, torch.Generator().manual_seed(1))
        for name, entry in tensors.items():
            for k in ("x", "dy"):
                rms = [t.double().pow(2).mean().sqrt().item() for t in (entry[k], control[name][k])]
                assert control[name][k].shape == entry[k].shape and control[name][k].dtype == entry[k].dtype
                assert rms[1] == pytest.approx(rms[0], rel=0.1) and not torch.equal(control[name][k], entry[k])
            assert control[name]["w"] is entry["w"]


def test_gemm_calls_compute_the_three_gemms_of_a_linear():
    pg = _probe_module()
    g = torch.Generator().manual_seed(0)
    entry = {"x": torch.randn(6, 4, generator=g, dtype=torch.float64), "dy": torch.randn(6, 3, generator=g, dtype=torch.float64),
             "w": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": None}
    x = entry["x"].clone().requires_grad_()
    w = entry["w"].clone().requires_grad_()
    y = x @ w.t()
    y.backward(entry["dy"])
    calls = pg.gemm_calls(entry)
    for gemm, expected in zip(pg.GEMMS, (y.detach(), x.grad, w.grad)):
        torch.testing.assert_close(calls[gemm](), expected)
    assert [pg.gemm_shape(entry, gm) for gm in pg.GEMMS] == ["6×3×4", "6×4×3", "3×4×6"]


@pytest.mark.slow
def test_probe_quick_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gemm_probe.json").read_text())["results"][0]
    assert result["model"] == "llama-1b" and result["layer"] == 1 and result["layers"] == 2
    sets = ["norms -> Identity", "norms -> Identity (Gaussian)", "as shipped", "as shipped (Gaussian)", "layernorm", "layernorm (Gaussian)"]
    assert list(result["us"]) == sets
    for s in sets:
        assert len(result["us"][s]) == 7
        assert all(us > 0 for per in result["us"][s].values() for us in per.values())
    assert result["shapes"]["mlp.down_proj"]["forward x·Wᵀ"] == "64×64×128"
    md = (tmp_path / "gemm_probe.md").read_text()
    assert "| **the layer** | all |" in md and "| mlp.down_proj | dy |" in md and md.strip() in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "gpt2-medium"], "has no nn.Linear"),
    (["--variants", "as shipped,layernorm"], "'norms -> Identity' among them"),
    (["--layer", "2"], "--layer must be in [0, 2)"),
])
def test_probe_refuses_what_it_cannot_probe_with_one_clear_message(args, message, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", *args, "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
