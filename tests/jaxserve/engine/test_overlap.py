"""The overlapped loop: the host schedules step N+1 before it reads step N's tokens, and the
outputs are exactly those of the synchronous loop (stop strings, n > 1, preemption, aborts,
penalties, logprobs); seeded samples are independent streams; no shape outside warm-up."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine_fixtures import write_engine_test_model
from jaxserve import LLM, SamplingParams

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlap-model")
    _, tok = write_engine_test_model(path)
    return path, tok


@pytest.fixture(scope="module")
def llms(model_dir):
    """Same model and a small page pool (forces preemption): overlapped and synchronous."""
    path = str(model_dir[0])
    return {mode: LLM(path, config=CPU, num_pages=40, async_scheduling=mode) for mode in (True, False)}


def test_next_step_is_dispatched_before_the_previous_tokens_are_read(llms):
    engine = llms[True].engine
    events: list[tuple[str, int]] = []
    dispatch, collect = engine.runner.dispatch, engine.runner.collect
    handles: list = []

    def record_dispatch(out):
        handles.append(dispatch(out))
        events.append(("dispatch", len(handles) - 1))
        return handles[-1]

    def record_collect(handle):
        events.append(("collect", next(i for i, h in enumerate(handles) if h is handle)))
        return collect(handle)

    engine.runner.dispatch, engine.runner.collect = record_dispatch, record_collect
    try:
        engine.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        del engine.runner.dispatch, engine.runner.collect
    n = len(handles)
    assert n >= 6
    order = {e: i for i, e in enumerate(events)}
    for k in range(n - 1):
        assert order[("dispatch", k + 1)] < order[("collect", k)], events  # N+1 queued before N is read
    assert [e for e in events if e[0] == "collect"] == [("collect", k) for k in range(n)]


def workload(tok) -> list[tuple[list[int], SamplingParams, int | None]]:
    """(prompt, params, abort after this many streamed tokens or None)."""
    rng = random.Random(0)
    out = []
    for i in range(20):
        prompt = [rng.randrange(6, 1000) for _ in range(rng.choice([3, 17, 40, 90]))]
        kind = i % 5
        if kind == 0:
            params = SamplingParams(max_tokens=rng.randrange(4, 30), temperature=0.0, ignore_eos=True)
        elif kind == 1:
            params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=20, seed=i, n=3, ignore_eos=True)
        elif kind == 2:
            params = SamplingParams(max_tokens=24, temperature=0.0, stop=[rng.choice(["e", "a", "o"])],
                                    ignore_eos=True, logprobs=2)
        elif kind == 3:
            params = SamplingParams(max_tokens=16, temperature=1.0, seed=100 + i, repetition_penalty=1.3,
                                    presence_penalty=0.5, frequency_penalty=0.3, min_tokens=4,
                                    logit_bias={7: 5.0})
        else:
            params = SamplingParams(max_tokens=25, temperature=0.7, seed=i, ignore_eos=True)
        out.append((prompt, params, 5 if i % 7 == 3 else None))
    return out


def drive(engine, work) -> dict[str, list]:
    """Runs the workload (staggered arrivals, aborts after N streamed tokens) to the end."""
    got: dict[str, dict[int, list]] = {}
    pending = list(enumerate(work))
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 2 == 0:  # two arrivals every other step
            for i, (prompt, params, _) in pending[:2]:
                engine.add_request(f"r{i}", prompt, params)
                got[f"r{i}"] = {}
            pending = pending[2:]
        for delta in engine.step():
            for c in delta.outputs:
                got[delta.request_id].setdefault(c.index, []).append((c.token_ids, c.text, c.finish_reason, c.logprobs))
        for i, (_, _, abort_after) in enumerate(work):
            rid = f"r{i}"
            if abort_after and rid in got and sum(len(t) for t, *_ in got[rid].get(0, [])) >= abort_after:
                engine.abort(rid)
        steps += 1
    return got


def tokens_and_text(got: dict) -> dict:
    return {rid: {k: [d[:3] for d in s] for k, s in streams.items()} for rid, streams in got.items()}


def test_overlap_on_and_off_give_identical_outputs(llms, model_dir):
    _, tok = model_dir
    work = workload(tok)
    on, off = drive(llms[True].engine, work), drive(llms[False].engine, work)
    assert tokens_and_text(on) == tokens_and_text(off)
    for rid in on:  # logprobs: equal up to float rounding (the batches are composed differently)
        for k, stream in on[rid].items():
            for (*_, a), (*_, b) in zip(stream, off[rid][k]):
                assert (a is None) == (b is None)
                for ea, eb in zip(a or [], b or []):
                    assert ea.keys() == eb.keys()
                    assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-5 and ea[t].rank == eb[t].rank for t in ea)
    for engine in (llm.engine for llm in llms.values()):
        stats = engine.stats()
        assert stats["num_preemptions"] > 0, "the pool should be small enough to preempt"
        assert stats["num_free_pages"] == stats["num_total_pages"] or engine.config.enable_prefix_caching
        assert engine.step() == []  # the next schedule hands the last finished slots back
        assert engine.stats()["num_running"] == 0 and not engine.runner.batch.slot_of
        assert engine.stats()["compile_count"] == len(engine.runner.shapes_to_compile())
    assert any(r == "stop" for streams in on.values() for s in streams.values() for *_, r, _ in s)


def test_seeded_samples_are_independent_streams(llms):
    llm = llms[True]
    prompt = [11, 12, 13, 14]
    params = lambda seed, n: SamplingParams(max_tokens=12, temperature=1.0, seed=seed, n=n, ignore_eos=True)  # noqa: E731
    group = llm.generate([prompt], params(5, 3), use_tqdm=False)[0].outputs
    shifted = [llm.generate([prompt], params(5 + k, 1), use_tqdm=False)[0].outputs[0].token_ids for k in range(3)]
    assert group[0].token_ids == shifted[0]  # sample 0 of seed s is the n=1 stream of seed s
    for k in (1, 2):
        assert group[k].token_ids != shifted[k]  # sample k of seed s is not sample 0 of seed s + k
    assert len({tuple(s.token_ids) for s in group}) == 3
    # The same seed gives the same tokens alone and inside any batch.
    noise = [([random.Random(j).randrange(6, 1000) for _ in range(3 + 5 * j)],
              SamplingParams(max_tokens=7, temperature=0.8)) for j in range(5)]
    batch = llm.generate([n[0] for n in noise[:2]] + [prompt] + [n[0] for n in noise[2:]],
                         [n[1] for n in noise[:2]] + [params(5, 3)] + [n[1] for n in noise[2:]], use_tqdm=False)
    assert [s.token_ids for s in batch[2].outputs] == [s.token_ids for s in group]


def test_n_larger_than_the_token_bucket_does_not_compile(model_dir):
    """The issue's reproduction: token buckets [8, 32], seq buckets [4, 16], n=12 and a
    5-token prompt (the last prefill chunk samples 12 rows for 5 tokens)."""
    llm = LLM(str(model_dir[0]), config=CPU, max_num_seqs=16, max_num_batched_tokens=32, token_buckets=[8, 32],
              seq_buckets=[4, 16])
    count = llm.stats()["compile_count"]
    assert count == len(llm.engine.runner.shapes_to_compile())
    outs = llm.generate([[5, 6, 7, 8, 9], [20, 21]],
                        [SamplingParams(n=12, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True),
                         SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)], use_tqdm=False)
    assert len(outs[0].outputs) == 12 and all(len(o.token_ids) == 6 for o in outs[0].outputs)
    assert llm.stats()["compile_count"] == count


def test_h100_buckets_serve_40_decodes_beside_an_n32_prefill_without_compiling(model_dir):
    """The issue's gpu-h100-1 example: 40 running decodes plus the last 5-token chunk of an
    n=32 prompt is (45 tokens, 72 rows), a (64, 128) pair the old warm-up never compiled."""
    preset = Path(CPU).parent / "gpu-h100-1.yaml"
    llm = LLM(str(model_dir[0]), config=str(preset), dtype="float32", attention_backend="reference",
              max_model_len=128, num_pages=2048, compilation_cache_dir="")
    engine = llm.engine
    count = llm.stats()["compile_count"]
    assert count == len(engine.runner.shapes_to_compile())
    for i in range(40):
        engine.add_request(f"d{i}", [6 + i, 7, 8], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while len(engine.scheduler.running) < 40:
        engine.step()
    shapes = []
    dispatch = engine.runner.dispatch
    engine.runner.dispatch = lambda out: shapes.append((out.num_tokens, out.num_sample_rows)) or dispatch(out)
    try:
        engine.add_request("n32", [9, 10, 11, 12, 13], SamplingParams(n=32, max_tokens=3, temperature=1.0, seed=2))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        del engine.runner.dispatch
    assert (45, 72) in shapes
    assert llm.stats()["compile_count"] == count


def hf_greedy_penalized(hf, prompt: list[int], max_new_tokens: int, penalty: float) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                          repetition_penalty=penalty, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_penalty_state_on_the_device_equals_transformers(tmp_path):
    """Repetition penalty over prompt + output, kept as per-slot device counts: greedy tokens
    equal transformers' RepetitionPenaltyLogitsProcessor, also for requests preempted and
    resumed (their counts are rebuilt from the tokens) and beside unpenalised requests."""
    hf, _ = write_engine_test_model(tmp_path)
    rng = random.Random(4)
    prompts = [[rng.randrange(6, 60) for _ in range(rng.choice([4, 20, 40]))] for _ in range(10)]
    llm = LLM(str(tmp_path), config=CPU, num_pages=18, enable_prefix_caching=False)
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                             repetition_penalty=1.0 if i % 3 == 2 else 1.8) for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats()["num_preemptions"] > 0
    plain = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), use_tqdm=False)
    changed = 0
    for prompt, p, out, ref in zip(prompts, params, outs, plain):
        assert out.outputs[0].token_ids == hf_greedy_penalized(hf, prompt, 24, p.repetition_penalty)
        changed += out.outputs[0].token_ids != ref.outputs[0].token_ids
    assert changed >= 3  # the penalty really changed the outputs
