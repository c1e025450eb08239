"""The GPU kernel (pallas_kernels/attention_gpu.py): its work list, its defaults, equality
with the dense reference in interpret mode, and lowering for CUDA through jax.export.

Batches come from rpa_batch.make_batch: shuffled pages, NaN in unused pages, page tails,
padding sequences' tables and padded q rows, num_seqs < max_seqs. The correctness sweep is
pairwise (page size x group x dtype x mix x options), not a full product, to stay within
the CPU budget of the interpreted kernel. Compiling the exported Triton IR needs a GPU; here
the Triton module each pallas_call lowers to is checked by the MLIR verifier.
"""

from unittest import mock

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import lowering as triton_lowering

import jaxserve.kernels.attention_gpu as gpu
from jaxserve.kernels import ragged_paged_attention
from rpa_batch import assert_backend_matches_reference, make_batch

TRITON_CALL = "__gpu$xla.gpu.triton"    # custom call target of a Pallas Triton kernel

MIXES = {
    "decode": [(1, 7), (1, 1), (1, 18), (1, 9), (1, 4)],
    "prefill": [(9, 9), (3, 3), (14, 14)],
    "mixed": [(1, 13), (6, 6), (5, 17), (1, 2), (7, 10)],       # incl. chunked prefill
    "with_empty": [(2, 6), (0, 5), (4, 4), (1, 11)],            # a sequence with no new rows
    "long_decode": [(1, 150), (1, 37), (1, 201), (1, 96)],      # several kv blocks per split
}

# (page_size, (num_q_heads, num_kv_heads), dtype, mix, sliding_window, soft_cap, tuning)
CASES = [
    (4, (4, 4), jnp.float32, "decode", None, None, {}),
    (8, (8, 2), jnp.float32, "prefill", None, None, dict(num_q_per_block=4)),
    (16, (8, 1), jnp.float32, "mixed", 5, None, {}),
    (8, (4, 1), jnp.bfloat16, "with_empty", None, 3.0, {}),
    (4, (16, 2), jnp.bfloat16, "mixed", 4, 2.0, dict(num_kv_splits=3)),
    (16, (6, 2), jnp.float32, "long_decode", 40, None,
     dict(num_kv_splits=4, num_kv_pages_per_block=2)),
    (8, (8, 2), jnp.bfloat16, "long_decode", None, None,
     dict(num_kv_splits=2, num_kv_pages_per_block=1)),
    (4, (4, 4), jnp.float32, "with_empty", 3, None, dict(num_kv_splits=5, num_q_per_block=2)),
    (128, (8, 2), jnp.bfloat16, "long_decode", 64, 5.0, dict(num_kv_splits=2)),
]


def _case_id(case):
    ps, (hq, hkv), dtype, mix, window, cap, tuning = case
    return (f"ps{ps}-h{hq}x{hkv}-{jnp.dtype(dtype).name}-{mix}-w{window}-c{cap}-"
            + "-".join(f"{k[4:10]}{v}" for k, v in tuning.items()))


