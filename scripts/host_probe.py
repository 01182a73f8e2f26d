"""Host time of a norm's training forward on a GPU, piece by piece, and of a model's forward.

Why: GPT-2-medium's bf16 training step is paced by the host in its forward (run 14b's phase
table: the forward's GPU end moves with its host end), so the host time of each norm's forward
*with autograd recording* is what the step pays, and ``profile_norms.py`` times the forward
without grad. Here, per call (medians over rounds of 49 calls, GPT-2-medium's norm count, their
outputs kept alive as a model's forward keeps them):
- the public function and the module, with grad, launched from Python and through the C++
  launch operator (``_cuda_launch``, the default on CUDA since run 15); ``_NormFunction.apply``
  alone; the launch path without autograd (``_fwd_impl``); an empty ``autograd.Function``
  taking the same arguments; torch's ``F.layer_norm`` with grad;
- each with the GPU idle and with it busy (a sleep kernel queued first): a call that waits on
  the GPU shows up as the sleep's length, so equal columns mean no hidden synchronisation.
Then GPT-2-medium's whole training forward (as shipped, both patched variants launched from
Python and through the C++ operator, Identity), host time with the GPU idle at the start, the
variants in turn round by round.

    python scripts/host_probe.py --out DIR     # GPU only; DIR/host_probe.json and .md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_training import MODELS, _launch_path, apply_variant, build  # noqa: E402

NORMS = 49  # GPT-2-medium: 24 blocks x 2, and the final one
SLEEP_CYCLES = int(2e8)  # ≈ 100 ms at an H100/H200's clock: longer than 49 calls take to issue
ROUNDS = 9


class _Empty(torch.autograd.Function):
    """Autograd's own cost for a Python-defined op with the kernels' arguments: no work at all."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, offset, is_rms, rounding, torch_impl):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None, None, None, None, None, None


def per_call_us(call, busy: bool) -> float:
    times = []
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        if busy:
            torch.cuda._sleep(SLEEP_CYCLES)
        start = time.perf_counter()
        outputs = [call() for _ in range(NORMS)]
        times.append((time.perf_counter() - start) / NORMS * 1e6)
        del outputs
    torch.cuda.synchronize()
    return statistics.median(times)


def norm_rows() -> list[dict]:
    from hf_rmsnorm import FusedLayerNorm
    from hf_rmsnorm.ops import _norm, layer_norm, layer_norm_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 1024, 1024, device="cuda", generator=g).bfloat16().requires_grad_(True)
    module = FusedLayerNorm(1024, device="cuda", dtype=torch.bfloat16)
    w, b = module.weight, module.bias
    args = (1e-5, 0.0, False, 0)
    calls = {
        "layer_norm(x, w, b), Python launch": lambda: layer_norm(x, w, b),
        "FusedLayerNorm module, Python launch": lambda: module(x),
        # the same two launched through the C++ launch operator
        "layer_norm(x, w, b), C++ launch": lambda: layer_norm(x, w, b),
        "FusedLayerNorm module, C++ launch": lambda: module(x),
        "_NormFunction.apply": lambda: _norm._NormFunction.apply(x, w, b, *args, layer_norm_ref),
        "_fwd_impl, no autograd": lambda: _norm._fwd_impl(x.detach(), w.detach(), b.detach(), *args),
        "empty autograd.Function, same arguments": lambda: _Empty.apply(x, w, b, *args, layer_norm_ref),
        "torch F.layer_norm": lambda: F.layer_norm(x, (1024,), w, b),
    }
    rows = []
    for name, call in calls.items():
        _launch_path("+cpp" if name.endswith("C++ launch") else "+python" if name.endswith("Python launch") else "")
        for _ in range(10):
            call()
        idle, busy = per_call_us(call, False), per_call_us(call, True)
        rows.append({"call": name, "idle_us": idle, "busy_us": busy})
        print(f"{name:42s} idle {idle:7.1f} µs  busy {busy:7.1f} µs", flush=True)
    _launch_path("")
    return rows


def model_rows() -> list[dict]:
    batch = torch.randint(0, 50257, (8, 1024), device="cuda")
    device = torch.device("cuda")
    variants = ("as shipped", "layernorm+python", "layernorm+cpp", "rmsnorm+python", "rmsnorm+cpp", "norms -> Identity")
    models = {}
    for variant in variants:
        models[variant] = build("gpt2-medium", MODELS, "bf16 params", device)
        apply_variant(models[variant], variant, batch)
        _launch_path(variant)
        for _ in range(2):
            models[variant](input_ids=batch, labels=batch).loss.backward()
    times = {v: [] for v in variants}
    for _ in range(ROUNDS):
        for variant, model in models.items():
            _launch_path(variant)
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            times[variant].append((time.perf_counter() - start) * 1e3)
            del loss
    torch.cuda.synchronize()
    _launch_path("")
    rows = [{"variant": v, "forward_host_ms": statistics.median(t), "each_ms": [round(x, 2) for x in t]} for v, t in times.items()]
    for r in rows:
        print(f"gpt2-medium forward, {r['variant']:18s} {r['forward_host_ms']:6.1f} ms", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_probe.py times calls on a CUDA GPU; there is none here.", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "norms": norm_rows(),
              "gpt2_forward": model_rows()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_probe.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Host time of a training forward, {result['device']}, torch {result['torch']}", "",
             f"Per call, bf16 8x1024x1024 with grad, {NORMS} calls a round, outputs kept, median of {ROUNDS} rounds; "
             "busy = a sleep kernel queued first (equal to idle: no call waits on the GPU).", "",
             "| call | idle µs | busy µs |", "|---|---|---|"]
    lines += [f"| {r['call']} | {r['idle_us']:.1f} | {r['busy_us']:.1f} |" for r in result["norms"]]
    lines += ["", "GPT-2-medium's training forward (batch 8 x 1024), host time from an idle GPU, the variants in turn:", "",
              "| variant | host ms (median) |", "|---|---|"]
    lines += [f"| {r['variant']} | {r['forward_host_ms']:.1f} |" for r in result["gpt2_forward"]]
    (args.out / "host_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
