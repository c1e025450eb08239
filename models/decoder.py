"""The shared Llama-family decoder (Flax NNX) over a paged KV cache.

Llama, Mistral, Qwen2, Qwen3 and Granite differ only in flags of `ModelConfig` (biases, q/k
norms, sliding windows, multipliers, soft caps), so one module tree serves them all; Gemma 2 / 3
differ in structure (their norms) and bring their layer and norm from `models.gemma`
(`make_layer`, `make_norm`). Every parameter carries logical axis names (`embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`) in its `out_sharding` metadata; a rules table maps them
to mesh axes elsewhere. A mixture of experts (Mixtral, Qwen-MoE) only swaps each layer's MLP
for models.moe's block (`make_mlp`).

The forward pass is the engine's: a flat ragged batch of tokens and the KV cache in, the
updated KV cache and logits out.

Scan over layers. The decoder layers are ONE `DecoderLayer` whose parameters carry a leading
`layers` axis (made with nnx.vmap; the logical axis "layers" is never sharded), and the forward
pass runs `lax.scan` over them, so a step program holds one layer body however deep the model
is (on CPU, a tiny-width step compiles in 0.55 s at 32, 64 or 80 layers; unrolled it took 1.6,
3.3 and 5 s, at the same step time). The KV cache is one array [L, P, B, 2K, H] carried
through the scan and updated in place: inside the step it is viewed as one pool of L * P
pages [L*P, B, 2K, H] (a free reshape) in which layer l's page p is l * P + p, so the KV write
scatters straight into it and attention gathers straight from it by offsetting the slot
mapping and block tables. No layer's pages are ever sliced out or copied,
and the attention kernels need no layer argument. An 8-bit cache (kv_cache_dtype int8 / fp8) is
a `QuantizedKV` of the pages and their scales [L, P, B, 2K], viewed and carried the same way.
The kernels take the sliding window as a static argument, so the scan runs over groups of
layers with static windows (`layer_groups`): one scan for uniform models, two for Qwen2's
`max_window_layers`, one scan over the repeated pattern for alternating local/global layers. RoPE is computed once per distinct config: sliding
layers use `cfg.sliding_rope` when set (Gemma 3's local base), the others `cfg.rope`.

Kv heads under tensor parallelism (as vLLM): the KV cache's kv-head axis is split over the model
axis, whole heads per device. With fewer kv heads than devices, each kv head is copied
tp / kv_heads times (`ModelConfig.kv_head_replicas`; the loader repeats its k_proj / v_proj
columns), so the model has tp kv heads and device d holds exactly the copy its query heads read:
query head i reads cached head i // (N / K), a copy of kv head i // (N / num_kv_heads).

Shapes: T tokens, D hidden, N query heads, K cached kv heads (cfg.cache_kv_heads), H head_dim,
F mlp, V vocab, L layers, P pages, B page size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve import kernels
from jaxserve.kernels.kv_quant import QuantizedKV, init_quantized, is_quantized_dtype
from jaxserve.models.activations import ACTIVATIONS
from jaxserve.models.attention_metadata import AttentionMetadata
from jaxserve.models.config import ModelConfig
from jaxserve.models.gemma import GemmaDecoderLayer, GemmaRMSNorm
from jaxserve.models.lora_layers import add_lora
from jaxserve.models.moe import MoEBlock
from jaxserve.models.params import param as _param
from jaxserve.models.quantization import linear, linear_weight
from jaxserve.models.sharded_attention import sharded_ragged_paged_attention
from jaxserve.models.rope import apply_rotary, rotary_embedding


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, *, dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), (axis_name,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def make_norm(cfg: ModelConfig, dim: int, axis_name: str, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The model's RMSNorm over `dim`: Llama's, or Gemma's (1 + weight) form."""
    if cfg.gemma_norms:
        return GemmaRMSNorm(dim, cfg.rms_norm_eps, axis_name, dtype=dtype, rngs=rngs)
    return RMSNorm(dim, cfg.rms_norm_eps, axis_name, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, attention_backend: str, rngs: nnx.Rngs, mesh=None):
        # K counts the cached kv heads: under tensor parallelism with fewer kv heads than devices
        # each is stored cfg.kv_head_replicas times (models.loader copies its k/v columns).
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.cache_kv_heads, cfg.head_dim
        # cfg.quantization: each projection is int8 / e4m3 values + a float32 `*_scale` [size 1 on
        # the contracted axes] (models.quantization.linear_weight); unquantized, the scale is None.
        quant = cfg.quantization
        self.q_proj, self.q_proj_scale = linear_weight(
            rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype, "q_proj", quant)  # [D, N, H]
        self.k_proj, self.k_proj_scale = linear_weight(
            rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, "k_proj", quant)  # [D, K, H]
        self.v_proj, self.v_proj_scale = linear_weight(
            rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, "v_proj", quant)  # [D, K, H]
        self.o_proj, self.o_proj_scale = linear_weight(
            rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype, "o_proj", quant)  # [N, H, D]
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), dtype, init="zeros")
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
        if cfg.o_proj_bias:
            self.o_bias = _param(rngs, (d,), ("embed",), dtype, init="zeros")
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, h, "head_dim", dtype=dtype, rngs=rngs)
            self.k_norm = make_norm(cfg, h, "head_dim", dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.w8a8 = cfg.activation_quantization
        self.attention_backend = attention_backend
        # A Pallas kernel under a multi-device mesh runs through shard_map (XLA cannot split it).
        self.shard_mesh = (mesh if mesh is not None and mesh.size > 1
                           and kernels.is_kernel(attention_backend) else None)

    def __call__(self, x, cos, sin, kv_pages, first_page, md: AttentionMetadata, sliding_window: int | None):
        """x [T, D]; cos, sin [T, R] (R <= H rotary dims); kv_pages [L*P, B, 2K, H], the pool of every layer's pages, of
        which this layer owns [first_page, first_page + P) (first_page int32 scalar, traced)
        -> (out [T, D], kv_pages')."""
        cfg = self.cfg
        q = linear("td,dnh->tnh", x, self.q_proj, self.q_proj_scale, w8a8=self.w8a8)
        q = add_lora(self, "q_proj", x, q, md.lora_slots)  # + each token's adapter (models.lora_layers)
        k = linear("td,dkh->tkh", x, self.k_proj, self.k_proj_scale, w8a8=self.w8a8)
        k = add_lora(self, "k_proj", x, k, md.lora_slots)
        v = linear("td,dkh->tkh", x, self.v_proj, self.v_proj_scale, w8a8=self.w8a8)
        v = add_lora(self, "v_proj", x, v, md.lora_slots)
        if cfg.attention_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        slots = md.slot_mapping + first_page * kv_pages.shape[1]
        kv_pages = kernels.write_kv(kv_pages, k, v, slots, backend=self.attention_backend)
        attend = kernels.ragged_paged_attention
        if self.shard_mesh is not None:
            attend = functools.partial(sharded_ragged_paged_attention, self.shard_mesh)
        o = attend(q, kv_pages, md.kv_lens, md.block_tables + first_page, md.cu_q_lens, md.num_seqs,
                   sm_scale=cfg.sm_scale, sliding_window=sliding_window, soft_cap=cfg.attn_logit_softcap,
                   backend=self.attention_backend)  # [T, N, H]
        out = linear("tnh,nhd->td", o.astype(x.dtype), self.o_proj, self.o_proj_scale, w8a8=self.w8a8)
        out = add_lora(self, "o_proj", o.astype(x.dtype), out, md.lora_slots)
        if cfg.o_proj_bias:
            out = out + self.o_bias[...]
        return out, kv_pages


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        quant = cfg.quantization  # see Attention: values + `*_scale` when quantized
        self.gate_proj, self.gate_proj_scale = linear_weight(rngs, (d, f), ("embed", "mlp"), dtype, "gate_proj", quant)
        self.up_proj, self.up_proj_scale = linear_weight(rngs, (d, f), ("embed", "mlp"), dtype, "up_proj", quant)
        self.down_proj, self.down_proj_scale = linear_weight(rngs, (f, d), ("mlp", "embed"), dtype, "down_proj", quant)
        if cfg.mlp_bias:
            self.gate_bias = _param(rngs, (f,), ("mlp",), dtype, init="zeros")
            self.up_bias = _param(rngs, (f,), ("mlp",), dtype, init="zeros")
            self.down_bias = _param(rngs, (d,), ("embed",), dtype, init="zeros")
        self.mlp_bias = cfg.mlp_bias
        self.hidden_act = cfg.hidden_act
        self.w8a8 = cfg.activation_quantization

    def __call__(self, x: jax.Array, lora_slots: jax.Array | None = None) -> jax.Array:
        """x [T, D] -> [T, D]; lora_slots int32[T]: each token's adapter slot (None: no adapters)."""
        gate = linear("td,df->tf", x, self.gate_proj, self.gate_proj_scale, w8a8=self.w8a8)
        gate = add_lora(self, "gate_proj", x, gate, lora_slots)
        up = linear("td,df->tf", x, self.up_proj, self.up_proj_scale, w8a8=self.w8a8)
        up = add_lora(self, "up_proj", x, up, lora_slots)
        if self.mlp_bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        act = ACTIVATIONS[self.hidden_act](gate) * up  # [T, F]
        out = linear("tf,fd->td", act, self.down_proj, self.down_proj_scale, w8a8=self.w8a8)
        out = add_lora(self, "down_proj", act, out, lora_slots)
        return out + self.down_bias[...] if self.mlp_bias else out


def make_mlp(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, mesh=None) -> nnx.Module:
    """A layer's feed-forward block: the dense MLP, or the mixture of experts of models.moe when
    cfg.num_experts > 0 (same call: x [T, D] -> [T, D]; `mesh` splits the experts over it)."""
    if not cfg.num_experts:
        return MLP(cfg, dtype=dtype, rngs=rngs)
    width = cfg.shared_expert_intermediate_size
    shared = MLP(dataclasses.replace(cfg, intermediate_size=width), dtype=dtype, rngs=rngs) if width else None
    return MoEBlock(cfg, dtype=dtype, rngs=rngs, mesh=mesh, shared_expert=shared)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, attention_backend: str, rngs: nnx.Rngs, **shard):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, attention_backend=attention_backend, rngs=rngs, **shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", dtype=dtype, rngs=rngs)
        self.mlp = make_mlp(cfg, dtype=dtype, rngs=rngs, **shard)
        self.residual_multiplier = cfg.residual_multiplier

    def __call__(self, x, cos, sin, kv_pages, first_page, md, sliding_window):
        attn, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, kv_pages, first_page, md, sliding_window)
        x = x + attn * self.residual_multiplier if self.residual_multiplier != 1.0 else x + attn
        mlp = self.mlp(self.post_attention_layernorm(x), md.lora_slots)
        x = x + mlp * self.residual_multiplier if self.residual_multiplier != 1.0 else x + mlp
        return x, kv_pages


