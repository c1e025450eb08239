"""Ragged paged attention over a tensor-parallel mesh, for the Pallas kernels.

The pure-JAX reference is partitioned by XLA (GSPMD) like any other op. A Pallas kernel is
opaque to XLA, so under a mesh it runs per device through shard_map: each device attends its
slice of query heads against the KV heads those queries use. When the kv heads split over the
model axis, every device holds exactly its own; when there are fewer kv heads than devices
the KV pages are replicated and each device slices out the heads its queries need.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

import pallas_kernels


def _local_kv_heads(num_heads: int, num_kv_heads: int, model: int) -> tuple[int, int]:
    """(kv heads per device, query heads per device) when the KV pages are replicated."""
    per_device = num_heads // model
    group = num_heads // num_kv_heads
    if per_device % group == 0:
        return per_device // group, per_device
    if group % per_device == 0:
        return 1, per_device
    raise ValueError(f"{num_heads} query heads over {model} devices with {num_kv_heads} kv heads: each device's "
                     "query heads must map to whole kv heads; use attention_backend=reference or another model size")


def sharded_ragged_paged_attention(mesh: Mesh, kv_sharded: bool, q, kv_pages, kv_lens, block_tables, cu_q_lens,
                                   num_seqs, *, num_kv_heads: int, **kwargs):
    """Same contract as pallas_kernels.ragged_paged_attention; q heads split over 'model'."""
    model = mesh.shape["model"]
    num_heads = q.shape[1]

    def body(q, kv, kv_lens, block_tables, cu_q_lens, num_seqs):
        if not kv_sharded:
            count, per_device = _local_kv_heads(num_heads, num_kv_heads, model)
            group = num_heads // num_kv_heads
            start = jax.lax.axis_index("model") * per_device // group
            kv = jax.lax.dynamic_slice_in_dim(kv, 2 * start, 2 * count, axis=2)
        return pallas_kernels.ragged_paged_attention(q, kv, kv_lens, block_tables, cu_q_lens, num_seqs, **kwargs)

    kv_spec = P(None, None, "model", None) if kv_sharded else P()
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "model", None), kv_spec, P(), P(), P(), P()),
                       out_specs=P(None, "model", None), check_vma=False)
    return fn(q, kv_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
