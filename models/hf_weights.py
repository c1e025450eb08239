"""How Hugging Face tensor names and layouts map onto our parameter tree.

HF `nn.Linear` stores weights as [out, in]; we store them as einsum-friendly arrays with
explicit head axes ([D, N, H] for q, [N, H, D] for o, [D, F] for the MLP in-projections).
The decoder layers' parameters are stacked on a leading layers axis, so the HF tensor of layer i
fills index i of its stacked parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from models.config import ModelConfig
from models.moe_weights import expert_tensors

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: Path  # where the tensor goes in the NNX state
    transform: Callable[[np.ndarray], np.ndarray]  # HF layout -> our layout
    hf_shape: tuple[int, ...]  # the shape the HF tensor must have
    layer: int | None = None  # index on the leading layers axis of a stacked parameter
    # Where in the layer's slice the tensor goes when it fills only a block of it (one expert of
    # an [E, ...] expert parameter, or its gate or up half): start indices after the layers axis;
    # the tensor's missing leading axes are size 1. () = the whole slice.
    offset: tuple[int, ...] = ()
    # Names of the tensors this one stands in for (a fused transformers 5 expert tensor covers
    # every per-expert tensor of its layer): loading it satisfies them, and it is never required.
    covers: tuple[str, ...] = ()


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
    d, v = cfg.hidden_size, cfg.vocab_size
    specs = {
        "model.embed_tokens.weight": WeightSpec(("embed_tokens",), _same, (v, d)),
        "model.norm.weight": WeightSpec(("norm", "weight"), _same, (d,)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = WeightSpec(("lm_head",), _transpose, (v, d))
    for i in range(cfg.num_layers):
        specs.update(_layer_specs(cfg, i))
    return specs


def _layer_specs(cfg: ModelConfig, i: int) -> dict[str, WeightSpec]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hf, ours = f"model.layers.{i}.", ("layers",)
    attn = ours + ("self_attn",)

    def spec(path: Path, transform: Callable[[np.ndarray], np.ndarray], hf_shape: tuple[int, ...]) -> WeightSpec:
        return WeightSpec(path, transform, hf_shape, layer=i)

    specs = {
        hf + "input_layernorm.weight": spec(ours + ("input_layernorm", "weight"), _same, (d,)),
        hf + "post_attention_layernorm.weight": spec(
            ours + ("post_attention_layernorm", "weight"), _same, (d,)),
        hf + "self_attn.q_proj.weight": spec(attn + ("q_proj",), _in_proj(n, h), (n * h, d)),
        hf + "self_attn.k_proj.weight": spec(attn + ("k_proj",), _in_proj(k, h), (k * h, d)),
        hf + "self_attn.v_proj.weight": spec(attn + ("v_proj",), _in_proj(k, h), (k * h, d)),
        hf + "self_attn.o_proj.weight": spec(attn + ("o_proj",), _out_proj(n, h), (d, n * h)),
        hf + "mlp.gate_proj.weight": spec(ours + ("mlp", "gate_proj"), _transpose, (f, d)),
        hf + "mlp.up_proj.weight": spec(ours + ("mlp", "up_proj"), _transpose, (f, d)),
        hf + "mlp.down_proj.weight": spec(ours + ("mlp", "down_proj"), _transpose, (d, f)),
    }
    if cfg.num_experts:  # the MoE block's tensors replace the dense MLP's
        for name in ("gate_proj", "up_proj", "down_proj"):
            del specs[hf + f"mlp.{name}.weight"]
        specs.update({name: WeightSpec(*fields) for name, fields in expert_tensors(cfg, i).items()})
    if cfg.attention_bias:
        specs.update({
            hf + "self_attn.q_proj.bias": spec(attn + ("q_bias",), _head_bias(n, h), (n * h,)),
            hf + "self_attn.k_proj.bias": spec(attn + ("k_bias",), _head_bias(k, h), (k * h,)),
            hf + "self_attn.v_proj.bias": spec(attn + ("v_bias",), _head_bias(k, h), (k * h,)),
        })
    if cfg.o_proj_bias:
        specs[hf + "self_attn.o_proj.bias"] = spec(attn + ("o_bias",), _same, (d,))
    if cfg.qk_norm:
        specs[hf + "self_attn.q_norm.weight"] = spec(attn + ("q_norm", "weight"), _same, (h,))
        specs[hf + "self_attn.k_norm.weight"] = spec(attn + ("k_norm", "weight"), _same, (h,))
    if cfg.mlp_bias:
        specs.update({
            hf + "mlp.gate_proj.bias": spec(ours + ("mlp", "gate_bias"), _same, (f,)),
            hf + "mlp.up_proj.bias": spec(ours + ("mlp", "up_bias"), _same, (f,)),
            hf + "mlp.down_proj.bias": spec(ours + ("mlp", "down_bias"), _same, (d,)),
        })
    return specs


# Tensors some checkpoints carry that we derive or do not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
