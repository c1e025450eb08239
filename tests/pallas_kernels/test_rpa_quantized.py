"""8-bit KV cache (pallas_kernels.kv_quant): int8 and fp8 e4m3 pages with a float32 scale per
token and combined head.

* quantize / write_kv against a numpy quantizer written here (the oracle), and write_kv
  changes only the slots it is given;
* every attention backend that reads 8-bit pages (reference, xla, and our TPU and GPU kernels
  interpreted on CPU) equals the dense float64 attention over the dequantized K/V, on shuffled
  pages whose unused slots hold garbage bytes (int8) or NaN (fp8) and NaN scales, with padded
  q rows NaN; real shapes (head_dim 128, pages of 16). A representative case per backend runs
  by default, the sweep is marked slow;
* jax's TPU kernel, which cannot read these pages, is refused by name, and "auto" on a TPU
  picks our kernel instead.
"""

import itertools

import ml_dtypes
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import jaxserve.kernels.backend as backend_mod
from jaxserve.kernels import ragged_paged_attention, resolve_backend, write_kv
from jaxserve.kernels.kv_quant import QuantizedKV, dequantize, init_quantized, quantize
from rpa_batch import dense_oracle, make_batch, quantize_batch

KV_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
BACKENDS = ["reference", "xla", "pallas_tpu", "pallas_gpu"]


