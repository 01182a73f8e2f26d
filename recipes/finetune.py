"""Fine-tune a model as shipped, fused and converted, and measure what the conversion cost,
what fine-tuning recovered and how fast each variant trains.

    accelerate launch [--config_file recipes/configs/X.yaml] recipes/finetune.py \\
        [--model M[,M2]] [--dataset D] [--variants baseline,layernorm,rmsnorm] \\
        [--max-steps N] [--output-dir OUT] ...

With no --model / --dataset it runs offline: a tiny byte-level GPT-2 it pretrains first
(cached; the exact rmsnorm path) and all-MiniLM-L6-v2 (a post-LN BERT; the approximate path),
on a corpus of Python's standard-library docstrings. See recipes/README.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline  # noqa: E402

import hf_rmsnorm  # noqa: E402
from hf_rmsnorm import patch_model  # noqa: E402

OFFLINE_MODELS = ("offline:tiny-gpt2", "offline:minilm")
VARIANTS = ("baseline", "layernorm", "rmsnorm")


# ----------------------------------------------------------------------------------- data


def load_texts(args) -> tuple[list[str], list[str], dict]:
    """(train, eval) texts: the stdlib corpus, a `datasets` name, or local text/JSON files;
    and what the results say of them. The offline corpus is the interpreter's own docstrings,
    which differ between Python versions (and so does the tiny decoder pretrained on them): the
    digest of the texts tells runs on the same data from runs on other data."""
    if args.dataset is None:
        texts = offline.stdlib_corpus()
    else:
        import datasets

        spec = args.dataset
        if Path(spec.split(",")[0]).exists():
            files = spec.split(",")
            kind = "json" if files[0].endswith((".json", ".jsonl")) else "text"
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        else:
            name, _, config = spec.partition(":")
            ds = datasets.load_dataset(name, config or None, split="train")
        if args.text_column not in ds.column_names:
            raise SystemExit(f"--dataset {spec}: no {args.text_column!r} column (it has {ds.column_names}); pass --text-column")
        texts = [t for t in ds[args.text_column] if isinstance(t, str) and len(t.strip()) >= 20]
    if len(texts) < 20:
        raise SystemExit(f"--dataset: only {len(texts)} usable texts; need at least 20")
    train, evals = [t for i, t in enumerate(texts) if i % 10], [t for i, t in enumerate(texts) if not i % 10][: args.max_eval_texts]
    source = args.dataset or f"the standard-library docstrings of Python {platform.python_version()}"
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    return train, evals, {"source": source, "texts": len(texts), "sha256": digest, "train_texts": len(train), "eval_texts": len(evals)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, encoded: dict):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.encoded.items()}


# --------------------------------------------------------------------------------- models


def load_model(spec: str, train_texts, args, log):
    """(model, tokenize(texts) -> batch dict, task) for a model spec."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if spec == "offline:tiny-gpt2":
        tok = offline.ByteTokenizer()
        return offline.tiny_decoder(train_texts, log=log), lambda texts: tok(texts, args.max_length), "causal-lm"
    path = offline.minilm_path() if spec == "offline:minilm" else spec
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--model {spec}: cannot load it ({str(exc).splitlines()[0]})") from None
    task = args.task or ("causal-lm" if getattr(config, "is_decoder", False) or config.model_type in _DECODER_TYPES else "embedding-distillation")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = (AutoModelForCausalLM if task == "causal-lm" else AutoModel).from_pretrained(path)

    def tokenize(texts):
        enc = tokenizer(texts, max_length=args.max_length, truncation=True, padding="max_length", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return model, tokenize, task


_DECODER_TYPES = {"gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "falcon", "phi", "biogpt", "mpt", "llama", "mistral", "qwen2", "gemma", "olmo", "codegen", "stablelm"}


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def loss_and_tokens(model, batch, task, teacher=None):
    """The training loss, and the number of real tokens it saw."""
    tokens = batch["attention_mask"].sum()
    if task == "causal-lm":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss, tokens
    with torch.no_grad():
        target = mean_pool(teacher(**batch).last_hidden_state, batch["attention_mask"])
    emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    return (1 - torch.nn.functional.cosine_similarity(emb.float(), target.float(), dim=-1)).mean(), tokens


@torch.no_grad()
def evaluate(model, loader, task, accelerator, teacher=None) -> float:
    """causal-lm: mean token loss; embedding-distillation: mean cosine to the teacher."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for batch in loader:
        if task == "causal-lm":
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            logits = model(**batch).logits.float()
            per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
            n = (labels[:, 1:] != -100).sum(-1).double()
            value = per_token.double().sum(-1)
        else:
            emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).float()
            target = mean_pool(teacher(**batch).last_hidden_state, batch["attention_mask"]).float()
            value = torch.nn.functional.cosine_similarity(emb, target, dim=-1).double()
            n = torch.ones_like(value)
        value, n = accelerator.gather_for_metrics((value, n))
        total += value.sum().cpu()
        count += n.sum().cpu()
    model.train()
    return (total / count.clamp_min(1)).item()


def metric_name(task):
    return "eval_loss" if task == "causal-lm" else "eval_cosine"


# ------------------------------------------------------------------------------ training


def training_function(config: dict, args) -> tuple[list[dict], dict]:
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    log = accelerator.print
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        # e.g. an FSDP or DeepSpeed config without GPUs: Accelerate then sets up no process
        # group, and every process would train alone and write the same output files
        raise SystemExit(
            f"launched as {launched} processes, but Accelerate joined {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type.value}): FSDP and DeepSpeed need GPUs. On CPUs use "
            "recipes/configs/cpu_2proc.yaml, or torchrun --nproc_per_node N recipes/finetune.py --cpu."
        )
    train_texts, eval_texts, data = load_texts(args)
    runs = []
    for spec in config["models"]:
        set_seed(args.seed)
        with accelerator.main_process_first():  # the main process pretrains/caches first
            base, tokenize, task = load_model(spec, train_texts, args, log)
        train_set, eval_set = _Rows(tokenize(train_texts)), _Rows(tokenize(eval_texts))
        slug = spec.replace("offline:", "").replace("/", "_")
        world = accelerator.num_processes
        log(
            f"== {spec} ({task}): {len(train_set)} train / {len(eval_set)} eval texts, {world} process(es), "
            f"per-device batch {args.per_device_batch_size}, total batch "
            f"{args.per_device_batch_size * world * args.gradient_accumulation_steps}, {args.max_steps} steps, "
            f"mixed precision {accelerator.mixed_precision}"
        )
        for variant in config["variants"]:
            runs.append(_run_variant(accelerator, args, base, task, variant, train_set, eval_set, slug, spec, log))
            accelerator.free_memory()
    return runs, data


def _run_variant(accelerator, args, base, task, variant, train_set, eval_set, slug, spec, log) -> dict:
    set_seed(args.seed)
    model = copy.deepcopy(base).to(accelerator.device)
    for module in model.modules():  # dropout on the residual stream makes no conversion exact
        if isinstance(module, torch.nn.Dropout):
            module.p = args.dropout
    teacher = copy.deepcopy(base).to(accelerator.device).eval() if task != "causal-lm" else None
    if teacher is not None:
        teacher.requires_grad_(False)
    eval_loader = accelerator.prepare(DataLoader(eval_set, batch_size=args.per_device_batch_size))
    before = evaluate(model, eval_loader, task, accelerator, teacher)
    if args.lora_rank:
        model = _with_lora(model, args)
    target, report = None, None
    if variant != "baseline":
        target = "layernorm" if variant == "layernorm" else "rmsnorm"
        report = patch_model(
            model, target=target, allow_approximate=args.allow_approximate and target == "rmsnorm",
            keep_centered=args.keep_centered and target == "rmsnorm",
        )
        log(f"   {variant}: {report.summary()}")
    after_conversion = evaluate(model, eval_loader, task, accelerator, teacher)
    if args.gradient_checkpointing:
        # transformers renamed it (5.2x), keeping the old name, deprecated, for a while
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    # a tiny LM from scratch-ish vs a pretrained encoder; LoRA's adapters take larger steps
    lr = args.learning_rate or (1e-3 if args.lora_rank else 5e-4 if task == "causal-lm" else 2e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # eps 1e-6: at the teacher the distillation gradient is rounding noise, which Adam's
    # default eps (1e-8) would normalise into full-size steps away from it
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, eps=1e-6)
    train_loader = DataLoader(train_set, batch_size=args.per_device_batch_size, shuffle=False)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

    ckpt_root = Path(args.output_dir) / "checkpoints" / slug / variant
    step, curve, step_times, step_tokens = 0, [{"step": 0, metric_name(task): after_conversion}], [], []
    resume = _find_checkpoint(args.resume_from_checkpoint, ckpt_root)
    if resume is not None:
        accelerator.load_state(str(resume))
        progress = json.loads((resume / "progress.json").read_text())
        step, curve, step_times, step_tokens = progress["step"], progress["curve"], progress["step_times"], progress["step_tokens"]
        log(f"   resumed {variant} from {resume} at step {step}")

    batches_per_epoch = len(train_loader)
    micro = step * args.gradient_accumulation_steps
    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, initial=step, desc=f"{slug}/{variant}", disable=not accelerator.is_local_main_process or args.quiet)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    while step < args.max_steps:
        epoch_start = micro % batches_per_epoch
        loader = accelerator.skip_first_batches(train_loader, epoch_start) if epoch_start else train_loader
        started, tokens = time.perf_counter(), 0
        for batch in loader:
            with accelerator.accumulate(model):
                loss, n = loss_and_tokens(model, batch, task, teacher)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            micro += 1
            tokens += int(n)
            if not accelerator.sync_gradients:
                continue
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - started)
            step_tokens.append(tokens)
            step += 1
            bar.update(1)
            if step % args.eval_steps == 0 or step == args.max_steps:
                curve.append({"step": step, metric_name(task): evaluate(model, eval_loader, task, accelerator, teacher),
                              "train_loss": accelerator.gather(loss.detach().float()).mean().item()})
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                _save_checkpoint(accelerator, ckpt_root / f"step_{step}", step, curve, step_times, step_tokens)
                if args.stop_after_steps and step >= args.stop_after_steps:
                    log(f"   stopping after step {step}, as asked (--stop-after-steps)")
                    accelerator.wait_for_everyone()
                    sys.exit(0)
            if step >= args.max_steps:
                break
            started, tokens = time.perf_counter(), 0  # evaluation and checkpoints are not step time
    bar.close()
    after_finetune = curve[-1][metric_name(task)]

    timed = slice(args.warmup_steps_excluded, None)
    times, toks = step_times[timed] or step_times, step_tokens[timed] or step_tokens
    per_process = sum(toks) / max(sum(times), 1e-12)
    total = accelerator.gather(torch.tensor([per_process], device=accelerator.device)).sum().item()
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        import psutil

        peak = psutil.Process().memory_info().rss
    cost = before - after_conversion
    recovery = (after_finetune - after_conversion) / cost if abs(cost) > 1e-6 * max(abs(before), 1e-12) else None

    out_dir = Path(args.output_dir) / "models" / slug / variant
    save_model(accelerator, model, out_dir)
    metrics = {
        "eval_before_conversion": before,
        "eval_after_conversion": after_conversion,
        "eval_after_finetune": after_finetune,
        "recovery": recovery,
        "tokens_per_second": total,
        "tokens_per_second_per_process": per_process,
        "step_time_ms_median": 1e3 * statistics.median(times) if times else None,
        "peak_memory_bytes": peak,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }
    log(f"   {variant}: {metric_name(task)} {before:.4f} -> {after_conversion:.4f} (converted) -> {after_finetune:.4f} (fine-tuned); "
        f"{total:.0f} tokens/s")
    return {"model": spec, "task": task, "variant": variant, "target": target, "lora_rank": args.lora_rank, "metric": metric_name(task), "metrics": metrics,
            "curve": curve, "report": report.summary() if report is not None else None}


def _with_lora(model, args):
    """LoRA adapters on the model's linear layers, put on before patching: the conversion then
    finds the adapters on the stream writers (their lora_B writes into the stream too) and
    centres them with their base layers, and --keep-centered keeps them centred. Only the
    adapters train."""
    import peft

    targets = args.lora_target_modules
    config = peft.LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=args.dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules the model does not have: PEFT's message says which
        raise SystemExit(f"--lora-target-modules {targets}: {exc}") from exc


def _find_checkpoint(arg, root: Path):
    if not arg:
        return None
    if arg != "latest":
        path = Path(arg)
        if path.is_dir() and (path / "progress.json").is_file():
            return path
        return None
    steps = sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if root.is_dir() else []
    return steps[-1] if steps else None


def _save_checkpoint(accelerator, path: Path, step, curve, step_times, step_tokens):
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        progress = {"step": step, "curve": curve, "step_times": step_times, "step_tokens": step_tokens}
        (path / "progress.json").write_text(json.dumps(progress))  # written last: marks it complete
    accelerator.wait_for_everyone()


def save_model(accelerator, model, out_dir: Path) -> None:
    """The fine-tuned model, whole, as a transformers checkpoint (``hf_rmsnorm.save_pretrained``):
    a patched one with the block ``hf_rmsnorm.from_pretrained`` needs to load it as it trained
    (converted and fine-tuned without --keep-centered, its LayerNorm reading is another model),
    LoRA adapters folded into their base layers. Every process takes part: under FSDP2 (and
    DeepSpeed ZeRO-3) the weights are sharded, and gathering them is a collective; the main
    process alone asking for them would wait forever for the others. FSDP2's DTensors are
    gathered with torch's own call (the one Accelerate makes for FSDP2), whatever set them up;
    anything else goes through Accelerate."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        hf_rmsnorm.save_pretrained(accelerator.unwrap_model(model), out_dir, state_dict=state_dict, safe_serialization=True)
    accelerator.wait_for_everyone()


# -------------------------------------------------------------------------------- outputs


def write_outputs(runs: list[dict], out: Path, accelerator_state: dict, data: dict):
    import datetime

    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not accelerator_state["cpu"] else "CPU",
        "num_processes": accelerator_state["num_processes"],
        "distributed_type": accelerator_state["distributed_type"],
        "mixed_precision": accelerator_state["mixed_precision"],
        "torch": torch.__version__, "transformers": transformers.__version__, "hf_rmsnorm": hf_rmsnorm.__version__,
        "python": platform.python_version(), "data": data,
        "peak_memory": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() and not accelerator_state["cpu"] else "process RSS (CPU)",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"runs": runs, "environment": env}, indent=2) + "\n")
    title = f"# Fine-tune results — {env['device']}, {env['num_processes']} process(es)"
    title += f" ({env['distributed_type']})" if env["distributed_type"] != "NO" else ""  # NO: one process, no wrapper
    title += f", mixed precision {env['mixed_precision']}"
    title += f", LoRA rank {runs[0]['lora_rank']} (only the adapters train)" if runs and runs[0]["lora_rank"] else ""
    lines = [
        title,
        "", f"torch {env['torch']}, transformers {env['transformers']}, hf_rmsnorm {env['hf_rmsnorm']}, Python {env['python']}; "
        f"data: {data['source']}, {data['texts']} texts (sha256 {data['sha256']}); {env['date']}.", "",
        "| model | variant | metric | before conversion | after conversion | after fine-tune | recovery | tokens/s | step ms (median) | peak memory MiB | trained parameters |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m = r["metrics"]
        rec = "—" if m["recovery"] is None else f"{100 * m['recovery']:.0f}%"
        step_ms = "—" if m["step_time_ms_median"] is None else f"{m['step_time_ms_median']:.1f}"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['metric']} | {m['eval_before_conversion']:.4f} | {m['eval_after_conversion']:.4f} | "
            f"{m['eval_after_finetune']:.4f} | {rec} | {m['tokens_per_second']:.0f} | {step_ms} | {m['peak_memory_bytes'] / 2**20:.0f} | "
            f"{m['trainable_parameters']:,} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(runs, out / "results.png")
    return "\n".join(lines)


