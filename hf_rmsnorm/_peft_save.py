"""What a ``PeftModel`` is saved as by ``hf_rmsnorm.save_pretrained`` (``checkpoint.py``): the
base model as ``merge_and_unload()`` would leave it, computed from the state dict and leaving
the model as it is. ``peft_names`` maps the PeftModel's names to the base model's (the copy
that runs, for modules_to_save and LN tuning; None for one that does not) and refuses PEFT
layers a whole save cannot hold; ``merged_lora_state_dict`` folds the LoRA adapters in. PEFT
is imported only here, when a PeftModel is saved."""

from __future__ import annotations

import re
from typing import Optional


def peft_names(peft_model):
    """``rename(name)``: a PeftModel's module or state-dict name -> its name in the base model
    as merge_and_unload() leaves it, or None for a copy that does not run (and is not saved).
    LoRA's base layers stand where their wrappers stood; a norm (or head) trained as a copy,
    in ``modules_to_save`` or by LN tuning, is saved as the copy that runs. Any other PEFT
    layer (IA3, LoHa, trainable tokens, ...) is refused: its weights would be left out of the
    save, silently."""
    from peft.tuners.ln_tuning.layer import LNTuningLayer
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import other

    copies = getattr(other, "AuxiliaryTrainingWrapper", other.ModulesToSaveWrapper)
    runs = {}  # wrapper's name -> the name, under it, of what its forward runs
    for name, layer in peft_model.named_modules():
        if isinstance(layer, other.ModulesToSaveWrapper):
            base, held, passthrough = "original_module", "modules_to_save", False
        elif isinstance(layer, LNTuningLayer):  # merged, its base layer is the tuned copy
            base, held, passthrough = "base_layer", "ln_tuning_layers", layer.merged
        elif isinstance(layer, LoraLayer) or not isinstance(layer, (BaseTunerLayer, copies)):
            continue  # LoRA is folded by merged_lora_state_dict
        else:
            raise ValueError(
                f"hf_rmsnorm.save_pretrained: {name} is a {type(layer).__module__}.{type(layer).__qualname__}, which this "
                "save cannot fold (it folds LoRA, modules_to_save and LN tuning). Merge it with PEFT first, "
                "peft_model.merge_and_unload(), then save."
            )
        active = [] if passthrough or layer.disable_adapters else [a for a in layer.active_adapters if a in getattr(layer, held)]
        if len(active) > 1:
            raise ValueError(f"hf_rmsnorm.save_pretrained: {name} has several active adapters ({active}). Merge "
                             "with PEFT first, peft_model.merge_and_unload(), then save.")
        runs[name] = f"{held}.{active[0]}" if active else base
    wrappers = sorted(runs, key=len, reverse=True)

    def rename(name: str) -> Optional[str]:
        for w in wrappers:
            if name.startswith(w + "."):
                rest = name[len(w) + 1:]
                if rest != runs[w] and not rest.startswith(runs[w] + "."):
                    return None
                name = w + rest[len(runs[w]):]
                break
        return re.sub(r"\.base_layer(?=\.|$)", "", name.removeprefix("base_model.model."))

    return rename


def merged_lora_state_dict(peft_model, state_dict: dict, rename) -> dict:
    """``state_dict`` (a PeftModel's keys) with each LoRA adapter folded into its base layer,
    W + scaling · B A (transposed where the layer stores W as (in, out): GPT-2's Conv1D), in
    float32, under the original names (``rename``); the model itself is left as it is. Only
    plain LoRA on weight matrices, one adapter active: anything else is for PEFT's own
    ``merge_and_unload()``, after which the state dict holds no adapter to fold."""
    from peft.tuners.lora import LoraLayer

    merged = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or getattr(layer, "merged", False):
            continue
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        unsupported = (len(adapters) != 1 or adapters[0] in getattr(layer, "lora_variant", {})
                       or getattr(layer, "lora_bias", {}).get(adapters[0]) or f"{name}.base_layer.weight" not in merged)
        if unsupported:
            raise ValueError(
                f"hf_rmsnorm.save_pretrained: {name} holds an adapter this save cannot fold (not one plain LoRA adapter on "
                "a weight matrix: DoRA, a LoRA bias, several adapters, an embedding). Merge it with PEFT first, "
                "peft_model.merge_and_unload(), then save."
            )
        a = adapters[0]
        w = merged[f"{name}.base_layer.weight"]
        delta = state_dict[f"{name}.lora_B.{a}.weight"].float() @ state_dict[f"{name}.lora_A.{a}.weight"].float()
        delta = (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[a]
        merged[f"{name}.base_layer.weight"] = (w.float() + delta.to(w.device)).to(w.dtype)
    return {rename(k): v for k, v in merged.items() if rename(k) is not None}
