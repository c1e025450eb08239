"""Ragged paged attention in plain jnp: the CPU path of the engine and the kernels' oracle.

A flat batch of T query tokens belongs to up to S sequences; sequence i owns q rows
cu_q_lens[i]:cu_q_lens[i+1], which are the LAST q_len_i positions of its kv_lens[i]-long
context stored in pages block_tables[i, :]. Each token attends causally to its own
sequence only. The reference works token by token: it finds the token's sequence and
position, gathers that sequence's pages and runs a dense masked softmax over them.
Tokens are processed in chunks (lax.map with batch_size) so memory stays at
O(chunk * max_context * Hkv * D). Small chunks keep that working set in the CPU caches: on a
2-core CPU a decode step of 16 sequences x 512 keys took 4.7 ms with chunks of 8 tokens and
14 ms with chunks of 32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite "minus infinity": keeps exp() at exactly 0 and avoids inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_metadata(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array,
                   num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per q row: (sequence id [T], absolute position [T], valid [T] bool).

    Padding rows (beyond cu_q_lens[num_seqs]) get valid=False and a clamped sequence id.
    """
    max_seqs = kv_lens.shape[0]
    n = num_seqs[0]
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    # Ends of the real sequences; padding sequences get +inf so they never match.
    ends = jnp.where(jnp.arange(max_seqs) < n, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    seq = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)
    valid = rows < cu_q_lens[n]
    seq = jnp.minimum(seq, max_seqs - 1)
    q_end = cu_q_lens[seq + 1]
    pos = kv_lens[seq] - (q_end - rows)   # the new tokens are the last ones of the context
    return seq, pos, valid


def key_mask(pos: jax.Array, kv_len: jax.Array, num_keys: int,
             sliding_window: int | None) -> jax.Array:
    """[num_keys] bool: keys visible to a query at position `pos` of a kv_len context."""
    keys = jnp.arange(num_keys, dtype=jnp.int32)
    mask = (keys < kv_len) & (keys <= pos)
    if sliding_window is not None:
        mask &= keys > pos - sliding_window
    return mask


def _attend_one(q, kv_pages, pages, pos, kv_len, *, sm_scale, sliding_window, soft_cap,
                kv_scales=None):
    """One query token. q [Hq, D]; pages int32 [max_pages] -> out [Hq, D] float32.
    kv_scales [P, page_size, 2*Hkv] float32: 8-bit pages are dequantized after the gather."""
    num_q_heads, d = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    hkv = two_hkv // 2
    kv = kv_pages[pages]                                         # [max_pages, ps, 2Hkv, D]
    if kv_scales is not None:
        kv = kv.astype(jnp.float32) * kv_scales[pages][..., None]
    kv = kv.reshape(-1, hkv, 2, d)                               # [L, Hkv, 2, D]
    mask = key_mask(pos, kv_len, kv.shape[0], sliding_window)    # [L]
    # Select (never multiply) so garbage/NaN in unused slots cannot leak.
    kv = jnp.where(mask[:, None, None, None], kv, 0).astype(jnp.float32)
    k, v = kv[:, :, 0], kv[:, :, 1]                              # [L, Hkv, D]
    qg = q.astype(jnp.float32).reshape(hkv, num_q_heads // hkv, d)  # [Hkv, G, D]
    logits = jnp.einsum("kgd,lkd->kgl", qg, k) * sm_scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("kgl,lkd->kgd", probs, v)
    return out.reshape(num_q_heads, d)


def ragged_paged_attention_reference(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                                     *, sm_scale: float, sliding_window: int | None = None,
                                     soft_cap: float | None = None,
                                     token_chunk: int = 8, kv_scales=None) -> jax.Array:
    """Reference ragged paged attention. Shapes as in pallas_kernels.ragged_paged_attention;
    kv_scales [P, page_size, 2*Hkv] float32 goes with 8-bit kv_pages (pallas_kernels.kv_quant).

    Output [T, Hq, D] in q.dtype; padding rows are zeros.
    """
    num_tokens = q.shape[0]
    seq, pos, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)

    def one(args):
        q_t, s, p = args
        return _attend_one(q_t, kv_pages, block_tables[s], p, kv_lens[s], sm_scale=sm_scale,
                           sliding_window=sliding_window, soft_cap=soft_cap, kv_scales=kv_scales)

    out = jax.lax.map(one, (q, seq, pos), batch_size=min(token_chunk, num_tokens))
    out = jnp.where(valid[:, None, None], out, 0.0)
    return out.astype(q.dtype)
