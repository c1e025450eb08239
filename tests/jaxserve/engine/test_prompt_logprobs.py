"""Prompt logprobs against transformers' log-softmax over the prompt's logits (float32), for
prompts split over several prefill chunks, beside plain requests, with prefix caching on."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import write_engine_test_model
from jaxserve import LLM, SamplingParams

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
# 32 tokens a step: a 100-token prompt takes four prefill chunks; 40 pages of 16: six long
# requests at once preempt
SHAPES = dict(max_num_batched_tokens=32, token_buckets=(16, 32), num_pages=40)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plp-model")
    hf, _ = write_engine_test_model(path)
    return path, hf


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir[0]), config=CPU, **SHAPES)


def hf_logprobs(hf, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()  # [P, V]


def check(entries, prompt, oracle, k):
    assert len(entries) == len(prompt) and entries[0] is None
    for p in range(1, len(prompt)):
        row = oracle[p - 1]
        entry = entries[p]
        tok = prompt[p]
        assert abs(entry[tok].logprob - row[tok]) < 1e-4
        assert entry[tok].rank == 1 + int(np.sum(row > row[tok]))
        top = sorted(((lp.rank, t) for t, lp in entry.items() if lp.rank <= k))
        assert [r for r, _ in top] == list(range(1, k + 1))
        for _, t in top:
            assert abs(entry[t].logprob - row[t]) < 1e-4
        if k:
            assert abs(min(entry[t].logprob for _, t in top) - np.sort(row)[-k]) < 1e-4
        assert set(entry) <= {t for _, t in top} | {tok}


def test_chunked_prompt_logprobs_equal_transformers(llm, model_dir):
    _, hf = model_dir
    rng = random.Random(0)
    prompts = [[rng.randrange(6, 1000) for _ in range(n)] for n in (100, 45, 1, 17)]
    params = [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=k) for k in (5, 0, 2, 20)]
    plain = [rng.randrange(6, 1000) for _ in range(30)]
    outs = llm.generate(prompts + [plain], params + [SamplingParams(max_tokens=4, temperature=0.0)],
                        use_tqdm=False)
    for prompt, p, out in zip(prompts, params, outs):
        check(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), p.prompt_logprobs)
    assert outs[-1].prompt_logprobs is None
    # the plain request's tokens are those it gets alone
    alone = llm.generate([plain], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[-1].outputs[0].token_ids


def test_prefix_cache_hits_are_skipped_for_prompt_logprobs(llm, model_dir):
    _, hf = model_dir
    rng = random.Random(3)
    prompt = [rng.randrange(6, 1000) for _ in range(70)]
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # caches 4 pages
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    check(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 3)


def test_n_samples_and_stream_get_prompt_logprobs_once(llm, model_dir):
    _, hf = model_dir
    prompt = list(range(40, 90))
    engine = llm.engine
    engine.add_request("plp-n", prompt, SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1, prompt_logprobs=1))
    got = []
    while engine.has_unfinished_requests():
        got += [o for o in engine.step() if o.request_id == "plp-n"]
    with_plp = [o for o in got if o.prompt_logprobs is not None]
    assert len(with_plp) == 1 and with_plp[0] is got[0]
    check(with_plp[0].prompt_logprobs, prompt, hf_logprobs(hf, prompt), 1)


def test_prompt_logprobs_bounds():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_prompt_logprobs_above_max_logprobs_is_refused(llm):
    small = llm.engine.inputs.max_logprobs
    llm.engine.inputs.max_logprobs = 4
    try:
        with pytest.raises(ValueError, match="prompt_logprobs must be <= 4"):
            llm.generate([[5, 6, 7]], SamplingParams(prompt_logprobs=5), use_tqdm=False)
    finally:
        llm.engine.inputs.max_logprobs = small


def test_engine_without_prompt_logprobs_compiles_fewer_programs(llm, model_dir):
    off = LLM(str(model_dir[0]), config=CPU, **SHAPES, enable_prompt_logprobs=False)
    assert off.stats()["compile_count"] == llm.stats()["compile_count"] - 2
    with pytest.raises(ValueError, match="enable_prompt_logprobs"):
        off.generate([[5, 6, 7]], SamplingParams(prompt_logprobs=1), use_tqdm=False)
    out = off.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0),
                                                    use_tqdm=False)[0].outputs[0].token_ids


def test_preemption_changes_no_prompt_logprob(llm, model_dir):
    _, hf = model_dir
    rng = random.Random(7)
    prompts = [[rng.randrange(6, 1000) for _ in range(90)] for _ in range(6)]
    before = llm.stats()["num_preemptions"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=2),
                        use_tqdm=False)
    assert llm.stats()["num_preemptions"] > before
    for prompt, out in zip(prompts, outs):
        check(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 2)
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
