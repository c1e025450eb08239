"""AsyncLLM: streaming deltas equal LLM.generate, aborts free pages, errors reach callers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine_fixtures import write_engine_test_model
from jaxserve import AsyncLLM, LLM, SamplingParams
from jaxserve.engine.async_llm import EngineDeadError
from jaxserve.config import EngineConfig
from jaxserve.outputs import merge_delta

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
        started = asyncio.Event()

        async def stream_until_cancelled():
            async for _ in engine.generate([7, 8, 9], params):
                started.set()

        task = asyncio.create_task(stream_until_cancelled())
        await started.wait()  # cancel mid-stream, however fast the engine is
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


def test_duplicate_request_id_refused_without_touching_the_owner(engine):
    """Client A streams request 'dup'; B's add with the same id is refused (ValueError), and
    A, untouched, streams every one of its tokens to the end (B's failed add must not abort it)."""
    async def main():
        params = SamplingParams(max_tokens=80, ignore_eos=True, temperature=0)
        a = engine.generate("Hello world", params, "dup")
        first = await a.__anext__()
        acc = merge_delta(None, first)
        with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
            await collect(engine, "Other", SamplingParams(max_tokens=4), "dup")
        # A refused add cancelled while it is still queued must not abort the owner either.
        b = asyncio.ensure_future(collect(engine, "Other", SamplingParams(max_tokens=4), "dup"))
        await asyncio.sleep(0)
        b.cancel()
        async for delta in a:
            acc = merge_delta(acc, delta)
        assert acc.finished and acc.outputs[0].finish_reason == "length"
        assert len(acc.outputs[0].token_ids) == 80
        with pytest.raises((ValueError, asyncio.CancelledError)):
            await b
        out = await collect(engine, "Hello world", params, "dup")  # the id is free again
        assert out.outputs[0].token_ids == acc.outputs[0].token_ids

    asyncio.run(main())
    assert engine.wait_idle(10) and engine.num_in_flight == 0


def test_bounds_checked_against_the_model(engine):
    """top_k up to the vocabulary, min_tokens within the resolved max_tokens, and a string
    prompt too long for any tokenization refused before the tokenizer runs."""
    vocab = engine.engine.inputs.vocab_size
    limit = engine.max_model_len

    async def main():
        out = await collect(engine, "Hello", SamplingParams(max_tokens=3, top_k=vocab, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 3
        with pytest.raises(ValueError, match=rf"top_k must be <= vocab_size \({vocab}\)"):
            await collect(engine, "Hello", SamplingParams(max_tokens=3, top_k=vocab + 1))
        with pytest.raises(ValueError, match="top_k must be in"):
            SamplingParams(top_k=2**31)
        with pytest.raises(ValueError, match=rf"min_tokens {limit} is more than max_tokens"):
            await collect(engine, "Hello", SamplingParams(max_tokens=None, min_tokens=limit))
        huge = "a" * (engine.engine.inputs.max_prompt_chars + 1)
        inputs, calls = engine.engine.inputs, []
        tokenizer = inputs.tokenizer

        class Counting:  # records every tokenization of the engine's input processor
            def __call__(self, *a, **k):
                calls.append(len(a[0]) if a else 0)
                return tokenizer(*a, **k)

            def __getattr__(self, name):
                return getattr(tokenizer, name)

        inputs.tokenizer = Counting()
        try:
            with pytest.raises(ValueError, match=rf"prompt has {len(huge)} characters.*max_model_len \({limit}"):
                await collect(engine, huge, SamplingParams(max_tokens=3))
        finally:
            inputs.tokenizer = tokenizer
        assert calls == []  # refused before tokenizing
        out = await collect(engine, "Hello", SamplingParams(max_tokens=3, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 3

    asyncio.run(main())


def test_a_request_is_counted_before_its_caller_sees_it_end(engine, monkeypatch):
    """The server's warm-up swaps scratch metrics in and back around its request: a request must
    be counted when its last output is handed to the caller, not after (a race once seen as the
    warm-up counted in /metrics)."""
    from jaxserve.engine import async_llm

    def finished(labels: str) -> float:
        return sum(s.value for m in engine.metrics.registry.collect() if m.name == "jaxserve_requests"
                   for s in m.samples if s.name.endswith("_total") and s.labels.get("status") == labels)

    seen = []
    put = async_llm._Stream.put

    def recording_put(self, item):
        if getattr(item, "finished", False):
            seen.append(finished("length"))
        put(self, item)

    before = finished("length")
    monkeypatch.setattr(async_llm._Stream, "put", recording_put)
    asyncio.run(collect(engine, "Hello world", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)))
    assert seen == [before + 1]
