"""Convert a Hugging Face checkpoint on disk (same as ``hf-rmsnorm convert``):

    python scripts/convert_checkpoint.py IN OUT [--target rmsnorm|layernorm] [--allow-approximate]
        [--dtype auto|float32|bfloat16|float16] [--max-shard-size 2GB] [--force] [--no-verify]
        [--allow-pickle] [--to-original]
"""

import sys

from hf_rmsnorm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
