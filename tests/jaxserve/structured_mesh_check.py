"""Run in a subprocess with 4 fake CPU devices: constrained and plain sampled outputs of one
workload under several meshes (the bitmask input replicated like the sampler's other
inputs), with the compiles after warm-up, printed as JSON (see test_structured_output.py)."""

from __future__ import annotations

import json
import os
import sys

# torch is only for the tests' oracles: hidden, transformers (the tokenizer) does not import it,
# as in a plain `pip install jaxserve` (about 2 s of CPU less per process)
sys.modules["torch"] = None
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from jaxserve import LLM, SamplingParams  # noqa: E402
from random_schemas import random_schemas  # noqa: E402


def main(config: str, meshes: list[str]) -> None:
    schemas = random_schemas(10, seed=11)
    params = ([SamplingParams(temperature=1.0, seed=i, max_tokens=150, structured_outputs={"json": s})
               for i, s in enumerate(schemas)]
              + [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=10) for i in range(6)])
    result = {}
    for mesh in meshes:
        llm = LLM(None, config=config, mesh=mesh, token_buckets=[128], seq_buckets=[16])
        warm = llm.stats()["compile_count"]
        outs = llm.generate(["JSON:"] * len(params), params, use_tqdm=False)
        result[mesh] = {"texts": [o.outputs[0].text for o in outs], "compiles": llm.stats()["compile_count"] - warm}
    print("RESULT " + json.dumps({"schemas": schemas, "meshes": result}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
