"""Rotary position embeddings (the HF "rotate_half" convention) with default, linear, llama3,
YaRN and LongRoPE frequency scaling, and partial rotary (the first rotary_dim dims of each head
rotate, the rest pass through), computed as HF does so logits match to float32 rounding.

LongRoPE (Phi-3 / Phi-3.5 / Phi-4-mini, "longrope" or the older "su") rescales each frequency by
a short or a long factor, chosen by the length of the sequence: transformers takes the long
factors when max(position_ids) + 1 > original_max_position_embeddings, for the whole forward.
Our step is a flat ragged batch of many sequences, so the choice is per token from a length per
token (`rotary_embedding`'s `lengths`):

    lengths[t] = max(prompt length of t's request, position of t + 1)   (the engine's worker)

A prompt's tokens all take the prompt's length, so a prompt forward equals transformers' one
however the prompt is chunked, and a decode token at position p takes p + 1, as transformers'
cached decode does. A token's factors depend on its request and position only, never on the
step that computes it, so batching, chunking and recomputation after preemption change nothing.
The one difference from transformers' `generate`: when a request whose prompt fits the original
limit decodes past it, `generate` drops its KV cache and re-encodes the whole sequence with the
long factors (Phi3ForCausalLM.prepare_inputs_for_generation); we keep the keys already cached
(short factors below the limit) and use the long factors for the new tokens, which is what
transformers' own forward with a cache computes. Without `lengths` (a model called directly),
each token takes its sequence's context length after the step (kv_lens), which is the same for a
whole prompt and for one-token decode steps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.errors import ModelConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope: one rescaling factor per rotary frequency (rotary_dim / 2 each); short up to
    # original_max_position_embeddings, long beyond (see the module docstring).
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # Only the first int(head_dim * partial_rotary_factor) dims of each head rotate (Phi-4-mini: 0.75).
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0:
            raise ModelConfigError(f"rope_theta must be > 0, got {self.theta}")
        if self.factor <= 0:
            raise ModelConfigError(f"rope factor must be > 0, got {self.factor}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ModelConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rope_type == "longrope":
            self._check_longrope()
        elif self.short_factor or self.long_factor:
            raise ModelConfigError(f"short_factor / long_factor are longrope keys, got rope type {self.rope_type!r}")

    def _check_longrope(self) -> None:
        for key in ("short_factor", "long_factor"):
            values = getattr(self, key)
            if not values or not all(isinstance(v, float) and v > 0 and math.isfinite(v) for v in values):
                raise ModelConfigError(f"rope type 'longrope' needs {key}: a list of positive numbers, got {values!r}")
        if len(self.short_factor) != len(self.long_factor):
            raise ModelConfigError(f"longrope short_factor has {len(self.short_factor)} entries, long_factor "
                                   f"{len(self.long_factor)}: both must have rotary_dim / 2")
        if not self.original_max_position_embeddings or self.original_max_position_embeddings <= 1:
            raise ModelConfigError("rope type 'longrope' needs original_max_position_embeddings > 1, "
                                   f"got {self.original_max_position_embeddings!r}")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ModelConfigError(f"longrope attention_factor must be > 0, got {self.attention_factor}")

    def rotary_dim(self, head_dim: int) -> int:
        """How many leading dims of each head rotate: int(head_dim * partial_rotary_factor), as
        transformers computes it; refused when odd (its halves would not pair up)."""
        dim = int(head_dim * self.partial_rotary_factor)
        if dim < 2 or dim % 2:
            raise ModelConfigError(f"partial_rotary_factor {self.partial_rotary_factor} with head_dim {head_dim} "
                                   f"rotates {dim} dims; it must be a positive even number")
        if self.rope_type == "longrope" and len(self.short_factor) != dim // 2:
            raise ModelConfigError(f"longrope short_factor and long_factor have {len(self.short_factor)} entries; "
                                   f"rotary_dim {dim} (head_dim {head_dim} x partial_rotary_factor "
                                   f"{self.partial_rotary_factor}) needs {dim // 2}")
        return dim

    @property
    def long_context_threshold(self) -> int | None:
        """Sequences longer than this use other frequencies (longrope's long factors); None when
        the frequencies never depend on the length."""
        return self.original_max_position_embeddings if self.rope_type == "longrope" else None


def inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int,
                        long: bool = False) -> tuple[np.ndarray, float]:
    """Returns (inv_freq float32[head_dim // 2], attention_scaling applied to cos and sin).
    head_dim: the dims that rotate (rope.rotary_dim of the model's head_dim). long: longrope's
    long factors instead of the short ones (ignored by the other types)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    pos_freqs = np.power(np.float32(rope.theta), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope, max_position_embeddings), 1.0
    if rope.rope_type == "yarn":
        return _yarn(pos_freqs, rope, head_dim, max_position_embeddings)
    if rope.rope_type == "longrope":
        return _longrope(pos_freqs, rope, long)
    raise ValueError(f"unsupported rope type {rope.rope_type!r}")


def _llama3(inv_freq: np.ndarray, rope: RopeConfig, max_position_embeddings: int) -> np.ndarray:
    old_len = rope.original_max_position_embeddings or max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(pos_freqs: np.ndarray, rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings or max_position_embeddings

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _longrope(pos_freqs: np.ndarray, rope: RopeConfig, long: bool) -> tuple[np.ndarray, float]:
    """transformers' _compute_longrope_parameters: inv_freq = 1 / (factor_i * theta^(2i/d)); the
    attention factor is the config's, else sqrt(1 + ln(factor) / ln(original)), 1 when factor <= 1
    (models.registry sets factor to max_position_embeddings / original when the config has none)."""
    original = rope.original_max_position_embeddings
    ext = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
    if ext.shape != pos_freqs.shape:
        raise ModelConfigError(f"longrope factors have {ext.shape[0]} entries for {pos_freqs.shape[0]} frequencies")
    inv_freq = (np.float32(1.0) / (ext * pos_freqs)).astype(np.float32)
    attention_factor = rope.attention_factor
    if attention_factor is None:
        factor = rope.factor
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, float(attention_factor)


def rotary_embedding(rope: RopeConfig, head_dim: int, max_position_embeddings: int, positions: jax.Array,
                     lengths: jax.Array | None = None, md=None) -> tuple[jax.Array, jax.Array]:
    """positions int32[T] -> cos, sin float32[T, rotary_dim] for `apply_rotary`.

    lengths int32[T]: the sequence length that picks each token's longrope factors (long where
    > original_max_position_embeddings; see the module docstring); when None, each token's
    sequence's kv_lens from md (AttentionMetadata). Other rope types ignore both. The tables
    are constants of the compiled step; which one a token takes is data, so nothing recompiles."""
    dim = rope.rotary_dim(head_dim)
    inv_freq, scaling = inverse_frequencies(rope, dim, max_position_embeddings)
    cos, sin = rotary_cos_sin(positions, jnp.asarray(inv_freq), scaling)
    if rope.long_context_threshold is None:
        return cos, sin
    if lengths is None:
        if md is None:
            raise ValueError("longrope needs the tokens' sequence lengths (lengths) or the attention metadata (md)")
        lengths = sequence_lengths(md.kv_lens, md.cu_q_lens, positions.shape[0])
    long_inv_freq, _ = inverse_frequencies(rope, dim, max_position_embeddings, long=True)
    long_cos, long_sin = rotary_cos_sin(positions, jnp.asarray(long_inv_freq), scaling)
    use_long = (lengths > rope.long_context_threshold)[:, None]  # [T, 1]
    return jnp.where(use_long, long_cos, cos), jnp.where(use_long, long_sin, sin)


def sequence_lengths(kv_lens: jax.Array, cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:
    """kv_lens int32[S], cu_q_lens int32[S + 1] -> int32[T]: each flat-batch token's sequence's
    context length after the step (padding tokens: the last sequence's)."""
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, tok, side="right") - 1, 0, kv_lens.shape[0] - 1)  # [T]
    return kv_lens[seq]


def rotary_cos_sin(positions: jax.Array, inv_freq: jax.Array, scaling: float) -> tuple[jax.Array, jax.Array]:
    """positions int32[T] -> cos, sin float32[T, head_dim]."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, head_dim]; cos, sin [T, R] -> x rotated, in x.dtype. With R < head_dim
    (partial rotary), dims [0, R) rotate (rotate_half over those R) and [R, head_dim) pass
    through, as transformers' Phi3 apply_rotary_pos_emb."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin
