"""Run by tests/test_fsdp.py under torchrun: 2 CPU processes (gloo). A patched model sharded by
FSDP2 (``fully_shard`` per block and at the root, as ``recipes/configs/fsdp.yaml`` asks of
Accelerate) trains as the same patched model does in one process: each rank takes half the
batch, and the loss, every gradient and the loss after an SGD step must be the one process's.
FSDP frees each block's gathered weights after its forward and gathers them again for the
backward, so this is where a fused module that held on to a weight of its own would show.
Also the recipe's save of the sharded model (recipes/finetune.py's save_model), keep_centered
(Adam steps and the weights saved after them: the one process's), FSDP's bf16 mixed precision,
and patch_model refusing an already sharded model. Prints
"ok <what>" per check; a mismatch raises."""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "recipes")]
from finetune import save_model  # noqa: E402
from tiny_models import adam_losses, build  # noqa: E402

from hf_rmsnorm import patch_model  # noqa: E402

MODELS = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer"}  # a converted pre-LN model, an RMSNorm one


def shard(model, block, mesh, mp_policy=None):
    for module in model.modules():
        if type(module).__name__ == block:
            fully_shard(module, mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    fully_shard(model, mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    return model


def mean_over_ranks(loss):
    total = loss.detach().float().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def sgd_step(model):
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None


def assert_saved(out: Path, want: dict, what: str, centred: bool) -> None:
    """The checkpoint written to ``out`` holds ``want``'s values (a state_dict) for its keys,
    and its hf_rmsnorm block says whether the stream writers are still centred."""
    block = json.loads((out / "config.json").read_text())["hf_rmsnorm"]
    assert block["writers_centred"] is centred, f"{what}: {block}"
    saved = load_file(out / "model.safetensors")
    assert saved and saved.keys() <= want.keys(), f"{what}: saved {sorted(saved)}"
    for k, v in saved.items():
        torch.testing.assert_close(v, want[k], msg=lambda m: f"{what}, saved {k}: {m}")


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main():
    dist.init_process_group("gloo")
    accelerator = Accelerator(cpu=True)  # joins the group above
    tmp = os.getcwd()  # the test's tmp_path
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    say = (lambda what: print(f"ok {what}", flush=True)) if rank == 0 else (lambda what: None)
    try:  # FSDP2 itself on CPU tensors: torch 2.6's asks its CPU stream for record_event, which it lacks
        probe = fully_shard(torch.nn.Linear(4, 4), mesh=mesh)
        probe(torch.ones(2, 4)).sum().backward()
    except Exception as e:  # noqa: BLE001 - whatever torch's FSDP2 raises on its own module
        if rank == 0:
            print(f"skip torch {torch.__version__}'s fully_shard does not train on CPU tensors: {e!r}", flush=True)
        leave()
    for name, block in MODELS.items():
        base = build(name)[0]
        ids = torch.randint(0, base.config.vocab_size, (2 * world, 9), generator=torch.Generator().manual_seed(0))
        mine = ids[2 * rank:2 * rank + 2]  # every row has the same number of tokens: the halves' mean is the batch's
        with torch.no_grad():
            unpatched_loss = base(input_ids=ids, labels=ids).loss

        one = copy.deepcopy(base)
        patch_model(one)
        one(input_ids=ids, labels=ids).loss.backward()
        grads = {k: p.grad.clone() for k, p in one.named_parameters()}
        sgd_step(one)
        with torch.no_grad():
            one_after = one(input_ids=ids, labels=ids).loss

        sharded = copy.deepcopy(base)
        patch_model(sharded)
        shard(sharded, block, mesh)
        loss = sharded(input_ids=mine, labels=mine).loss
        loss.backward()
        torch.testing.assert_close(mean_over_ranks(loss), unpatched_loss, msg=lambda m: f"{name}, loss: {m}")
        for k, p in sharded.named_parameters():
            torch.testing.assert_close(full(p.grad), grads[k], msg=lambda m: f"{name}, gradient of {k}: {m}")
        sgd_step(sharded)
        with torch.no_grad():
            after = mean_over_ranks(sharded(input_ids=mine, labels=mine).loss)
        torch.testing.assert_close(after, one_after, msg=lambda m: f"{name}, loss after a step: {m}")
        say(f"{name} fp32")

        # The recipe's save (every rank gathers; the main process writes): the one process's weights
        out = Path(tmp) / name
        save_model(accelerator, sharded, out)
        if rank == 0:  # a step without keep_centered moves gpt2's writers off centre (llama has none)
            assert_saved(out, one.state_dict(), name, centred=name != "gpt2")
        say(f"{name} saved whole by the recipe")

        # keep_centered (gpt2's writers; llama has none): Adam steps, the loss of each and the
        # weights saved after them, against the one process's
        one = copy.deepcopy(base)
        patch_model(one, keep_centered=True)
        one_losses = adam_losses(one, ids, steps=3)
        sharded = copy.deepcopy(base)
        patch_model(sharded, keep_centered=True)
        losses = adam_losses(shard(sharded, block, mesh), mine, steps=3, reduce=mean_over_ranks)
        torch.testing.assert_close(losses, one_losses, msg=lambda m: f"{name}, keep_centered losses: {m}")
        out = Path(tmp) / f"{name}-centred"
        save_model(accelerator, sharded, out)
        if rank == 0:
            assert_saved(out, one.state_dict(), f"{name}, keep_centered", centred=True)
        say(f"{name} keep_centered")

        if name == "gpt2":
            # LoRA first, then the patch, then sharded (as --lora-rank): the losses of a few
            # Adam steps, and the model saved whole with the adapters folded in, as one process's
            import peft

            lora = peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
            twins = []
            for _ in range(2):
                torch.manual_seed(0)  # the same random adapters in both
                twins.append(peft.get_peft_model(copy.deepcopy(base), lora).eval())  # eval: no dropout on the stream
                patch_model(twins[-1])
            one, sharded = twins
            one_losses = adam_losses(one, ids, steps=3)
            losses = adam_losses(shard(sharded, block, mesh), mine, steps=3, reduce=mean_over_ranks)
            torch.testing.assert_close(losses, one_losses, msg=lambda m: f"{name}, LoRA losses: {m}")
            out = Path(tmp) / f"{name}-lora"
            save_model(accelerator, sharded, out)
            if rank == 0:  # the adapters on the writers move them off centre
                assert_saved(out, one.merge_and_unload().state_dict(), f"{name}, LoRA", centred=False)
            say(f"{name} LoRA saved whole")

        # bf16 compute, fp32 master weights and gradient reduction (Accelerate's mixed_precision: bf16).
        # The patched model against the unpatched one under the same policy, at bf16's tolerance.
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        results = {}
        for patched in (False, True):
            model = copy.deepcopy(base)
            if patched:
                patch_model(model)
            shard(model, block, mesh, bf16)
            loss = model(input_ids=mine, labels=mine).loss
            loss.backward()
            results[patched] = mean_over_ranks(loss), {k: full(p.grad) for k, p in model.named_parameters()}
        torch.testing.assert_close(results[True][0], results[False][0], rtol=2**-6, atol=0,
                                   msg=lambda m: f"{name}, bf16 loss: {m}")
        for k, g in results[True][1].items():
            # gpt2's converted weights live in another basis; their gradients are compared in fp32 above
            assert torch.isfinite(g).all(), f"{name}, bf16 gradient of {k} is not finite"
            if k in results[False][1] and name == "llama":
                ref = results[False][1][k]
                torch.testing.assert_close(g, ref, rtol=2**-6, atol=2**-6 * ref.abs().max().item(),
                                           msg=lambda m: f"{name}, bf16 gradient of {k}: {m}")
        say(f"{name} bf16")

        wrapped = shard(copy.deepcopy(base), block, mesh)
        before = {k: full(v).clone() for k, v in wrapped.state_dict().items()}
        try:
            patch_model(wrapped)
        except TypeError as e:
            assert "before accelerator.prepare" in str(e), e
        else:
            raise AssertionError(f"{name}: patch_model took a model already sharded by fully_shard")
        assert all(torch.equal(full(v), before[k]) for k, v in wrapped.state_dict().items()), f"{name}: refused, yet changed"
        assert not any("Fused" in type(m).__name__ for m in wrapped.modules()), f"{name}: refused, yet swapped"
        say(f"{name} refused once sharded")
    leave()


def leave():
    # See dtensor_child.py: leave without torch's gloo teardown, which sometimes aborts.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
