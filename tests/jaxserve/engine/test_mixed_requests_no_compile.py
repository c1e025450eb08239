"""No compilation after warm-up with any mix of prompt-logprob, beam-search, best_of,
constrained (structured outputs) and plain requests running in the same steps, including
prompt-logprob prefill chunks beside constrained sample rows; every output is still right."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from engine_fixtures import write_engine_test_model
from jaxserve import AsyncLLM, BeamSearchParams, LLM, SamplingParams, StructuredOutputsParams
from jaxserve.outputs import merge_delta
from jaxserve.worker.prompt_logprobs import wants_prompt_logprobs

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("mix-model")
    write_engine_test_model(path)
    return LLM(str(path), config=CPU, max_num_batched_tokens=64, token_buckets=(16, 64))


def mix(seed: int) -> list[SamplingParams]:
    rng = random.Random(seed)
    kinds = [dict(prompt_logprobs=rng.choice([0, 3, 20]), max_tokens=3),
             dict(structured_outputs=StructuredOutputsParams(json=SCHEMA), temperature=1.0, seed=rng.randrange(99),
                  max_tokens=40),
             dict(structured_outputs=StructuredOutputsParams(regex=r"[a-z]{2,6}"), prompt_logprobs=2, max_tokens=10),
             dict(n=2, best_of=3, temperature=0.8, seed=rng.randrange(99), max_tokens=5),
             dict(temperature=rng.choice([0.0, 1.0]), logprobs=rng.choice([None, 2]), max_tokens=rng.randrange(1, 9))]
    return [SamplingParams(**rng.choice(kinds)) for _ in range(12)]


def prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 1000) for _ in range(rng.choice([3, 20, 70, 130]))] for _ in range(n)]


@pytest.fixture
def step_kinds(llm, monkeypatch):
    """Counts the dispatched steps by kind: prompt-logprob, constrained, both."""
    runner, kinds = llm.engine.runner, {"plp": 0, "mask": 0, "both": 0}
    dispatch = runner.dispatch

    def counted(out, bitmask=None):
        plp = wants_prompt_logprobs(out)
        kinds["plp"] += plp
        kinds["mask"] += bitmask is not None
        kinds["both"] += plp and bitmask is not None
        return dispatch(out, bitmask)

    monkeypatch.setattr(runner, "dispatch", counted)
    return kinds


def test_mixed_requests_compile_nothing_after_warm_up(llm, step_kinds):
    warm = len(llm.engine.runner.shapes_to_compile())
    assert llm.stats()["compile_count"] == warm
    params = mix(0)
    outs = llm.generate(prompts(1, len(params)), params, use_tqdm=False)
    for p, out in zip(params, outs):
        assert (out.prompt_logprobs is not None) == (p.prompt_logprobs is not None)
        if p.structured_outputs is not None and p.structured_outputs.json is not None:
            assert 0 <= json.loads(out.outputs[0].text)["a"] <= 99
        assert len(out.outputs) == p.n
    llm.beam_search(prompts(2, 3), BeamSearchParams(beam_width=3, max_tokens=6))
    assert llm.stats()["compile_count"] == warm

    async def concurrent() -> None:
        engine = AsyncLLM(engine=llm.engine)
        try:
            async def run(i, prompt, p):
                acc = None
                async for delta in engine.generate(prompt, p, f"mix-{i}"):
                    acc = merge_delta(acc, delta)
                return acc

            params = mix(3)
            beams = [engine.beam_search(p, BeamSearchParams(beam_width=2, max_tokens=5, length_penalty=0.5), f"b{i}")
                     for i, p in enumerate(prompts(4, 2))]
            outs = await asyncio.gather(*beams, *(run(i, q, p) for i, (q, p) in
                                                  enumerate(zip(prompts(5, len(params)), params))))
            assert all(len(o.sequences) == 2 for o in outs[:2])
            assert all(o.finished for o in outs[2:])
        finally:
            engine.shutdown()

    asyncio.run(concurrent())
    assert llm.stats()["compile_count"] == warm
    assert step_kinds["both"] > 0 and step_kinds["plp"] > step_kinds["both"], step_kinds
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
