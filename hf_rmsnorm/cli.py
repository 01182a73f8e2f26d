"""The ``hf-rmsnorm`` command.

    hf-rmsnorm inspect MODEL [--target rmsnorm|layernorm] [--include P] [--exclude P] [--json]
    hf-rmsnorm convert IN OUT [...]
    hf-rmsnorm build-cpu-kernel
    hf-rmsnorm build-cuda-launch

MODEL is a local Hugging Face model directory (its weights are loaded), a config.json file,
or a ``model_type`` such as ``llama`` (a default config; built on the meta device, only the
norms are materialised, so even a large configuration inspects in seconds). It prints the
report ``patch_model`` would produce, without changing anything. ``build-cpu-kernel`` builds the
compiled CPU RMSNorm (plain and gated) into its cache now rather than at the first CPU call (a container image,
a machine about to go offline), or says why it cannot be built; ``build-cuda-launch`` does the
same for the C++ launch operator that issues the norms on CUDA (no GPU needed to build it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import architecture_class, build_meta, materialise_norms_
from .patching import patch_model
from .patching.discovery import is_norm_like, model_name_of
from .patching.patch import TARGETS

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """A bad argument or input: printed as one line on stderr, exit status 2."""


# The exact conversion is measured on real (random) weights; above this a config is not
# instantiated for inspection, a model directory is needed instead.
_MAX_RANDOM_PARAMS = 300_000_000


def _from_config(config, dtype, target="layernorm"):
    """For target=layernorm: build on the meta device and materialise only the norms (all
    that is probed). For target=rmsnorm: a real random model, if it is small enough."""
    model = build_meta(config)
    layer_norms = any("layernorm" in type(m).__name__.lower() and "rms" not in type(m).__name__.lower() for m in model.modules())
    if target == "rmsnorm" and layer_norms:
        size = sum(p.numel() for p in model.parameters())
        if size > _MAX_RANDOM_PARAMS:
            raise CliError(
                f"this configuration has {size / 1e6:.0f}M parameters; inspecting the exact conversion needs real weights: "
                "pass a model directory, or --target layernorm"
            )
        cls = architecture_class(getattr(config, "architectures", None))
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        # A fresh model's norms are weight 1, bias 0, whose outputs happen to be centred; a
        # trained model's are not. Random norm parameters make the report speak for the latter.
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model_name = model_name_of(model)
            for m in model.modules():
                if is_norm_like(m, model_name):
                    for p in m.parameters(recurse=False):
                        p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    else:
        materialise_norms_(model)
    return model.to(dtype) if dtype is not None else model


def load_for_inspection(spec: str, dtype=None, trust_remote_code: bool = False, target: str = "layernorm"):
    import transformers

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{spec} is a directory without config.json: not a Hugging Face model directory.")
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        cls = architecture_class(getattr(config, "architectures", None))
        kwargs = {"trust_remote_code": trust_remote_code} if trust_remote_code else {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            return cls.from_pretrained(path, **kwargs)
        except OSError as exc:  # no weights: inspect the architecture alone
            if "no file named" not in str(exc).lower() and "does not appear to have" not in str(exc).lower():
                raise CliError(f"could not load {spec}: {exc}") from exc
            return _from_config(config, dtype, target)
    if path.suffix == ".json":
        if not path.is_file():
            raise CliError(f"{spec}: no such file.")
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return _from_config(config, dtype, target)
    if "/" in spec or spec.startswith("."):
        raise CliError(f"{spec}: no such directory (hub ids are not fetched by inspect; download the model first).")
    try:
        config = transformers.AutoConfig.for_model(spec)
    except ValueError as exc:
        raise CliError(f"{spec!r} is neither a local model directory, a config.json, nor a known model_type.") from exc
    return _from_config(config, dtype, target)


def _inspect(args) -> int:
    model = load_for_inspection(args.model, _DTYPES[args.dtype], args.trust_remote_code, args.target)
    report = patch_model(
        model, target=args.target, include=args.include, exclude=args.exclude, dry_run=True,
        allow_approximate=args.allow_approximate,
    )
    print(json.dumps({"model": report.model_class, "target": report.target, "entries": list(report)}, indent=2) if args.json else report)
    return 0


def _convert(args) -> int:
    from .checkpoint import REPORT, convert_checkpoint

    block = convert_checkpoint(
        args.input, args.output, target=args.target, allow_approximate=args.allow_approximate, dtype=args.dtype,
        force=args.force, verify=not args.no_verify, max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle, to_original=args.to_original, trust_remote_code=args.trust_remote_code,
    )
    print((Path(args.output) / REPORT).read_text(), end="")
    verification = block.get("verification")
    if verification and "skipped" in verification:
        print(f"NOT VERIFIED: {verification['skipped']}; hf_rmsnorm.from_pretrained still checks the conversion when it loads the model", file=sys.stderr)
    elif verification and "loaded_converted" in verification:  # fits once: the check from_pretrained makes
        print(f"verification (the model loaded converted, not compared with the input): {verification['note']}")
    elif verification:
        print(f"verification: {verification}")
    print(f"written: {args.output}")
    return 0


def _build_cpu_kernel(args) -> int:
    from .ops import _cpu_kernel

    if _cpu_kernel.op() is None:
        print(
            f"hf-rmsnorm build-cpu-kernel: {_cpu_kernel.unavailable_reason()}; "
            "RMSNorm and the gated norms on the CPU will run torch ops",
            file=sys.stderr,
        )
        return 1
    print(f"the CPU RMSNorm kernel (plain and gated) is built: {_cpu_kernel.built_path()}")
    return 0


def _build_cuda_launch(args) -> int:
    command = "hf-rmsnorm build-cuda-launch"
    try:
        from .ops import _cuda_launch
    except ImportError as e:  # Triton, which the kernels it launches need
        print(f"{command}: {e}; without Triton the norms run the torch path and need no operator", file=sys.stderr)
        return 1
    if _cuda_launch.ops() is None:
        print(f"{command}: {_cuda_launch.unavailable_reason()}; the norms on CUDA will launch from Python", file=sys.stderr)
        return 1
    print(f"the C++ launch operator is built: {_cuda_launch.built_path()}")
    return 0


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a local Hugging Face model directory (from save_pretrained)")
    p.add_argument("output", help="the directory to write (must not exist or be empty, unless --force)")
    p.add_argument("--target", choices=TARGETS, default="rmsnorm", help="rmsnorm: exact conversion where provable (default)")
    p.add_argument("--allow-approximate", action="store_true", help="also convert post-LN norms (changes the function)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="dtype of the written weights")
    p.add_argument("--max-shard-size", default=None, help="re-shard the output (e.g. 2GB); default: as the input")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip loading both models to compare outputs")
    p.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (unpickling can run code)")
    p.add_argument("--to-original", action="store_true", help="export a converted checkpoint back to the original architecture")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run (off by default)")


def main(argv=None) -> int:
    from .checkpoint import ConversionError

    parser = argparse.ArgumentParser(prog="hf-rmsnorm", description="Fused norms for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_arguments(sub.add_parser("convert", help="convert a checkpoint on disk, in bounded memory"))
    p = sub.add_parser("inspect", help="print the report patch_model would produce, changing nothing")
    p.add_argument("model", help="local model directory, config.json, or model_type (e.g. llama)")
    p.add_argument("--target", choices=TARGETS, default="rmsnorm", help="rmsnorm: exact conversion where provable (default)")
    p.add_argument("--allow-approximate", action="store_true", help="with --target rmsnorm: also convert post-LN norms")
    p.add_argument("--include", action="append", help="fnmatch pattern on dotted module names (repeatable)")
    p.add_argument("--exclude", action="append", help="fnmatch pattern on dotted module names (repeatable)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="auto", help="dtype to load the model in")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own code to run (off by default)")
    sub.add_parser(
        "build-cpu-kernel", help="build the compiled CPU RMSNorm (plain and gated) into its cache now (HF_RMSNORM_CACHE), not at first use"
    )
    sub.add_parser(
        "build-cuda-launch",
        help="build the C++ launch operator (the norms' launches on CUDA) into its cache now, not at the first CUDA call",
    )
    args = parser.parse_args(argv)
    if args.command == "build-cpu-kernel":
        return _build_cpu_kernel(args)
    if args.command == "build-cuda-launch":
        return _build_cuda_launch(args)
    try:
        return _convert(args) if args.command == "convert" else _inspect(args)
    except (CliError, ConversionError, ValueError, TypeError, NotImplementedError) as exc:
        print(f"hf-rmsnorm {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
