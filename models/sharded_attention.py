"""Ragged paged attention over a tensor-parallel mesh, for the Pallas kernels.

The pure-JAX paths (reference, xla) are partitioned by XLA (GSPMD) like any other op. A Pallas
kernel is opaque to XLA, so under a mesh it runs per device through shard_map: each device
attends its slice of query heads against its slice of the KV pages' kv-head axis. The cache
holds max(kv_heads, tp) heads split over the model axis (kv heads copied when there are fewer
than devices, see models.decoder), so the kv heads a device's queries read are exactly the ones
it holds: the kernel's own GQA mapping on the local slices is the global one.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxserve import kernels
from jaxserve.kernels.kv_quant import QuantizedKV


def sharded_ragged_paged_attention(mesh: Mesh, q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs, **kwargs):
    """Same contract as pallas_kernels.ragged_paged_attention; q [T, N, H] and kv_pages
    [P, B, 2K, H] split over 'model' on their head axes (N and K multiples of the model size);
    an 8-bit cache's scales [P, B, 2K] split with their pages."""
    model = mesh.shape["model"]
    num_heads, num_kv_heads = q.shape[1], kv_pages.shape[2] // 2
    if num_heads % model or num_kv_heads % model:
        raise ValueError(f"{num_heads} query heads and {num_kv_heads} cached kv heads must both split over the "
                         f"{model} devices of the model axis (load the model with kv_head_replicas="
                         f"{max(1, model // num_kv_heads)}, see ModelConfig.for_tensor_parallel)")

    def body(q, kv, kv_lens, block_tables, cu_q_lens, num_seqs):
        return kernels.ragged_paged_attention(q, kv, kv_lens, block_tables, cu_q_lens, num_seqs, **kwargs)

    heads = P(None, "model", None)
    kv_spec = P(None, None, "model", None)
    if isinstance(kv_pages, QuantizedKV):
        kv_spec = QuantizedKV(kv_spec, P(None, None, "model"))
    fn = jax.shard_map(body, mesh=mesh, in_specs=(heads, kv_spec, P(), P(), P(), P()),
                       out_specs=heads, check_vma=False)
    return fn(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
