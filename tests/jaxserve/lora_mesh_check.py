"""Run in a subprocess with 8 fake CPU devices: greedy tokens of one batch mixing base-model
requests and three LoRA adapters under several tensor-parallel meshes, and the shardings of the
LoRA slot arrays, printed as JSON (see test_lora_sharding.py).

    python lora_mesh_check.py MODEL_DIR CONFIG NAME=ADAPTER_DIR... -- MESH...
"""

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

from jaxserve import LLM, LoRARequest, SamplingParams  # noqa: E402


def main(model_dir: str, config: str, adapters: list[str], meshes: list[str]) -> None:
    loras = [None] + [LoRARequest(name, i, path) for i, (name, _, path) in
                      enumerate((a.partition("=") for a in adapters), start=1)]
    rng = random.Random(0)
    work = [([rng.randrange(6, 1000) for _ in range(rng.choice([1, 5, 17, 40]))], rng.randrange(2, 10), loras[i % 4])
            for i in range(16)]
    result = {"devices": jax.device_count(), "meshes": {}}
    for mesh in meshes:
        llm = LLM(model_dir, config=config, mesh=mesh, token_buckets=[128], seq_buckets=[16],
                  enable_lora=True, max_loras=3, max_lora_rank=16)
        outs = llm.generate([p for p, _, _ in work],
                            [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m, _ in work],
                            use_tqdm=False, lora_request=[lora for _, _, lora in work])
        layers = llm.engine.runner.params["layers"]
        attn, mlp = layers["self_attn"]["lora"], layers["mlp"]["lora"]
        specs = {name: str(part[name].get_value().sharding.spec) for part, name in
                 ((attn, "q_proj_a"), (attn, "q_proj_b"), (attn, "k_proj_b"), (attn, "o_proj_a"),
                  (attn, "o_proj_b"), (mlp, "gate_proj_b"), (mlp, "down_proj_a"))}
        result["meshes"][mesh] = {"tokens": [o.outputs[0].token_ids for o in outs], "specs": specs,
                                  "compiles": llm.stats()["compile_count"],
                                  "programs": len(llm.engine.runner.shapes_to_compile())}
        if mesh == meshes[0]:  # the same prompts on the base model: the adapters must change tokens
            result["base_tokens"] = [o.outputs[0].token_ids for o in llm.generate(
                [p for p, _, _ in work], [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                                          for _, m, _ in work], use_tqdm=False)]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    args = sys.argv[1:]
    cut = args.index("--")
    main(args[0], args[1], args[2:cut], args[cut + 1:])
