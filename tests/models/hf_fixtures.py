"""Tiny random-weight Hugging Face models (PyTorch), one per architecture we claim.

Every parameter is drawn at random (biases and norm weights too), so a tensor loaded into the
wrong place or with the wrong layout changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, model class, extra config fields)
ARCHS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama2_bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, head_dim=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8,
                                                      max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64})),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.125, logits_scaling=3.0)),
}


def random_hf_model(config_cls: str, model_cls: str, fields: dict, seed: int = 0):
    """A transformers model of that class with every parameter drawn from `seed` (norm weights
    around 1, the rest around 0), eager attention."""
    config = getattr(transformers, config_cls)(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def make_hf_model(name: str, seed: int = 0):
    config_cls, model_cls, extra = ARCHS[name]
    return random_hf_model(config_cls, model_cls, {**BASE, **extra}, seed)


def save_hf_model(name: str, path: Path, seed: int = 0, **save_kwargs):
    model = make_hf_model(name, seed)
    model.save_pretrained(path, **save_kwargs)
    return model
