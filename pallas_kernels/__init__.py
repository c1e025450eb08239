"""Pallas kernels (TPU and GPU) for jaxserve, each with a pure-JAX reference.

ragged_paged_attention: one attention op for flat batches mixing prefill chunks and
decode tokens over a paged KV cache (reference | tpu | gpu behind one validated wrapper).
write_kv: stores a step's new K/V into their page slots.
"""

from pallas_kernels.attention_api import ragged_paged_attention
from pallas_kernels.backend import AttentionBackend, resolve_backend
from pallas_kernels.kv_write import write_kv

__all__ = ["AttentionBackend", "ragged_paged_attention", "resolve_backend", "write_kv"]
