"""best_of > n: the n of best_of samples with the highest cumulative logprob, checked against
the same seeded samples generated with n = best_of (sample k's stream depends only on the
seed and k), their logprobs summed independently, and against transformers' scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_fixtures import write_engine_test_model
from jaxserve import LLM, SamplingParams

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
PARAMS = dict(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("best-of-model")
    hf, _ = write_engine_test_model(path)
    return path, hf


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model[0]), config=CPU)


def hf_sum_logprob(hf, prompt, tokens) -> float:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    lp = torch.log_softmax(logits, -1)
    return float(lp[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


def test_best_of_returns_the_n_most_likely_samples(llm, model):
    _, hf = model
    prompt = [5, 17, 33, 90, 4, 61]
    all_ = llm.generate([prompt], SamplingParams(n=5, logprobs=0, **PARAMS), use_tqdm=False)[0].outputs
    totals = [sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)) for c in all_]
    for c, total in zip(all_, totals):
        assert hf_sum_logprob(hf, prompt, c.token_ids) == pytest.approx(total, abs=1e-4)
    order = sorted(range(5), key=lambda k: -totals[k])
    out = llm.generate([prompt], SamplingParams(n=2, best_of=5, **PARAMS), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert [c.token_ids for c in out.outputs] == [all_[k].token_ids for k in order[:2]]
    assert [c.text for c in out.outputs] == [all_[k].text for k in order[:2]]
    assert [c.cumulative_logprob for c in out.outputs] == pytest.approx([totals[k] for k in order[:2]], abs=1e-6)
    assert all(c.logprobs is None for c in out.outputs)  # not asked for
    with_lp = llm.generate([prompt], SamplingParams(n=1, best_of=5, logprobs=2, **PARAMS), use_tqdm=False)[0]
    assert with_lp.outputs[0].token_ids == all_[order[0]].token_ids and len(with_lp.outputs[0].logprobs) == 8
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_best_of_streams_one_final_delta(llm):
    engine = llm.engine
    engine.add_request("bo", [7, 8, 9], SamplingParams(n=2, best_of=3, **PARAMS))
    got = []
    while engine.has_unfinished_requests():
        got += [o for o in engine.step() if o.request_id == "bo"]
    assert len(got) == 1 and got[0].finished and len(got[0].outputs) == 2
    assert all(len(c.token_ids) == 8 for c in got[0].outputs)


def test_best_of_abort_frees_everything(llm):
    engine = llm.engine
    engine.add_request("bo-abort", [7, 8, 9], SamplingParams(n=1, best_of=4, **{**PARAMS, "max_tokens": 50}))
    engine.step()
    engine.step()
    assert engine.abort("bo-abort")
    while engine.has_unfinished_requests():
        engine.step()
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"] and not engine.best_of._held


def test_best_of_bounds():
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=1, best_of=3, temperature=0.0)
    assert SamplingParams(n=2, best_of=2, temperature=0.0).best_of == 2
