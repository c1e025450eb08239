"""Weight quantization primitives (issue 15, weight half): per-output-channel symmetric int8 / fp8 e4m3.

Only the primitives exist so far (quantize, dequantize, a quantized einsum that dequantizes then matmuls);
they are not yet hooked into models/decoder.py, the loader or EngineConfig.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_QMAX = {"int8": 127.0, "fp8": 448.0}  # float8_e4m3fn's largest finite value is 448
_QDTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def quantize(w, contract_axes: tuple[int, ...], mode: str):
    """Symmetric per-output-channel quantization of a weight.

    w: float array, e.g. q_proj [d, n, h]; contract_axes: the axes the matmul sums over (e.g. (0,) for "td,dnh").
    Returns (q, scale): q has w's shape in int8 / float8_e4m3fn; scale is float32 with w's shape and size 1 on
    contract_axes (keepdims), so that w ~= q.astype(float32) * scale.
    """
    if mode not in _QMAX:
        raise ValueError(f"quantization must be one of {sorted(_QMAX)}, got {mode!r}")
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / _QMAX[mode], 1.0).astype(jnp.float32)
    scaled = w32 / scale
    if mode == "int8":
        q = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)
    else:
        q = jnp.clip(scaled, -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return q, scale


def dequantize(q, scale, dtype=jnp.float32):
    """q * scale in float32, cast to dtype."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def quantized_einsum(eq: str, x, q, scale):
    """einsum(eq, x, dequantize(q, scale)) computed in float32 and cast back to x.dtype (dequantize-then-matmul)."""
    w = dequantize(q, scale, jnp.float32)
    return jnp.einsum(eq, x.astype(jnp.float32), w).astype(x.dtype)


def dequantize_numpy(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Independent numpy reference: q * scale in float32."""
    return np.asarray(q).astype(np.float32) * np.asarray(scale, np.float32)