def np_quantize(x: np.ndarray, name: str, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy quantizer: symmetric absmax per row -> (values as float64, scale).
    `scale` given: quantize with it (XLA may round amax / qmax one ulp apart from numpy)."""
    x = x.astype(np.float32)
    qmax = 127.0 if name == "int8" else 448.0
    amax = np.abs(x).max(axis=-1)
    if scale is None:
        scale = np.where(amax > 0, amax / np.float32(qmax), 1.0).astype(np.float32)
    y = np.clip(x / scale[..., None], -qmax, qmax)
    y = np.rint(y) if name == "int8" else y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return y.astype(np.float64), scale


@pytest.mark.parametrize("name", sorted(KV_DTYPES))
def test_quantize_matches_numpy_and_bounds_the_error(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8, 128)).astype(np.float32) * rng.lognormal(0, 2, (64, 8, 1))
    x[3, 2] = 0.0                                               # an all-zero row: scale 1, values 0
    q, scale = quantize(jnp.asarray(x), KV_DTYPES[name])
    np.testing.assert_allclose(np.asarray(scale), np_quantize(x, name)[1], rtol=3e-7)
    want_q, _ = np_quantize(x, name, np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), want_q)
    assert float(scale[3, 2]) == 1.0 and not np.asarray(q[3, 2].astype(jnp.float32)).any()
    err = np.abs(np.asarray(dequantize(q, scale)) - x)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    # int8: half a step (amax/254); e4m3: 3 mantissa bits, half an ulp <= 1/16 of the value.
    bound = amax / 254 * 1.0001 if name == "int8" else np.maximum(np.abs(x) / 16, amax / 448 * 2 ** -9)
    assert (err <= bound + 1e-7).all()


@pytest.mark.parametrize("name", sorted(KV_DTYPES))
def test_write_kv_quantizes_into_slots_and_nothing_else(name):
    rng = np.random.default_rng(0)
    num_pages, page_size, hkv, d = 6, 4, 2, 16
    kv = init_quantized((num_pages, page_size, 2 * hkv, d), KV_DTYPES[name])
    real_slots = rng.choice(np.arange(page_size, num_pages * page_size), 7, replace=False)
    slots = np.concatenate([real_slots, [0, 0, 0]]).astype(np.int32)      # 3 padded tokens
    k = rng.standard_normal((10, hkv, d)).astype(np.float32) * 3
    v = rng.standard_normal((10, hkv, d)).astype(np.float32)
    after = jax.jit(write_kv, donate_argnums=0)(kv, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    assert isinstance(after, QuantizedKV) and after.dtype == KV_DTYPES[name]
    pages = np.asarray(after.pages.astype(jnp.float32)).reshape(num_pages * page_size, 2 * hkv, d)
    scales = np.asarray(after.scales).reshape(num_pages * page_size, 2 * hkv)
    for t, slot in enumerate(real_slots):
        for x, col in ((k[t], slice(0, None, 2)), (v[t], slice(1, None, 2))):
            np.testing.assert_allclose(scales[slot, col], np_quantize(x, name)[1], rtol=3e-7)
            np.testing.assert_array_equal(pages[slot, col], np_quantize(x, name, scales[slot, col])[0])
    untouched = np.setdiff1d(np.arange(1, num_pages * page_size), real_slots)
    assert not pages[untouched].any() and (scales[untouched] == 1.0).all()


def _check(backend, name, *, page_size, heads, dtype, seqs, window=None, cap=None, seed=0, **tuning):
    hq, hkv = heads
    max_kv = max(k for _, k in seqs)
    batch = make_batch(seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=128,
                       max_seqs=len(seqs) + 2, num_tokens=sum(q for q, _ in seqs) + 5,
                       max_pages_per_seq=-(-max_kv // page_size) + 1, dtype=dtype, seed=seed)
    batch = quantize_batch(batch, KV_DTYPES[name], seed=seed)
    opts = dict(sm_scale=128 ** -0.5, sliding_window=window, soft_cap=cap)
    got = np.asarray(ragged_paged_attention(*batch.args, backend=backend, **opts, **tuning).astype(jnp.float32))
    n = batch.num_valid_rows
    assert got.shape == batch.q.shape
    assert np.isfinite(got[:n]).all(), "a stray read of a garbage page, NaN scale or padded row leaked"
    assert (got[n:] == 0).all(), "padding rows must be zeros"
    want = dense_oracle(batch, **opts)                   # float64 over the dequantized K/V
    # float32 q: only float32 rounding; bfloat16 q: K and V enter the dots in bfloat16.
    tol = 5e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got[:n], want, rtol=tol, atol=tol)


MIXES = {
    "decode": [(1, 40), (1, 1), (1, 70), (1, 17)],
    "mixed": [(1, 45), (6, 6), (5, 37), (0, 15), (12, 30)],    # chunked prefill, no-new-rows seq
}
# (kv dtype, q dtype, mix, (Hq, Hkv), window, cap): both kv dtypes, both q dtypes, GQA, options
CASES = [("int8", jnp.float32, "mixed", (8, 2), None, None),
         ("fp8", jnp.bfloat16, "decode", (4, 4), 20, 5.0)]
SWEEP = [(n, dt, mix, heads, w, c) for n, dt, mix, heads, (w, c) in itertools.product(
    sorted(KV_DTYPES), [jnp.float32, jnp.bfloat16], sorted(MIXES), [(8, 2), (8, 8)],
    [(None, None), (9, 3.0)])]


def _case_id(case):
    name, dtype, mix, (hq, hkv), window, cap = case
    return f"{name}-q{jnp.dtype(dtype).name}-{mix}-h{hq}x{hkv}-w{window}-c{cap}"


# The interpreted TPU kernel on the int8 case (7 s) is slow: test_kernel_block_sizes_with_quantized_pages
# runs it on int8 pages with float32 q, GQA 8x2 and a mixed batch in make test (with a window, pages of 8).
@pytest.mark.parametrize("backend,case", [
    pytest.param(b, c, id=f"{_case_id(c)}-{b}",
                 marks=[pytest.mark.slow] if (b, c[0]) == ("pallas_tpu", "int8") else [])
    for c in CASES for b in BACKENDS])
def test_backend_equals_dequantized_dense_attention(backend, case):
    name, dtype, mix, heads, window, cap = case
    _check(backend, name, page_size=16, heads=heads, dtype=dtype, seqs=MIXES[mix], window=window,
           cap=cap, seed=len(mix) + heads[0])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SWEEP, ids=_case_id)
def test_backend_sweep(backend, case):
    name, dtype, mix, heads, window, cap = case
    _check(backend, name, page_size=16, heads=heads, dtype=dtype, seqs=MIXES[mix], window=window,
           cap=cap, seed=len(mix) + heads[1])


@pytest.mark.parametrize("backend,tuning", [("xla", dict(num_kv_pages_per_block=1)),
                                            ("pallas_tpu", dict(num_q_per_block=4, num_kv_pages_per_block=2)),
                                            ("pallas_gpu", dict(num_kv_splits=3, num_kv_pages_per_block=1))])
def test_kernel_block_sizes_with_quantized_pages(backend, tuning):
    """Several kv blocks (and, for the GPU kernel, context splits) per sequence, pages of 8."""
    _check(backend, "int8", page_size=8, heads=(8, 2), dtype=jnp.float32,
           seqs=[(1, 61), (9, 40), (1, 5)], window=33, seed=3, **tuning)


def test_jax_tpu_is_refused_by_name_and_auto_picks_ours_on_tpu(monkeypatch):
    batch = quantize_batch(make_batch([(1, 5)], head_dim=128, page_size=16), jnp.int8)
    with pytest.raises(ValueError, match="'jax_tpu' cannot read an 8-bit"):
        ragged_paged_attention(*batch.args, sm_scale=0.1, backend="jax_tpu")
    monkeypatch.setattr(backend_mod.jax, "default_backend", lambda: "tpu")
    assert resolve_backend("auto") == "jax_tpu"
    assert resolve_backend("auto", quantized_kv=True) == "pallas_tpu"
    assert resolve_backend("tpu", quantized_kv=True) == "pallas_tpu"


def test_quantized_pages_without_scales_or_with_wrong_scales_are_refused():
    batch = make_batch([(1, 5)])
    args = list(batch.args)
    args[1] = batch.kv_pages.astype(jnp.int8)
    with pytest.raises(ValueError, match="need their scales"):
        ragged_paged_attention(*args, sm_scale=0.1)
    with pytest.raises(ValueError, match="need their scales"):
        write_kv(args[1], jnp.zeros((2, 2, 8)), jnp.zeros((2, 2, 8)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="scales must be float32"):
        QuantizedKV(args[1], jnp.zeros(args[1].shape[:2], jnp.float32))
    with pytest.raises(ValueError, match="pages must be int8 or float8_e4m3fn"):
        QuantizedKV(batch.kv_pages, jnp.zeros(batch.kv_pages.shape[:3], jnp.float32))
