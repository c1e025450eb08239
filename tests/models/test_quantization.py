import ml_dtypes
import numpy as np
import jax.numpy as jnp
import pytest

from jaxserve.models.quantization import dequantize_numpy, quantize, quantized_einsum


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantize_roundtrip_and_einsum_match_numpy(mode):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 4, 8)).astype(np.float32)  # [d, n, h]
    q, scale = quantize(w, (0,), mode)
    assert q.dtype == (jnp.int8 if mode == "int8" else jnp.float8_e4m3fn)
    assert scale.shape == (1, 4, 8)
    # numpy oracle of the scale and the quantized values
    amax = np.abs(w).max(axis=0, keepdims=True)
    np.testing.assert_allclose(np.asarray(scale), amax / (127.0 if mode == "int8" else 448.0), rtol=1e-6)
    s = amax / (127.0 if mode == "int8" else 448.0)
    if mode == "int8":
        ref_q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
    else:
        ref_q = (w / s).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), ref_q.astype(np.float32))
    wd = dequantize_numpy(np.asarray(q), np.asarray(scale))
    assert np.max(np.abs(wd - w)) <= np.max(amax) * (0.5 / 127 if mode == "int8" else 0.07)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    out = np.asarray(quantized_einsum("td,dnh->tnh", jnp.asarray(x), q, scale))
    np.testing.assert_allclose(out, np.einsum("td,dnh->tnh", x, wd), rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="quantization"):
        quantize(np.ones((2, 2), np.float32), (0,), "int4")
