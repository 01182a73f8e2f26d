"""The one architecture table: for each pre-LN ``config.model_type``, which modules write the
residual stream, which LayerNorms read it, and where each stream starts.

``patch_model`` does not need it: it measures all of this on the model itself
(``measure.py``). The table is what lets a checkpoint be converted on disk, tensor by tensor,
without instantiating the model (``checkpoint.py``). Every entry was derived by that
measurement on a tiny model of the family, and ``tests/test_architectures.py`` re-derives it
on every run, so the table cannot drift from what the model computes.

Patterns are fnmatch patterns on module names relative to the base model (``h.*.attn.c_proj``
for GPT-2, whose checkpoints name it ``transformer.h.0.attn.c_proj``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Architecture:
    writers: tuple[str, ...]  # modules whose output is added to the residual stream: centred
    norms: tuple[str, ...]  # LayerNorms that read the stream: converted to RMSNorm
    starts: tuple[str, ...]  # blocks whose input is centred at run time
    # a reason when a configuration of this model_type is not the pre-LN layout
    not_pre_ln: Optional[Callable[[object], Optional[str]]] = None

    def refusal(self, config) -> Optional[str]:
        return self.not_pre_ln(config) if self.not_pre_ln else None


def _opt_layout(config) -> Optional[str]:
    return None if getattr(config, "do_layer_norm_before", True) else "post-LN (do_layer_norm_before=False, as in OPT-350m)"


def _post_ln(config) -> Optional[str]:
    return "post-LN (gamma * n + beta rides the residual stream)"


def _wav2vec2_layout(config) -> Optional[str]:
    if getattr(config, "do_stable_layer_norm", False):
        return None
    return "post-LN (do_stable_layer_norm=False, as in wav2vec2-base and hubert-base)"


# wav2vec2-style encoders with do_stable_layer_norm (the large checkpoints): pre-LN blocks after a
# convolutional feature encoder, whose LayerNorms normalise conv features, not the stream
_WAV2VEC2 = Architecture(
    ("encoder.layers.*.attention.out_proj", "encoder.layers.*.feed_forward.output_dense"),
    ("encoder.layers.*.layer_norm", "encoder.layers.*.final_layer_norm", "encoder.layer_norm"),
    ("encoder.layers.0",),
    _wav2vec2_layout,
)

# Post-LN families: listed so that they are refused for what they are, not as unknown.
_POST_LN = Architecture((), (), (), _post_ln)

_DECODER_LN = ("layers.*.input_layernorm", "layers.*.post_attention_layernorm")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(("h.*.attn.c_proj", "h.*.mlp.c_proj"), ("h.*.ln_1", "h.*.ln_2", "ln_f"), ("h.0",)),
    "gpt_neo": Architecture(("h.*.attn.attention.out_proj", "h.*.mlp.c_proj"), ("h.*.ln_1", "h.*.ln_2", "ln_f"), ("h.0",)),
    "gptj": Architecture(("h.*.attn.out_proj", "h.*.mlp.fc_out"), ("h.*.ln_1", "ln_f"), ("h.0",)),
    "codegen": Architecture(("h.*.attn.out_proj", "h.*.mlp.fc_out"), ("h.*.ln_1", "ln_f"), ("h.0",)),
    "gpt_neox": Architecture(("layers.*.attention.dense", "layers.*.mlp.dense_4h_to_h"), (*_DECODER_LN, "final_layer_norm"), ("layers.0",)),
    "opt": Architecture(
        ("decoder.layers.*.self_attn.out_proj", "decoder.layers.*.fc2"),
        ("decoder.layers.*.self_attn_layer_norm", "decoder.layers.*.final_layer_norm", "decoder.final_layer_norm"),
        ("decoder.layers.0",),
        _opt_layout,
    ),
    "bloom": Architecture(("h.*.self_attention.dense", "h.*.mlp.dense_4h_to_h"), ("h.*.input_layernorm", "h.*.post_attention_layernorm", "ln_f"), ("h.0",)),
    # both decoder layouts: input_layernorm (+ post_attention_layernorm), or ln_attn / ln_mlp
    "falcon": Architecture(
        ("h.*.self_attention.dense", "h.*.mlp.dense_4h_to_h"),
        ("h.*.input_layernorm", "h.*.post_attention_layernorm", "h.*.ln_attn", "h.*.ln_mlp", "ln_f"),
        ("h.0",),
    ),
    "phi": Architecture(("layers.*.self_attn.dense", "layers.*.mlp.fc2"), ("layers.*.input_layernorm", "final_layernorm"), ("layers.0",)),
    "xglm": Architecture(("layers.*.self_attn.out_proj", "layers.*.fc2"), ("layers.*.self_attn_layer_norm", "layers.*.final_layer_norm", "layer_norm"), ("layers.0",)),
    "biogpt": Architecture(("layers.*.self_attn.out_proj", "layers.*.fc2"), ("layers.*.self_attn_layer_norm", "layers.*.final_layer_norm", "layer_norm"), ("layers.0",)),
    "mpt": Architecture(("blocks.*.attn.out_proj", "blocks.*.ffn.down_proj"), ("blocks.*.norm_1", "blocks.*.norm_2", "norm_f"), ("blocks.0",)),
    "stablelm": Architecture(("layers.*.self_attn.o_proj", "layers.*.mlp.down_proj"), (*_DECODER_LN, "norm"), ("layers.0",)),
    "persimmon": Architecture(("layers.*.self_attn.dense", "layers.*.mlp.dense_4h_to_h"), (*_DECODER_LN, "final_layernorm"), ("layers.0",)),
    "olmo": Architecture(("layers.*.self_attn.o_proj", "layers.*.mlp.down_proj"), (*_DECODER_LN, "norm"), ("layers.0",)),
    # mixture of experts: every expert's down-projection is one 3-D parameter of mlp.experts
    # (transformers 4.x: an nn.Linear per expert, block_sparse_moe.experts.<i>.w2)
    "phimoe": Architecture(
        ("layers.*.self_attn.o_proj", "layers.*.mlp.experts", "layers.*.block_sparse_moe.experts.*.w2"),
        (*_DECODER_LN, "norm"),
        ("layers.0",),
    ),
    "cohere": Architecture(("layers.*.self_attn.o_proj", "layers.*.mlp.down_proj"), ("layers.*.input_layernorm", "norm"), ("layers.0",)),
    # transformers 5.x names, then 4.x's (encoder.layer.<i>.attention.output.dense, output.dense)
    "vit": Architecture(
        ("layers.*.attention.o_proj", "layers.*.mlp.fc2", "encoder.layer.*.attention.output.dense", "encoder.layer.*.output.dense"),
        ("layers.*.layernorm_before", "layers.*.layernorm_after", "encoder.layer.*.layernorm_before",
         "encoder.layer.*.layernorm_after", "layernorm"),
        ("layers.0", "encoder.layer.0"),
    ),
    "clip": Architecture(
        tuple(f"{tower}.encoder.layers.*.{m}" for tower in ("text_model", "vision_model") for m in ("self_attn.out_proj", "mlp.fc2")),
        (
            *(f"{tower}.encoder.layers.*.{n}" for tower in ("text_model", "vision_model") for n in ("layer_norm1", "layer_norm2")),
            "text_model.final_layer_norm",
            "vision_model.post_layernorm",
        ),
        ("text_model.encoder.layers.0", "vision_model.encoder.layers.0"),
    ),
    "wav2vec2": _WAV2VEC2,
    "hubert": _WAV2VEC2,
    **{t: _POST_LN for t in ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "bart", "mbart", "camembert")},
    "whisper": Architecture(
        (
            "encoder.layers.*.self_attn.out_proj", "encoder.layers.*.fc2",
            "decoder.layers.*.self_attn.out_proj", "decoder.layers.*.encoder_attn.out_proj", "decoder.layers.*.fc2",
        ),
        (
            "encoder.layers.*.self_attn_layer_norm", "encoder.layers.*.final_layer_norm", "encoder.layer_norm",
            "decoder.layers.*.self_attn_layer_norm", "decoder.layers.*.encoder_attn_layer_norm",
            "decoder.layers.*.final_layer_norm", "decoder.layer_norm",
        ),
        ("encoder.layers.0", "decoder.layers.0"),
    ),
}


def relative_name(name: str, base_prefix: str) -> str:
    """A module name relative to the base model (checkpoints of heads prefix it)."""
    return name[len(base_prefix) + 1 :] if base_prefix and name.startswith(base_prefix + ".") else name


def matches(name: str, patterns, base_prefix: str = "") -> bool:
    rel = relative_name(name, base_prefix)
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)
