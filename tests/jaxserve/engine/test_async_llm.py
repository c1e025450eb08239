"""AsyncLLM: streaming deltas equal LLM.generate, aborts free pages, errors reach callers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine_fixtures import write_engine_test_model
from jaxserve import AsyncLLM, LLM, SamplingParams
from jaxserve.engine.async_llm import EngineDeadError
from jaxserve.config import EngineConfig
from jaxserve.engine.llm import merge_delta

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("async-model")
    write_engine_test_model(path)
    return LLM(str(path), config=CPU)


@pytest.fixture(scope="module")
def engine(llm):
    a = AsyncLLM(engine=llm.engine)  # shares the compiled engine; LLM is not used concurrently
    yield a
    a.shutdown()


async def collect(engine, prompt, params, request_id=None):
    acc = None
    async for delta in engine.generate(prompt, params, request_id):
        acc = merge_delta(acc, delta)
    return acc


PROMPTS = ["Hello world", "The capital of France is", "One, two, three", [5, 6, 7, 8, 9]] * 5


def test_concurrent_streams_equal_llm_generate(llm, engine):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    # First, while the AsyncLLM thread is idle: two threads must never step one engine.
    expected = LLMGenerate(llm, PROMPTS, params)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in PROMPTS))

    streamed = asyncio.run(main())
    assert [(o.outputs[0].text, o.outputs[0].token_ids) for o in streamed] == expected
    assert engine.metrics.generation_tokens._value.get() >= 12 * len(PROMPTS)


def LLMGenerate(llm, prompts, params):
    return [(o.outputs[0].text, o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_abort_and_cancel_free_pages(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        total = engine.stats()["num_total_pages"]
        agen = engine.generate("Hello world", params, "to-abort")
        first = await agen.__anext__()
        assert not first.finished
        engine.abort("to-abort")
        rest = [d async for d in agen]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"

        async def consume_two():
            n = 0
            async for _ in engine.generate("One, two, three", params):
                n += 1
                if n == 2:
                    break  # leaving early aborts the request
        await consume_two()
        task = asyncio.create_task(collect(engine, [7, 8, 9], params))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if engine.num_in_flight == 0 and engine.stats()["num_free_pages"] == total:
                break
            await asyncio.sleep(0.05)
        assert engine.num_in_flight == 0
        assert engine.stats()["num_free_pages"] == total
        assert engine.stats()["num_running"] == engine.stats()["num_waiting"] == 0

    asyncio.run(main())


def test_invalid_request_raises_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="max_tokens"):
            await collect(engine, [5] * 500, SamplingParams(max_tokens=100))
        with pytest.raises(ValueError, match="prompt must not be empty"):
            await collect(engine, "", SamplingParams())
        out = await collect(engine, "Hello", SamplingParams(max_tokens=3, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 3
        assert b'jaxserve_requests_total{model_name=' in engine.metrics.exposition()

    asyncio.run(main())


def test_engine_failure_reaches_callers_and_health(llm):
    class Boom(RuntimeError):
        pass

    broken = AsyncLLM(engine=llm.engine)
    original = llm.engine.step

    def failing_step():
        raise Boom("device lost")

    llm.engine.step = failing_step
    try:
        async def main():
            with pytest.raises(EngineDeadError, match="device lost"):
                await collect(broken, "Hello", SamplingParams(max_tokens=3))
            assert not broken.healthy
            with pytest.raises(EngineDeadError):
                await collect(broken, "Hello", SamplingParams(max_tokens=3))

        asyncio.run(main())
    finally:
        llm.engine.step = original
        for rid in list(llm.engine.outputs.groups):
            llm.engine.abort(rid)


def test_config_yaml_and_overrides(tmp_path):
    cfg = EngineConfig.load(CPU, max_num_seqs=8, num_pages=None)
    assert cfg.max_num_seqs == 8 and cfg.num_pages == 256 and cfg.token_buckets == (32, 128)
    assert cfg.seq_buckets == (4, 8)  # capped at the new limit, which is always a bucket
    assert EngineConfig.load(CPU, token_buckets=[16, 64]).token_buckets == (16, 64, 128)
    with pytest.raises(ValueError, match="unknown engine config keys: bogus"):
        EngineConfig.load(CPU, bogus=1)
    with pytest.raises(ValueError, match="token_buckets must be a list of positive integers"):
        EngineConfig.load(CPU, token_buckets=[0, 64])
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig.load(CPU, attention_backend="cuda")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        EngineConfig.load(bad)
