"""Write this step's new K/V into their page slots.

Layout: kv_pages [P, page_size, 2*Hkv, D]; K of kv head h at index 2h, V at 2h+1.
slot = page * page_size + offset; padded tokens carry a slot in the null page 0.

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


def _check_write_args(kv_pages, k, v, slot_mapping) -> None:
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
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             *, backend: str = "auto") -> jax.Array:
    """Return kv_pages with k[t], v[t] stored at slot slot_mapping[t] (cast to kv_pages.dtype).

    kv_pages: [P, page_size, 2*Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: int32 [T].
    Every backend uses the XLA scatter (see the module docstring for why). Donate kv_pages
    under jit so the update happens in place.
    """
    _check_write_args(kv_pages, k, v, slot_mapping)
    resolve_backend(backend)  # validates the name
    return write_kv_reference(kv_pages, k, v, slot_mapping)
