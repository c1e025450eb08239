"""The xla path and our TPU (Mosaic, interpreted) and GPU (Triton, interpreted) kernels equal
the reference (jax_tpu, at the head_dim 128 it needs: test_rpa_tpu.py).

Pages are shuffled; unused pages, page tails and padded q rows are NaN, so any stray
read poisons the output. num_seqs < max_seqs throughout. The sweep is pairwise rather
than a full product (page size x head grouping x dtype x mix x options) to keep the
interpreted kernels within the CPU test budget.
"""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxserve.kernels import ragged_paged_attention
from rpa_batch import assert_backend_matches_reference, make_batch

MIXES = {
    "decode": [(1, 7), (1, 1), (1, 18), (1, 9), (1, 4)],
    "prefill": [(9, 9), (3, 3), (14, 14)],
    "mixed": [(1, 13), (6, 6), (5, 17), (1, 2), (7, 10)],      # incl. chunked prefill
    "with_empty": [(2, 6), (0, 5), (4, 4), (1, 11)],           # a sequence with no new rows
}

# (page_size, (num_q_heads, num_kv_heads), dtype, mix, sliding_window, soft_cap, tuning)
CASES = [
    (4, (4, 4), jnp.float32, "decode", None, None, {}),
    (8, (8, 2), jnp.float32, "prefill", None, None, dict(num_q_per_block=8)),
    (4, (6, 2), jnp.float32, "mixed", 5, None, dict(num_q_per_block=4)),
    (8, (4, 1), jnp.float32, "with_empty", None, 3.0, {}),
    (4, (8, 2), jnp.float32, "mixed", 4, 2.0, dict(num_kv_pages_per_block=1)),
    (4, (4, 2), jnp.bfloat16, "decode", 3, None, {}),
    (8, (6, 2), jnp.bfloat16, "mixed", None, None, dict(num_q_per_block=8)),
    (4, (4, 4), jnp.bfloat16, "prefill", None, 5.0, dict(num_kv_pages_per_block=3)),
]


def _case_id(case):
    ps, (hq, hkv), dtype, mix, window, cap, tuning = case
    return (f"ps{ps}-h{hq}x{hkv}-{jnp.dtype(dtype).name}-{mix}-w{window}-c{cap}-"
            + "-".join(f"{k[4:9]}{v}" for k, v in tuning.items()))


# The interpreted TPU kernel takes ~5 s a case on 2 cores: two cases run by default (empty sequences
# with a soft cap; a window + soft cap + one kv page per block), the other six are marked slow
# (`make test-all`). test_rpa_tpu.py runs it by default at head_dim 128 on bf16 with q blocks and a
# window and on a decode with a window, test_rpa_quantized.py on 8-bit pages.
_TPU_SLOW = {0, 1, 2, 5, 6, 7}
PARAMS = [pytest.param(backend, case, id=f"{_case_id(case)}-{backend}",
                       marks=[pytest.mark.slow] if backend == "pallas_tpu" and i in _TPU_SLOW else [])
          for i, case in enumerate(CASES) for backend in ("xla", "pallas_tpu", "pallas_gpu")]


@pytest.mark.parametrize(("backend", "case"), PARAMS)
def test_kernel_matches_reference(backend, case):
    page_size, (hq, hkv), dtype, mix, window, cap, tuning = case
    seqs = MIXES[mix]
    batch = make_batch(seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv,
                       head_dim=16, max_seqs=len(seqs) + 2, num_tokens=sum(q for q, _ in seqs) + 5,
                       max_pages_per_seq=6, dtype=dtype, seed=page_size * 7 + hq)
    opts = dict(sm_scale=0.25, sliding_window=window, soft_cap=cap)
    assert_backend_matches_reference(batch, backend, **opts, **tuning)


# The TPU kernel's case is slow: test_rpa_tpu.py::test_no_sequences_gives_zeros runs it (5 s) in make test.
@pytest.mark.parametrize("backend", ["xla", pytest.param("pallas_tpu", marks=pytest.mark.slow), "pallas_gpu"])
def test_kernel_with_no_sequences_returns_zeros(backend):
    batch = make_batch(MIXES["mixed"], max_seqs=6, num_tokens=24)
    args = list(batch.args)
    args[5] = jnp.zeros((1,), jnp.int32)
    out = ragged_paged_attention(*args, sm_scale=0.3, backend=backend)
    assert (np.asarray(out) == 0).all()
