"""Ragged paged attention as a Pallas GPU kernel (Triton back end).

Grid: (q block of Bq rows, kv head). One program owns rows [b*Bq, (b+1)*Bq) of q for the
G query heads of one kv head, laid out as a [Bq*Gp, D] tile (G padded to a power of two,
Gp, because Triton tiles are powers of two). It walks the sequences with rows in its
block (first one precomputed by XLA), and for each sequence the kv blocks its rows can
see (causal bound, sliding-window bound). A kv block is Bkp pages gathered by page id
straight from HBM (kv_pages[pages, :, 2h, :] -> [Bkp*ps, D]); Triton pipelines the loads.
Each block is one online-softmax update in float32; rows of other sequences are kept by
a row mask. Page slots past the needed range are replaced by zeros with jnp.where before
any arithmetic, so NaN in unused pages cannot leak.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.attention_reference import MASK_VALUE
from pallas_kernels.attention_tpu import q_block_first_seq
from pallas_kernels.backend import interpret_mode


def _kernel(kv_lens_ref, tables_ref, cu_ref, num_seqs_ref, first_seq_ref, q_ref, kv_ref,
            o_ref, *, sm_scale, sliding_window, soft_cap, group, pages_per_blk):
    # q_ref/o_ref [Bq, Gp, D] (this kv head's q heads); kv_ref [P, ps, 2Hkv, D] in HBM.
    bq, gp, head_dim = q_ref.shape
    page_size = kv_ref.shape[1]
    max_seqs, max_pages = tables_ref.shape
    block_k = pages_per_blk * page_size
    b, h = pl.program_id(0), pl.program_id(1)
    blk_start = b * bq
    blk_end = blk_start + bq
    num_seqs = num_seqs_ref[0]
    rows = bq * gp
    # 16-bit caches: P @ V on 16-bit operands (tensor cores), as flash attention does.
    pv_dtype = kv_ref.dtype if jnp.dtype(kv_ref.dtype).itemsize == 2 else jnp.float32
    exact_pv = pv_dtype == jnp.float32
    exact_qk = jnp.dtype(q_ref.dtype).itemsize == 4

    q = q_ref[...].reshape(rows, head_dim)
    row_tok = blk_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // gp
    row_head_ok = lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % gp < group

    def seq_update(seq, carry):
        q_start, q_end = cu_ref[seq], cu_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        first_row = jnp.maximum(q_start, blk_start)
        last_row = jnp.minimum(q_end, blk_end)
        hi = jnp.clip(kv_len - q_end + last_row, 0, kv_len)   # keys [lo, hi) are needed
        lo = jnp.int32(0)
        if sliding_window is not None:
            lo = jnp.maximum(kv_len - q_end + first_row - sliding_window + 1, 0)
        row_in_seq = (row_tok >= q_start) & (row_tok < q_end) & row_head_ok  # [rows, 1]
        q_pos = kv_len - q_end + row_tok

        def kv_block(j, carry):
            m, l, acc = carry
            page_idx = j * pages_per_blk + jnp.arange(pages_per_blk, dtype=jnp.int32)
            pages = tables_ref[seq, jnp.minimum(page_idx, max_pages - 1)]  # [Bkp] page ids
            k = kv_ref[pages, :, 2 * h, :].reshape(block_k, head_dim)
            v = kv_ref[pages, :, 2 * h + 1, :].reshape(block_k, head_dim)
            k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            key_ok = (k_pos >= lo) & (k_pos < hi)
            k = jnp.where(key_ok.reshape(block_k, 1), k, 0).astype(q.dtype)
            v = jnp.where(key_ok.reshape(block_k, 1), v, 0).astype(pv_dtype)
            # [rows, Bk]; f32 operands use full-precision dots (no TF32) to match the reference.
            s = pltriton.dot(q, k, trans_b=True, allow_tf32=False if exact_qk else None)
            s = s.astype(jnp.float32) * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            mask = row_in_seq & key_ok & (k_pos <= q_pos)
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            s = jnp.where(mask, s, MASK_VALUE)
            m_next = jnp.maximum(m, s.max(axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
            alpha = jnp.exp(m - m_next)
            l_next = alpha * l + p.sum(axis=1, keepdims=True)
            acc_next = alpha * acc + pltriton.dot(p.astype(pv_dtype), v,
                                                  allow_tf32=False if exact_pv else None)
            return (jnp.where(row_in_seq, m_next, m), jnp.where(row_in_seq, l_next, l),
                    jnp.where(row_in_seq, acc_next, acc))

        return lax.fori_loop(lo // block_k, pl.cdiv(hi, block_k), kv_block, carry)

    def seq_cond(state):
        seq = state[0]
        return (seq < num_seqs) & (cu_ref[jnp.minimum(seq, max_seqs)] < blk_end)

    def seq_body(state):
        seq, carry = state
        return seq + 1, seq_update(seq, carry)

    init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    _, (_, l, acc) = lax.while_loop(seq_cond, seq_body, (first_seq_ref[b], init))
    out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = out.reshape(bq, gp, head_dim).astype(o_ref.dtype)


def ragged_paged_attention_gpu(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                               sm_scale, sliding_window=None, soft_cap=None,
                               num_q_per_block=None, num_kv_pages_per_block=None,
                               num_warps=None, num_stages=None):
    """Shapes as in pallas_kernels.ragged_paged_attention; runs interpreted off GPU."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    gp = pl.next_power_of_2(group)
    # Triton dots need >= 16 rows: aim for 16..64 rows of [Bq*Gp, D].
    bq = num_q_per_block or max(1, min(64, max(16, pl.next_power_of_2(num_tokens) * gp)) // gp)
    pages_per_blk = num_kv_pages_per_block or max(1, min(block_tables.shape[1],
                                                         64 // page_size))
    num_q_blocks = pl.cdiv(num_tokens, bq)
    padded = num_q_blocks * bq
    # [T, Hq, D] -> [T_pad, Hkv, Gp, D]: each program reads one kv head's q heads.
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, padded - num_tokens), (0, 0), (0, gp - group), (0, 0)))
    first_seq = q_block_first_seq(cu_q_lens, num_seqs, num_q_blocks, bq)

    q_spec = pl.BlockSpec((bq, None, gp, head_dim), lambda b, h: (b, h, 0, 0))
    full = lambda x: pl.BlockSpec(x.shape, lambda b, h: (0,) * x.ndim)
    scalars = (kv_lens, block_tables, cu_q_lens, num_seqs, first_seq)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, group=group, pages_per_blk=pages_per_blk)
    out = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, num_kv_heads),
        in_specs=[*(full(x) for x in scalars), q_spec, full(kv_pages)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps or 4,
                                                num_stages=num_stages or 2),
        interpret=interpret_mode("gpu"),
        name="ragged_paged_attention_gpu",
    )(*scalars, qg, kv_pages)
    return out[:num_tokens, :, :group].reshape(num_tokens, num_q_heads, head_dim)