def _check_against_reference(batch, dtype, **opts_and_tuning):
    assert_backend_matches_reference(batch, "pallas_gpu", **opts_and_tuning)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case):
    page_size, (hq, hkv), dtype, mix, window, cap, tuning = case
    seqs = MIXES[mix]
    max_pages = max(6, -(-max(k for _, k in seqs) // page_size) + 1)
    batch = make_batch(seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv,
                       head_dim=16, max_seqs=len(seqs) + 2,
                       num_tokens=sum(q for q, _ in seqs) + 5, max_pages_per_seq=max_pages,
                       dtype=dtype, seed=page_size * 7 + hq)
    _check_against_reference(batch, dtype, sm_scale=0.25, sliding_window=window,
                             soft_cap=cap, **tuning)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_llama3_8b_heads_with_default_splits(dtype):
    """32 q / 8 kv heads, head_dim 128, page 16; a 1024-key table gives 2 default splits."""
    seqs = [(1, 700), (9, 40), (1, 1000), (0, 9), (1, 17)]
    max_pages = 64
    bq = gpu.default_block_q(16, 6, 4)
    assert gpu.default_num_kv_splits(max_pages * 16, gpu.num_tiles_bound(16, 6, bq), 8) == 2
    batch = make_batch(seqs, page_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128,
                       max_seqs=6, num_tokens=16, max_pages_per_seq=max_pages, dtype=dtype,
                       seed=3)
    _check_against_reference(batch, dtype, sm_scale=128 ** -0.5, sliding_window=None,
                             soft_cap=None)


def test_no_sequences_returns_zeros():
    batch = make_batch(MIXES["mixed"], max_seqs=6, num_tokens=24)
    args = list(batch.args)
    args[5] = jnp.zeros((1,), jnp.int32)
    out = ragged_paged_attention(*args, sm_scale=0.3, backend="pallas_gpu", num_kv_splits=2)
    assert (np.asarray(out) == 0).all()


def test_work_list_never_mixes_sequences():
    # q_lens 5, 0, 1, 9 (then two padding sequences); Bq = 4; bound = min(15, (15+6*3)//4) = 8.
    cu = jnp.array([0, 5, 5, 6, 15, 15, 15], jnp.int32)
    assert gpu.num_tiles_bound(15, 6, 4) == 8
    seq, start, rows, first = gpu.tile_work_list(cu, jnp.array([4], jnp.int32), 8, 4)
    assert seq.tolist()[:6] == [0, 0, 2, 3, 3, 3]
    assert start.tolist()[:6] == [0, 4, 5, 6, 10, 14]
    assert rows.tolist() == [4, 1, 1, 4, 4, 1, 0, 0]
    assert first.tolist()[:4] == [0, 2, 2, 3]


def test_defaults():
    # Decode buckets get 16-row tiles (one tile per decode), others 64 rows.
    assert gpu.default_block_q(64, 64, 4) == 4
    assert gpu.default_block_q(512, 64, 4) == 16
    assert gpu.default_block_q(8, 8, 16) == 1
    # Splits: >= 512 keys each, at most 16, fewer once the grid has ~2048 programs.
    assert gpu.default_num_kv_splits(8192, 8, 8) == 16
    assert gpu.default_num_kv_splits(8192, 64, 8) == 4
    assert gpu.default_num_kv_splits(8192, 256, 8) == 1
    assert gpu.default_num_kv_splits(512, 1, 8) == 1
    assert gpu.default_pages_per_block(16, 512, 16) == 8
    assert gpu.default_pages_per_block(128, 64, 64) == 1


# --- Lowering for CUDA (jax.export), at Llama-3-8B shapes -------------------------------

EXPORT_STEPS = {
    # name: (seqs, num_tokens, max_seqs)
    "decode": ([(1, 8000), (1, 40), (1, 3000), (1, 512), (1, 1), (1, 77), (1, 4096), (1, 9)],
               8, 8),
    "mixed": ([(1, 8000), (100, 300), (1, 40), (20, 20), (1, 2048)], 128, 8),
}


def _export(step, page_size, dtype, **opts):
    """Export the kernel for CUDA; returns (StableHLO text, [(verified, grid)] per kernel)."""
    seqs, num_tokens, max_seqs = EXPORT_STEPS[step]
    shapes = dict(q=((num_tokens, 32, 128), dtype),
                  kv_pages=((1 + sum(-(-k // page_size) for _, k in seqs), page_size, 16, 128),
                            dtype),
                  kv_lens=((max_seqs,), jnp.int32),
                  block_tables=((max_seqs, 8192 // page_size), jnp.int32),
                  cu_q_lens=((max_seqs + 1,), jnp.int32), num_seqs=((1,), jnp.int32))
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes.values()]
    kernels = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def verified(*a, **k):
        result = original(*a, **k)
        kernels.append((result.module.operation.verify(), tuple(result.grid)))
        return result

    with mock.patch.object(gpu, "interpret_mode", lambda _: False), \
            mock.patch.object(triton_lowering, "lower_jaxpr_to_triton_module", verified):
        fn = jax.jit(lambda *a: gpu.ragged_paged_attention_gpu(*a, sm_scale=0.088, **opts))
        exported = jax.export.export(
            fn, platforms=("cuda",),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    return exported.mlir_module(), kernels


@pytest.mark.parametrize("window", [None, 1024])
@pytest.mark.parametrize("step", ["decode", "mixed"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("page_size", [16, 128])
def test_lowers_for_cuda(page_size, dtype, step, window):
    text, kernels = _export(step, page_size, dtype, sliding_window=window,
                            soft_cap=None if window else 30.0)
    assert f"custom_call @{TRITON_CALL}" in text.replace('"', "")
    assert [ok for ok, _ in kernels] == [True], "the Triton module must verify"


def test_decode_grid_spreads_over_context_splits():
    """8 decodes of an 8192-key table: 8 tiles x 8 kv heads x 16 splits = 1024 programs."""
    _, kernels = _export("decode", 16, jnp.bfloat16)
    assert kernels == [(True, (8, 8, 16))]
