"""One process of a multi-process (fake multi-host) run on CPU: `jax.distributed.initialize`
over 127.0.0.1, CPU collectives, one engine whose model mesh spans every process; each
process runs the same scheduler on the same requests. Prints the outputs as JSON."""

from __future__ import annotations

import json
import os
import random
import sys

# torch is only for the tests' oracles: hidden, transformers (the tokenizer) does not import it,
# as in a plain `pip install jaxserve` (about 2 s of CPU less per process)
sys.modules["torch"] = None
os.environ["JAX_PLATFORMS"] = "cpu"


def main(coordinator: str, num_processes: int, process_id: int, model_dir: str, config: str, mode: str) -> None:
    from jaxserve.entrypoints.distributed import initialize

    initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    import jax

    from jaxserve import LLM, SamplingParams

    rng = random.Random(0)
    work = [([rng.randrange(6, 1000) for _ in range(rng.choice([1, 5, 17, 40]))], rng.randrange(2, 10))
            for _ in range(8)]
    llm = LLM(model_dir, config=config, tensor_parallel_size=jax.device_count(), token_buckets=[128],
              seq_buckets=[16])
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in work]
    counts = None
    if mode == "peer_dies":
        return peer_dies(llm)
    if mode == "offline":  # every process makes the same call
        tokens = [o.outputs[0].token_ids for o in llm.generate([p for p, _ in work], params, use_tqdm=False)]
    else:  # serving: only process 0 takes requests; the others follow its broadcast commands
        tokens, counts = serve(llm, work, params)
    q = llm.engine.runner.params["layers"]["self_attn"]["q_proj"].get_value()
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": jax.device_count(), "q_devices": len(q.sharding.device_set),
                                  "tokens": tokens, "counts": counts}), flush=True)


def serve(llm, work, params):
    import asyncio

    import jax

    from jaxserve import AsyncLLM
    from jaxserve.engine import async_llm
    from jaxserve.outputs import merge_delta

    # Count collectives (header-sized or larger) and engine steps: between two syncs no
    # process calls a collective, so they are fewer than the steps. Only the leader's
    # latency budget matters (it announces the intervals); a generous one makes the
    # intervals grow whatever this machine's step time.
    async_llm.SYNC_LATENCY_S = 10.0
    counts = {"collectives": 0, "payload_collectives": 0, "steps": 0}
    broadcast, step = async_llm._bounded_broadcast, llm.engine.step

    def counted_broadcast(x, *args, **kwargs):
        counts["collectives"] += 1
        counts["payload_collectives"] += x.size != async_llm.HEADER_BYTES
        return broadcast(x, *args, **kwargs)

    def counted_step(*args, **kwargs):
        counts["steps"] += 1
        return step(*args, **kwargs)

    async_llm._bounded_broadcast, llm.engine.step = counted_broadcast, counted_step
    engine = AsyncLLM(engine=llm.engine)
    if jax.process_index() != 0:
        engine.wait()
        return None, counts

    async def one(prompt, p):
        acc = None
        async for delta in engine.generate(prompt, p):
            acc = merge_delta(acc, delta)
        return acc.outputs[0].token_ids

    async def run_all():
        return await asyncio.gather(*(one(prompt, p) for (prompt, _), p in zip(work, params)))

    tokens = asyncio.run(run_all())
    engine.shutdown()
    return tokens, counts


def peer_dies(llm):
    """The test kills (or stops) the follower while the leader serves a long request: the
    leader's request must end with EngineDeadError within the bound, and the engine report
    unhealthy. The leader prints "STREAMING" once tokens flow, then its RESULT, and leaves
    with os._exit (jax.distributed's exit barrier would wait for the dead peer)."""
    import asyncio
    import time

    import jax

    from jaxserve import AsyncLLM, SamplingParams

    engine = AsyncLLM(engine=llm.engine)
    if jax.process_index() != 0:
        engine.wait()
        return
    result = {"process": 0, "tokens": 0}

    async def run():
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        try:
            async for delta in engine.generate([5, 6, 7], params):
                result["tokens"] += len(delta.outputs[0].token_ids)
                if "streaming_at" not in result:
                    result["streaming_at"] = time.monotonic()
                    print("STREAMING", flush=True)
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"
            result["failed_after_s"] = time.monotonic() - result.pop("streaming_at")
        result.pop("streaming_at", None)

    asyncio.run(run())
    result["healthy"] = engine.healthy
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
