"""The ragged paged attention kernel jax ships for TPU, as our "jax_tpu" backend.

jax.experimental.pallas.ops.tpu.ragged_paged_attention takes our layout as is
(kv_pages [P, page_size, 2*Hkv, D], K of kv head h at 2h, V at 2h+1) and our metadata
(kv_lens, block_tables as page_indices, cu_q_lens, num_seqs). This wrapper
  * checks the shapes the kernel supports (see `check_supported`) and raises ValueError
    naming the constraint, before any tracing of the kernel;
  * picks jax's tuned (num_kv_pages_per_block, num_queries_per_block) by default
    (`default_block_sizes`);
  * enforces our output contract: jax's kernel leaves rows past cu_q_lens[num_seqs]
    as whatever its VMEM accumulator held, so they are zeroed here;
  * runs interpreted off TPU (see `_interpreted_call`).

Interpret mode. jax's kernel has no `interpret` argument, and neither of jax 0.10's
interpreters runs it unchanged: under pltpu.force_tpu_interpret_mode() (the TPU
interpreter) its `kv_buf.reshape(pages * page_size * 2Hkv, D)` ref view fails
("'ReshapeTransform' object has no attribute 'indices'": the interpreter resolves only
index transforms), and the HLO interpreter (interpret=True) supports neither its strided
loads nor its masked stores on int-indexed refs. So off TPU we run jax's own kernel body
(`kernel.ragged_paged_attention_kernel`, unmodified) in a pallas_call built like jax's,
under the TPU interpreter, handing it a view of its KV double buffer that serves the
flattened strided loads as the equivalent per-kv-head index loads (`_KvBufView`). The
DMAs, semaphores, masking and flash update are jax's code; only that view differs.
One more interpreter bug shapes the interpreted run: its masked store marks rows >= n of
axis 0 out of bounds for every axis of size n (shared_memory.swap_buffer_content builds
its in-bounds mask with `mask[n:] = False` for each axis), which breaks jax's masked store
into the [Bq, G, D] accumulator whenever Bq > G. Interpreted, num_queries_per_block is
therefore capped at G (q heads per kv head); on TPU the tuned value is used.

Constraints (checked by `check_supported`): head_dim % 128 == 0, q and kv_pages both
float32 or both bfloat16, 2*num_kv_heads tileable (see get_min_heads_per_blk).
sliding_window and soft_cap are supported. The whole block table is scalar-prefetched into
SMEM (see attention_tpu.smem_bytes_needed). An 8-bit KV cache (pallas_kernels.kv_quant) is
refused: jax's kernel dequantizes with one static per-tensor k_scale / v_scale, ours has a
scale per token and kv head (pallas_kernels.backend.resolve_backend picks pallas_tpu then).
A real sequence with kv_len == 0 is not supported by jax's kernel (its prefetched DMA is
never waited); our contract has q_len <= kv_len, and the engine never schedules an empty
context.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as tuned

from jaxserve.kernels.backend import interpret_mode

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
# The tuned table used when no TPU is attached (interpret mode, export for TPU from CPU).
OFF_TPU_DEVICE = "TPU v6"


def check_supported(q_shape, q_dtype, kv_shape, kv_dtype) -> None:
    """Raise ValueError if jax's TPU kernel cannot run these shapes."""
    _, num_q_heads, head_dim = q_shape
    _, _, num_combined, _ = kv_shape
    if head_dim % 128:
        raise ValueError(f"jax_tpu needs head_dim % 128 == 0 (Mosaic lane width; the kernel "
                         f"has no head_dim padding), got head_dim={head_dim}")
    for name, dtype in (("q", q_dtype), ("kv_pages", kv_dtype)):
        if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
            raise ValueError(f"jax_tpu supports {name} dtype float32 or bfloat16, got {dtype}")
    if jnp.dtype(q_dtype) != jnp.dtype(kv_dtype):
        raise ValueError(f"jax_tpu needs q and kv_pages of one dtype, got {q_dtype} and "
                         f"{kv_dtype}")
    try:
        jax_rpa.get_min_heads_per_blk(num_q_heads, num_combined, q_dtype, kv_dtype)
    except ValueError as err:
        packing = jax_rpa.get_dtype_packing(kv_dtype)
        raise ValueError(f"jax_tpu needs 2*num_kv_heads / {packing} (dtype packing) in "
                         f"(1, 2, 4, 8) or a multiple of 8, got 2*num_kv_heads={num_combined} "
                         f"({err})") from None


