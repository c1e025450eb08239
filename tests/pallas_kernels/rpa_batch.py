"""Test batches for ragged paged attention, and an independent dense oracle.

A batch is built from per-sequence (q_len, kv_len) pairs. K/V are drawn unpaged, then
scattered into shuffled pages; every page slot not holding real context, every unused
block-table page and every padded q row is NaN, so a stray read poisons the result.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax.numpy as jnp


@dataclasses.dataclass
class Batch:
    q: jnp.ndarray              # [T, Hq, D]
    kv_pages: jnp.ndarray       # [P, page_size, 2*Hkv, D]
    kv_lens: jnp.ndarray        # int32 [S]
    block_tables: jnp.ndarray   # int32 [S, max_pages_per_seq]
    cu_q_lens: jnp.ndarray      # int32 [S + 1]
    num_seqs: jnp.ndarray       # int32 [1]
    k_seqs: list[np.ndarray]    # per real sequence: [kv_len, Hkv, D] float64
    v_seqs: list[np.ndarray]
    q_lens: list[int]
    num_valid_rows: int

    @property
    def args(self):
        return (self.q, self.kv_pages, self.kv_lens, self.block_tables, self.cu_q_lens,
                self.num_seqs)


def make_batch(seqs, *, page_size=4, num_q_heads=4, num_kv_heads=2, head_dim=8,
               max_seqs=None, num_tokens=None, max_pages_per_seq=None, extra_pages=3,
               dtype=jnp.float32, seed=0) -> Batch:
    """seqs: list of (q_len, kv_len) with q_len <= kv_len."""
    rng = np.random.default_rng(seed)
    max_seqs = max_seqs or len(seqs)
    q_lens = [q for q, _ in seqs]
    kv_lens = [k for _, k in seqs]
    pages_needed = [-(-k // page_size) for k in kv_lens]
    max_pages_per_seq = max_pages_per_seq or max(pages_needed + [1])
    num_pages = 1 + sum(pages_needed) + extra_pages
    num_tokens = num_tokens or sum(q_lens)
    assert num_tokens >= sum(q_lens) and max_seqs >= len(seqs)

    page_ids = rng.permutation(np.arange(1, num_pages))     # shuffled, page 0 reserved
    pages = np.full((num_pages, page_size, 2 * num_kv_heads, head_dim), np.nan, np.float64)
    block_tables = np.zeros((max_seqs, max_pages_per_seq), np.int32)
    k_seqs, v_seqs, next_page = [], [], 0
    for i, kv_len in enumerate(kv_lens):
        k = rng.standard_normal((kv_len, num_kv_heads, head_dim))
        v = rng.standard_normal((kv_len, num_kv_heads, head_dim))
        k, v = _round(k, dtype), _round(v, dtype)
        k_seqs.append(k)
        v_seqs.append(v)
        own = page_ids[next_page:next_page + pages_needed[i]]
        next_page += pages_needed[i]
        block_tables[i, :len(own)] = own
        for pos in range(kv_len):
            page, off = own[pos // page_size], pos % page_size
            pages[page, off, 0::2] = k[pos]
            pages[page, off, 1::2] = v[pos]
    # Padding sequences get garbage lengths and tables; they must never be looked at.
    block_tables[len(seqs):] = rng.integers(0, num_pages, block_tables[len(seqs):].shape)
    kv_lens_arr = np.array(kv_lens + [17] * (max_seqs - len(seqs)), np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu = np.concatenate([cu, np.full(max_seqs - len(seqs), cu[-1], np.int32)])
    q = np.full((num_tokens, num_q_heads, head_dim), np.nan)
    q[:cu[len(seqs)]] = rng.standard_normal((int(cu[len(seqs)]), num_q_heads, head_dim))
    return Batch(q=jnp.asarray(q, dtype), kv_pages=jnp.asarray(pages, dtype),
                 kv_lens=jnp.asarray(kv_lens_arr), block_tables=jnp.asarray(block_tables),
                 cu_q_lens=jnp.asarray(cu), num_seqs=jnp.array([len(seqs)], jnp.int32),
                 k_seqs=k_seqs, v_seqs=v_seqs, q_lens=q_lens, num_valid_rows=int(cu[len(seqs)]))


def _round(x: np.ndarray, dtype) -> np.ndarray:
    """Round through `dtype` so the oracle sees exactly what the pages hold."""
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def dense_oracle(batch: Batch, *, sm_scale, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Per-sequence dense causal attention on unpaged K/V in float64 -> [valid rows, Hq, D]."""
    q_all = np.asarray(batch.q.astype(jnp.float32), np.float64)
    num_q_heads = q_all.shape[1]
    outs, row = [], 0
    for k, v, q_len in zip(batch.k_seqs, batch.v_seqs, batch.q_lens):
        kv_len, num_kv_heads, _ = k.shape
        group = num_q_heads // num_kv_heads
        q = q_all[row:row + q_len]
        row += q_len
        kh = np.repeat(k, group, axis=1)                      # [L, Hq, D]
        vh = np.repeat(v, group, axis=1)
        logits = np.einsum("qhd,lhd->hql", q, kh) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * np.tanh(logits / soft_cap)
        qpos = np.arange(kv_len - q_len, kv_len)[:, None]
        kpos = np.arange(kv_len)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        logits = np.where(mask[None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        outs.append(np.einsum("hql,lhd->qhd", probs, vh))
    return np.concatenate(outs) if outs else np.zeros((0,) + q_all.shape[1:])


def assert_backend_matches_reference(batch: Batch, backend: str, *, sm_scale, sliding_window=None,
                                     soft_cap=None, **tuning) -> None:
    """`backend` equals the dense reference on the real rows (no NaN leaked), padding rows zeros."""
    from jaxserve.kernels import ragged_paged_attention

    opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    want = ragged_paged_attention(*batch.args, backend="reference", **opts)
    got = ragged_paged_attention(*batch.args, backend=backend, **opts, **tuning)
    assert got.shape == batch.q.shape and got.dtype == batch.q.dtype
    n = batch.num_valid_rows
    got32 = np.asarray(got.astype(jnp.float32))
    want32 = np.asarray(want.astype(jnp.float32))
    assert np.isfinite(got32[:n]).all(), "a stray read of a NaN page or row leaked"
    tol = 2e-5 if batch.q.dtype == jnp.float32 else 1.6e-2
    np.testing.assert_allclose(got32[:n], want32[:n], rtol=tol, atol=tol)
    assert (got32[n:] == 0).all(), "padding rows must be zeros"


def quantize_batch(batch: Batch, kv_dtype, seed: int = 0) -> Batch:
    """`batch` with its K/V quantized to 8-bit pages (pallas_kernels.kv_quant.QuantizedKV), one
    scale per token and combined head, and k_seqs / v_seqs replaced by the dequantized values,
    so dense_oracle is the dequantized dense reference. Every slot not holding real context
    gets NaN scales and garbage pages (random bytes for int8, NaN for fp8)."""
    from jaxserve.kernels.kv_quant import QuantizedKV, quantize

    rng = np.random.default_rng(seed)
    pages = np.asarray(batch.kv_pages.astype(jnp.float32))            # [P, ps, 2Hkv, D], NaN unused
    real = ~np.isnan(pages).any(axis=-1)                               # [P, ps, 2Hkv]
    q, scales = quantize(jnp.asarray(np.where(real[..., None], pages, 0.0)), kv_dtype)
    q, scales = np.asarray(q), np.asarray(scales)
    if jnp.dtype(kv_dtype) == jnp.int8:
        garbage = rng.integers(-128, 128, q.shape).astype(np.int8)
    else:
        garbage = np.full(q.shape, np.nan, np.float32).astype(q.dtype)
    q = np.where(real[..., None], q, garbage)
    scales = np.where(real, scales, np.nan).astype(np.float32)

    def dequant(x):                       # [L, Hkv, D] float -> the values the pages hold
        xq, s = quantize(jnp.asarray(x, jnp.float32), kv_dtype)
        return np.asarray(xq.astype(jnp.float32), np.float64) * np.asarray(s, np.float64)[..., None]

    return dataclasses.replace(batch, kv_pages=QuantizedKV(jnp.asarray(q), jnp.asarray(scales)),
                               k_seqs=[dequant(k) for k in batch.k_seqs],
                               v_seqs=[dequant(v) for v in batch.v_seqs])
