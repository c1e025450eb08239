"""The reference ragged paged attention equals dense attention on unpaged K/V."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxserve.kernels import ragged_paged_attention
from rpa_batch import dense_oracle, make_batch

MIXES = {
    "decode": [(1, 5), (1, 1), (1, 13), (1, 8)],
    "prefill": [(7, 7), (3, 3), (12, 12)],
    "mixed": [(1, 9), (6, 6), (4, 11), (1, 3), (5, 14)],
}


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("window,cap", [(None, None), (4, None), (None, 5.0), (3, 2.0)])
def test_reference_matches_dense(mix, window, cap):
    batch = make_batch(MIXES[mix], max_seqs=6, num_tokens=40, num_q_heads=6, num_kv_heads=2,
                       seed=hash(mix) % 1000)
    out = ragged_paged_attention(*batch.args, sm_scale=0.3, sliding_window=window,
                                 soft_cap=cap, backend="reference")
    want = dense_oracle(batch, sm_scale=0.3, sliding_window=window, soft_cap=cap)
    n = batch.num_valid_rows
    np.testing.assert_allclose(np.asarray(out[:n]), want, rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(out[n:]) == 0), "padding rows must be zeros"


def test_reference_under_jit_with_dynamic_num_seqs():
    batch = make_batch(MIXES["mixed"], max_seqs=8, num_tokens=32)
    step = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.5))
    out = step(*batch.args)
    want = dense_oracle(batch, sm_scale=0.5)
    np.testing.assert_allclose(np.asarray(out[:batch.num_valid_rows]), want, rtol=2e-5, atol=2e-5)
    # Fewer sequences through the same compiled function: num_seqs is data, not shape.
    fewer = make_batch(MIXES["mixed"][:2], max_seqs=8, num_tokens=32,
                       max_pages_per_seq=batch.block_tables.shape[1],
                       extra_pages=batch.kv_pages.shape[0] - 1 - 5)
    out = step(*fewer.args)
    np.testing.assert_allclose(np.asarray(out[:fewer.num_valid_rows]),
                               dense_oracle(fewer, sm_scale=0.5), rtol=2e-5, atol=2e-5)


def test_reference_bf16_inputs_give_bf16_output():
    batch = make_batch(MIXES["mixed"], dtype=jnp.bfloat16, num_tokens=20)
    out = ragged_paged_attention(*batch.args, sm_scale=0.35, backend="reference")
    assert out.dtype == jnp.bfloat16
    want = dense_oracle(batch, sm_scale=0.35)
    np.testing.assert_allclose(np.asarray(out[:batch.num_valid_rows], np.float32), want,
                               rtol=2e-2, atol=2e-2)
