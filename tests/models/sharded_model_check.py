"""Run in a subprocess with 4 fake CPU devices: the layer-scanned model with its parameters and
its stacked KV cache placed by jaxserve.sharding.Placement (kv heads split over the devices, or
copied so each device holds one when there are fewer than devices) gives the single-device
logits, keeps the KV sharding, and updates the cache in place. Prints one RESULT line of JSON."""

from __future__ import annotations

import json
import os
import sys

# torch is only for the tests' oracles: hidden, transformers (the tokenizer) does not import it,
# as in a plain `pip install jaxserve` (about 2 s of CPU less per process)
sys.modules["torch"] = None
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxserve.sharding import MeshConfig, Placement  # noqa: E402
from jaxserve.models.attention_metadata import single_sequence_metadata  # noqa: E402
from jaxserve.models.decoder import init_kv_caches  # noqa: E402
from jaxserve.models.loader import load_model  # noqa: E402

IDS = [5, 17, 3, 44, 90, 12, 7, 8, 9, 10, 11]
PAGES, PAGE_SIZE = 8, 4


def run(model_dir: str, model: int, backend: str) -> dict:
    mesh_cfg = MeshConfig(model=model)
    probe = load_model(model_dir).config
    placement = Placement(mesh_cfg.replica_meshes(jax.devices()[:model])[0], mesh_cfg.rule_table, probe)
    sharded = model > 1
    loaded = load_model(model_dir, attention_backend=backend, sharding_fn=placement.sharding if sharded else None,
                        mesh=placement.mesh if sharded else None, kv_head_replicas=placement.kv_head_replicas)
    graphdef, state = nnx.split(loaded.model)
    kv = init_kv_caches(loaded.config, PAGES, PAGE_SIZE, jnp.float32, placement.kv_sharding if sharded else None)
    md = jax.tree.map(jnp.asarray, single_sequence_metadata([1, 2, 3], PAGE_SIZE, 3, 0, len(IDS)))
    ids = jnp.asarray(IDS, jnp.int32)
    out_shardings = (placement.kv_sharding, placement.replicated) if sharded else None

    def step(state, kv, ids, md):
        return nnx.merge(graphdef, state)(kv, ids, jnp.arange(len(IDS), dtype=jnp.int32), md)

    f = jax.jit(step, donate_argnums=(1,), out_shardings=out_shardings)
    compiled = f.lower(state, kv, ids, md).compile()
    kv_bytes = kv.addressable_shards[0].data.nbytes  # per device
    kv, logits = f(state, kv, ids, md)
    return dict(logits=np.asarray(logits).tolist(), kv_spec=str(getattr(kv.sharding, "spec", None)),
                want_spec=str(placement.kv_sharding.spec), kv_heads_sharded=placement.kv_heads_sharded,
                kv_shard=list(kv.addressable_shards[0].data.shape), kv_head_replicas=placement.kv_head_replicas,
                in_place=compiled.memory_analysis().alias_size_in_bytes == kv_bytes)


# (devices on 'model', attention backend) after the one-device reference, the oracle; SHARDED_MODEL_RUNS
# ("2:reference,4:pallas_gpu") picks some.
ALL_RUNS = ((2, "reference"), (4, "reference"), (2, "pallas_gpu"), (4, "pallas_gpu"))


def main(model_dir: str) -> None:
    chosen = [(int(m), b) for m, b in (r.split(":") for r in os.environ.get("SHARDED_MODEL_RUNS", "").split(",") if r)]
    runs = {f"model={m},{b}": run(model_dir, m, b) for m, b in ((1, "reference"), *(chosen or ALL_RUNS))}
    print("RESULT " + json.dumps(runs))


if __name__ == "__main__":
    main(sys.argv[1])