def make_layer(cfg: ModelConfig, *, dtype, attention_backend: str, rngs: nnx.Rngs, **shard) -> nnx.Module:
    """One decoder layer of this config's structure (one call signature for all): Llama's, or
    Gemma's norms around the same attention and feed-forward block (models.gemma)."""
    if cfg.gemma_norms:
        attn = Attention(cfg, dtype=dtype, attention_backend=attention_backend, rngs=rngs, **shard)
        return GemmaDecoderLayer(cfg, attn, make_mlp(cfg, dtype=dtype, rngs=rngs, **shard), dtype=dtype, rngs=rngs)
    return DecoderLayer(cfg, dtype=dtype, attention_backend=attention_backend, rngs=rngs, **shard)


def stacked_layers(cfg: ModelConfig, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """cfg.num_layers decoder layers as one layer (`make_layer`) whose parameters are stacked on
    a leading "layers" axis (each layer drawn from its own split of `rngs`)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(cfg, rngs=rngs, **kwargs)

    return make(rngs)


Window = int | None


def layer_groups(sliding_windows: tuple[Window, ...]) -> list[tuple[int, int, tuple[Window, ...]]]:
    """How the layers are scanned, given that each attention call needs a static window:
    [(start, stop, pattern)], one scan over layers [start, stop) whose body runs len(pattern)
    layers with those windows. Runs of equal windows (uniform models: one group; Qwen2's
    max_window_layers: two); a sequence that repeats a short pattern (alternating local and
    global layers) scans that pattern instead of making one group per layer."""
    runs: list[tuple[int, int, tuple[Window, ...]]] = []
    for i, window in enumerate(sliding_windows):
        if runs and runs[-1][2] == (window,):
            runs[-1] = (runs[-1][0], i + 1, (window,))
        else:
            runs.append((i, i + 1, (window,)))
    n = len(sliding_windows)
    if len(runs) <= 2:
        return runs
    for period in range(2, n // 2 + 1):
        body = n - n % period
        if all(sliding_windows[i] == sliding_windows[i % period] for i in range(body)):
            groups = [(0, body, tuple(sliding_windows[:period]))]
            return groups + [(body + a, body + b, w) for a, b, w in layer_groups(sliding_windows[body:])]
    return runs


def _check_kv(cfg: ModelConfig, kv_caches) -> None:
    is_cache = isinstance(kv_caches, (jax.Array, QuantizedKV))
    if not is_cache or kv_caches.ndim != 5 or kv_caches.shape[0] != cfg.num_layers:
        got = f"a {type(kv_caches).__name__}" if not is_cache else f"shape {kv_caches.shape}"
        raise TypeError(f"kv_caches must be the one stacked [num_layers={cfg.num_layers}, P, B, 2K, H] array (8-bit: "
                        f"QuantizedKV) that "
                        f"models.decoder.init_kv_caches makes (copy pages with models.decoder.copy_pages), got {got}")


class CausalLM(nnx.Module):
    """Decoder-only LM: embed, N decoder layers (scanned) over paged KV, final norm, LM head."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, attention_backend: str = "auto",
                 rngs: nnx.Rngs | None = None, mesh=None):
        """mesh: the tensor-parallel ('model',) mesh the parameters live on, needed only to run a
        Pallas attention kernel per device (cfg.cache_kv_heads must then split over it)."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = stacked_layers(cfg, dtype=dtype, attention_backend=attention_backend, rngs=rngs, mesh=mesh)
        self.norm = make_norm(cfg, cfg.hidden_size, "embed", dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def __call__(
        self,
        kv_caches: jax.Array,
        input_ids: jax.Array,
        positions: jax.Array,
        md: AttentionMetadata,
        logits_indices: jax.Array | None = None,
        rope_lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """kv_caches [L, P, B, 2K, H] (from init_kv_caches; donate it; an 8-bit cache is a QuantizedKV of
        pages and scales [L, P, B, 2K]); input_ids, positions int32[T];
        logits_indices int32[R] selects the rows to project to the vocabulary (all when None);
        rope_lengths int32[T]: the lengths that pick longrope's factors (models.rope.rotary_embedding).
        Returns (updated kv_caches, logits float32[R or T, V])."""
        kv_caches, h = self.forward(kv_caches, input_ids, positions, md, logits_indices, rope_lengths)
        return kv_caches, self.compute_logits(h)

    def forward(self, kv_caches: jax.Array, input_ids: jax.Array, positions: jax.Array,
                md: AttentionMetadata, rows: jax.Array | None = None,
                rope_lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The decoder body without the LM head: (updated kv_caches, final-normed hidden states
        [R, D] of the flat-batch rows `rows` int32[R], or [T, D] when rows is None)."""
        _check_kv(self.cfg, kv_caches)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0)  # [T, D]
        if self.cfg.embedding_multiplier != 1.0:
            x = x * self.cfg.embedding_multiplier
        ropes = self._rotary(positions, rope_lengths, md)
        num_layers, num_pages = kv_caches.shape[:2]
        pages = kv_caches.reshape(num_layers * num_pages, *kv_caches.shape[2:])  # [L*P, B, 2K, H], no copy
        x, pages = self._run_layers(x, ropes, pages, num_pages, md)
        if rows is not None:
            x = jnp.take(x, rows, axis=0)
        return pages.reshape(kv_caches.shape), self.norm(x)

    def _rotary(self, positions: jax.Array, rope_lengths: jax.Array | None,
                md: AttentionMetadata) -> dict[bool, tuple[jax.Array, jax.Array]]:
        """positions int32[T] -> {is a sliding layer: (cos, sin) float32[T, rotary_dim]}, each
        distinct RoPE config computed once (Gemma 3's local layers have their own); rope_lengths
        pick longrope's factors (models.rope.rotary_embedding). The tables are derived from the
        config at trace time: constants of the step."""
        cfg = self.cfg

        def cos_sin(rope):
            return rotary_embedding(rope, cfg.head_dim, cfg.max_position_embeddings, positions, rope_lengths, md)

        full = cos_sin(cfg.rope)
        return {False: full, True: full if cfg.sliding_rope in (None, cfg.rope) else cos_sin(cfg.sliding_rope)}

    def _run_layers(self, x, ropes, pages, num_pages: int, md: AttentionMetadata):
        """Every decoder layer over x [T, D] and the page pool [L*P, B, 2K, H], one scan per group;
        ropes as `_rotary` gives them (a layer's window picks its RoPE)."""
        graphdef, stacked = nnx.split(self.layers)
        for start, stop, pattern in layer_groups(self.cfg.sliding_windows):

            def body(carry, first, pattern=pattern):
                x, pages = carry
                for j, window in enumerate(pattern):
                    layer = first + j  # int32 scalar, traced
                    params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), stacked)
                    cos, sin = ropes[window is not None]
                    x, pages = nnx.merge(graphdef, params)(x, cos, sin, pages, layer * num_pages, md, window)
                return (x, pages), None

            if stop - start == len(pattern):  # a single pass: no loop
                (x, pages), _ = body((x, pages), jnp.int32(start))
            else:
                firsts = jnp.arange(start, stop, len(pattern), dtype=jnp.int32)
                (x, pages), _ = jax.lax.scan(body, (x, pages), firsts)
        return x, pages

    def compute_logits(self, h: jax.Array) -> jax.Array:
        """h [R, D] (after the final norm) -> float32 logits [R, V]."""
        if self.cfg.tie_word_embeddings:
            logits = jnp.einsum("rd,vd->rv", h, self.embed_tokens[...])
        else:
            logits = h @ self.lm_head[...]
        logits = logits.astype(jnp.float32)
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        if self.cfg.final_logit_softcap is not None:
            cap = self.cfg.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return logits


