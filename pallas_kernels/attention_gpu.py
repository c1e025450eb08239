"""Ragged paged attention as a Pallas GPU kernel (Triton back end), organised by sequence.

Work list (XLA, before the kernel). The step's q rows are cut into q tiles that never mix
sequences: sequence i gets cdiv(q_len_i, Bq) tiles of up to Bq tokens, a decode exactly one,
a sequence with no new rows none. The list has a static length, num_tiles =
min(T, (T + S*(Bq-1)) // Bq) (an upper bound on sum_i cdiv(q_len_i, Bq)); entries past the
real tiles are empty. Each tile is (sequence id, first q row, rows).

Kernel. grid = (num_tiles, num_kv_heads, num_kv_splits). Program (t, h, s) holds the G query
heads of kv head h for the Bq tokens of tile t as the rows of one MMA tile, [Bq*Gp, D]
(G padded to a power of two Gp; Bq*Gp >= 16 rows, as Triton's dot needs). It finds the keys
the tile can see, [lo, hi) (causal bound of its last token, sliding-window bound of its
first), cuts that range into num_kv_splits equal runs of kv blocks, and walks run s: a kv
block is Bkp pages gathered by page id straight from HBM (kv_pages[pages, :, 2h, :] ->
[Bkp*ps, D]), one online-softmax update in float32. An empty tile or run loops zero times
and writes zeros. Page slots outside [lo, hi) are pointed at the null page and replaced by
zeros with jnp.where before any arithmetic, so NaN in unused pages cannot leak.
8-bit pages (pallas_kernels.kv_quant) come with their scales [P, ps, 2Hkv]: the kernel
gathers each block's scales by the same page ids and dequantizes K and V in float32 before
that select (then casts to q's dtype for the dots).

Combine (XLA). With one split the kernel writes the normalised output in q.dtype; with
several, each split writes its normalised partial output and log-sum-exp in float32 and a
small jnp pass merges them. Either way the tile rows are gathered back to [T, Hq, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxserve.kernels.attention_reference import MASK_VALUE, token_metadata
from jaxserve.kernels.backend import interpret_mode

MIN_MMA_ROWS = 16          # Triton's dot needs >= 16 rows
KEYS_PER_SPLIT = 512       # a context split covers at least this many keys
MAX_KV_SPLITS = 16
TARGET_PROGRAMS = 2048     # enough programs to fill a large GPU (132 SMs) several times


def default_block_q(num_tokens: int, max_seqs: int, group_padded: int) -> int:
    """Tokens per q tile: 16 MMA rows for decode buckets (T <= S), 64 rows otherwise."""
    rows = MIN_MMA_ROWS if num_tokens <= max_seqs else 64
    return max(1, rows // group_padded)


def num_tiles_bound(num_tokens: int, max_seqs: int, block_q: int) -> int:
    """Static upper bound on sum_i cdiv(q_len_i, Bq) over sequences with sum_i q_len_i <= T."""
    return max(1, min(num_tokens, (num_tokens + max_seqs * (block_q - 1)) // block_q))


def default_pages_per_block(page_size: int, max_pages: int, rows: int) -> int:
    """Pages per kv block: 128 keys beside a 16-32 row q tile, 64 beside a bigger one."""
    keys = 128 if rows <= 32 else 64
    return max(1, min(keys // page_size, pl.next_power_of_2(max_pages)))


def default_num_kv_splits(max_context: int, num_tiles: int, num_kv_heads: int) -> int:
    """Context splits: each covers >= KEYS_PER_SPLIT keys; stop once the grid is big enough."""
    by_length = pl.cdiv(max_context, KEYS_PER_SPLIT)
    by_occupancy = pl.cdiv(TARGET_PROGRAMS, num_tiles * num_kv_heads)
    return max(1, min(by_length, by_occupancy, MAX_KV_SPLITS))


def tile_work_list(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tiles: int,
                   block_q: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """-> (seq [n], first row [n], rows [n], first tile of each sequence [S]), n = num_tiles.

    Tiles past the real ones have rows 0 (and a clamped, valid sequence id).
    """
    max_seqs = cu_q_lens.shape[0] - 1
    live = jnp.arange(max_seqs) < num_seqs[0]
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    tiles_per_seq = (q_lens + block_q - 1) // block_q
    tile_ends = jnp.cumsum(tiles_per_seq)                       # inclusive
    first_tile = (tile_ends - tiles_per_seq).astype(jnp.int32)
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(tile_ends, tiles, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, max_seqs - 1)
    start = cu_q_lens[seq] + (tiles - first_tile[seq]) * block_q
    rows = jnp.clip(cu_q_lens[seq + 1] - start, 0, block_q)
    rows = jnp.where(tiles < tile_ends[-1], rows, 0).astype(jnp.int32)
    return seq, start.astype(jnp.int32), rows, first_tile


def _key_range(kv_len, q_end, start, rows, sliding_window):
    """Keys [lo, hi) the tile's rows can see; first_pos = position of the tile's first token."""
    first_pos = kv_len - q_end + start
    hi = jnp.where(rows > 0, jnp.clip(first_pos + rows, 0, kv_len), 0)
    lo = jnp.int32(0)
    if sliding_window is not None:
        lo = jnp.minimum(jnp.maximum(first_pos - sliding_window + 1, 0), hi)
    return first_pos, lo, hi


def _split_blocks(lo, hi, block_k, num_splits):
    """This program's run of kv blocks [b0, b1): the tile's blocks cut into equal runs."""
    blk_lo, blk_hi = lo // block_k, (hi + block_k - 1) // block_k
    per_split = (jnp.maximum(blk_hi - blk_lo, 0) + num_splits - 1) // num_splits
    b0 = blk_lo + pl.program_id(2) * per_split
    return b0, jnp.minimum(b0 + per_split, blk_hi)


def _kernel(seq_ref, start_ref, rows_ref, kv_lens_ref, tables_ref, cu_ref, q_ref, kv_ref,
            *refs, sm_scale, sliding_window, soft_cap, group, pages_per_blk, num_splits,
            quantized):
    # q_ref [Bq, Gp, D] (tile t, kv head h); kv_ref [P, ps, 2Hkv, D] in HBM;
    # quantized: refs[0] = scales [P, ps, 2Hkv] f32 in HBM, then the outputs.
    scales_ref, out_refs = (refs[0], refs[1:]) if quantized else (None, refs)
    bq, gp, head_dim = q_ref.shape
    num_pages, page_size = kv_ref.shape[:2]
    max_pages = tables_ref.shape[1]
    block_k = pages_per_blk * page_size
    num_rows = bq * gp
    t, h = pl.program_id(0), pl.program_id(1)
    seq, start, rows = seq_ref[t], start_ref[t], rows_ref[t]
    first_pos, lo, hi = _key_range(kv_lens_ref[seq], cu_ref[seq + 1], start, rows,
                                   sliding_window)
    b0, b1 = _split_blocks(lo, hi, block_k, num_splits)
    # 16-bit caches: both dots on 16-bit operands (tensor cores); f32 without TF32, so
    # float32 inputs match the reference.
    # 8-bit caches: dequantized to float32, then dotted in q's dtype (16-bit or float32).
    cache_dtype = q_ref.dtype if quantized else kv_ref.dtype
    pv_dtype = cache_dtype if jnp.dtype(cache_dtype).itemsize == 2 else jnp.float32
    tf32 = lambda dt: False if jnp.dtype(dt).itemsize == 4 else None

    q = q_ref[...].reshape(num_rows, head_dim)
    row = lax.broadcasted_iota(jnp.int32, (num_rows,), 0)
    row_ok = (row // gp < rows) & (row % gp < group)
    q_pos = first_pos + row // gp                                     # [rows]

    def kv_block(j, carry):
        m, l, acc = carry
        slot = j * pages_per_blk + lax.broadcasted_iota(jnp.int32, (pages_per_blk,), 0)
        pages = tables_ref[seq, jnp.minimum(slot, max_pages - 1)]     # [Bkp] page ids
        # Slots outside [lo, hi) read the null page (no traffic, no stray ids).
        pages = jnp.where((slot * page_size < hi) & ((slot + 1) * page_size > lo),
                          jnp.clip(pages, 0, num_pages - 1), 0)
        k = kv_ref[pages, :, 2 * h, :].reshape(block_k, head_dim)
        v = kv_ref[pages, :, 2 * h + 1, :].reshape(block_k, head_dim)
        if quantized:
            k_scale = scales_ref[pages, :, 2 * h].reshape(block_k, 1)
            v_scale = scales_ref[pages, :, 2 * h + 1].reshape(block_k, 1)
            k = k.astype(jnp.float32) * k_scale
            v = v.astype(jnp.float32) * v_scale
        k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        key_ok = ((k_pos >= lo) & (k_pos < hi))[:, None]
        k = jnp.where(key_ok, k, 0).astype(q.dtype)
        v = jnp.where(key_ok, v, 0).astype(pv_dtype)
        s = pltriton.dot(q, k, trans_b=True, allow_tf32=tf32(q.dtype))   # [rows, Bk]
        s = s.astype(jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = row_ok[:, None] & (k_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m - m_next)
        pv = pltriton.dot(p.astype(pv_dtype), v, allow_tf32=tf32(pv_dtype))
        return m_next, alpha * l + p.sum(axis=1), alpha[:, None] * acc + pv

    init = (jnp.full((num_rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((num_rows,), jnp.float32),
            jnp.zeros((num_rows, head_dim), jnp.float32))
    m, l, acc = lax.fori_loop(b0, b1, kv_block, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[:, None]                      # 0 where nothing seen
    o_ref = out_refs[0]
    o_ref[...] = out.reshape(bq, gp, head_dim).astype(o_ref.dtype)
    if num_splits > 1:
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE)
        out_refs[1][...] = lse.reshape(bq, gp)


def _gather_q_tiles(q, start, rows, block_q, num_kv_heads, gp):
    """q [T, Hq, D] -> [num_tiles * Bq, Hkv, Gp, D]: each tile's rows, zeros past its end."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    offs = jnp.arange(block_q, dtype=jnp.int32)
    idx = jnp.minimum(start[:, None] + offs, num_tokens - 1).reshape(-1)
    ok = (offs < rows[:, None]).reshape(-1, 1, 1, 1)
    qt = q[idx].reshape(-1, num_kv_heads, group, head_dim)
    qt = jnp.where(ok, qt, 0)        # padding q rows may be NaN
    return jnp.pad(qt, ((0, 0), (0, 0), (0, gp - group), (0, 0)))


