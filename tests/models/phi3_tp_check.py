"""Run in a subprocess with 8 fake CPU devices: a Phi-3 checkpoint (fused qkv_proj / gate_up_proj)
loaded for tensor parallelism. Args: RUN... as name=dir:tp:backend. Prints one RESULT line of
JSON: per run the logits of IDS (longer than the original context: long LongRoPE factors) and,
per split parameter, its partition spec, one device's shard shape, and the largest difference
between any device's shard and that slice of the tensor rebuilt here from the checkpoint's fused
rows (q | k | v, gate | up; k and v heads copied for kv head replicas)."""

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
from jaxserve.models.attention_metadata import single_sequence_metadata  # noqa: E402
from jaxserve.models.config import ModelConfig  # noqa: E402
from jaxserve.models.decoder import init_kv_caches  # noqa: E402
from jaxserve.models.loader import load_model, read_hf_config  # noqa: E402

IDS = [(7 * i + 3) % 90 + 3 for i in range(40)]
PAGES, PAGE_SIZE = 12, 4


def expected(hf_dir: Path, cfg: ModelConfig, replicas: int) -> dict[str, np.ndarray]:
    """Our layout of the split parameters, [L, ...], rebuilt from the fused HF tensors."""
    from safetensors.numpy import load_file

    tensors = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    n, k, h, f, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.hidden_size
    out: dict[str, list[np.ndarray]] = {name: [] for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
    for i in range(cfg.num_layers):
        qkv = tensors[f"model.layers.{i}.self_attn.qkv_proj.weight"]  # [(N + 2K) H, D]
        heads = qkv.reshape(n + 2 * k, h, d).transpose(2, 0, 1)  # [D, N + 2K, H]
        out["q_proj"].append(heads[:, :n])
        out["k_proj"].append(np.repeat(heads[:, n:n + k], replicas, axis=1))
        out["v_proj"].append(np.repeat(heads[:, n + k:], replicas, axis=1))
        gate_up = tensors[f"model.layers.{i}.mlp.gate_up_proj.weight"]  # [2F, D]
        out["gate_proj"].append(gate_up[:f].T)
        out["up_proj"].append(gate_up[f:].T)
    return {name: np.stack(v) for name, v in out.items()}


def run(model_dir: str, tp: int, backend: str, hf_dir: Path) -> dict:
    mesh_cfg = MeshConfig(model=tp)
    base = ModelConfig.from_hf(read_hf_config(Path(model_dir)))
    placement = Placement(mesh_cfg.replica_meshes(jax.devices()[:tp])[0], mesh_cfg.rule_table, base)
    loaded = load_model(model_dir, attention_backend=backend, sharding_fn=placement.sharding, mesh=placement.mesh,
                        kv_head_replicas=placement.kv_head_replicas)
    graphdef, state = nnx.split(loaded.model)
    kv = init_kv_caches(loaded.config, PAGES, PAGE_SIZE, jnp.float32, placement.kv_sharding)
    md = jax.tree.map(jnp.asarray, single_sequence_metadata(list(range(1, 11)), PAGE_SIZE, 10, 0, len(IDS)))

    def step(state, kv, ids, md):
        return nnx.merge(graphdef, state)(kv, ids, jnp.arange(len(IDS), dtype=jnp.int32), md)

    f = jax.jit(step, donate_argnums=(1,), out_shardings=(placement.kv_sharding, placement.replicated))
    _, logits = f(state, kv, jnp.asarray(IDS, jnp.int32), md)
    want = expected(hf_dir, base, placement.kv_head_replicas)
    layer = loaded.model.layers
    params = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
              "gate_proj": layer.mlp.gate_proj, "up_proj": layer.mlp.up_proj}
    split = {}
    for name, param in params.items():
        value = param[...]
        shards = value.addressable_shards
        diff = max(float(np.abs(np.asarray(s.data) - want[name][s.index]).max()) for s in shards)
        split[name] = dict(spec=str(value.sharding.spec), shape=list(value.shape), shard=list(shards[0].data.shape),
                           devices=len({s.device.id for s in shards}), max_diff=diff)
    return dict(logits=np.asarray(logits).tolist(), replicas=placement.kv_head_replicas, split=split)


def main(hf_dir: str, runs: list[str]) -> None:
    out = {}
    for item in runs:
        name, spec = item.split("=", 1)
        model_dir, tp, backend = spec.rsplit(":", 2)
        out[name] = run(model_dir, int(tp), backend, Path(hf_dir))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
