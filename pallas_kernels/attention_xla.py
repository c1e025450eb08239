"""Ragged paged attention in plain XLA whose work follows each sequence's real context.

The CPU default and the fallback on every platform ("xla" backend). The dense reference
(attention_reference.py) gathers every query token's whole block table, so its cost grows
with max_model_len; here every loop runs only over the kv blocks some query really sees.

A step's sequences split into two kinds, each walked its own way:

  decode sequences (q_len == 1): vectorised over the first R = min(T, S) sequence slots.
      One while_loop walks kv block j = 0 .. max over those sequences of their block count
      (dynamic: the step's longest decode context, or the window, rounded to a block); at
      iteration j every sequence reads its own block first_block + j (gather of the pages
      named by its block table) and applies one online-softmax update. Work is
      R x (longest decode context) rather than R x max_model_len.
  prefill sequences (q_len > 1): cut into q tiles of Tq rows that never mix sequences. A
      while_loop over the tiles (dynamic count) runs, per tile, a while_loop over exactly
      the kv blocks its rows can see (causal bound above, window bound below), so a chunk
      reads each of its pages once per tile, not once per token.

8-bit pages (pallas_kernels.kv_quant) are dequantized per gathered block: the block's
scales are gathered by the same page ids and multiplied in float32 before the select.

Each kv block is nb pages (Bk = nb * page_size keys). Slots outside the keys a row may see
(page tails, null or NaN pages, keys past the window) are replaced by zeros with jnp.where
before any arithmetic and masked to MASK_VALUE in the logits, so garbage never leaks.
Softmax statistics and accumulators are float32; the output is cast to q.dtype and padding
rows (past cu_q_lens[num_seqs]) are zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.kernels.attention_reference import MASK_VALUE

# A decode iteration gathers R sequences x Bk keys x 2*Hkv x D values; on a 2-core x86 CPU
# ~2 MiB per iteration was fastest (64 decodes x 400 keys: blocks of 16-32 keys beat blocks
# of 128 by 2-4x; smaller blocks only add loop trips). At most 64 keys even where 2 MiB would
# hold more (few or small kv heads): every row pays for the whole block, so a big block is
# work wasted on short contexts. 16 decodes of 20 tokens, 2 kv heads of 16: 0.47 -> 0.23 ms a
# call (blocks of 512 keys -> 64). At 8B heads only steps of fewer than 16 decode rows get other
# blocks, and their times stayed within noise (BENCHMARKS.md, "The xla backend's decode block cap").
DECODE_BLOCK_BYTES = 2 << 20
DECODE_BLOCK_MAX_KEYS = 64
PREFILL_BLOCK_KEYS = 128
PREFILL_TILE_ROWS = 32


def default_block_sizes(num_tokens: int, max_seqs: int, page_size: int, max_pages: int,
                        kv_row_bytes: int, num_groups: int = 1) -> tuple[int, int, int]:
    """(decode pages per block, prefill pages per block, prefill q rows per tile).

    kv_row_bytes: bytes of one key slot across all kv heads (2 * Hkv * D * itemsize);
    num_groups: decode groups (each gathers its own rows' blocks per iteration).
    """
    rows = max(1, -(-min(num_tokens, max_seqs) // num_groups))
    decode_keys = min(DECODE_BLOCK_MAX_KEYS, DECODE_BLOCK_BYTES // (rows * kv_row_bytes))
    decode_pages = max(1, min(max_pages, decode_keys // page_size))
    prefill_pages = max(1, min(max_pages, PREFILL_BLOCK_KEYS // page_size))
    tile = max(1, min(num_tokens, PREFILL_TILE_ROWS))
    return decode_pages, prefill_pages, tile


def _gather_block(kv_pages, tables, blk, pages_per_blk: int, key_ok, dtype, kv_scales=None):
    """K and V of kv block `blk` for each table row, head-major, unseen keys zeroed.

    tables int32 [..., max_pages]; blk int32 [...]; key_ok bool [..., Bk];
    kv_scales [P, ps, 2Hkv] float32 or None (8-bit pages: dequantized here)
    -> (k, v), each [..., Hkv, Bk, D] in `dtype`.
    The head-major copy makes every dot a plain batched matmul over (..., head); on CPU
    that measured 2.5-4x faster than contracting the page layout [Bk, Hkv, D] in place.
    """
    max_pages = tables.shape[-1]
    _, page_size, two_hkv, d = kv_pages.shape
    idx = blk[..., None] * pages_per_blk + jnp.arange(pages_per_blk, dtype=jnp.int32)
    pages = jnp.take_along_axis(tables, jnp.minimum(idx, max_pages - 1), axis=-1)  # [..., nb]
    kv = kv_pages[pages]                                          # [..., nb, ps, 2Hkv, D]
    if kv_scales is not None:
        kv = kv.astype(jnp.float32) * kv_scales[pages][..., None]
    kv = kv.reshape(*blk.shape, pages_per_blk * page_size, two_hkv // 2, 2, d)
    kv = jnp.where(key_ok[..., None, None, None], kv, 0).astype(dtype)  # select, never 0*NaN
    n = blk.ndim
    kv = jnp.moveaxis(kv, (n + 1, n + 2), (n, n + 1))              # [..., Hkv, 2, Bk, D]
    return kv[..., 0, :, :], kv[..., 1, :, :]


def _online_update(carry, logits, mask, v):
    """One flash step. logits/mask [..., Hkv, G, Bk] (mask broadcastable); v [..., Hkv, Bk, D]."""
    m, l, acc = carry                                             # [..., Hkv, G, (1|D)]
    s = jnp.where(mask, logits, MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m - m_next)
    l_next = alpha * l + p.sum(axis=-1, keepdims=True)
    pv = jnp.einsum("...kgl,...kld->...kgd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)
    return m_next, l_next, alpha * acc + pv


def _logits(q, k, sm_scale, soft_cap, *, elementwise: bool = False):
    """q [..., Hkv, G, D], k [..., Hkv, Bk, D] -> float32 [..., Hkv, G, Bk].

    elementwise: multiply and reduce instead of a dot. For decode rows on CPU the dot is a
    batch of R*Hkv tiny [G, D] x [D, Bk] products; the fused multiply-reduce measured about
    1.4x faster per engine step (48 decodes, demo model) there.
    """
    if elementwise:
        s = (q[..., :, :, None, :].astype(jnp.float32) * k[..., :, None, :, :]).sum(-1) * sm_scale
    else:
        s = jnp.einsum("...kgd,...kld->...kgl", q, k,
                       preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def _finish(l, acc):
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def _compute_dtype(dtype):
    # CPUs have no fast 16-bit dot: upcast there; accelerators keep 16-bit operands.
    return jnp.float32 if jax.default_backend() == "cpu" else dtype


def decode_groups(rows: int) -> int:
    """How many length-sorted groups the decode rows are walked in (each to its own longest
    context): 1 below 16 rows, then groups of >= 8 rows, at most 4."""
    return 1 if rows < 16 else min(4, rows // 8)


def _decode_part(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale,
                 sliding_window, soft_cap, pages_per_blk, num_groups, kv_scales=None):
    """Attention of the one query row of every decode sequence among the first R slots.

    The R slots are sorted by context length and cut into `num_groups` groups; each group's
    kv-block loop runs to its own longest context, so a few long decodes do not make every
    short one walk their length (with contexts spread evenly over [0, L], one group does
    ~2x the needed work, four ~1.25x).
    -> (rows int32 [R]: the q row of each slot, or T when the slot is not a decode; out
    float32 [R, Hq, D]).
    """
    num_tokens, num_q_heads, d = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    hkv = two_hkv // 2
    group = num_q_heads // hkv
    r = min(num_tokens, kv_lens.shape[0])
    block_k = pages_per_blk * page_size
    slot = jnp.arange(r, dtype=jnp.int32)
    q_end = cu_q_lens[1:r + 1]
    is_decode = (slot < num_seqs[0]) & (q_end - cu_q_lens[:r] == 1)
    rows = jnp.where(is_decode, q_end - 1, num_tokens)            # [R]
    kv_len = jnp.where(is_decode, kv_lens[:r], 0)                 # [R]
    dtype = _compute_dtype(q.dtype)
    on_cpu = jax.default_backend() == "cpu"
    per_group = -(-r // num_groups)
    pad = per_group * num_groups - r
    # Longest first; padding slots (context 0) last.
    order = jnp.argsort(-jnp.pad(kv_len, (0, pad)), stable=True).astype(jnp.int32)  # [Rp]
    src = jnp.minimum(order, r - 1)
    g_len = jnp.where(order < r, jnp.pad(kv_len, (0, pad))[order], 0)
    g_rows = jnp.where(order < r, jnp.pad(rows, (0, pad), constant_values=num_tokens)[order], num_tokens)
    g_q = q[jnp.minimum(g_rows, num_tokens - 1)].astype(dtype).reshape(num_groups, per_group, hkv, group, d)
    g_tables = block_tables[src].reshape(num_groups, per_group, -1)
    g_len = g_len.reshape(num_groups, per_group)

    def one_group(qr, tables, kv_len):
        pos = kv_len - 1                                          # the query's position
        lo = (jnp.zeros_like(pos) if sliding_window is None
              else jnp.maximum(pos - sliding_window + 1, 0))
        first_blk = lo // block_k
        num_blk = jnp.where(kv_len > 0, (kv_len + block_k - 1) // block_k - first_blk, 0)

        def body(state):
            j, carry = state
            blk = first_blk + j                                    # [Rg]
            k_pos = blk[:, None] * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [Rg, Bk]
            key_ok = (k_pos >= lo[:, None]) & (k_pos < kv_len[:, None])
            k, v = _gather_block(kv_pages, tables, blk, pages_per_blk, key_ok, dtype,
                                 kv_scales)                       # [Rg, Hkv, Bk, D]
            s = _logits(qr, k, sm_scale, soft_cap, elementwise=on_cpu)  # [Rg, Hkv, G, Bk]
            carry = _online_update(carry, s, key_ok[:, None, None, :], v)
            return j + 1, carry

        n = qr.shape[0]
        init = (jnp.full((n, hkv, group, 1), MASK_VALUE, jnp.float32),
                jnp.zeros((n, hkv, group, 1), jnp.float32), jnp.zeros((n, hkv, group, d), jnp.float32))
        _, (_, l, acc) = lax.while_loop(lambda st: st[0] < num_blk.max(), body, (jnp.int32(0), init))
        return _finish(l, acc).reshape(n, num_q_heads, d)

    outs = [one_group(g_q[i], g_tables[i], g_len[i]) for i in range(num_groups)]
    return g_rows, jnp.concatenate(outs)                          # rows in sorted order


def _prefill_tiles(cu_q_lens, num_seqs, tile: int, num_tiles_max: int):
    """Tiles of <= `tile` q rows over the sequences with q_len > 1, never mixing sequences.

    -> (tile_seq int32 [NT], tile_row0 int32 [NT], num_tiles int32 scalar).
    """
    max_seqs = cu_q_lens.shape[0] - 1
    q_len = cu_q_lens[1:] - cu_q_lens[:-1]
    real = jnp.arange(max_seqs) < num_seqs[0]
    tiles = jnp.where(real & (q_len > 1), (q_len + tile - 1) // tile, 0)  # [S]
    ends = jnp.cumsum(tiles)                                      # tiles of seqs <= i
    t = jnp.arange(num_tiles_max, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), max_seqs - 1).astype(jnp.int32)
    row0 = cu_q_lens[seq] + (t - (ends[seq] - tiles[seq])) * tile
    return seq, row0.astype(jnp.int32), ends[-1].astype(jnp.int32)


def _prefill_part(out, q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale,
                  sliding_window, soft_cap, pages_per_blk, tile, kv_scales=None):
    """Write the rows of every prefill sequence into out [T + tile, Hq, D] float32."""
    num_tokens, num_q_heads, d = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    hkv = two_hkv // 2
    group = num_q_heads // hkv
    block_k = pages_per_blk * page_size
    # A sequence with q_len >= 2 owns >= 2 rows, so at most T // 2 sequences have tiles.
    num_tiles_max = num_tokens // tile + min(kv_lens.shape[0], num_tokens // 2) + 1
    tile_seq, tile_row0, num_tiles = _prefill_tiles(cu_q_lens, num_seqs, tile, num_tiles_max)
    dtype = _compute_dtype(q.dtype)
    q_pad = jnp.pad(q, ((0, tile), (0, 0), (0, 0)))

    def tile_body(state):
        t, out = state
        seq, row0 = tile_seq[t], tile_row0[t]
        q_end, kv_len = cu_q_lens[seq + 1], kv_lens[seq]
        rows = row0 + jnp.arange(tile, dtype=jnp.int32)           # [Tq]
        row_ok = rows < q_end
        pos = kv_len - q_end + rows                               # [Tq]
        last = jnp.minimum(row0 + tile, q_end) - 1
        hi = jnp.clip(kv_len - q_end + last + 1, 0, kv_len)      # keys [lo, hi) are needed
        lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos[0] - sliding_window + 1, 0)
        qt = lax.dynamic_slice_in_dim(q_pad, row0, tile).astype(dtype).reshape(tile, hkv, group, d)
        table = block_tables[seq]

        def kv_body(state):
            blk, carry = state
            k_pos = blk * block_k + jnp.arange(block_k, dtype=jnp.int32)   # [Bk]
            key_ok = (k_pos >= lo) & (k_pos < hi)
            k, v = _gather_block(kv_pages, table, blk, pages_per_blk, key_ok, dtype,
                                 kv_scales)                                  # [Hkv, Bk, D]
            s = _logits(qt, k[None], sm_scale, soft_cap)                     # [Tq, Hkv, G, Bk]
            mask = key_ok & (k_pos <= pos[:, None]) & row_ok[:, None]         # [Tq, Bk]
            if sliding_window is not None:
                mask &= k_pos > pos[:, None] - sliding_window
            carry = _online_update(carry, s, mask[:, None, None, :], v[None])
            return blk + 1, carry

        init = (jnp.full((tile, hkv, group, 1), MASK_VALUE, jnp.float32),
                jnp.zeros((tile, hkv, group, 1), jnp.float32),
                jnp.zeros((tile, hkv, group, d), jnp.float32))
        _, (_, l, acc) = lax.while_loop(lambda st: st[0] * block_k < hi, kv_body,
                                        (lo // block_k, init))
        res = _finish(l, acc).reshape(tile, num_q_heads, d)
        old = lax.dynamic_slice_in_dim(out, row0, tile)
        out = lax.dynamic_update_slice_in_dim(out, jnp.where(row_ok[:, None, None], res, old),
                                              row0, axis=0)
        return t + 1, out

    _, out = lax.while_loop(lambda st: st[0] < num_tiles, tile_body, (jnp.int32(0), out))
    return out


def ragged_paged_attention_xla(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None,
                               num_kv_pages_per_block: int | None = None,
                               num_q_per_block: int | None = None, kv_scales=None) -> jax.Array:
    """Shapes as in pallas_kernels.ragged_paged_attention; usable on every platform.
    kv_scales [P, page_size, 2*Hkv] float32 goes with 8-bit kv_pages (pallas_kernels.kv_quant).

    num_kv_pages_per_block: pages per kv block (both parts; default: decode blocks sized by
    the number of sequences, prefill blocks of ~128 keys). num_q_per_block: prefill tile rows.
    """
    num_tokens, num_q_heads, d = q.shape
    page_size = kv_pages.shape[1]
    # The gather is dequantized to float32 at once: size blocks by what it becomes.
    itemsize = 4 if kv_scales is not None else jnp.dtype(kv_pages.dtype).itemsize
    kv_row_bytes = kv_pages.shape[2] * d * itemsize
    num_groups = decode_groups(min(num_tokens, kv_lens.shape[0]))
    dec_pages, pre_pages, tile = default_block_sizes(num_tokens, kv_lens.shape[0], page_size,
                                                     block_tables.shape[1], kv_row_bytes, num_groups)
    if num_kv_pages_per_block is not None:
        dec_pages = pre_pages = num_kv_pages_per_block
    tile = num_q_per_block or tile
    opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                kv_scales=kv_scales)
    rows, dec = _decode_part(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                             pages_per_blk=dec_pages, num_groups=num_groups, **opts)
    out = jnp.zeros((num_tokens + tile, num_q_heads, d), jnp.float32)
    out = out.at[rows].set(dec, mode="drop")                      # non-decode slots hit row T
    if num_tokens > 1:                                            # a 1-token step has no prefill
        out = _prefill_part(out, q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                            pages_per_blk=pre_pages, tile=tile, **opts)
    # Rows past cu_q_lens[num_seqs] (and the tile overhang) are never written: zeros.
    return out[:num_tokens].astype(q.dtype)