def default_block_sizes(q, kv_pages, block_tables) -> tuple[int, int]:
    """(num_kv_pages_per_block, num_queries_per_block) from jax's tuned table.

    On TPU this is jax's get_tuned_block_sizes for the attached chip; off TPU (which jax's
    helper refuses) the same lookup in the table of OFF_TPU_DEVICE, else jax's default.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    pages_per_seq = block_tables.shape[1]
    q_heads_blk, combined_blk = jax_rpa.get_min_heads_per_blk(
        num_q_heads, num_combined, q.dtype, kv_pages.dtype)
    key = (q.dtype, kv_pages.dtype, q_heads_blk, combined_blk // 2, head_dim, page_size,
           num_tokens, pages_per_seq)
    if jax.default_backend() == "tpu":
        return tuned.get_tuned_block_sizes(*key)
    bkv, bq = tuned.TUNED_BLOCK_SIZES[OFF_TPU_DEVICE].get(tuned.simplify_key(key), (128, 32))
    return min(pages_per_seq, bkv), min(num_tokens, bq)


def ragged_paged_attention_jax_tpu(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *,
                                   sm_scale, sliding_window=None, soft_cap=None,
                                   num_q_per_block=None, num_kv_pages_per_block=None,
                                   vmem_limit_bytes=None, kv_scales=None):
    """Shapes as in pallas_kernels.ragged_paged_attention; runs interpreted off TPU."""
    if kv_scales is not None:
        raise ValueError("attention backend 'jax_tpu' cannot read an 8-bit KV cache with a scale per token "
                         "and kv head (jax's kernel takes one static per-tensor k_scale / v_scale); use "
                         "'pallas_tpu'")
    check_supported(q.shape, q.dtype, kv_pages.shape, kv_pages.dtype)
    bkv_default, bq_default = default_block_sizes(q, kv_pages, block_tables)
    opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                num_kv_pages_per_block=min(num_kv_pages_per_block or bkv_default,
                                           block_tables.shape[1]),
                num_queries_per_block=min(num_q_per_block or bq_default, q.shape[0]),
                vmem_limit_bytes=vmem_limit_bytes)
    args = (q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    if interpret_mode("jax_tpu"):
        out = _interpreted_call(*args, **opts)
    else:
        out = jax_rpa.ragged_paged_attention(*args, **opts)
    valid = jnp.arange(q.shape[0]) < cu_q_lens[num_seqs[0]]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


class _Rows:
    """`ref[start::step, :]` on the flattened [pages*page_size*2Hkv, D] buffer of one slot,
    served as the same rows of the 4-D buffer: row r is (page, slot_row, combined head)."""

    def __init__(self, buf, slot, packed: bool):
        self.buf, self.slot, self.packed = buf, slot, packed   # buf [2, Bkp, ps, C, D]

    @property
    def dtype(self):
        return jnp.uint32 if self.packed else self.buf.dtype

    def bitcast(self, dtype):
        assert dtype == jnp.uint32 and self.buf.dtype == jnp.bfloat16, dtype
        return _Rows(self.buf, self.slot, packed=True)

    def _head(self, c):
        _, pages, page_size, _, head_dim = self.buf.shape
        return self.buf[self.slot, :, :, c, :].reshape(pages * page_size, head_dim)

    def __getitem__(self, idx):
        rows, cols = idx
        num_combined = self.buf.shape[3]
        step = num_combined // 2 if self.packed else num_combined
        assert cols == slice(None) and rows.step == step and rows.stop is None, idx
        if not self.packed:
            return self._head(rows.start)
        # A uint32 row of the packed buffer holds combined heads 2j (low) and 2j+1 (high).
        lo, hi = (jax.lax.bitcast_convert_type(self._head(2 * rows.start + i), jnp.uint16).astype(jnp.uint32)
                  for i in (0, 1))
        return lo | (hi << 16)


class _KvSlot:
    def __init__(self, buf, slot):
        self.buf, self.slot = buf, slot
        self.shape = buf.shape[1:]
        self.at = buf.at[slot].at               # DMA destinations: .at[i] -> page i

    def reshape(self, *shape):
        assert shape == (self.shape[0] * self.shape[1] * self.shape[2], self.shape[3]), shape
        return _Rows(self.buf, self.slot, packed=False)


class _KvBufView:
    """jax's kv_bufs scratch [2, Bkp, ps, C, D], with `.at[slot].reshape(-1, D)` servable
    by the TPU interpreter."""

    def __init__(self, buf):
        self.buf, self.shape, self.dtype = buf, buf.shape, buf.dtype

    @property
    def at(self):
        return _Indexer(self.buf)


class _Indexer:
    def __init__(self, buf):
        self.buf = buf

    def __getitem__(self, slot):
        return _KvSlot(self.buf, slot)


def _interpreted_call(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale,
                      sliding_window, soft_cap, num_kv_pages_per_block, num_queries_per_block,
                      vmem_limit_bytes):
    """jax's kernel body in a pallas_call set up as jax.ragged_paged_attention does, under
    the TPU interpreter (see the module docstring)."""
    del vmem_limit_bytes
    jax_rpa.static_validate_inputs(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                                   sm_scale=sm_scale, sliding_window=sliding_window,
                                   soft_cap=soft_cap,
                                   num_kv_pages_per_block=num_kv_pages_per_block,
                                   num_queries_per_block=num_queries_per_block)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_pages.shape
    q_heads_blk, combined_blk = jax_rpa.get_min_heads_per_blk(
        num_q_heads, num_combined, q.dtype, kv_pages.dtype)
    group = num_q_heads // (num_combined // 2)
    bq = min(num_queries_per_block, group)     # interpreter bug, see the module docstring
    q_spec = pl.BlockSpec((bq, q_heads_blk, head_dim), lambda h, b, *_: (b, h, 0))
    lm = pltpu.VMEM((combined_blk // 2, bq * group, 128), jnp.float32)
    scratch = [
        pltpu.VMEM((2, num_kv_pages_per_block, page_size, combined_blk, head_dim),
                   kv_pages.dtype),
        pltpu.SemaphoreType.DMA((2,)),
        lm, lm,
        pltpu.VMEM((bq, q_heads_blk, head_dim), jnp.float32),
    ]
    body = functools.partial(jax_rpa.ragged_paged_attention_kernel, sm_scale=sm_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap,
                             mask_value=jax_rpa.DEFAULT_MASK_VALUE)

    def kernel(*refs):
        *head, kv_bufs, sems, l_ref, m_ref, acc_ref = refs
        body(*head, _KvBufView(kv_bufs), sems, l_ref, m_ref, acc_ref)

    prefetch = (kv_lens, block_tables, cu_q_lens, jnp.zeros((2,), jnp.int32), num_seqs)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec, grid=(num_q_heads // q_heads_blk, pl.cdiv(num_tokens, bq)),
            scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=pltpu.InterpretParams(),
        name="ragged_paged_attention_kernel",
    )(*prefetch, q, kv_pages)
