"""Pallas kernels (TPU and GPU) for jaxserve, each with a pure-JAX reference.

ragged_paged_attention: one attention op for flat batches mixing prefill chunks and
decode tokens over a paged KV cache, with named backends behind one validated wrapper
(pallas_kernels.backend: reference, xla, jax_tpu, pallas_tpu, pallas_gpu).
write_kv: stores a step's new K/V into their page slots.
QuantizedKV: an 8-bit (int8 / fp8 e4m3) cache, pages and their scales (pallas_kernels.kv_quant).
"""

from jaxserve.kernels.attention_api import ragged_paged_attention
from jaxserve.kernels.backend import AttentionBackend, is_kernel, resolve_backend
from jaxserve.kernels.kv_quant import QuantizedKV
from jaxserve.kernels.kv_write import write_kv

__all__ = ["AttentionBackend", "QuantizedKV", "is_kernel", "ragged_paged_attention", "resolve_backend", "write_kv"]