def _combine(o, lse, row_idx, num_splits):
    """Per token row: the tile row's output, splits merged by their log-sum-exp.

    o [(splits,) num_tiles*Bq, Hkv, Gp, D]; lse [splits, num_tiles*Bq, Hkv, Gp].
    """
    if num_splits == 1:
        return o[row_idx]
    o, lse = o[:, row_idx], lse[:, row_idx]              # [splits, T, Hkv, Gp, (D)]
    w = jnp.exp(lse - lse.max(axis=0))                   # the max split has weight 1
    return (w[..., None] * o).sum(axis=0) / w.sum(axis=0)[..., None]


def ragged_paged_attention_gpu(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                               sm_scale, sliding_window=None, soft_cap=None,
                               num_q_per_block=None, num_kv_pages_per_block=None,
                               num_kv_splits=None, num_warps=None, num_stages=None,
                               kv_scales=None):
    """Shapes as in pallas_kernels.ragged_paged_attention; runs interpreted off GPU.
    kv_scales [P, page_size, 2*Hkv] float32 goes with 8-bit kv_pages (pallas_kernels.kv_quant).

    num_q_per_block: tokens per q tile (Bq); num_kv_pages_per_block: pages per kv block;
    num_kv_splits: context splits per tile. On a GPU, Bq*Gp and pages*page_size must be
    powers of two (Triton tensor sizes).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_combined, _ = kv_pages.shape
    max_seqs, max_pages = block_tables.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    gp = pl.next_power_of_2(group)
    bq = num_q_per_block or default_block_q(num_tokens, max_seqs, gp)
    num_tiles = num_tiles_bound(num_tokens, max_seqs, bq)
    pages_per_blk = num_kv_pages_per_block or default_pages_per_block(page_size, max_pages,
                                                                      bq * gp)
    splits = num_kv_splits or default_num_kv_splits(max_pages * page_size, num_tiles,
                                                    num_kv_heads)
    interpret = interpret_mode("gpu")
    if not interpret:
        _check_triton_sizes(bq * gp, pages_per_blk * page_size, head_dim)

    seq, start, rows, first_tile = tile_work_list(cu_q_lens, num_seqs, num_tiles, bq)
    qt = _gather_q_tiles(q, start, rows, bq, num_kv_heads, gp)
    out = _call_kernel(qt, kv_pages, kv_scales, (seq, start, rows, kv_lens, block_tables, cu_q_lens),
                       q.dtype, bq=bq, splits=splits, interpret=interpret,
                       compiler_params=pltriton.CompilerParams(num_warps=num_warps or 4,
                                                               num_stages=num_stages or 2),
                       kernel=functools.partial(
                           _kernel, sm_scale=sm_scale, sliding_window=sliding_window,
                           soft_cap=soft_cap, group=group, pages_per_blk=pages_per_blk,
                           num_splits=splits, quantized=kv_scales is not None))

    tok_seq, _, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)
    in_seq = jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[tok_seq]
    row_idx = (first_tile[tok_seq] + in_seq // bq) * bq + in_seq % bq
    row_idx = jnp.where(valid, row_idx, 0)
    o = _combine(*out, row_idx, splits)[:, :, :group]      # [T, Hkv, G, D]
    o = jnp.where(valid[:, None, None, None], o, 0)
    return o.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def _check_triton_sizes(rows: int, block_k: int, head_dim: int) -> None:
    for name, n in (("q tile rows (num_q_per_block * padded group)", rows),
                    ("kv block (num_kv_pages_per_block * page_size)", block_k),
                    ("head_dim", head_dim)):
        if n & (n - 1) or n < 16:
            raise ValueError(f"the Triton kernel needs {name} to be a power of two >= 16, "
                             f"got {n}")


def _call_kernel(qt, kv_pages, kv_scales, scalars, dtype, *, bq, splits, interpret,
                 compiler_params, kernel):
    """The pallas_call. qt [num_tiles*Bq, Hkv, Gp, D] -> ((splits,) rows, Hkv, Gp, D)[, lse].
    kv_scales: None, or the 8-bit pages' scales (a whole-array input beside kv_pages)."""
    tiles_x_bq, num_kv_heads, gp, head_dim = qt.shape
    num_tiles = tiles_x_bq // bq
    full = lambda x: pl.BlockSpec(x.shape, lambda t, h, s: (0,) * x.ndim)
    q_spec = pl.BlockSpec((bq, None, gp, head_dim), lambda t, h, s: (t, h, 0, 0))
    if splits == 1:
        out_specs = [q_spec]
        out_shape = [jax.ShapeDtypeStruct(qt.shape, dtype)]
    else:
        out_specs = [
            pl.BlockSpec((None, bq, None, gp, head_dim), lambda t, h, s: (s, t, h, 0, 0)),
            pl.BlockSpec((None, bq, None, gp), lambda t, h, s: (s, t, h, 0)),
        ]
        out_shape = [jax.ShapeDtypeStruct((splits,) + qt.shape, jnp.float32),
                     jax.ShapeDtypeStruct((splits,) + qt.shape[:3], jnp.float32)]
    kv_inputs = (kv_pages,) if kv_scales is None else (kv_pages, kv_scales)
    outs = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, splits),
        in_specs=[*(full(x) for x in scalars), q_spec, *(full(x) for x in kv_inputs)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(*scalars, qt, *kv_inputs)
    return outs[0], (outs[1] if splits > 1 else None)