def kv_cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int, int]:
    """Shape of the KV cache: [num_layers, num_pages, page_size, 2 * cache_kv_heads, head_dim]
    (K of cached kv head h at index 2h, V at 2h + 1; cache_kv_heads counts each replica)."""
    return (cfg.num_layers, num_pages, page_size, 2 * cfg.cache_kv_heads, cfg.head_dim)


def copy_pages(kv_caches: jax.Array | QuantizedKV, src: jax.Array, dst: jax.Array) -> jax.Array | QuantizedKV:
    """Copy-on-write in every layer: pages[:, dst[i]] = pages[:, src[i]] (src, dst int32[C]; a
    padding pair copies the null page 0 onto itself; an 8-bit cache's scales move with their pages).
    In place when kv_caches is donated."""
    return jax.tree.map(lambda a: a.at[:, dst].set(a[:, src]), kv_caches)


def kv_cache_sharding(sharding, kv_caches):
    """The sharding of each array of the KV cache, from the five-axis sharding of its pages (an 8-bit
    cache's scales [L, P, B, 2K] take the first four): a pytree like kv_caches."""
    from jax.sharding import NamedSharding, PartitionSpec

    spec = tuple(sharding.spec) + (None,) * (5 - len(sharding.spec))
    return jax.tree.map(lambda a: NamedSharding(sharding.mesh, PartitionSpec(*spec[:a.ndim])), kv_caches)


def init_kv_caches(cfg: ModelConfig, num_pages: int, page_size: int, dtype,
                   sharding=None) -> jax.Array | QuantizedKV:
    """Allocates the KV cache once (zeros), optionally placed with a sharding of its five axes
    (jaxserve.sharding.Placement.kv_sharding: split over the cached kv heads, whole heads per
    device, never over layers). An 8-bit dtype (int8, float8_e4m3fn) gives a QuantizedKV: the pages
    and their float32 scales [L, P, B, 2K] (pallas_kernels.kv_quant), both device state."""
    shape = kv_cache_shape(cfg, num_pages, page_size)
    if cfg.num_layers * num_pages * page_size > jnp.iinfo(jnp.int32).max:
        raise ValueError(f"{cfg.num_layers} layers x {num_pages} pages x {page_size} slots overflow the int32 "
                         "slot index of the layer-stacked KV cache; use fewer pages")
    make = (lambda: init_quantized(shape, dtype)) if is_quantized_dtype(dtype) else (lambda: jnp.zeros(shape, dtype))
    if sharding is None:
        return make()
    return jax.jit(make, out_shardings=kv_cache_sharding(sharding, jax.eval_shape(make)))()
