"""Token-by-token generation with a patched model: is it faster or slower than as shipped?

Decoding runs each norm on a few rows per call, so a norm's time there is nearly all host time
(the module's Python, the launch), not the kernel's: the opposite end from the training
benchmark. For the training benchmark's two configs (random weights, SDPA, KV cache), each
variant generates greedily from the same prompt, the variants in turn, round after round, so
that a slow stretch of the host falls on all of them:

- ``generate ms``: the median time of ``model.generate`` for ``--new-tokens`` tokens;
- ``prefill ms``: the same for one new token (the prompt's forward and one step);
- ``decode ms/token``: the difference over the remaining tokens, the per-token cost;
- ``same tokens``: whether the variant generated what as shipped did (greedy; with random
  weights and bf16 an argmax can tie, so a difference here is reported, not judged).

    python scripts/benchmark_generation.py                 # GPU: bf16, batch 1 and 8
    python scripts/benchmark_generation.py --quick         # tiny configs (CI, CPU)

Writes ``<out>/generation.json`` and ``<out>/generation.md``, device and versions named.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmark_cpu import _cpu_model
from benchmark_kernels import _versions
from benchmark_training import MODELS, QUICK, apply_variant, build, converts_nothing, write_results

VARIANTS = ("as shipped", "layernorm", "rmsnorm", "norms -> Identity")
DTYPES = {"bf16": "bf16 params", "fp32": "fp32 params"}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(name, table, dtype, variant, prompt, device):
    """One variant's model in eval mode with its KV cache on; None where there is nothing to
    time (the ``rmsnorm`` variant of a model without LayerNorms is the ``layernorm`` one)."""
    model = build(name, table, DTYPES[dtype], device).eval()
    summary = apply_variant(model, variant, prompt)
    if converts_nothing(variant, summary):
        return None
    model.config.use_cache = True
    # no end-of-sequence token: every call generates exactly the tokens asked for (a random
    # model's eos id may even lie outside its vocabulary)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def generate(model, prompt, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, use_cache=True)


def time_in_turn(models: dict, prompt, new_tokens: int, rounds: int, device) -> dict:
    """{variant: (times of new_tokens, times of one token)}, each call synchronised, the
    variants in turn in every round, the order reversed every other round."""
    times = {v: ([], []) for v in models}
    order = list(models)
    for i in range(rounds):
        for variant in order[::-1] if i % 2 else order:
            for k, n in enumerate((new_tokens, 1)):
                _sync(device)
                start = time.perf_counter()
                generate(models[variant], prompt, n)
                _sync(device)
                times[variant][k].append((time.perf_counter() - start) * 1e3)
    return times


def group_rows(name, table, dtype, variants, batch, prompt_len, new_tokens, rounds, device) -> list:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, table[name][1]["vocab_size"], (batch, prompt_len), generator=g).to(device)
    models, rows = {}, []
    for variant in variants:
        try:
            model = prepare(name, table, dtype, variant, prompt, device)
        except Exception as exc:  # keep the other rows
            rows.append({"model": name, "dtype": dtype, "batch": batch, "variant": variant,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        if model is not None:
            models[variant] = model
    tokens = {v: generate(m, prompt, new_tokens) for v, m in models.items()}  # also the warm-up
    for m in models.values():
        generate(m, prompt, 1)
    times = time_in_turn(models, prompt, new_tokens, rounds, device)
    reference = tokens.get("as shipped")
    for variant, (full, one) in times.items():
        ms, ms_one = statistics.median(full), statistics.median(one)
        differ = None if reference is None else int((tokens[variant] != reference).sum())
        rows.append({
            "model": name, "dtype": dtype, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
            "variant": variant, "generate_ms": ms, "generate_ms_min": min(full), "generate_ms_max": max(full),
            "prefill_ms": ms_one, "decode_ms_per_token": (ms - ms_one) / max(new_tokens - 1, 1),
            "tokens_per_second": batch * new_tokens / (ms / 1e3), "rounds": rounds, "tokens_differing": differ,
        })
    del models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs, few tokens (CI, CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 1,8; --quick: 1,2)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt length in tokens (default 128; --quick: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 64; --quick: 4)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick: 2)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="parameters' dtype (default bf16 on a GPU, fp32 on the CPU)")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(n not in MODELS for n in names):
        parser.error(f"--models takes a subset of {', '.join(MODELS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants takes a subset of {', '.join(VARIANTS)}")
    try:
        batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,8")).split(",")]
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    q = args.quick
    prompt_len = args.prompt or (8 if q else 128)
    new_tokens = args.new_tokens or (4 if q else 64)
    rounds = args.rounds or (2 if q else 5)
    if min(batches) < 1 or prompt_len < 1 or new_tokens < 2 or rounds < 1:
        parser.error("batch sizes, --prompt and --rounds must be at least 1, --new-tokens at least 2")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    table = QUICK if q else MODELS
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({_cpu_model()}, {torch.get_num_threads()} threads)",
        "quick": q,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **_versions(),
    }
    results = []
    for name in names:
        for batch in batches:
            results += group_rows(name, table, dtype, variants, batch, prompt_len, new_tokens, rounds, device)
            _write(args.out, env, results)  # after each group: a run cut short keeps what it measured
    print(_write(args.out, env, results))
    return 1 if any("error" in r for r in results) else 0


def _write(out: Path, env: dict, results: list) -> str:
    return write_results(out, "generation", env, results, _markdown)


def _markdown(env, results) -> str:
    lines = [
        f"# Generation: {env['device']}, greedy, KV cache, SDPA", "",
        f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; {env['date']}. "
        "The variants generate in turn, round after round; medians over the rounds. prefill ms = one new token "
        "(the prompt's forward and one step); decode ms/token = (generate − prefill) over the other tokens; "
        "vs as shipped = decode ms/token over as shipped's; same tokens: as shipped's greedy tokens, or how many differ.",
        "",
        "| model | dtype | batch | prompt + new | variant | generate ms (median) | min–max ms | prefill ms "
        "| decode ms/token | vs as shipped | tokens/s | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shipped = {(r["model"], r["batch"]): r for r in results if r["variant"] == "as shipped" and "error" not in r}
    for r in results:
        head = f"| {r['model']} | {r['dtype']} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} | {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        base = shipped.get((r["model"], r["batch"]))
        ratio = f"{r['decode_ms_per_token'] / base['decode_ms_per_token']:.3f}×" if base else "—"
        same = "—" if r["tokens_differing"] is None else ("yes" if r["tokens_differing"] == 0 else f"{r['tokens_differing']} differ")
        lines.append(
            f"{head} {r['prompt']} + {r['new_tokens']} | {r['variant']} | {r['generate_ms']:.1f} | "
            f"{r['generate_ms_min']:.1f}–{r['generate_ms_max']:.1f} | {r['prefill_ms']:.1f} | "
            f"{r['decode_ms_per_token']:.2f} | {ratio} | {r['tokens_per_second']:.0f} | {same} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
