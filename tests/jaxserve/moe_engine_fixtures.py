"""Tiny random-weight mixtures of experts with the demo tokenizer, for engine tests: their
PyTorch twins are the oracle for greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from jaxserve.demo_model import train_tokenizer

# name -> (config class, model class, config fields); head_dim 24 != 64 / heads, GQA.
MOE_MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=40, num_experts=16, num_experts_per_tok=8, norm_topk_prob=True)),
}


def write_moe_engine_model(path: Path, name: str, seed: int = 0, **overrides):
    """Writes the HF model and the demo tokenizer to `path`; returns the PyTorch model."""
    config_cls, model_cls, extra = MOE_MODELS[name]
    tokenizer = train_tokenizer()
    fields = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, config_cls)(**{**fields, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_((1.0 if "norm" in pname else 0.0) + (0.2 if "norm" in pname else 0.15) * torch.randn(
                p.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
