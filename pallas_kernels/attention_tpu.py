"""Ragged paged attention as a Pallas TPU (Mosaic) kernel.

Grid: one step per block of `num_q_per_block` (Bq) query rows; steps are independent
("parallel", so megacore TPUs split them). Scalar prefetch (SMEM): kv_lens, block_tables,
cu_q_lens, num_seqs and first_seq[q_block] (the first sequence with rows in each block,
computed by XLA before the call). q/out blocks [Bq, Hq, D] are pipelined by BlockSpecs;
kv_pages stays in HBM (memory_space=ANY) and is copied page by page into a VMEM
double buffer [2, Bkp, page_size, 2*Hkv, D].

Inside a step the work is a flat list of items (seq, kv_block) over the sequences whose
rows fall in the block and, per sequence, only the kv blocks its rows can see (causal
upper bound, sliding-window lower bound). Each item first starts the DMA of the NEXT item
(possibly of the next sequence) into the other buffer, then waits for its own, then runs
one online-softmax (flash) update per kv head on the MXU: q rows [Bq*G, D] x K [Bk, D].
Rows of the block that belong to other sequences are left untouched by a row mask.
Pages a block does not need are not copied; buffer slots holding stale or unused data
(and NaN pages) are neutralised by jnp.where before any arithmetic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention_reference import MASK_VALUE
from pallas_kernels.backend import interpret_mode

LANES = 128  # m/l scratch is lane-broadcast: Mosaic dislikes width-1 minor dims.


def q_block_first_seq(cu_q_lens, num_seqs, num_q_blocks: int, block: int) -> jax.Array:
    """int32 [num_q_blocks]: first sequence with a row in each q block (>= num_seqs: none)."""
    max_seqs = cu_q_lens.shape[0] - 1
    ends = jnp.where(jnp.arange(max_seqs) < num_seqs[0], cu_q_lens[1:],
                     jnp.iinfo(jnp.int32).max)
    starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * block
    first = jnp.searchsorted(ends, starts, side="right").astype(jnp.int32)
    return jnp.where(starts < cu_q_lens[num_seqs[0]], first, max_seqs)


def _kv_range(seq, kv_lens_ref, cu_ref, blk_start, blk_end, block_k, sliding_window):
    """Keys [lo, hi) that the sequence's rows inside this q block can see, and kv blocks."""
    q_end = cu_ref[seq + 1]
    kv_len = kv_lens_ref[seq]
    first_row = jnp.maximum(cu_ref[seq], blk_start)
    last_row = jnp.minimum(q_end, blk_end)            # exclusive
    hi = jnp.clip(kv_len - q_end + last_row, 0, kv_len)
    lo = jnp.int32(0)
    if sliding_window is not None:
        lo = jnp.maximum(kv_len - q_end + first_row - sliding_window + 1, 0)
    # lax.div (round toward zero) is exact here since lo, hi >= 0, and unlike `//` it
    # lowers to Mosaic without a sign computation.
    first_blk = lax.div(lo, block_k)
    last_blk = jnp.maximum(lax.div(hi + block_k - 1, block_k), first_blk + 1)  # >= 1 item
    return lo, hi, first_blk, last_blk


