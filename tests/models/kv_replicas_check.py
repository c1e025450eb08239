"""Run in a subprocess with 8 fake CPU devices: a model loaded for tensor parallelism (kv heads
split over the model axis, copied when fewer than the devices) gives the same logits as one
device, and each device holds only its own kv heads. Args: RUN... as name=dir:tp:backend.
Prints one RESULT line of JSON: per run the logits, the KV cache's global and per-device shape
and bytes, and the per-device bytes of the old layout (all kv heads on every device when they
do not split)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# torch is only for the tests' oracles: hidden, transformers (the tokenizer) does not import it,
# as in a plain `pip install jaxserve` (about 2 s of CPU less per process)
sys.modules["torch"] = None
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxserve.sharding import MeshConfig, Placement  # noqa: E402
from jaxserve.worker.memory_profile import KVLayout  # noqa: E402
from jaxserve.models.attention_metadata import single_sequence_metadata  # noqa: E402
from jaxserve.models.config import ModelConfig  # noqa: E402
from jaxserve.models.decoder import init_kv_caches  # noqa: E402
from jaxserve.models.loader import load_model, read_hf_config  # noqa: E402

IDS = [5, 17, 3, 44, 90, 12, 7, 8, 9, 10, 11]
PAGES, PAGE_SIZE = 8, 4


def run(model_dir: str, tp: int, backend: str) -> dict:
    mesh_cfg = MeshConfig(model=tp)
    base = ModelConfig.from_hf(read_hf_config(Path(model_dir)))
    placement = Placement(mesh_cfg.replica_meshes(jax.devices()[:tp])[0], mesh_cfg.rule_table, base)
    loaded = load_model(model_dir, attention_backend=backend, sharding_fn=placement.sharding, mesh=placement.mesh,
                        kv_head_replicas=placement.kv_head_replicas)
    graphdef, state = nnx.split(loaded.model)
    kv = init_kv_caches(loaded.config, PAGES, PAGE_SIZE, jnp.float32, placement.kv_sharding)
    md = jax.tree.map(jnp.asarray, single_sequence_metadata([1, 2, 3], PAGE_SIZE, 3, 0, len(IDS)))

    def step(state, kv, ids, md):
        return nnx.merge(graphdef, state)(kv, ids, jnp.arange(len(IDS), dtype=jnp.int32), md)

    f = jax.jit(step, donate_argnums=(1,), out_shardings=(placement.kv_sharding, placement.replicated))
    kv, logits = f(state, kv, jnp.asarray(IDS, jnp.int32), md)
    shards = kv.addressable_shards
    k = base.num_kv_heads
    old_heads = k // tp if k % tp == 0 else k  # before: kv heads split when they divide, else all on every device
    old_bytes = base.num_layers * PAGES * PAGE_SIZE * 2 * old_heads * base.head_dim * 4
    heads_of = [sorted({(s.index[3].start or 0) // 2 + h for h in range(s.data.shape[3] // 2)}) for s in shards]
    return dict(logits=np.asarray(logits).tolist(), kv_shape=list(kv.shape), kv_spec=str(kv.sharding.spec),
                kv_shard=list(shards[0].data.shape), kv_shard_bytes=int(shards[0].data.nbytes),
                all_shard_bytes=sorted({int(s.data.nbytes) for s in shards}), old_shard_bytes=old_bytes,
                layout_page_bytes=KVLayout.of(loaded.config, placement, PAGE_SIZE, jnp.float32).page_bytes,
                replicas=placement.kv_head_replicas, devices=len(shards),
                heads_by_device=[heads_of[i] for i in np.argsort([s.device.id for s in shards])])


def main(runs: list[str]) -> None:
    out = {}
    for item in runs:
        name, spec = item.split("=", 1)
        model_dir, tp, backend = spec.rsplit(":", 2)
        out[name] = run(model_dir, int(tp), backend)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
