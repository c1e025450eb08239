"""Run in a subprocess with 8 fake CPU devices: greedy outputs and parameter shardings of one
workload under several meshes, printed as JSON (see test_sharding.py)."""

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
    # auto: the xla backend on CPU, what the engine runs there (the dense reference gathers every
    # row's whole block table: 85 ms a step at the tests' -O0, against 6 ms)
    backend = os.environ.get("MESH_CHECK_BACKEND", "auto")
    num = int(os.environ.get("MESH_CHECK_REQUESTS", "16"))
    kv_cache_dtype = os.environ.get("MESH_CHECK_KV_CACHE_DTYPE", "auto")
    quantization = os.environ.get("MESH_CHECK_QUANTIZATION") or None  # weights: int8 | fp8
    rng = random.Random(0)
    work = [([rng.randrange(6, 1000) for _ in range(rng.choice([1, 5, 17, 40, 90]))], rng.randrange(2, 12))
            for _ in range(num)]
    result = {"devices": jax.device_count(), "meshes": {}}
    for mesh in meshes:
        llm = LLM(model_dir, config=config, mesh=mesh, token_buckets=[128], seq_buckets=[16],
                  attention_backend=backend, kv_cache_dtype=kv_cache_dtype, quantization=quantization)
        outs = llm.generate([p for p, _ in work],
                            [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in work],
                            use_tqdm=False)
        engines = getattr(llm.engine, "replicas", [llm.engine])
        attn = engines[0].runner.params["layers"]["self_attn"]  # stacked: [layers, ...]
        q, k = attn["q_proj"].get_value(), attn["k_proj"].get_value()
        kv = engines[0].runner.kv_caches  # [layers, pages, page, 2 * kv_heads, head_dim]
        scales = getattr(kv, "scales", None)  # an 8-bit cache: QuantizedKV(pages, scales [layers, pages, page, 2K])
        kv = getattr(kv, "pages", kv)
        result["meshes"][mesh] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "replicas": len(engines),
            "replica_devices": [sorted(d.id for d in e.placement.mesh.devices.flat) for e in engines],
            "q_spec": str(q.sharding.spec), "q_shard": list(q.addressable_shards[0].data.shape),
            "k_spec": str(k.sharding.spec), "kv_spec": str(kv.sharding.spec), "kv_dtype": str(kv.dtype),
            "scales_spec": None if scales is None else str(scales.sharding.spec),
            "weight_specs": {f"{group}.{name}": [str(p.get_value().dtype), str(p.get_value().sharding.spec)]
                             for group in ("self_attn", "mlp")
                             for name, p in engines[0].runner.params["layers"][group].items()},
            "weight_bytes_per_device": llm.stats()["weight_bytes_per_device"],
            "free_pages": llm.stats()["num_free_pages"], "total_pages": llm.stats()["num_total_pages"],
        }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
