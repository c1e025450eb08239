"""N-gram speculative decoding end to end: greedy outputs token-identical with speculation on
and off over a mixed batch (stop strings, stop tokens, n > 1, logprobs, penalties, min_tokens,
aborts, preemption forced by a small page pool), no page leaks, nothing compiled after
warm-up, metrics; and seeded sampling whose output distribution is the target's."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from engine_fixtures import write_engine_test_model
from jaxserve import AsyncLLM, LLM, SamplingParams
from jaxserve.demo_model import train_tokenizer
from jaxserve.outputs import merge_delta
from jaxserve.engine.metrics import EngineMetrics

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
ABORT_AT_STEP = 4


def spec(k: int, draft: str | None = None) -> dict:
    if draft is not None:  # a draft model (the target itself in these tests: every greedy proposal is right)
        return {"method": "draft_model", "num_speculative_tokens": k, "model": draft}
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-model")
    _, tok = write_engine_test_model(path)
    return path, tok


def workload(n: int = 64, seed: int = 0) -> list[tuple[list[int], int]]:
    """Prompts that repeat themselves (copying, editing) and a few that do not."""
    rng = random.Random(seed)
    work = []
    for i in range(n):
        base = [rng.randrange(6, 1000) for _ in range(rng.choice([2, 3, 5, 8]))]
        prompt = base * rng.choice([2, 3, 5]) if i % 5 else [rng.randrange(6, 1000) for _ in range(9)]
        work.append((prompt, rng.randrange(1, 40)))
    return work


def drive(llm: LLM, work, params, abort: set[int]) -> list:
    """All requests at once through engine.step(); the `abort` ones are aborted after ABORT_AT_STEP steps."""
    engine = llm.engine
    ids = [f"s{i}" for i in range(len(work))]
    for rid, (prompt, _), p in zip(ids, work, params):
        engine.add_request(rid, prompt, p)
    results: dict = {}
    steps = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
        steps += 1
        if steps == ABORT_AT_STEP:
            for i in abort:
                engine.abort(ids[i])
    return [results.get(rid) for rid in ids]


@pytest.fixture(scope="module")
def reference(model_dir):
    """Speculation off: every request's full greedy output, then the mixed batch's outputs."""
    path, tok = model_dir
    llm = LLM(str(path), config=CPU)
    work = workload()
    full = [o.outputs[0].token_ids for o in llm.generate(
        [p for p, _ in work], [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in work],
        use_tqdm=False)]
    params, abort = [], set()
    for i, ((_, m), out) in enumerate(zip(work, full)):
        kind = i % 8
        extra: dict = {"ignore_eos": True}
        if kind == 0 and len(out) > 4:  # a stop string from the middle of the text
            text = tok.decode(out, skip_special_tokens=True)
            extra["stop"] = [text[len(text) // 2:][:2]] if len(text) > 4 else None
        elif kind == 1:
            extra["n"] = 2
        elif kind == 2:
            extra["logprobs"] = 2
        elif kind == 3:
            extra["repetition_penalty"] = 1.3
        elif kind == 4 and len(out) > 3:
            extra["stop_token_ids"] = [out[len(out) // 2]]
        elif kind == 5:
            extra = {"ignore_eos": False, "min_tokens": min(2, m)}
        elif kind == 6:
            abort.add(i)
        params.append(SamplingParams(max_tokens=m, temperature=0.0, **extra))
    return work, full, params, abort, drive(llm, work, params, abort)


def completions(out) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


CASES = ([pytest.param("ngram", k, marks=pytest.mark.slow) if k != 3 else ("ngram", k) for k in range(1, 6)]
         + [pytest.param("draft_model", k, marks=pytest.mark.slow) if k != 2 else ("draft_model", k)
            for k in range(1, 6)])


@pytest.mark.parametrize("method, k", CASES)
def test_greedy_is_token_identical_with_speculation(model_dir, reference, method, k):
    work, full, params, abort, ref = reference
    # a small page pool forces preemption; the prefix cache is off so recomputation is real
    cfg = spec(k, str(model_dir[0]) if method == "draft_model" else None)
    llm = LLM(str(model_dir[0]), config=CPU, num_pages=24, enable_prefix_caching=False, speculative_config=cfg)
    got = drive(llm, work, params, abort)
    for i, (r, g) in enumerate(zip(ref, got)):
        if i in abort:  # aborted after ABORT_AT_STEP steps: a prefix of the full output
            assert g is None or g.outputs[0].token_ids == full[i][:len(g.outputs[0].token_ids)]
            continue
        assert completions(g) == completions(r), i
        if params[i].logprobs is not None:
            for a, b in zip(g.outputs[0].logprobs, r.outputs[0].logprobs):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["num_preemptions"] > 0
    assert stats["compile_count"] == len(llm.engine.runner.shapes_to_compile())
    # the verification step carries no prompt-logprob output: a speculating engine compiles none of
    # those programs (enable_prompt_logprobs is on in the preset) and refuses the field, naming why
    assert llm.config.enable_prompt_logprobs
    assert not [s for s in llm.engine.runner.shapes_to_compile() if s[0] == "prompt_logprobs"]
    with pytest.raises(ValueError, match="prompt_logprobs.*speculative_config"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    assert llm.stats()["num_free_pages"] == stats["num_total_pages"]
    if method == "draft_model":  # the target as its own draft: (nearly) every proposal of a plain request is
        # accepted (the draft knows nothing of penalties and min_tokens bans, so there it may miss)
        plain = [g.metrics for i, g in enumerate(got) if g is not None and g.metrics and i not in abort
                 and params[i].repetition_penalty == 1.0 and not params[i].min_tokens]
        proposed = sum(x["spec_num_draft_tokens"] for x in plain)
        accepted = sum(x["spec_num_accepted_tokens"] for x in plain)
        assert accepted >= 0.99 * proposed > 0
    else:
        assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    m = [g.metrics for i, g in enumerate(got) if g is not None and g.metrics]
    assert sum(x["spec_num_accepted_tokens"] for x in m) <= stats["spec_num_accepted_tokens"]
    assert all(0 <= x["spec_acceptance_rate"] <= 1 and 1 <= x["spec_mean_acceptance_length"] <= k + 1 for x in m)
    # requests with penalties speculate too (row j's penalties count the proposals before it)
    assert any(got[i].metrics for i in range(len(work)) if params[i].repetition_penalty != 1.0)
    # Prometheus: the engine totals as counters
    metrics = EngineMetrics("m")
    metrics.rebase({})
    metrics.refresh(stats)
    text = metrics.exposition().decode()
    for key, name in (("spec_num_drafts", "num_drafts"), ("spec_num_draft_tokens", "num_draft_tokens"),
                      ("spec_num_accepted_tokens", "num_accepted_tokens")):
        assert f'jaxserve_spec_decode_{name}_total{{model_name="m"}} {float(stats[key])}' in text


def test_structured_and_penalised_requests_decode_exactly_beside_speculating_ones(model_dir, reference):
    """Requests with a grammar do not speculate: they run in the verification program with one
    row each; penalised greedy requests speculate with the proposals counted. Their outputs are
    those without speculation (the seeded sampled one only where it did not speculate)."""
    work, full, _, _, _ = reference
    prompts = [p for p, _ in work[:12]]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)] * 8 + [
        SamplingParams(max_tokens=12, temperature=0.0, structured_outputs={"regex": "[a-e]{3,8}"}),
        SamplingParams(max_tokens=12, temperature=0.0, structured_outputs={"choice": ["yes", "no way"]}),
        SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=0.5, repetition_penalty=1.2, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=0.7, ignore_eos=True)]
    outs = {}
    for name, cfg in (("off", None), ("on", spec(3))):
        llm = LLM(str(model_dir[0]), config=CPU, num_pages=24, enable_prefix_caching=False, speculative_config=cfg)
        outs[name] = [completions(o) for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.stats()
        assert stats["num_free_pages"] == stats["num_total_pages"]
        assert stats["compile_count"] == len(llm.engine.runner.shapes_to_compile())
    assert outs["on"] == outs["off"]
    assert outs["on"][9][0][1] in ("yes", "no way")
    # streamed through AsyncLLM (multi-token deltas), and its Prometheus counters
    engine = AsyncLLM(engine=llm.engine)
    try:
        async def stream(prompt, p):
            acc = None
            async for delta in engine.generate(prompt, p):
                acc = merge_delta(acc, delta)
            return acc

        async def main():
            return await asyncio.gather(*(stream(pr, p) for pr, p in zip(prompts, params)))

        streamed = asyncio.run(main())
        text = engine.metrics.exposition().decode()
    finally:
        engine.shutdown()
    assert [completions(o) for o in streamed] == outs["on"]
    # (the counters hold at least what the engine had done when AsyncLLM took it over)
    for key in ("spec_num_draft_tokens", "spec_num_accepted_tokens"):
        name = key.removeprefix("spec_")
        value = re.search(rf'jaxserve_spec_decode_{name}_total\{{model_name="[^"]*"\}} ([0-9.]+)', text)
        assert value and float(value.group(1)) >= stats[key]
    assert stats["spec_num_draft_tokens"] > 0


def test_a_draft_with_another_vocabulary_is_refused(model_dir, tiny_vocab_dir):
    with pytest.raises(ValueError, match="speculative_config.model: the draft's vocab_size 5"):
        LLM(str(model_dir[0]), config=CPU, speculative_config=spec(2, str(tiny_vocab_dir)))


# -- sampling: the output distribution is the target's ------------------------------------

TINY_VOCAB = 5


@pytest.fixture(scope="module")
def tiny_vocab_dir(tmp_path_factory):
    """A random Llama over 5 tokens (the demo tokenizer's first ids) with a peaked, not
    degenerate next-token distribution."""
    path = tmp_path_factory.mktemp("tiny-vocab")
    tok = train_tokenizer()
    config = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=[1],
                                      pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.25
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def first_three(path, num_samples: int, speculative_config) -> np.ndarray:
    """The first 3 tokens of num_samples seeded requests (seed i), as cell ids in [0, V^3)."""
    llm = LLM(str(path), config=CPU, max_num_seqs=128, max_num_batched_tokens=512, token_buckets=[128, 512],
              seq_buckets=[128], max_model_len=64, num_pages=512, max_logprobs=4,
              speculative_config=speculative_config)
    prompt = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]  # every token has an earlier occurrence: always a proposal
    # (a presence penalty: the rows after a proposal count it, worker.spec_decode.penalize_prefix)
    params = [SamplingParams(max_tokens=3, temperature=0.9, top_k=4, presence_penalty=0.8, seed=i, ignore_eos=True)
              for i in range(num_samples)]
    outs = llm.generate([prompt] * num_samples, params, use_tqdm=False)
    tokens = np.array([o.outputs[0].token_ids for o in outs])
    stats = llm.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["compile_count"] == len(llm.engine.runner.shapes_to_compile())
    if speculative_config is not None:
        assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    cells = tokens @ np.array([TINY_VOCAB ** 2, TINY_VOCAB, 1])
    if speculative_config is None:  # the target's distribution is spread out: a test with teeth
        assert np.bincount(cells).max() < 0.2 * num_samples
    return cells


def two_sample_chi_square_p(a: np.ndarray, b: np.ndarray, cells: int) -> float:
    """p-value that two samples of cell ids come from one distribution (cells with fewer than
    10 observations in all are pooled)."""
    ca, cb = np.bincount(a, minlength=cells), np.bincount(b, minlength=cells)
    small = ca + cb < 10
    ca = np.append(ca[~small], ca[small].sum())
    cb = np.append(cb[~small], cb[small].sum())
    keep = ca + cb > 0
    ca, cb = ca[keep], cb[keep]
    total = ca + cb
    ea, eb = total * ca.sum() / total.sum(), total * cb.sum() / total.sum()
    stat = float(((ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb).sum())
    return float(jax.scipy.special.gammaincc((len(total) - 1) / 2, stat / 2))


@pytest.mark.parametrize("method, num_samples", [
    pytest.param("ngram", 20_000, marks=pytest.mark.slow), ("ngram", 3_000),
    pytest.param("draft_model", 20_000, marks=pytest.mark.slow),
    pytest.param("draft_model", 3_000, marks=pytest.mark.slow)])
def test_sampling_keeps_the_target_distribution(tiny_vocab_dir, method, num_samples):
    cells = TINY_VOCAB ** 3
    off = first_three(tiny_vocab_dir, num_samples, None)
    on = first_three(tiny_vocab_dir, num_samples, spec(3, str(tiny_vocab_dir) if method == "draft_model" else None))
    assert not np.array_equal(off, on)  # other random draws ...
    assert two_sample_chi_square_p(off, on, cells) >= 1e-3  # ... from the same distribution
    # the test can fail: the same samples with a fifth of them moved to another cell are told apart
    skewed = np.where(np.arange(len(on)) % 5 == 0, (on + 1) % cells, on)
    assert two_sample_chi_square_p(off, skewed, cells) < 1e-3


def test_a_stop_string_inside_a_run_wins_over_a_later_length_finish(model_dir):
    """A run of 12 tokens ends the request by max_tokens, but a stop string completes at token m
    inside it: the output is what one token at a time gives (m tokens, finish_reason stop)."""
    from jaxserve.core.request import Request, RequestStatus
    from jaxserve.engine.detokenizer import IncrementalDetokenizer
    from jaxserve.engine.output_processor import OutputProcessor

    _, tok = model_dir
    prompt, toks = [5, 6, 7], list(range(300, 312))
    texts = [tok.decode(toks[:i], skip_special_tokens=True) for i in range(13)]
    m = next(i for i in range(4, 12) if len(texts[i]) > len(texts[i - 1]) + 1 and texts[i][-2:] not in texts[i - 1])
    stop = texts[m][-2:]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    oracle = IncrementalDetokenizer(tok, prompt, stop=[stop])
    for t in toks:  # one token at a time: where the stop string completes
        oracle.append([t])
        if oracle.finished:
            break
    assert len(oracle.token_ids) == m
    processor = OutputProcessor(tok)
    processor.add("r", None, prompt, params)
    req = Request("r", prompt, params, max_tokens=12, eos_token_ids=frozenset(), seed=0)
    for t in toks:
        req.append_token(t, None)
    req.status = RequestStatus.FINISHED_LENGTH  # what Scheduler.update decided for the run's last token
    out = processor.process([req], lambda r, status: None)[0].outputs[0]
    assert out.token_ids == toks[:m] and req.output_token_ids == toks[:m]
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop, oracle.output_text)
