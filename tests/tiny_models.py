"""Tiny random transformers models built from configs (no downloads), with a matching probe
input each: the shared table the patching tests iterate over."""

from __future__ import annotations

import inspect

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    CLIPConfig,
    CLIPModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 128
_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
_LLAMA_LIKE = dict(_DECODER, num_key_value_heads=2, head_dim=8)
_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
_WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16, 16),
                 conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                 feat_extract_norm="layer")

# name -> (model_type, config kwargs, auto class, inputs kind)
MODELS = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64), AutoModelForCausalLM, "text"),
    "gpt_neo": ("gpt_neo", dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=VOCAB, max_position_embeddings=64, attention_types=[[["global", "local"], 1]], window_size=8), AutoModelForCausalLM, "text"),
    "gptj": ("gptj", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64), AutoModelForCausalLM, "text"),
    "codegen": ("codegen", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64, n_ctx=64), AutoModelForCausalLM, "text"),
    "gpt_neox": ("gpt_neox", dict(_DECODER, use_parallel_residual=True), AutoModelForCausalLM, "text"),
    "gpt_neox_sequential": ("gpt_neox", dict(_DECODER, use_parallel_residual=False), AutoModelForCausalLM, "text"),
    "opt": ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64), AutoModelForCausalLM, "text"),
    "bloom": ("bloom", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB), AutoModelForCausalLM, "text"),
    "falcon": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, new_decoder_architecture=False), AutoModelForCausalLM, "text"),
    "falcon_new": ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=VOCAB, new_decoder_architecture=True), AutoModelForCausalLM, "text"),
    "phi": ("phi", _DECODER, AutoModelForCausalLM, "text"),
    "biogpt": ("biogpt", _DECODER, AutoModelForCausalLM, "text"),
    "mpt": ("mpt", dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64, vocab_size=VOCAB), AutoModelForCausalLM, "text"),
    "stablelm": ("stablelm", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "persimmon": ("persimmon", _DECODER, AutoModelForCausalLM, "text"),
    "llama": ("llama", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "mistral": ("mistral", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "qwen2": ("qwen2", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    # mixture of experts: transformers runs the experts on grouped_mm kernels, which take no float64
    "mixtral": ("mixtral", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), AutoModelForCausalLM, "text"),
    # builds masks with torch.full((), finfo(dtype).min): runs in float64 only with float64 as torch's default dtype
    "xglm": ("xglm", dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64), AutoModelForCausalLM, "text"),
    "phimoe": ("phimoe", dict(_LLAMA_LIKE, num_local_experts=4), AutoModelForCausalLM, "text"),  # pre-LN LayerNorm
    "qwen3": ("qwen3", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "gemma": ("gemma", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "gemma2": ("gemma2", dict(_LLAMA_LIKE, query_pre_attn_scalar=8, sliding_window=16), AutoModelForCausalLM, "text"),
    "olmo": ("olmo", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "olmo2": ("olmo2", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "cohere": ("cohere", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    "bert": ("bert", _ENCODER, AutoModel, "text"),
    "roberta": ("roberta", dict(_ENCODER, max_position_embeddings=80), AutoModel, "text"),
    "electra": ("electra", dict(_ENCODER, embedding_size=32), AutoModel, "text"),
    "distilbert": ("distilbert", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64), AutoModel, "text"),
    "bart": ("bart", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64), AutoModelForSeq2SeqLM, "seq2seq"),
    "t5": ("t5", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0), AutoModelForSeq2SeqLM, "seq2seq"),
    "vit": ("vit", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8), AutoModel, "image"),
    "clip": ("clip", None, CLIPModel, "text+image"),
    # norms without parameters or normalized_shape (q/k norms; every norm of NanoChat)
    "llama4_text": ("llama4_text", dict(_LLAMA_LIKE, intermediate_size_mlp=64, num_local_experts=4), AutoModelForCausalLM, "text"),
    "nanochat": ("nanochat", _LLAMA_LIKE, AutoModelForCausalLM, "text"),
    # an RMSNorm computed in the activations' dtype, returned in the weight's (fp32 weight, bf16 activations)
    "imagegpt": ("imagegpt", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64), AutoModel, "text"),
    # raw audio through a convolutional feature encoder; pre-LN ("stable layer norm", as the
    # large checkpoints) and post-LN (as wav2vec2-base) encoders
    "wav2vec2": ("wav2vec2", dict(_WAV2VEC2, do_stable_layer_norm=True), AutoModel, "raw audio"),
    "wav2vec2_post_ln": ("wav2vec2", dict(_WAV2VEC2, do_stable_layer_norm=False), AutoModel, "raw audio"),
    "hubert": ("hubert", dict(_WAV2VEC2, do_stable_layer_norm=True), AutoModel, "raw audio"),
    # gated norms (FusedGatedRMSNorm): Mamba2's gate before the norm, in groups or not; Qwen3-Next's
    # gate after it (a linear-attention layer, then a full-attention one); FalconH1's all-fp32 order
    "mamba2": ("mamba2", dict(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=2, state_size=8, expand=2, chunk_size=8, vocab_size=VOCAB), AutoModelForCausalLM, "text"),
    "mamba2_one_group": ("mamba2", dict(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=1, state_size=8, expand=2, chunk_size=8, vocab_size=VOCAB), AutoModelForCausalLM, "text"),
    "qwen3_next": ("qwen3_next", dict(_LLAMA_LIKE, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32), AutoModelForCausalLM, "text"),
    "falcon_h1": ("falcon_h1", dict(_LLAMA_LIKE, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8, mamba_rms_norm=True), AutoModelForCausalLM, "text"),
    # Qwen4-Exp: Qwen3-Next's gated norms, hyper-connections (two streams) whose norms normalise
    # one stream at a time (a grouped RMSNorm, weights stored as w - 1), an indexed-attention layer
    # "full_attention": each release maps it to its own attention (indexed in 5.24, sparse in 5.17)
    "qwen4_exp": ("qwen4_exp_text", dict(_LLAMA_LIKE, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, hc_count=2, hc_lowrank=8, ple_embed_dim=16, ngram_vocab_size_base=256, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4, heads_per_ngram=2, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2), AutoModelForCausalLM, "text"),
    "whisper": ("whisper", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1), AutoModel, "audio"),
}


