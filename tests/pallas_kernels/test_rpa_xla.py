"""The xla backend (work follows the real context) equals the dense reference and the
float64 oracle, over dtype x page size x GQA group x window x soft cap x mixes, with shuffled
pages and NaN in every unused page slot, page-table entry and padded q row.

The xla path walks only the kv blocks some query sees, chooses its block sizes from the
shapes, tiles prefill chunks per sequence and vectorises decodes, so the cases also cover:
block tables far longer than any context (the cost must not depend on them; correctness is
checked here, speed in scripts/bench_attention.py), a prefill chunk spanning several q tiles
next to decodes, long windows, tiles that overhang into the next sequence's rows, and
explicit block sizes of one page.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxserve.kernels import ragged_paged_attention
from jaxserve.kernels.attention_xla import default_block_sizes
from rpa_batch import dense_oracle, make_batch

MIXES = {
    "decode": [(1, 7), (1, 1), (1, 40), (1, 9), (1, 33)],
    "prefill": [(9, 9), (3, 3), (37, 37)],
    "mixed": [(1, 13), (6, 6), (21, 45), (1, 2), (7, 10), (1, 70)],
    "with_empty": [(2, 6), (0, 5), (4, 4), (1, 11)],
    "chunked": [(1, 50), (33, 80), (1, 3)],      # a chunk at the end of a long context
}


def _check(batch, dtype, reference: bool = True, **opts):
    """reference=False: float32 only, against the float64 oracle alone (the dense reference
    gathers every block-table entry for every row: 8192 keys x 48 rows at 8B shapes took 14.7 s
    in make test's -O0 programs, the oracle 0.13 s)."""
    assert reference or dtype == jnp.float32
    tol = 2e-5 if dtype == jnp.float32 else 1.6e-2
    n = batch.num_valid_rows
    got = np.asarray(ragged_paged_attention(*batch.args, backend="xla", **opts).astype(jnp.float32))
    assert np.isfinite(got[:n]).all(), "a stray read of a NaN page or row leaked"
    assert (got[n:] == 0).all(), "padding rows must be zeros"
    tuning = {k: v for k, v in opts.items() if k.startswith("num_")}
    base = {k: v for k, v in opts.items() if k not in tuning}
    if reference:
        want = np.asarray(ragged_paged_attention(*batch.args, backend="reference", **base)
                          .astype(jnp.float32))
        np.testing.assert_allclose(got[:n], want[:n], rtol=tol, atol=tol)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got[:n], dense_oracle(batch, **base), rtol=5e-5, atol=5e-5)


SHAPES = [  # page_size, (q heads, kv heads), window, soft cap
    (4, (4, 4), None, None),
    (8, (8, 2), 5, None),
    (16, (6, 2), None, 3.0),
    (4, (8, 1), 20, 2.0),
]
DTYPES = [(jnp.float32, "f32"), (jnp.bfloat16, "bf16")]


def _sweep():
    """The full product mix x dtype x shape (40 cases, ~1.3 s each); `make test` runs the quarter
    where the indices' sum is a multiple of 4 (every mix with both dtypes, one shape each; every
    shape with both dtypes), the other 30 are `slow`."""
    for i, mix in enumerate(sorted(MIXES)):
        for j, (dtype, name) in enumerate(DTYPES):
            for k, (page_size, heads, window, cap) in enumerate(SHAPES):
                marks = [pytest.mark.slow] if (i + j + k) % 4 else []
                yield pytest.param(mix, dtype, page_size, heads, window, cap, marks=marks,
                                   id=f"{page_size}-heads{k}-{window}-{cap}-{name}-{mix}")


@pytest.mark.parametrize("mix,dtype,page_size,heads,window,cap", list(_sweep()))
def test_xla_matches_reference(mix, dtype, page_size, heads, window, cap):
    seqs = MIXES[mix]
    hq, hkv = heads
    batch = make_batch(seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=16,
                       max_seqs=len(seqs) + 2, num_tokens=sum(q for q, _ in seqs) + 5,
                       dtype=dtype, seed=page_size * 7 + hq + len(mix))
    _check(batch, dtype, sm_scale=0.25, sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("tuning", [dict(num_kv_pages_per_block=1), dict(num_q_per_block=4),
                                    dict(num_kv_pages_per_block=3, num_q_per_block=16)])
def test_xla_explicit_block_sizes(tuning):
    batch = make_batch(MIXES["mixed"], page_size=4, num_q_heads=8, num_kv_heads=2, head_dim=16,
                       max_seqs=8, num_tokens=48, seed=5)
    _check(batch, jnp.float32, sm_scale=0.3, sliding_window=9, **tuning)


# make test runs float32 with a window; the other three (21 s for bfloat16 without a window) are
# marked slow. float32 is checked against the float64 oracle, bfloat16 against the dense reference
# (the reference itself equals the oracle in test_rpa_reference). Both dtypes and both kinds of
# window run in make test at small shapes too (test_xla_matches_reference), against both.
@pytest.mark.parametrize(("dtype", "window"), [
    pytest.param(jnp.float32, None, id="None-f32", marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, None, id="None-bf16", marks=pytest.mark.slow),
    pytest.param(jnp.float32, 64, id="64-f32"),
    pytest.param(jnp.bfloat16, 64, id="64-bf16", marks=pytest.mark.slow),
])
def test_xla_at_8b_shapes_with_long_block_tables(dtype, window):
    """32 q / 8 kv heads, head_dim 128, pages of 16; block tables of 512 pages (8192 keys)
    for contexts of at most 300: every entry past a context is the NaN null page."""
    seqs = [(1, 300), (1, 17), (40, 240), (1, 129), (1, 1)]
    batch = make_batch(seqs, page_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128,
                       max_seqs=8, num_tokens=48, max_pages_per_seq=512, dtype=dtype, seed=11)
    # float32 against the float64 oracle, bfloat16 against the dense reference
    _check(batch, dtype, reference=dtype == jnp.bfloat16, sm_scale=128 ** -0.5, sliding_window=window)


def test_xla_is_jittable_and_handles_no_sequences():
    batch = make_batch(MIXES["mixed"], max_seqs=8, num_tokens=48)
    args = list(batch.args)
    args[5] = jnp.zeros((1,), jnp.int32)
    out = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.3, backend="xla"))(*args)
    assert (np.asarray(out) == 0).all()


def test_default_block_sizes_follow_bytes_not_limits():
    # ~2 MiB per decode iteration: 64 sequences x 2*4*32 float32 values per key -> 2 pages of 16.
    assert default_block_sizes(64, 64, 16, 2048, kv_row_bytes=2 * 4 * 32 * 4) == (2, 8, 32)
    # The block table's length (max_model_len) only caps them.
    assert default_block_sizes(64, 64, 16, 1, kv_row_bytes=1024) == (1, 1, 32)
    # At most DECODE_BLOCK_MAX_KEYS (64) keys, however few bytes a key holds.
    assert default_block_sizes(1, 256, 16, 2048, kv_row_bytes=1024)[0] == 4
    assert default_block_sizes(16, 16, 16, 32, kv_row_bytes=256)[0] == 4
    assert default_block_sizes(16, 16, 8, 64, kv_row_bytes=256)[0] == 8
