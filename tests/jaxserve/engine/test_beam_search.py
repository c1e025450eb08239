"""Beam search against transformers' generate(num_beams=k, do_sample=False) on the same
random weights: the top beam token-exact, every returned beam's score within 1e-4, for
k = 2 and 4 under length penalties and each early_stopping mode."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from engine_fixtures import write_engine_test_model
from jaxserve import AsyncLLM, LLM, BeamSearchParams
from jaxserve.engine.beam_search import BeamSearch

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
EOS_SCALE = 0.85
PAD = 1  # transformers pads the shorter beams' sequences with it


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The engine test model with its EOS made likely (its LM-head row points along the mean
    final hidden state, scaled to a typical top logit times EOS_SCALE), so beams end by EOS at
    different lengths."""
    path = tmp_path_factory.mktemp("beam-model")
    hf, tok = write_engine_test_model(path)
    eos = hf.config.eos_token_id[0]
    rng = random.Random(0)
    with torch.no_grad():
        h = torch.cat([hf(torch.tensor([[rng.randrange(6, 1000) for _ in range(20)]]), output_hidden_states=True)
                       .hidden_states[-1][0] for _ in range(4)])  # [80, D], after the final norm
        direction = h.mean(0) / h.mean(0).norm()
        top = (h @ hf.lm_head.weight.T).max(1).values.mean()
        hf.lm_head.weight[eos] = EOS_SCALE * direction * top / (h @ direction).mean()
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model[0]), config=CPU)


def hf_beams(hf, prompt, k, max_new, length_penalty, early_stopping, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          num_beams=k, num_return_sequences=k, do_sample=False, max_new_tokens=max_new,
                          length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
                          pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    return out.sequences.tolist(), out.sequences_scores.tolist()


# (beam width, length penalty, early_stopping, some returned beam must end by EOS)
CASES = [(2, 1.0, False, True), (2, 0.0, True, True), (4, 1.0, False, True), (4, 2.0, "never", False),
         (4, -0.5, True, True), (2, 1.5, "never", False)]


@pytest.mark.parametrize("k,length_penalty,early_stopping,eos_expected", CASES)
def test_beam_search_equals_transformers(llm, model, k, length_penalty, early_stopping, eos_expected):
    _, hf = model
    eos = sorted(llm.engine.eos_token_ids)
    rng = random.Random(k * 10 + int(length_penalty * 2))
    prompts = [[rng.randrange(6, 1000) for _ in range(n)] for n in (5, 23, 40)][:2 if k == 4 else 3]
    params = BeamSearchParams(beam_width=k, max_tokens=12, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    outs = llm.beam_search(prompts, params)
    ended_by_eos = 0
    for prompt, out in zip(prompts, outs):
        seqs, scores = hf_beams(hf, prompt, k, 12, length_penalty, early_stopping, eos)
        assert len(out.sequences) == k
        top = out.sequences[0].tokens
        assert seqs[0][:len(top)] == top and all(t == PAD for t in seqs[0][len(top):])
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
        for ours, theirs in zip(out.sequences, seqs):
            assert theirs[:len(ours.tokens)] == ours.tokens
            gen = ours.tokens[len(prompt):]
            assert ours.cum_logprob / len(gen) ** length_penalty == pytest.approx(ours.score, abs=1e-6)
            ended_by_eos += ours.finish_reason == "stop"
            assert (ours.finish_reason == "stop") == (gen[-1] in eos)
    print("beams ended by EOS:", ended_by_eos, "of", k * len(prompts))
    assert ended_by_eos or not eos_expected  # the case exercises finished-beam scoring, not only max length
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_beam_search_text_ignore_eos_and_prefix_cache(llm, model):
    _, hf = model
    prompt = "Once upon a time there was a"
    ids = llm.get_tokenizer()(prompt)["input_ids"]
    hits = llm.stats()["prefix_cache_hit_tokens"]
    out = llm.beam_search([prompt, {"prompt_token_ids": ids}], BeamSearchParams(beam_width=3, max_tokens=20,
                                                                                 ignore_eos=True))
    assert out[0].sequences[0].tokens == out[1].sequences[0].tokens
    single = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=20, ignore_eos=True))
    assert len(single) == 1 and single[0].sequences[0].tokens == out[0].sequences[0].tokens
    best = out[0].sequences[0]
    assert len(best.tokens) == len(ids) + 20 and best.finish_reason == "length"
    assert best.text == llm.get_tokenizer().decode(best.tokens[len(ids):], skip_special_tokens=True)
    seqs, scores = hf_beams(hf, ids, 3, 20, 1.0, False, [])  # no EOS: ignore_eos
    assert seqs[0] == best.tokens and scores[0] == pytest.approx(best.score, abs=1e-4)
    # the beams' shared prefix is served from the prefix cache: at least the prompt's full pages each round
    assert llm.stats()["prefix_cache_hit_tokens"] - hits >= 19 * 3 * (len(ids) // 16) * 16


def test_bad_beam_params():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=11, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.5)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearchParams(beam_width=2, max_tokens=4, early_stopping="sometimes")
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)


def test_search_stops_when_k_beams_finished_with_early_stopping():
    """A hand-made case (EOS = 9): two slots fill within two steps and the search stops."""
    params = BeamSearchParams(beam_width=2, max_tokens=10, early_stopping=True)
    s = BeamSearch([1, 2], params, frozenset({9}), 10)
    s.advance([[(9, -0.1), (5, -0.2), (6, -0.3), (7, -5.0)]])  # 9 finishes, 5 and 6 run
    assert not s.done and [b.tokens for b in s.running] == [[5], [6]]
    assert [(round(f[0], 6), f[1].tokens) for f in s.finished] == [(-0.1, [9])]
    s.advance([[(9, -0.1), (3, -1.0), (4, -2.0), (8, -3.0)], [(9, -0.05), (3, -4.0), (4, -4.5), (8, -5.0)]])
    # candidates [5, 9] -0.3 and [6, 9] -0.35 lead and both end: the slots keep the best two scores
    assert s.done and [f[1].tokens for f in s.finished] == [[9], [5, 9]]
    assert s.finished[1][0] == pytest.approx(-0.3 / 2)


def test_async_beam_search_equals_sync_and_a_cancel_frees_its_pages(llm):
    prompt = [9, 8, 7, 6, 5, 4, 3]
    params = BeamSearchParams(beam_width=2, max_tokens=8, length_penalty=0.7)
    want = llm.beam_search([prompt], params)[0]

    async def run():
        engine = AsyncLLM(engine=llm.engine)
        try:
            got = await engine.beam_search(prompt, params, "async-beam")
            long = asyncio.create_task(engine.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=300,
                                                                                   ignore_eos=True), "cancelled"))
            await asyncio.sleep(0.3)  # some rounds in (300 tokens take far longer)
            long.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long
            assert await asyncio.to_thread(engine.wait_idle, 60)
            return got
        finally:
            engine.shutdown()

    got = asyncio.run(run())
    assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
    assert [s.score for s in got.sequences] == pytest.approx([s.score for s in want.sequences], abs=1e-6)
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
