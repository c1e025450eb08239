"""Run in a subprocess with 4 fake CPU devices: the Pallas kernels (interpret mode) through
shard_map on a ('model',) mesh equal the unsharded reference, for kv heads split over the
devices (more kv heads than devices, and as many) and for fewer kv heads than devices, each
copied model / kv_heads times as the loader does (ModelConfig.kv_head_replicas), so every
device holds one head. A second argument (int8 | fp8) runs it on an 8-bit cache, whose scales
are split (and copied) with their pages. Prints the max errors as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# torch is only for the tests' oracles: hidden, transformers (the tokenizer) does not import it,
# as in a plain `pip install jaxserve` (about 2 s of CPU less per process)
sys.modules["torch"] = None
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "pallas_kernels"))
from rpa_batch import make_batch, quantize_batch  # noqa: E402

from jaxserve.models.sharded_attention import sharded_ragged_paged_attention  # noqa: E402
from jaxserve.kernels import ragged_paged_attention  # noqa: E402
from jaxserve.kernels.kv_quant import QuantizedKV  # noqa: E402


def copy_kv_heads(kv_pages, replicas: int):
    """[P, B, 2K, H] -> [P, B, 2K*r, H]: kv head h's K/V pair becomes heads h*r .. h*r + r - 1."""
    p, b, two_k, h = kv_pages.shape
    pairs = np.asarray(kv_pages).reshape(p, b, two_k // 2, 2, h)
    return np.repeat(pairs, replicas, axis=2).reshape(p, b, two_k * replicas, h)


def copy_scale_heads(scales, replicas: int):
    """[P, B, 2K] -> [P, B, 2K*r], the scales of copy_kv_heads' pages."""
    return copy_kv_heads(np.asarray(scales)[..., None], replicas)[..., 0]


# (devices on 'model', kv heads): kv > tp, kv == tp, kv < tp (copied 2x and 4x). SHARDED_ATTENTION_CASES
# ("2:4,4:1") picks some of them.
ALL_CASES = ((2, 4), (2, 2), (4, 2), (4, 1))
CASES = tuple(tuple(int(x) for x in case.split(":"))
              for case in os.environ.get("SHARDED_ATTENTION_CASES", "").split(",") if case) or ALL_CASES


def main(backend: str, kv_dtype: str | None = None) -> None:
    errors = {}
    seqs = [(1, 9), (5, 5), (3, 14)]
    for model, hkv in CASES:
        mesh = Mesh(np.asarray(jax.devices()[:model]), ("model",))
        batch = make_batch(seqs, page_size=4, num_q_heads=8, num_kv_heads=hkv, head_dim=16, max_seqs=5,
                           num_tokens=12, max_pages_per_seq=5, seed=model + hkv)
        if kv_dtype is not None:
            batch = quantize_batch(batch, {"int8": np.int8, "fp8": jax.numpy.float8_e4m3fn}[kv_dtype])
        opts = dict(sm_scale=0.25, sliding_window=None, soft_cap=None)
        want = np.asarray(ragged_paged_attention(*batch.args, backend="reference", **opts))
        q = jax.device_put(batch.q, NamedSharding(mesh, P(None, "model", None)))
        copies = max(1, model // hkv)
        split = NamedSharding(mesh, P(None, None, "model", None))
        if kv_dtype is None:
            kv = jax.device_put(copy_kv_heads(batch.kv_pages, copies), split)
        else:
            kv = QuantizedKV(jax.device_put(copy_kv_heads(batch.kv_pages.pages, copies), split),
                             jax.device_put(copy_scale_heads(batch.kv_pages.scales, copies),
                                            NamedSharding(mesh, P(None, None, "model"))))
        for part in jax.tree.leaves(kv):  # pages (and an 8-bit cache's scales): whole heads, never all
            assert part.addressable_shards[0].data.shape[2] == 2 * max(1, hkv // model)
        got = sharded_ragged_paged_attention(mesh, q, kv, *batch.args[2:], backend=backend, **opts)
        n = batch.num_valid_rows
        errors[f"model={model},kv_heads={hkv}"] = float(np.abs(np.asarray(got)[:n] - want[:n]).max())
    print("RESULT " + json.dumps(errors))


if __name__ == "__main__":
    main(*sys.argv[1:])