def _plot(runs, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4))
    for ax, model in zip(axes, models):
        for r in (r for r in runs if r["model"] == model):
            ax.plot([c["step"] for c in r["curve"]], [c[r["metric"]] for c in r["curve"]], marker="o", label=r["variant"])
            ax.set_title(model)
            ax.set_xlabel("step")
            ax.set_ylabel(r["metric"])
        ax.legend()
    labels = [f"{r['model'].replace('offline:', '')}\n{r['variant']}" for r in runs]
    axes[-1].bar(range(len(runs)), [r["metrics"]["tokens_per_second"] for r in runs])
    axes[-1].set_xticks(range(len(runs)), labels, fontsize=7)
    axes[-1].set_title("training throughput (tokens/s, all processes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=",".join(OFFLINE_MODELS), help="local path or hub id (comma-separated for several); default: the offline pair")
    parser.add_argument("--dataset", default=None, help="`datasets` name[:config], or local .txt/.json files; default: stdlib docstrings")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--task", choices=["causal-lm", "embedding-distillation"], default=None, help="default: from the model")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--allow-approximate", action="store_true", help="rmsnorm variant: convert post-LN models approximately")
    parser.add_argument("--keep-centered", action="store_true", help="rmsnorm variant: keep the model exactly exportable while training")
    parser.add_argument("--lora-rank", type=int, default=0, help="fine-tune LoRA adapters of this rank, nothing else (0: every weight)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    parser.add_argument("--lora-target-modules", default="all-linear", help="'all-linear' or comma-separated module names")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: 5e-4 for causal LM, 2e-5 for encoders, 1e-3 with LoRA")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout for fine-tuning (0: conversions stay exact while training)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-eval-texts", type=int, default=128)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None, help="default: the accelerate config's")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpointing-steps", type=int, default=0)
    parser.add_argument("--resume-from-checkpoint", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument("--stop-after-steps", type=int, default=0, help="stop after the checkpoint at this step, as a pre-empted job would")
    parser.add_argument("--warmup-steps-excluded", type=int, default=2, help="steps left out of the throughput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--output-dir", default="recipe_out")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.max_steps <= 0:
        parser.error(f"--max-steps must be positive, got {args.max_steps}")
    if args.eval_steps <= 0 or args.per_device_batch_size <= 0 or args.gradient_accumulation_steps <= 0:
        parser.error("--eval-steps, --per-device-batch-size and --gradient-accumulation-steps must be positive")
    if (args.allow_approximate or args.keep_centered) and "rmsnorm" not in variants:
        parser.error("--allow-approximate and --keep-centered apply to the rmsnorm variant, which --variants leaves out")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be 0 (no LoRA) or positive, got {args.lora_rank}")
    if args.lora_rank and importlib.util.find_spec("peft") is None:
        parser.error("--lora-rank needs peft: pip install peft (or the package's [recipes] extra)")
    if args.stop_after_steps and not args.checkpointing_steps:
        parser.error("--stop-after-steps needs --checkpointing-steps (there would be nothing to resume from)")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume-from-checkpoint {args.resume_from_checkpoint}: no such directory")
    for m in models:
        if m not in OFFLINE_MODELS and not Path(m).exists() and (m.startswith((".", "/")) or m.count("/") > 1):
            parser.error(f"--model {m}: no such local path")
    if args.dataset is None and models == list(OFFLINE_MODELS) and not args.allow_approximate:
        args.allow_approximate = True  # the offline encoder is post-LN: its rmsnorm variant is the approximate path

    runs, data = training_function({"models": models, "variants": variants}, args)
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    if state.is_main_process:
        accelerator_state = {"cpu": args.cpu or not torch.cuda.is_available(), "num_processes": state.num_processes,
                             "distributed_type": state.distributed_type.value, "mixed_precision": str(state.mixed_precision)}
        table = write_outputs(runs, Path(args.output_dir), accelerator_state, data)
        print(table)
        print(f"\nwrote {args.output_dir}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()
