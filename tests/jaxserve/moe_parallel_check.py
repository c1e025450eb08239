"""Run in a subprocess with 8 fake CPU devices: greedy outputs of one workload through a mixture
of experts served with its experts split over 1, 2, 4 and 8 devices (expert parallelism over the
model axis, attention tensor parallel over the same devices), with the expert weights' shardings
and compile counts, printed as JSON (see test_moe_parallel.py). Args: MODEL_DIR CONFIG MESH..."""

from __future__ import annotations

import json
import os
import random
import sys

# torch is only for the tests' oracles: hidden, transformers (the tokenizer) does not import it,
# as in a plain `pip install jaxserve` (about 2 s of CPU less per process)
sys.modules["torch"] = None
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402


def main(model_dir: str, config: str, meshes: list[str]) -> None:
    rng = random.Random(0)
    work = [([rng.randrange(6, 1000) for _ in range(rng.choice([1, 5, 17, 40, 90]))], rng.randrange(4, 16))
            for _ in range(12)]
    result = {"devices": jax.device_count(), "meshes": {}}
    for mesh in meshes:
        llm = LLM(model_dir, config=config, mesh=mesh, token_buckets=[128], seq_buckets=[16],
                  quantization=os.environ.get("MOE_CHECK_QUANTIZATION") or None)  # int8 | fp8 experts
        warm = llm.stats()["compile_count"]
        outs = llm.generate([p for p, _ in work],
                            [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in work],
                            use_tqdm=False)
        engine = llm.engine
        mlp = engine.runner.params["layers"]["mlp"]  # stacked: [layers, experts, ...]
        gate_up, router = mlp["gate_up_proj"].get_value(), mlp["router"].get_value()
        result["meshes"][mesh] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "expert_parallel": engine.placement.expert_parallel,
            "model_expert_parallel": engine.model_config.expert_parallel,
            "gate_up_spec": str(gate_up.sharding.spec), "gate_up_shard": list(gate_up.addressable_shards[0].data.shape),
            "router_spec": str(router.sharding.spec), "gate_up_dtype": str(gate_up.dtype),
            "gate_up_scale_spec": str(mlp["gate_up_proj_scale"].get_value().sharding.spec)
            if "gate_up_proj_scale" in mlp else None,
            "compiles_warm": warm, "compiles_after": llm.stats()["compile_count"],
            "free_pages": llm.stats()["num_free_pages"], "total_pages": llm.stats()["num_total_pages"],
        }
    result["expert_update_collectives"] = expert_update_collectives()
    print("RESULT " + json.dumps(result))


def expert_update_collectives() -> list[str]:
    """Collectives in the loader's program that writes one expert into an expert-split weight."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxserve.models.loader import _set_layer

    mesh = Mesh(jax.devices(), ("model",))
    stacked = jax.device_put(jnp.zeros((2, 16, 64, 80)), NamedSharding(mesh, P(None, "model", None, None)))
    block = jax.device_put(jnp.ones((64, 40)), NamedSharding(mesh, P()))
    hlo = _set_layer.lower(stacked, block, (1, 5, 0, 40)).compile().as_text()
    return [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
