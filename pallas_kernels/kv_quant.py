"""8-bit KV cache: int8 or fp8 (e4m3) pages with one float32 scale per token and kv head.

A quantized cache is a `QuantizedKV`: the 8-bit pages, laid out exactly like float pages
([..., P, page_size, 2*Hkv, D], K of kv head h at 2h, V at 2h+1), and their scales
[..., P, page_size, 2*Hkv] float32, the pages without their last axis. Both are device
arrays of one pytree, so the cache goes in and out of the jitted step (and is donated) as
one value, and `QuantizedKV.shape` / `.dtype` answer as the pages do.

Scale granularity: per token and combined head (one scale for each K row and each V row
of D values), symmetric, scale = max|x| / QMAX (127 for int8, 448 for e4m3), so
x ~= q * scale. Why per token-head rather than per page-head:
  * KV is written a token at a time (decode appends one row per sequence per step). A row's
    scale depends on that row only, so `write_kv` quantizes and scatters exactly the new rows,
    as for float pages. A page-head scale is known only once the page is full: a growing
    page would be requantized (read-modify-write of the whole page, each step, with
    rounding error compounding) or would need a scale fixed before its tokens exist
    (vLLM's static per-tensor k_scale / v_scale from calibration).
  * A token whose K or V is large (attention sinks, outlier tokens) stretches only its own
    scale; with a page-head scale it costs every other row of its page precision
    (scripts/bench_kv_quant.py measures both on the same data).
  * Cost: 4 bytes of scale per D bytes of data; at head_dim 128 that is 132 bytes a row
    against 256 for bf16, so a byte budget holds 1.94x the bf16 tokens (1.97x with 16-bit
    scales, which were not worth the rounding of the scale itself).
A page-head layout ([P, 2*Hkv]) would cost 1/page_size of that and makes the same
kernels work unchanged apart from the scale gather; it is the layout to try if a TPU
measurement shows the per-row scale loads to matter.

Not measured (no TPU was available): XLA's TPU layouts tile the last two axes of an array,
and the scales' last axis (2*Hkv, 16 for 8 kv heads) is narrower than a 128-lane tile, so on
TPU the scales may occupy up to 128 / (2*Hkv) times their logical 4 bytes. The byte budget
(jaxserve.worker.memory_profile.KVLayout) counts logical bytes. If a TPU run shows the padding,
the fix is a lane-dense scale layout (the page's scales as one [page_size * 2*Hkv] row) or
the page-head layout above; CPU and GPU arrays are not tiled.

Every attention backend dequantizes inside its kernel (pages.astype(f32) * scale, per
block of keys, after the gather); no dense dequantized copy of the cache is ever made.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# kv_cache_dtype name -> page dtype. vLLM's "fp8" is e4m3.
KV_QUANT_DTYPES: dict[str, jnp.dtype] = {
    "int8": jnp.dtype(jnp.int8),
    "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn),
    "fp8": jnp.dtype(jnp.float8_e4m3fn),
}
# Largest magnitude a page element holds: int8 symmetric (-128 unused), e4m3fn's max finite.
QMAX: dict[jnp.dtype, float] = {jnp.dtype(jnp.int8): 127.0,
                                jnp.dtype(jnp.float8_e4m3fn): float(jnp.finfo(jnp.float8_e4m3fn).max)}
SCALE_DTYPE = jnp.dtype(jnp.float32)
SCALE_BYTES = SCALE_DTYPE.itemsize


def is_quantized_dtype(dtype) -> bool:
    """True for the 8-bit page dtypes this module quantizes to (int8, float8_e4m3fn)."""
    try:
        return jnp.dtype(dtype) in QMAX
    except TypeError:
        return False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """8-bit KV pages and their per token-head scales (see the module docstring).

    pages  [..., P, page_size, 2*Hkv, D] int8 | float8_e4m3fn
    scales [..., P, page_size, 2*Hkv]    float32; x ~= pages * scales[..., None]
    """

    pages: jax.Array
    scales: jax.Array

    def __post_init__(self):
        pages, scales = self.pages, self.scales
        if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in (pages, scales)):
            return  # a pytree of other leaves (shardings, partition specs, jax's placeholders)
        if not is_quantized_dtype(pages.dtype):
            raise ValueError(f"QuantizedKV pages must be int8 or float8_e4m3fn, got {pages.dtype}")
        if tuple(scales.shape) != tuple(pages.shape[:-1]) or jnp.dtype(scales.dtype) != SCALE_DTYPE:
            raise ValueError(f"QuantizedKV scales must be float32 {tuple(pages.shape[:-1])} (the pages' shape "
                             f"without head_dim), got {scales.dtype} {tuple(scales.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pages.shape)

    @property
    def dtype(self):
        return self.pages.dtype

    @property
    def ndim(self) -> int:
        return len(self.pages.shape)

    @property
    def nbytes(self) -> int:
        return int(self.pages.nbytes + self.scales.nbytes)

    def reshape(self, *shape: int) -> "QuantizedKV":
        """The pages reshaped to `shape` (head_dim last, unchanged), the scales alike."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return QuantizedKV(self.pages.reshape(shape), self.scales.reshape(shape[:-1]))


def kv_cache_dtype(name: str):
    """The page dtype of a quantized kv_cache_dtype name ("int8", "fp8", "fp8_e4m3"), else None."""
    return KV_QUANT_DTYPES.get(name)


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Symmetric quantization over the last axis. x [..., D] float -> (q [..., D] dtype,
    scale [...] float32) with x ~= q * scale. All-zero rows get scale 1 (q = 0)."""
    dtype = jnp.dtype(dtype)
    qmax = QMAX[dtype]
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    y = jnp.clip(x32 / scale[..., None], -qmax, qmax)
    if dtype == jnp.int8:
        y = jnp.round(y)
    return y.astype(dtype), scale


def dequantize(pages: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
    """pages [..., D] 8-bit, scales [...] -> [..., D] in `dtype` (computed in float32)."""
    return (pages.astype(jnp.float32) * scales[..., None]).astype(dtype)


def init_quantized(shape: tuple[int, ...], dtype) -> QuantizedKV:
    """Zero pages [*shape] of the 8-bit `dtype` with unit scales [*shape[:-1]]."""
    return QuantizedKV(jnp.zeros(shape, dtype), jnp.ones(shape[:-1], SCALE_DTYPE))


def token_head_bytes(head_dim: int, dtype) -> int:
    """Bytes one K (or V) row of one kv head takes in the cache, scale included."""
    dtype = np.dtype(dtype)
    return head_dim * dtype.itemsize + (SCALE_BYTES if is_quantized_dtype(dtype) else 0)
