"""Both TPU backends (jax_tpu: jax's kernel; pallas_tpu: ours), interpreted on CPU, equal the
dense reference at head_dim 128.

Pages are shuffled; unused pages, page tails and padded q rows are NaN, so any stray read
poisons the output; num_seqs < max_seqs throughout. By default a representative subset
runs (f32 and bf16, page sizes 16/32, GQA groups 1/2/4/8, sliding window, soft cap,
decode/prefill/mixed, a sequence with no new rows). The repo has no slow marker, so the
larger sweep runs only with RPA_TPU_SWEEP=1 in the environment.
"""

import itertools
import os

import numpy as np
import jax.numpy as jnp
import pytest

from jaxserve.kernels import ragged_paged_attention
from jaxserve.kernels.attention_tpu import (check_smem_fit, max_tiles, q_tiles,
                                          smem_bytes_needed)
from rpa_batch import assert_backend_matches_reference, make_batch

BACKENDS = ["jax_tpu", "pallas_tpu"]
MIXES = {
    "decode": [(1, 40), (1, 1), (1, 70), (1, 17), (1, 33)],
    "prefill": [(9, 9), (3, 3), (20, 20)],
    "mixed": [(1, 45), (6, 6), (5, 37), (1, 2), (12, 30)],        # incl. chunked prefill
    "with_empty": [(2, 26), (0, 15), (4, 4), (1, 51)],            # a sequence with no new rows
}

# (page_size, (num_q_heads, num_kv_heads), dtype, mix, sliding_window, soft_cap, tuning)
CASES = [
    (16, (8, 2), jnp.bfloat16, "with_empty", None, None, {}),
    (16, (4, 2), jnp.float32, "decode", 20, 2.0, dict(num_kv_pages_per_block=1)),
    (32, (4, 4), jnp.float32, "prefill", None, 5.0, dict(num_q_per_block=4,
                                                        num_kv_pages_per_block=2)),
    (16, (8, 1), jnp.bfloat16, "mixed", 9, None, dict(num_q_per_block=8)),
]
SWEEP = [
    (ps, heads, dtype, mix, window, cap, {})
    for ps, heads, dtype, mix, (window, cap) in itertools.product(
        [16, 64], [(4, 4), (8, 2), (16, 2)], [jnp.float32, jnp.bfloat16], list(MIXES),
        [(None, None), (7, 3.0)])
]


def _case_id(case):
    ps, (hq, hkv), dtype, mix, window, cap, tuning = case
    return (f"ps{ps}-h{hq}x{hkv}-{jnp.dtype(dtype).name}-{mix}-w{window}-c{cap}-"
            + "-".join(f"{k[4:9]}{v}" for k, v in tuning.items()))


def _check(backend, case):
    page_size, (hq, hkv), dtype, mix, window, cap, tuning = case
    seqs = MIXES[mix]
    max_kv = max(k for _, k in seqs)
    batch = make_batch(seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv,
                       head_dim=128, max_seqs=len(seqs) + 2,
                       num_tokens=sum(q for q, _ in seqs) + 5,
                       max_pages_per_seq=-(-max_kv // page_size) + 1, dtype=dtype,
                       seed=page_size + hq)
    opts = dict(sm_scale=0.088, sliding_window=window, soft_cap=cap)
    assert_backend_matches_reference(batch, backend, **opts, **tuning)


# Each backend runs two of the four cases by default (between them all four, and every option);
# the other two are marked slow (`make test-all`): the interpreted kernels take 4-10 s a case.
_SLOW = {"jax_tpu": {1, 3}, "pallas_tpu": {0, 2}}
PARAMS = [pytest.param(backend, case, id=f"{_case_id(case)}-{backend}",
                       marks=[pytest.mark.slow] if i in _SLOW[backend] else [])
          for i, case in enumerate(CASES) for backend in BACKENDS]


@pytest.mark.parametrize(("backend", "case"), PARAMS)
def test_tpu_backend_matches_reference(backend, case):
    _check(backend, case)


@pytest.mark.skipif(os.environ.get("RPA_TPU_SWEEP") != "1", reason="set RPA_TPU_SWEEP=1")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SWEEP, ids=_case_id)
def test_tpu_backend_sweep(backend, case):
    _check(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_sequences_gives_zeros(backend):
    batch = make_batch(MIXES["mixed"], page_size=16, num_q_heads=4, num_kv_heads=2,
                       head_dim=128, max_seqs=6, num_tokens=28)
    args = list(batch.args)
    args[5] = jnp.zeros((1,), jnp.int32)
    out = ragged_paged_attention(*args, sm_scale=0.3, backend=backend)
    assert (np.asarray(out) == 0).all()


@pytest.mark.parametrize("head_dim,dtype,match", [(64, jnp.float32, "head_dim % 128"),
                                                  (128, jnp.float16, "float32 or bfloat16")])
def test_jax_tpu_refuses_unsupported_shapes(head_dim, dtype, match):
    batch = make_batch([(1, 5)], head_dim=head_dim, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*batch.args, sm_scale=0.1, backend="jax_tpu")


def test_q_tiles_hold_one_sequence_each():
    # q lens 3, 0, 9, 1 (+ a padding sequence) with tiles of up to 4 rows.
    cu = jnp.array([0, 3, 3, 12, 13, 13], jnp.int32)
    num_tiles = max_tiles(16, 5, 4)
    seq, start, length, count = q_tiles(cu, jnp.array([4], jnp.int32), num_tiles, 4)
    assert int(count[0]) == 5 and num_tiles >= 5
    assert list(np.asarray(seq[:5])) == [0, 2, 2, 2, 3]
    assert list(np.asarray(start[:5])) == [0, 3, 7, 11, 12]
    assert list(np.asarray(length)) == [3, 4, 4, 1, 1] + [0] * (num_tiles - 5)


def test_smem_fit_numbers():
    # jax_tpu holds the whole [S, max_pages] table: 256 x 2048 int32 = 2 MiB > 1 MiB.
    assert smem_bytes_needed("jax_tpu", 256, 2048) == 4 * (256 + 256 * 2048 + 257 + 3)
    with pytest.raises(ValueError, match=r"needs 2099216 bytes .* lower max_model_len or "
                                         r"max_num_seqs"):
        check_smem_fit("jax_tpu", 256, 131072, 64)
    check_smem_fit("pallas_tpu", 256, 131072, 64, max_num_tokens=2048)   # 2 rows only
    check_smem_fit("jax_tpu", 256, 32768, 64)                             # 512 KiB table
