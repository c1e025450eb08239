"""Write this step's new K/V into their page slots.

Layout: kv_pages [P, page_size, 2*Hkv, D]; K of kv head h at index 2h, V at 2h+1.
slot = page * page_size + offset; padded tokens carry a slot in the null page 0.
An 8-bit cache (pallas_kernels.kv_quant.QuantizedKV) is written the same way: each new K
and V row is quantized on its own (one scale per token and combined head), and the rows
and their scales are scattered to the same slots.

Why only an XLA scatter (no Pallas kernel, no fusion into the attention kernel):
- Bytes: the write moves T * 2*Hkv * D elements, while the same step's attention reads
  sum(kv_lens) * 2*Hkv * D (every decode token reads its whole context), so the write is
  about 1/avg_context of the step's unavoidable traffic (< 1% for contexts >= 128).
- With kv_pages donated under jit, XLA lowers `.at[slots].set` to an in-place scatter of
  contiguous [2*Hkv*D] rows on every platform, i.e. it already moves only those bytes; a
  separate kernel would replace one memory-bound op by another of the same size.
- Fusing the write into the attention kernel (as tpu-inference's RPA v3 does) would save
  one launch per layer; whether that pays can only be measured on an accelerator, which
  this work had none of, so it is not done. scripts/bench_attention.py times write_kv
  beside attention so the question can be settled on real hardware.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.kernels.backend import resolve_backend
from jaxserve.kernels.kv_quant import QuantizedKV, is_quantized_dtype, quantize


def interleave_kv(k: jax.Array, v: jax.Array) -> jax.Array:
    """[T, Hkv, D] x2 -> [T, 2*Hkv, D] with K of head h at 2h and V at 2h+1."""
    t, hkv, d = k.shape
    return jnp.stack([k, v], axis=2).reshape(t, 2 * hkv, d)


def write_kv_reference(kv_pages: jax.Array, k: jax.Array, v: jax.Array,
                       slot_mapping: jax.Array) -> jax.Array:
    """XLA scatter of the new K/V rows into the flattened [P*page_size] slot axis."""
    num_pages, page_size, two_hkv, d = kv_pages.shape
    new_kv = interleave_kv(k, v).astype(kv_pages.dtype)            # [T, 2Hkv, D]
    flat = kv_pages.reshape(num_pages * page_size, two_hkv, d)      # [P*ps, 2Hkv, D]
    # Padded tokens all hit slot(s) of page 0; which one wins is irrelevant.
    flat = flat.at[slot_mapping].set(new_kv, mode="drop")
    return flat.reshape(kv_pages.shape)


def write_kv_quantized_reference(kv: QuantizedKV, k: jax.Array, v: jax.Array,
                                 slot_mapping: jax.Array) -> QuantizedKV:
    """Quantize the new K/V rows (one scale each) and scatter rows and scales to their slots."""
    num_pages, page_size, two_hkv, d = kv.pages.shape
    rows, scales = quantize(interleave_kv(k, v), kv.pages.dtype)   # [T, 2Hkv, D], [T, 2Hkv]
    flat = kv.pages.reshape(num_pages * page_size, two_hkv, d)
    flat_scales = kv.scales.reshape(num_pages * page_size, two_hkv)
    flat = flat.at[slot_mapping].set(rows, mode="drop")
    flat_scales = flat_scales.at[slot_mapping].set(scales, mode="drop")
    return QuantizedKV(flat.reshape(kv.pages.shape), flat_scales.reshape(kv.scales.shape))


def _check_write_args(kv_pages, k, v, slot_mapping) -> None:
    if isinstance(kv_pages, QuantizedKV):
        kv_pages = kv_pages.pages
    elif is_quantized_dtype(kv_pages.dtype):
        raise ValueError(f"kv_pages of dtype {kv_pages.dtype} need their scales: pass a "
                         "pallas_kernels.kv_quant.QuantizedKV (pages and scales)")
    if kv_pages.ndim != 4:
        raise ValueError(f"kv_pages must be [num_pages, page_size, 2*num_kv_heads, head_dim], "
                         f"got shape {kv_pages.shape}")
    if k.ndim != 3:
        raise ValueError(f"k must be [num_tokens, num_kv_heads, head_dim], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    t, hkv, d = k.shape
    if kv_pages.shape[2] != 2 * hkv or kv_pages.shape[3] != d:
        raise ValueError(f"kv_pages must be [P, page_size, {2 * hkv}, {d}] for k of shape "
                         f"{k.shape}, got {kv_pages.shape}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must have shape ({t},), got {slot_mapping.shape}")
    if slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be int32, got {slot_mapping.dtype}")
    for name, x in (("kv_pages", kv_pages), ("k", k), ("v", v)):
        if name == "kv_pages" and is_quantized_dtype(x.dtype):
            continue
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")


def write_kv(kv_pages: jax.Array | QuantizedKV, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             *, backend: str = "auto") -> jax.Array | QuantizedKV:
    """Return kv_pages with k[t], v[t] stored at slot slot_mapping[t] (cast to kv_pages.dtype,
    or quantized with their scales when kv_pages is a QuantizedKV).

    kv_pages: [P, page_size, 2*Hkv, D] (a QuantizedKV: 8-bit pages and scales
    [P, page_size, 2*Hkv]); k, v: [T, Hkv, D]; slot_mapping: int32 [T].
    Every backend uses the XLA scatter (see the module docstring for why). Donate kv_pages
    under jit so the update happens in place.
    """
    _check_write_args(kv_pages, k, v, slot_mapping)
    resolve_backend(backend)  # validates the name
    if isinstance(kv_pages, QuantizedKV):
        return write_kv_quantized_reference(kv_pages, k, v, slot_mapping)
    return write_kv_reference(kv_pages, k, v, slot_mapping)
