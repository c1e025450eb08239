"""Gemma 2 / 3 layer structure on the shared decoder (`models.decoder`), as transformers'
Gemma2DecoderLayer / Gemma3DecoderLayer compute it.

What differs from the Llama layer is structure, so it lives here rather than behind flags:
  - RMSNorm scales by (1 + weight), in float32, before casting back (HF Gemma2RMSNorm:
    `(norm(x.float()) * (1.0 + w.float())).type_as(x)`; Llama casts first, then scales by w);
    the stored weight is the offset from 1, as in the checkpoint.
  - the "sandwich": besides the input norm, attention's output is normalised before the residual
    add (post_attention_layernorm), and the MLP has a norm before and after it
    (pre_feedforward_layernorm, post_feedforward_layernorm).
The layer wraps the shared attention and MLP (`models.decoder` builds them and hands them in, so
this module does not import the decoder). Everything else is a flag of `ModelConfig` read by the
shared modules: attention and final logit soft caps, sm_scale = query_pre_attn_scalar ** -0.5
(`attention_multiplier`), embeddings times sqrt(hidden) (`embedding_multiplier`), the GeGLU
activation (`hidden_act`), Gemma 3's q/k norms (`qk_norm`, with this module's norm) and its
local layers' RoPE (`sliding_rope`).

Shapes: T tokens, D hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.models.config import ModelConfig


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., dim], weight [dim] (offset from 1) -> x normalised over its last axis, in x.dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


class GemmaRMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, *, dtype, rngs: nnx.Rngs):
        # Zeros: (1 + 0) is the identity scale, as transformers initialises it.
        self.weight = nnx.Param(jnp.zeros((dim,), dtype), out_sharding=(axis_name,), eager_sharding=False)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return gemma_rms_norm(x, self.weight[...], self.eps)


class GemmaDecoderLayer(nnx.Module):
    """One Gemma layer: x + post_attn_norm(attn(input_norm(x))), then
    x + post_ffw_norm(mlp(pre_ffw_norm(x))). Same call signature as decoder.DecoderLayer.

    self_attn: the decoder's Attention module (called as attn(x, cos, sin, kv_pages, first_page,
    md, sliding_window) -> (out, kv_pages')); mlp: its MLP (x [T, D] -> [T, D])."""

    def __init__(self, cfg: ModelConfig, self_attn: nnx.Module, mlp: nnx.Module, *, dtype, rngs: nnx.Rngs):
        def norm() -> GemmaRMSNorm:
            return GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)

        self.input_layernorm = norm()
        self.self_attn = self_attn
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = mlp
        self.post_feedforward_layernorm = norm()

    def __call__(self, x, cos, sin, kv_pages, first_page, md, sliding_window):
        """x [T, D]; the rest as decoder.Attention -> (x' [T, D], kv_pages')."""
        attn, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, kv_pages, first_page, md, sliding_window)
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), md.lora_slots))
        return x, kv_pages