def _load_kv_heads(kv_buf, slot) -> list[tuple[jax.Array, jax.Array]]:
    """[(K, V)] per kv head, each [Bk, D], from buffer slot `slot`.

    kv_buf [2, Bkp, ps, 2Hkv, D]: K at 2h, V at 2h+1 on the second-minor (sublane) axis.
    """
    _, pages, page_size, num_combined, head_dim = kv_buf.shape
    flat = lambda x: x.reshape(pages * page_size, head_dim)
    if jnp.dtype(kv_buf.dtype).itemsize == 4:
        return [(flat(kv_buf[slot, :, :, 2 * h, :]), flat(kv_buf[slot, :, :, 2 * h + 1, :]))
                for h in range(num_combined // 2)]
    # 16-bit: rows 2h and 2h+1 share one packed 32-bit sublane row; split them by bit
    # shifts (Mosaic has no strided sublane load for packed types). bf16 is the top half
    # of a float32, so the shifted words are exact float32 values.
    assert kv_buf.dtype == jnp.bfloat16, kv_buf.dtype
    packed = pltpu.bitcast(kv_buf[slot], jnp.uint32)                 # [Bkp, ps, Hkv, D]
    out = []
    for h in range(num_combined // 2):
        word = packed[:, :, h, :]
        out.append((flat(pltpu.bitcast(word << 16, jnp.float32)),
                    flat(pltpu.bitcast(word & jnp.uint32(0xFFFF0000), jnp.float32))))
    return out


def _kernel(kv_lens_ref, tables_ref, cu_ref, num_seqs_ref, first_seq_ref,   # SMEM prefetch
            q_ref, kv_hbm_ref,                                             # inputs
            o_ref,                                                         # output
            kv_buf, sems, m_ref, l_ref, acc_ref,                           # scratch
            *, sm_scale, sliding_window, soft_cap):
    # q_ref/o_ref [Bq, Hq, D]; kv_hbm_ref [P, ps, 2Hkv, D]; kv_buf [2, Bkp, ps, 2Hkv, D]
    # m_ref/l_ref [Hkv, Bq*G, LANES] f32; acc_ref [Hkv, Bq*G, D] f32
    bq, num_q_heads, head_dim = q_ref.shape
    _, pages_per_blk, page_size, num_combined, _ = kv_buf.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    block_k = pages_per_blk * page_size
    max_pages = tables_ref.shape[1]
    # 16-bit caches: P @ V on 16-bit operands (one MXU pass), as flash attention does.
    pv_dtype = kv_buf.dtype if jnp.dtype(kv_buf.dtype).itemsize == 2 else jnp.float32
    blk_start = pl.program_id(0) * bq
    blk_end = blk_start + bq
    num_seqs = num_seqs_ref[0]
    kv_range = functools.partial(_kv_range, kv_lens_ref=kv_lens_ref, cu_ref=cu_ref,
                                 blk_start=blk_start, blk_end=blk_end, block_k=block_k,
                                 sliding_window=sliding_window)

    def has_rows(seq):
        return (seq < num_seqs) & (cu_ref[jnp.minimum(seq, num_seqs)] < blk_end)

    def page_copies(seq, kv_blk, slot):
        """(needed, descriptor) per page of the block; unneeded pages are never copied."""
        lo, hi, _, _ = kv_range(seq)
        copies = []
        for i in range(pages_per_blk):
            idx = kv_blk * pages_per_blk + i                 # page index within the sequence
            needed = (idx * page_size < hi) & ((idx + 1) * page_size > lo) & (idx < max_pages)
            page = tables_ref[seq, jnp.minimum(idx, max_pages - 1)]
            copies.append((needed, pltpu.make_async_copy(kv_hbm_ref.at[page],
                                                         kv_buf.at[slot, i], sems.at[slot])))
        return copies

    def start_copies(seq, kv_blk, slot):
        for needed, copy in page_copies(seq, kv_blk, slot):
            pl.when(needed)(copy.start)

    def wait_copies(seq, kv_blk, slot):
        for needed, copy in page_copies(seq, kv_blk, slot):
            pl.when(needed)(copy.wait)

    def next_item(seq, kv_blk):
        _, _, _, last = kv_range(seq)
        same = kv_blk + 1 < last
        nseq = jnp.where(same, seq, seq + 1)
        _, _, nfirst, _ = kv_range(jnp.minimum(nseq, tables_ref.shape[0] - 1))
        return nseq, jnp.where(same, kv_blk + 1, nfirst)

    def init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    init()  # every grid step is independent: accumulators start fresh

    def flash_update(seq, kv_blk, slot):
        q_start, q_end = cu_ref[seq], cu_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        lo, hi, _, _ = kv_range(seq)
        rows = blk_start + lax.div(lax.broadcasted_iota(jnp.int32, (bq * group, 1), 0),
                                   jnp.int32(group))
        row_in_seq = (rows >= q_start) & (rows < q_end)            # [Bq*G, 1]
        q_pos = kv_len - q_end + rows
        k_pos = kv_blk * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = row_in_seq & (k_pos <= q_pos) & (k_pos >= lo) & (k_pos < hi)
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        key_ok = (k_pos >= lo) & (k_pos < hi)                       # [1, Bk]
        key_ok_col = key_ok.reshape(block_k, 1)
        for h, (k, v) in enumerate(_load_kv_heads(kv_buf, slot)):  # [Bk, D] each
            k = jnp.where(key_ok_col, k, 0).astype(q_ref.dtype)     # select, never 0 * NaN
            v = jnp.where(key_ok_col, v, 0).astype(pv_dtype)
            q = q_ref[:, h * group:(h + 1) * group, :].reshape(bq * group, head_dim)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, MASK_VALUE)                      # [Bq*G, Bk]
            m_prev = m_ref[h][:, :1]
            m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_next = alpha * l_ref[h][:, :1] + p.sum(axis=1, keepdims=True)
            acc_next = alpha * acc_ref[h] + jnp.dot(p.astype(pv_dtype), v,
                                                    preferred_element_type=jnp.float32)
            m_ref[h] = jnp.where(row_in_seq, jnp.broadcast_to(m_next, (bq * group, LANES)),
                                 m_ref[h])
            l_ref[h] = jnp.where(row_in_seq, jnp.broadcast_to(l_next, (bq * group, LANES)),
                                 l_ref[h])
            acc_ref[h] = jnp.where(row_in_seq, acc_next, acc_ref[h])

    first_seq = first_seq_ref[pl.program_id(0)]

    @pl.when(has_rows(first_seq))
    def prefetch_first():
        start_copies(first_seq, kv_range(first_seq)[2], 0)

    def body(state):
        seq, kv_blk, slot = state
        nseq, nblk = next_item(seq, kv_blk)

        @pl.when(has_rows(nseq))
        def prefetch_next():
            start_copies(nseq, nblk, 1 - slot)

        wait_copies(seq, kv_blk, slot)
        flash_update(seq, kv_blk, slot)
        return nseq, nblk, 1 - slot

    lax.while_loop(lambda st: has_rows(st[0]), body,
                   (first_seq, kv_range(jnp.minimum(first_seq, tables_ref.shape[0] - 1))[2],
                    jnp.int32(0)))

    def finalize():
        for h in range(num_kv_heads):
            l = l_ref[h][:, :1]
            out = jnp.where(l > 0, acc_ref[h] / jnp.where(l > 0, l, 1.0), 0.0)
            o_ref[:, h * group:(h + 1) * group, :] = (
                out.reshape(bq, group, head_dim).astype(o_ref.dtype))

    finalize()


def default_block_sizes(num_tokens: int, page_size: int, max_pages: int) -> tuple[int, int]:
    """(num_q_per_block, num_kv_pages_per_block): ~128 keys per kv block, <= 32 q rows."""
    num_q = min(32, max(8, pl.next_power_of_2(num_tokens)))
    pages = max(1, min(max_pages, 128 // page_size))
    return num_q, pages


def ragged_paged_attention_tpu(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                               sm_scale, sliding_window=None, soft_cap=None,
                               num_q_per_block=None, num_kv_pages_per_block=None,
                               vmem_limit_bytes=None):
    """Shapes as in pallas_kernels.ragged_paged_attention; runs interpreted off TPU."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    bq_default, pages_default = default_block_sizes(num_tokens, page_size,
                                                    block_tables.shape[1])
    bq = num_q_per_block or bq_default
    pages_per_blk = num_kv_pages_per_block or pages_default
    num_q_blocks = pl.cdiv(num_tokens, bq)
    padded = num_q_blocks * bq
    q_padded = jnp.pad(q, ((0, padded - num_tokens), (0, 0), (0, 0)))
    first_seq = q_block_first_seq(cu_q_lens, num_seqs, num_q_blocks, bq)

    q_spec = pl.BlockSpec((bq, num_q_heads, head_dim), lambda b, *_: (b, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(num_q_blocks,),
        in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((2, pages_per_blk, page_size, num_combined, head_dim), kv_pages.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((num_kv_heads, bq * group, LANES), jnp.float32),
            pltpu.VMEM((num_kv_heads, bq * group, LANES), jnp.float32),
            pltpu.VMEM((num_kv_heads, bq * group, head_dim), jnp.float32),
        ],
    )
    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_padded.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=vmem_limit_bytes),
        interpret=pltpu.InterpretParams() if interpret_mode("tpu") else False,
        name="ragged_paged_attention_tpu",
    )(kv_lens, block_tables, cu_q_lens, num_seqs, first_seq, q_padded, kv_pages)
    return out[:num_tokens]
