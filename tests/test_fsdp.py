"""Patched models under FSDP2 (``fully_shard``), what ``recipes/configs/fsdp.yaml`` asks
Accelerate for: two CPU processes (gloo, through torchrun), each on half the batch, against the
same patched model in one process (loss, every gradient, the loss after an SGD step) and the
unpatched model (the loss), and saved whole by the recipe's ``save_model``; keep_centered's Adam steps and saved weights
against the one process's; LoRA's too, saved with the adapters folded in; bf16 mixed precision against the unpatched model under the same
policy; patch_model refusing a model already sharded. The checks are in ``fsdp_child.py``."""

from pathlib import Path

import pytest

from conftest import run_child

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.slow
def test_a_patched_model_trains_under_fully_shard_as_in_one_process(backend, tmp_path):
    done = run_child(HERE / "fsdp_child.py", backend, tmp_path, processes=2)
    # gpt2 and llama: fp32, saved, keep_centered, bf16, refused once sharded; gpt2: LoRA saved whole
    assert len(done) == 2 * 5 + 1, done
