"""Ragged paged attention as a Pallas TPU (Mosaic) kernel, and the SMEM-fit check for both
TPU backends.

Work list. XLA splits every sequence's new q rows into tiles of at most Bq tokens of that
ONE sequence (`q_tiles`); a sequence with no new rows gets no tile. One grid step runs one
tile. Its rows on the MXU are tokens x the G query heads of a kv head (decode: one token,
G rows), so no row of another sequence rides along. Tiles of at most `small` tokens (a
decode token, short chunks) run a variant sized for them: Bs = max(1, 8 // G) tokens, so
a decode step uses Bs*G rows of scratch and MXU work, not Bq*G.

Memory. q, kv_pages, block_tables and out stay in HBM (memory_space=ANY):
  * the tile's block-table row is DMAed into an SMEM double buffer [2, max_pages], so SMEM
    holds 2 rows, not the whole table (see `smem_bytes_needed`);
  * q rows of the tile are copied row by row into a VMEM double buffer [2, Bq, Hq, D], the
    output rows back from [Bq, Hq, D] (only the tile's rows are written; rows outside every
    tile are zeroed by XLA after the call);
  * kv pages are copied page by page into a VMEM double buffer [2, Bkp, page_size, 2Hkv, D]:
    per tile only the kv blocks its rows can see (causal upper bound, sliding-window lower
    bound), per block only the pages that hold visible keys.

Pipeline. Each kv block first starts the copy of the NEXT block into the other buffer;
after the tile's last block the next block is the first block of the NEXT grid step's tile
(its block-table row was fetched at the start of this step, its q rows are copied with it),
so the DMA pipeline never drains between steps. That carried state (which buffer slot is
next) lives in SMEM scratch and needs the grid to run in order: the grid dimension is
"arbitrary" (on megacore chips both cores then do not split the grid).

Loads. K and V of kv head h are read from the buffer ref one head at a time (never the
whole buffer as one vector): f32 with a strided ref index (row 2h / 2h+1 of the combined
axis); bf16 through a uint32 bitcast of the ref, where one word holds K (low half) and V
(high half) of a head, split by shifts (Mosaic has no strided sublane load of packed
types). Interpreted off TPU, where the interpreter resolves only index transforms of refs,
bf16 K and V are read by the same strided index as f32. Stale or unused buffer slots (and
NaN pages) are neutralised by jnp.where before any arithmetic.

8-bit pages (pallas_kernels.kv_quant: int8 / fp8 e4m3 with float32 scales [P, ps, 2Hkv]).
Each page's scales are DMAed beside it into a VMEM double buffer [2, Bkp, ps, 2Hkv]; K and
V of head h are dequantized in float32 (times their [Bk, 1] scale column) before the
select, then cast to q's dtype for the MXU. On TPU an 8-bit buffer is read as uint32 words
holding 4 combined heads (K and V of heads 2j, 2j+1), split by shifts and bitcast back to
8 bits, as jax's own kernel reads int8/fp8 pages; that needs 2*Hkv % 4 == 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxserve.kernels.attention_reference import MASK_VALUE
from jaxserve.kernels.backend import interpret_mode

LANES = 128  # m/l scratch is lane-broadcast: Mosaic dislikes width-1 minor dims.
SMEM_BYTES_PER_CORE = 1 << 20  # TPU v4/v5e/v5p/v6e: 1 MiB of scalar memory per core
SMEM_RESERVE_BYTES = 16 << 10  # left to Mosaic's own scalars and padding


# ----------------------------------------------------------------------------- SMEM fit

def smem_bytes_needed(backend: str, max_num_seqs: int, max_pages_per_seq: int,
                      max_num_tokens: int | None = None) -> int:
    """Bytes of SMEM the backend's scalar operands take at these engine limits (int32s;
    Mosaic's padding of SMEM arrays comes on top, hence SMEM_RESERVE_BYTES).

    jax_tpu scalar-prefetches kv_lens, the whole block table [S, max_pages], cu_q_lens,
    two carried indices and num_seqs. pallas_tpu prefetches kv_lens, cu_q_lens, num_seqs
    and the tile list (3 x max_tiles + 1), and holds 2 block-table rows plus 1 carried slot.
    """
    s, pages = max_num_seqs, max_pages_per_seq
    if backend == "jax_tpu":
        words = s + s * pages + (s + 1) + 2 + 1
    elif backend == "pallas_tpu":
        tokens = max_num_tokens if max_num_tokens is not None else s
        tiles = tokens + min(s, tokens)            # bound of max_tiles for any Bq >= 1
        words = s + (s + 1) + 1 + 3 * tiles + 1 + 2 * pages + 1
    else:
        raise ValueError(f"smem_bytes_needed knows jax_tpu and pallas_tpu, got {backend!r}")
    return 4 * words


def check_smem_fit(backend: str, max_num_seqs: int, max_model_len: int, page_size: int,
                   max_num_tokens: int | None = None,
                   smem_bytes: int = SMEM_BYTES_PER_CORE) -> None:
    """Raise ValueError if the backend's SMEM operands do not fit one core's SMEM.

    Call at engine start for TPU backends; max_pages_per_seq = ceil(max_model_len/page_size).
    """
    pages = -(-max_model_len // page_size)
    need = smem_bytes_needed(backend, max_num_seqs, pages, max_num_tokens)
    avail = smem_bytes - SMEM_RESERVE_BYTES
    if need > avail:
        raise ValueError(
            f"attention backend {backend!r} needs {need} bytes of SMEM for max_num_seqs="
            f"{max_num_seqs} x max_pages_per_seq={pages} (max_model_len={max_model_len} / "
            f"page_size={page_size}), but {avail} of {smem_bytes} are available: lower "
            f"max_model_len or max_num_seqs, raise page_size, or use backend 'pallas_tpu' "
            f"(fetches block-table rows per sequence)")


# ----------------------------------------------------------------------------- work list

def max_tiles(num_tokens: int, max_seqs: int, bq: int) -> int:
    """Static bound on tiles: sum_i ceil(q_i / Bq) <= T / Bq + (sequences with rows)."""
    return pl.cdiv(num_tokens, bq) + min(max_seqs, num_tokens)


def q_tiles(cu_q_lens, num_seqs, num_tiles: int, bq: int):
    """Split each real sequence's q rows into tiles of <= bq rows of that sequence.

    -> (seq [NT], start [NT], length [NT], count [1]) int32; tiles >= count have length 0.
    """
    max_seqs = cu_q_lens.shape[0] - 1
    real = jnp.arange(max_seqs) < num_seqs[0]
    q_lens = jnp.where(real, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    per_seq = (q_lens + bq - 1) // bq
    ends = jnp.cumsum(per_seq)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), max_seqs - 1).astype(jnp.int32)
    start = cu_q_lens[seq] + (t - (ends[seq] - per_seq[seq])) * bq
    count = ends[-1]
    length = jnp.where(t < count, jnp.minimum(bq, cu_q_lens[seq + 1] - start), 0)
    return seq, start.astype(jnp.int32), length.astype(jnp.int32), count.reshape(1).astype(
        jnp.int32)


# ----------------------------------------------------------------------------- kernel

def _load_kv_head(kv_buf, slot, h, interpret):
    """(K, V) of kv head h from buffer slot `slot`, each [Bk, D]."""
    _, pages, page_size, _, head_dim = kv_buf.shape
    flat = lambda x: x.reshape(pages * page_size, head_dim)
    if jnp.dtype(kv_buf.dtype).itemsize == 4 or interpret:
        return flat(kv_buf[slot, :, :, 2 * h, :]), flat(kv_buf[slot, :, :, 2 * h + 1, :])
    assert kv_buf.dtype == jnp.bfloat16, kv_buf.dtype
    word = kv_buf.bitcast(jnp.uint32)[slot, :, :, h, :]        # [Bkp, ps, D]: K low, V high
    # bf16 is the top half of a float32, so the shifted words are exact float32 values.
    return (flat(pltpu.bitcast(word << 16, jnp.float32)),
            flat(pltpu.bitcast(word & jnp.uint32(0xFFFF0000), jnp.float32)))


def _load_quantized_kv_head(kv_buf, sc_buf, slot, h, interpret):
    """Dequantized (K, V) of kv head h from buffer slot `slot`, each [Bk, D] float32.
    kv_buf [2, Bkp, ps, 2Hkv, D] 8-bit; sc_buf [2, Bkp, ps, 2Hkv] float32."""
    _, pages, page_size, _, head_dim = kv_buf.shape
    block_k = pages * page_size
    if interpret:
        k, v = kv_buf[slot, :, :, 2 * h, :], kv_buf[slot, :, :, 2 * h + 1, :]
    else:
        # Word j holds combined heads 4j..4j+3, one byte each: K of head h is byte 2(h % 2).
        word = kv_buf.bitcast(jnp.uint32)[slot, :, :, h // 2, :]   # [Bkp, ps, D]
        byte = 2 * (h % 2)
        if kv_buf.dtype == jnp.int8:   # sign-extend in 32 bits: no 8-bit vector op at all
            k, v = (pltpu.bitcast(word << (24 - 8 * b), jnp.int32) >> 24 for b in (byte, byte + 1))
        else:                          # fp8: back to 8 bits for the float conversion, as jax's kernel
            k, v = (pltpu.bitcast((word >> (8 * b)).astype(jnp.uint8), kv_buf.dtype)
                    for b in (byte, byte + 1))
    k_scale = sc_buf[slot, :, :, pl.ds(2 * h, 1)].reshape(block_k, 1)
    v_scale = sc_buf[slot, :, :, pl.ds(2 * h + 1, 1)].reshape(block_k, 1)
    # Convert before merging (Bkp, ps): float32 rows tile by 8, 8-bit rows by 32.
    flat = lambda x: x.astype(jnp.float32).reshape(block_k, head_dim)
    return flat(k) * k_scale, flat(v) * v_scale


def _kernel(kv_lens_ref, cu_ref, tile_seq_ref, tile_start_ref, tile_len_ref, count_ref,  # SMEM
            *refs, sm_scale, sliding_window, soft_cap, small, interpret, quantized):
    # refs: inputs q_hbm, kv_hbm, tables_hbm[, scales_hbm]; output o_hbm; scratch bt_buf,
    # kv_slot_ref, q_buf, o_buf, kv_buf[, sc_buf], sems, m_ref, l_ref, acc_ref.
    # q_hbm/o_hbm [T, Hq, D]; kv_hbm [P, ps, 2Hkv, D]; tables_hbm [S, max_pages]
    # scales_hbm [P, ps, 2Hkv] f32 (8-bit pages only)
    # bt_buf SMEM [2, max_pages]; q_buf [2, Bq, Hq, D]; o_buf [Bq, Hq, D]
    # kv_buf [2, Bkp, ps, 2Hkv, D]; sc_buf [2, Bkp, ps, 2Hkv] f32
    # sems DMA [4 or 5, 2] (kv, q, block table, out[, scales]) x slot
    # m_ref/l_ref [Hkv, Bq*G, LANES] f32; acc_ref [Hkv, Bq*G, D] f32
    if quantized:
        (q_hbm, kv_hbm, tables_hbm, scales_hbm, o_hbm, bt_buf, kv_slot_ref, q_buf, o_buf, kv_buf,
         sc_buf, sems, m_ref, l_ref, acc_ref) = refs
    else:
        (q_hbm, kv_hbm, tables_hbm, o_hbm, bt_buf, kv_slot_ref, q_buf, o_buf, kv_buf,
         sems, m_ref, l_ref, acc_ref) = refs
        scales_hbm = sc_buf = None
    _, bq, num_q_heads, head_dim = q_buf.shape
    _, pages_per_blk, page_size, num_combined, _ = kv_buf.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    block_k = pages_per_blk * page_size
    max_pages = bt_buf.shape[1]
    cache_dtype = q_buf.dtype if quantized else kv_buf.dtype   # 8-bit: dequantized to q's
    pv_dtype = cache_dtype if jnp.dtype(cache_dtype).itemsize == 2 else jnp.float32
    t = pl.program_id(0)
    count = count_ref[0]

    def tile(i):
        """(seq, first row, rows, lo, hi, first kv block, end kv block) of tile i."""
        seq, start, n = tile_seq_ref[i], tile_start_ref[i], tile_len_ref[i]
        kv_len, q_end = kv_lens_ref[seq], cu_ref[seq + 1]
        hi = kv_len - q_end + start + n               # keys [lo, hi) are visible to the tile
        lo = jnp.int32(0)
        if sliding_window is not None:
            lo = jnp.maximum(kv_len - q_end + start - sliding_window + 1, 0)
        first = lax.div(lo, block_k)                  # lo, hi >= 0: lax.div is floor here
        return seq, start, n, lo, hi, first, jnp.maximum(lax.div(hi + block_k - 1, block_k),
                                                         first + 1)

    def kv_copies(i, kv_blk, slot):
        """(needed, copy) per page of kv block kv_blk of tile i; block-table row in SMEM."""
        _, _, _, lo, hi, _, _ = tile(i)
        out = []
        for p in range(pages_per_blk):
            idx = kv_blk * pages_per_blk + p
            needed = (idx * page_size < hi) & ((idx + 1) * page_size > lo) & (idx < max_pages)
            page = bt_buf[lax.rem(i, 2), jnp.minimum(idx, max_pages - 1)]
            out.append((needed, pltpu.make_async_copy(kv_hbm.at[page], kv_buf.at[slot, p],
                                                      sems.at[0, slot])))
            if quantized:
                out.append((needed, pltpu.make_async_copy(scales_hbm.at[page], sc_buf.at[slot, p],
                                                          sems.at[4, slot])))
        return out

    def q_copies(i):
        _, start, n, *_ = tile(i)
        return [(r < n, pltpu.make_async_copy(q_hbm.at[start + r], q_buf.at[lax.rem(i, 2), r],
                                              sems.at[1, lax.rem(i, 2)])) for r in range(bq)]

    def bt_copy(i):
        return pltpu.make_async_copy(tables_hbm.at[tile_seq_ref[i]], bt_buf.at[lax.rem(i, 2)],
                                     sems.at[2, lax.rem(i, 2)])

    def start(copies):
        for needed, copy in copies:
            pl.when(needed)(copy.start)

    def wait(copies):
        for needed, copy in copies:
            pl.when(needed)(copy.wait)

    def start_tile(i, slot):
        """Start q rows and the first kv block of tile i (its block-table row is in SMEM)."""
        start(q_copies(i))
        start(kv_copies(i, tile(i)[5], slot))

    @pl.when((t == 0) & (count > 0))
    def prologue():
        bt_copy(0).start()
        bt_copy(0).wait()
        kv_slot_ref[0] = 0
        start_tile(0, 0)

    def run_tile(n_tok):
        """The tile at grid step t, with n_tok (static) >= its rows."""
        rows = n_tok * group
        has_next = t + 1 < count
        seq, q_start, n, lo, hi, first_blk, end_blk = tile(t)
        kv_len, q_end = kv_lens_ref[seq], cu_ref[seq + 1]

        @pl.when(has_next)
        def fetch_next_table_row():
            bt_copy(t + 1).start()

        wait(q_copies(t))
        m_ref[:, :rows] = jnp.full((num_kv_heads, rows, LANES), MASK_VALUE, jnp.float32)
        l_ref[:, :rows] = jnp.zeros((num_kv_heads, rows, LANES), jnp.float32)
        acc_ref[:, :rows] = jnp.zeros((num_kv_heads, rows, head_dim), jnp.float32)
        row_tok = lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), jnp.int32(group))
        q_pos = kv_len - q_end + q_start + row_tok               # [rows, 1]

        def flash_update(kv_blk, slot):
            k_pos = kv_blk * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            mask = (row_tok < n) & (k_pos <= q_pos) & (k_pos >= lo)       # [rows, Bk]
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            k_col = kv_blk * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            key_ok = (k_col >= lo) & (k_col < hi)                        # [Bk, 1]
            for h in range(num_kv_heads):
                if quantized:
                    k, v = _load_quantized_kv_head(kv_buf, sc_buf, slot, h, interpret)
                else:
                    k, v = _load_kv_head(kv_buf, slot, h, interpret)     # [Bk, D] each
                q = q_buf[lax.rem(t, 2), :n_tok, h * group:(h + 1) * group, :]   # [n_tok, G, D]
                if jnp.dtype(q.dtype).itemsize == 2 and group % 2:
                    q = q.astype(jnp.float32)      # packed rows fold only in pairs
                q = q.reshape(rows, head_dim)
                k = jnp.where(key_ok, k, 0).astype(q.dtype)              # select, never 0*NaN
                v = jnp.where(key_ok, v, 0).astype(pv_dtype)
                s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * sm_scale
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                s = jnp.where(mask, s, MASK_VALUE)                       # [rows, Bk]
                m_prev = m_ref[h, :rows, :1]
                m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
                p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
                alpha = jnp.exp(m_prev - m_next)
                l_next = alpha * l_ref[h, :rows, :1] + p.sum(axis=1, keepdims=True)
                acc_ref[h, :rows] = alpha * acc_ref[h, :rows] + jnp.dot(
                    p.astype(pv_dtype), v, preferred_element_type=jnp.float32)
                m_ref[h, :rows] = jnp.broadcast_to(m_next, (rows, LANES))
                l_ref[h, :rows] = jnp.broadcast_to(l_next, (rows, LANES))

        def body(kv_blk, slot):
            last = kv_blk + 1 >= end_blk

            @pl.when(~last)
            def prefetch_next_block():
                start(kv_copies(t, kv_blk + 1, 1 - slot))

            @pl.when(last & has_next)
            def prefetch_next_tile():
                bt_copy(t + 1).wait()
                start_tile(t + 1, 1 - slot)

            wait(kv_copies(t, kv_blk, slot))
            flash_update(kv_blk, slot)
            return 1 - slot

        kv_slot_ref[0] = lax.fori_loop(first_blk, end_blk, body, kv_slot_ref[0])

        for h in range(num_kv_heads):
            l = l_ref[h, :rows, :1]
            out = jnp.where(l > 0, acc_ref[h, :rows] / jnp.where(l > 0, l, 1.0), 0.0)
            o_buf[:n_tok, h * group:(h + 1) * group, :] = (
                out.reshape(n_tok, group, head_dim).astype(o_buf.dtype))
        out_copies = [(r < n, pltpu.make_async_copy(o_buf.at[r], o_hbm.at[q_start + r],
                                                    sems.at[3, 0])) for r in range(n_tok)]
        start(out_copies)
        wait(out_copies)

    n_rows = tile_len_ref[t]
    if small < bq:
        pl.when((t < count) & (n_rows <= small))(functools.partial(run_tile, small))
        pl.when((t < count) & (n_rows > small))(functools.partial(run_tile, bq))
    else:
        pl.when(t < count)(functools.partial(run_tile, bq))


def default_block_sizes(num_tokens: int, group: int, page_size: int,
                        max_pages: int) -> tuple[int, int]:
    """(num_q_per_block, num_kv_pages_per_block): q tiles of ~128 MXU rows (Bq*G), ~128
    keys per kv block. Untuned: no TPU was available to measure."""
    num_q = max(1, min(128 // group, pl.next_power_of_2(num_tokens)))
    pages = max(1, min(max_pages, 128 // page_size))
    return num_q, pages


def ragged_paged_attention_tpu(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                               sm_scale, sliding_window=None, soft_cap=None,
                               num_q_per_block=None, num_kv_pages_per_block=None,
                               vmem_limit_bytes=None, kv_scales=None):
    """Shapes as in pallas_kernels.ragged_paged_attention; runs interpreted off TPU.

    num_q_per_block: tokens (of one sequence) per q tile; num_kv_pages_per_block: pages
    per kv block. kv_scales [P, page_size, 2*Hkv] float32 goes with 8-bit kv_pages
    (pallas_kernels.kv_quant).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    max_seqs, max_pages = block_tables.shape
    group = num_q_heads // (num_combined // 2)
    bq_default, pages_default = default_block_sizes(num_tokens, group, page_size, max_pages)
    bq = min(num_q_per_block or bq_default, num_tokens)
    pages_per_blk = min(num_kv_pages_per_block or pages_default, max_pages)
    small = min(bq, max(1, 8 // group))
    num_tiles = max_tiles(num_tokens, max_seqs, bq)
    tiles = q_tiles(cu_q_lens, num_seqs, num_tiles, bq)
    interpret = interpret_mode("pallas_tpu")
    quantized = kv_scales is not None
    if quantized and not interpret and num_combined % 4:
        raise ValueError(f"pallas_tpu reads 8-bit pages as words of 4 combined kv heads: it needs "
                         f"2*num_kv_heads % 4 == 0, got 2*num_kv_heads={num_combined}")
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    kv_scratch = [pltpu.VMEM((2, pages_per_blk, page_size, num_combined, head_dim), kv_pages.dtype)]
    if quantized:
        kv_scratch.append(pltpu.VMEM((2, pages_per_blk, page_size, num_combined), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(num_tiles,),
        in_specs=[any_spec] * (4 if quantized else 3),
        out_specs=any_spec,
        scratch_shapes=[
            pltpu.SMEM((2, max_pages), jnp.int32),
            pltpu.SMEM((1,), jnp.int32),
            pltpu.VMEM((2, bq, num_q_heads, head_dim), q.dtype),
            pltpu.VMEM((bq, num_q_heads, head_dim), q.dtype),
            *kv_scratch,
            pltpu.SemaphoreType.DMA((5 if quantized else 4, 2)),
            pltpu.VMEM((num_combined // 2, bq * group, LANES), jnp.float32),
            pltpu.VMEM((num_combined // 2, bq * group, LANES), jnp.float32),
            pltpu.VMEM((num_combined // 2, bq * group, head_dim), jnp.float32),
        ],
    )
    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, small=small, interpret=interpret,
                               quantized=quantized)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",),
                                             vmem_limit_bytes=vmem_limit_bytes),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="ragged_paged_attention_tpu",
    )(kv_lens, cu_q_lens, *tiles, q, kv_pages, block_tables,
      *((kv_scales,) if quantized else ()))
    valid = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
