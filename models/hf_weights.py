"""How Hugging Face tensor names and layouts map onto our parameter tree.

HF `nn.Linear` stores weights as [out, in]; we store them as einsum-friendly arrays with
explicit head axes ([D, N, H] for q, [N, H, D] for o, [D, F] for the MLP in-projections).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from models.config import ModelConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: Path  # where the tensor goes in the NNX state
    transform: Callable[[np.ndarray], np.ndarray]  # HF layout -> our layout
    hf_shape: tuple[int, ...]  # the shape the HF tensor must have


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _in_proj(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(w: np.ndarray) -> np.ndarray:  # [heads * head_dim, D] -> [D, heads, head_dim]
        return np.ascontiguousarray(w.reshape(heads, head_dim, -1).transpose(2, 0, 1))

    return f


def _out_proj(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    def f(w: np.ndarray) -> np.ndarray:  # [D, heads * head_dim] -> [heads, head_dim, D]
        return np.ascontiguousarray(w.reshape(-1, heads, head_dim).transpose(1, 2, 0))

    return f


def _head_bias(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda b: b.reshape(heads, head_dim)


def weight_specs(cfg: ModelConfig) -> dict[str, WeightSpec]:
    """HF tensor name -> WeightSpec, for every tensor the model needs."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    specs = {
        "model.embed_tokens.weight": WeightSpec(("embed_tokens",), _same, (v, d)),
        "model.norm.weight": WeightSpec(("norm", "weight"), _same, (d,)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = WeightSpec(("lm_head",), _transpose, (v, d))
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        attn = ours + ("self_attn",)
        specs.update({
            hf + "input_layernorm.weight": WeightSpec(ours + ("input_layernorm", "weight"), _same, (d,)),
            hf + "post_attention_layernorm.weight": WeightSpec(
                ours + ("post_attention_layernorm", "weight"), _same, (d,)),
            hf + "self_attn.q_proj.weight": WeightSpec(attn + ("q_proj",), _in_proj(n, h), (n * h, d)),
            hf + "self_attn.k_proj.weight": WeightSpec(attn + ("k_proj",), _in_proj(k, h), (k * h, d)),
            hf + "self_attn.v_proj.weight": WeightSpec(attn + ("v_proj",), _in_proj(k, h), (k * h, d)),
            hf + "self_attn.o_proj.weight": WeightSpec(attn + ("o_proj",), _out_proj(n, h), (d, n * h)),
            hf + "mlp.gate_proj.weight": WeightSpec(ours + ("mlp", "gate_proj"), _transpose, (f, d)),
            hf + "mlp.up_proj.weight": WeightSpec(ours + ("mlp", "up_proj"), _transpose, (f, d)),
            hf + "mlp.down_proj.weight": WeightSpec(ours + ("mlp", "down_proj"), _transpose, (d, f)),
        })
        if cfg.attention_bias:
            specs.update({
                hf + "self_attn.q_proj.bias": WeightSpec(attn + ("q_bias",), _head_bias(n, h), (n * h,)),
                hf + "self_attn.k_proj.bias": WeightSpec(attn + ("k_bias",), _head_bias(k, h), (k * h,)),
                hf + "self_attn.v_proj.bias": WeightSpec(attn + ("v_bias",), _head_bias(k, h), (k * h,)),
            })
        if cfg.o_proj_bias:
            specs[hf + "self_attn.o_proj.bias"] = WeightSpec(attn + ("o_bias",), _same, (d,))
        if cfg.qk_norm:
            specs[hf + "self_attn.q_norm.weight"] = WeightSpec(attn + ("q_norm", "weight"), _same, (h,))
            specs[hf + "self_attn.k_norm.weight"] = WeightSpec(attn + ("k_norm", "weight"), _same, (h,))
        if cfg.mlp_bias:
            specs.update({
                hf + "mlp.gate_proj.bias": WeightSpec(ours + ("mlp", "gate_bias"), _same, (f,)),
                hf + "mlp.up_proj.bias": WeightSpec(ours + ("mlp", "up_bias"), _same, (f,)),
                hf + "mlp.down_proj.bias": WeightSpec(ours + ("mlp", "down_bias"), _same, (d,)),
            })
    return specs


# Tensors some checkpoints carry that we derive or do not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
