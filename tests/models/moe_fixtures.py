"""Tiny random-weight mixtures of experts built with transformers' own config classes.

Awkward on purpose: head_dim (24) != hidden / heads (16), GQA (4 query heads over 2 kv heads),
expert widths unlike the hidden size, top-2 of 4 experts (Mixtral, with a 12-token window),
top-8 of 16 (Qwen3-MoE, renormalised) and top-3 of 12 without renormalisation (Qwen3-MoE with
attention biases), and Qwen2-MoE's gated shared expert. Every tensor is random (norms and the
router too), so a tensor loaded into the wrong place or layout changes the logits.
"""

from __future__ import annotations

from pathlib import Path

from hf_fixtures import random_hf_model

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)

# name -> (config class, model class, extra config fields)
MOE_ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, sliding_window=12,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=40, num_experts=16, num_experts_per_tok=8, norm_topk_prob=True,
        tie_word_embeddings=True)),
    "qwen3_moe_raw": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=24, num_experts=12, num_experts_per_tok=3, norm_topk_prob=False,
        attention_bias=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False)),
}


def make_hf_moe(name: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = MOE_ARCHS[name]
    return random_hf_model(config_cls, model_cls, {**BASE, **extra, **overrides}, seed)


def save_hf_moe(name: str, path: Path, seed: int = 0, **save_kwargs):
    model = make_hf_moe(name, seed)
    model.save_pretrained(path, **save_kwargs)
    return model