def taken_arguments(cls, kwargs: dict) -> dict:
    """``kwargs`` less what ``cls`` does not take: transformers before 5.23 built Mamba2's, Bamba's
    and GraniteMoeHybrid's gated norms without groups (no ``group_size``; 5.17 on the lent GPUs)."""
    return {k: v for k, v in kwargs.items() if k in inspect.signature(cls).parameters}


def build(name: str, dtype=torch.float32, seed: int = 0):
    """A tiny random model in eval mode and a matching probe input."""
    model_type, kwargs, auto, kind = MODELS[name]
    if model_type not in CONFIG_MAPPING:
        import pytest

        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r} models")
    torch.manual_seed(seed)
    if model_type == "clip":
        config = CLIPConfig(
            text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, projection_dim=16),
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, projection_dim=16),
            projection_dim=16,
        )
    else:
        config = AutoConfig.for_model(model_type, **kwargs)
    config.use_cache = False
    model = auto(config) if auto is CLIPModel else auto.from_config(config, attn_implementation="eager")
    model = model.to(dtype).eval()
    randomize_norms(model, seed)
    inputs = probe_inputs(config, kind, seed)
    return model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def probe_inputs(config, kind, seed=0, batch=2, length=9):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    if kind == "text":
        return {"input_ids": ids}
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if kind == "text+image":
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if kind == "raw audio":  # 200 samples: 9 frames of the feature encoder above (field 40, stride 20)
        return {"input_values": torch.randn(batch, 200, generator=g)}
    if kind == "audio":
        return {"input_features": torch.randn(batch, 16, 32, generator=g), "decoder_input_ids": ids[:, :5]}
    raise ValueError(kind)


def norm_modules(model):
    """Norm-like modules, by the tests' own definition: modules without children named for a
    norm, less torch's weight-norm parametrizations (they normalise weights, not activations)."""
    return {
        n: m for n, m in model.named_modules()
        if "norm" in type(m).__name__.lower() and not any(m.children()) and ".parametrizations." not in f".{n}."
    }


def randomize_norms(model, seed=0):
    """Non-default norm weights and biases, so that a swap that dropped or mis-read one shows."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for _, m in norm_modules(model).items():
            for pname, p in m.named_parameters(recurse=False):
                centre = 1.0 if pname == "weight" else 0.0
                p.copy_((torch.randn(p.shape, generator=g) * 0.3 + centre).to(p.dtype))


def tensor_outputs(out) -> dict:
    """Every tensor a model returned, by name (caches and Nones left out)."""
    found = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif hasattr(value, "items"):
            found.update({f"{key}.{k}": v for k, v in tensor_outputs(value).items()})
    return found


def float64_truth(model, inputs):
    """The model's outputs computed in float64 on a copy (Mixtral-style experts switched to
    transformers' eager implementation: its grouped_mm kernels take no float64; float64 as
    torch's default dtype, for the tensors a model creates on the fly, as XGLM's masks)."""
    import copy

    model64 = copy.deepcopy(model).double()
    if getattr(getattr(model64, "config", None), "_experts_implementation", "eager") != "eager":
        model64.set_experts_implementation("eager")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return run(model64, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    finally:
        torch.set_default_dtype(previous)


def run(model, inputs):
    with torch.no_grad():
        return tensor_outputs(model(**inputs))


def randomize_for_conversion(model, seed=0):
    """What a trained model has and a fresh one lacks: non-zero biases everywhere and
    embedding tables with a non-zero mean, so that centring biases and the stream's start is
    really exercised."""
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for m in model.modules():
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.nn.Parameter) and "norm" not in type(m).__name__.lower():
                bias.copy_((torch.randn(bias.shape, generator=g) * 0.1).to(bias.dtype))
            if isinstance(m, torch.nn.Embedding):
                m.weight.add_((0.2 + 0.05 * torch.randn(m.weight.shape[0], 1, generator=g)).to(m.weight.dtype))
    return model


def adam_losses(model, ids, steps: int = 4, reduce=None) -> torch.Tensor:
    """The causal-LM loss on ``ids`` at each of ``steps`` Adam steps (lr 1e-2) over the
    trainable parameters, each through ``reduce`` (e.g. the mean over ranks) where given. eps
    sits well above the rounding noise of a gradient that is zero in exact arithmetic
    (attention's key bias), which Adam's default would scale up to full-size steps, so that
    runs that only add in another order stay comparable."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-4)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(reduce(loss) if reduce is not None else loss.detach())
    return torch.stack(losses)
