"""Sliding-window KV memory through the whole engine, against transformers.

A tiny random Mistral with a 64-token window generates 512 greedy tokens per sequence. At
every step no sequence holds more than window / page_size + 2 pages (pages the window slid
past go back to the pool as the request runs), the tokens equal transformers' greedy
generate (whose Mistral applies the same window: a query at p sees keys (p - 64, p]), and
every page is free at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from engine_fixtures import hf_greedy
from jaxserve import LLM, SamplingParams
from jaxserve.demo_model import train_tokenizer

CPU = str(Path(__file__).parents[3] / "configs" / "cpu.yaml")
WINDOW = 64
PAGE = 16
# 8 windows' worth: the window slides past most of each sequence's 33 pages. (1024 until make test had to
# fit in 8 minutes: the same checks at twice the cost.)
NEW_TOKENS = 512
MAX_LEN = 640  # prompt + 512 generated tokens fit
BOUND = WINDOW // PAGE + 2  # pages a decoding sequence may hold
# Two short prompts (one page) and one that needs a 7-page prefill chunk.
PROMPTS = [[5, 77, 300, 12, 9], [400, 401, 3, 3, 17, 250, 99, 1000, 8, 64, 71, 13], list(range(20, 120))]


def write_mistral(path: Path, seed: int = 0):
    tokenizer = train_tokenizer()
    config = transformers.MistralConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, sliding_window=WINDOW,
        rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.15
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral-window")
    hf = write_mistral(path)
    return path, hf


@pytest.fixture(scope="module")
def hf_tokens(mistral):
    _, hf = mistral
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only contend (20x slower on 2 cores)
    try:
        return [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    finally:
        torch.set_num_threads(threads)


def watch_pages(llm: LLM) -> dict:
    """Wraps the engine's step: after each one, checks every running sequence's pages."""
    engine, seen = llm.engine, {"max_held": 0, "max_held_decoding": 0, "steps": 0, "device_checks": 0}
    step = engine.step

    def checked_step():
        deltas = step()
        kv = engine.kv
        for req in engine.scheduler.running:
            table = kv.block_table_view(req.request_id)
            held = kv.num_held_pages(req.request_id)
            assert held == sum(p != 0 for p in table)  # nulls lead, held pages follow
            assert all(p == 0 for p in table[:kv.num_null_pages(req.request_id)])
            seen["max_held"] = max(seen["max_held"], held)
            if req.num_computed_tokens > req.num_prompt_tokens:  # scheduled a decode token
                seen["max_held_decoding"] = max(seen["max_held_decoding"], held)
                assert held <= BOUND, (req.request_id, req.num_computed_tokens, list(table))
            elif req.num_prompt_tokens <= PAGE:
                assert held <= BOUND
        seen["steps"] += 1
        if seen["steps"] % 128 == 0:  # the device block table has the nulls too
            device = np.asarray(engine.runner.state.block_tables)
            for req in engine.scheduler.running:
                table = kv.block_table_view(req.request_id)
                row = device[engine.runner.batch.slot_of[req.request_id]]
                assert row[:len(table)].tolist() == list(table)
                seen["device_checks"] += 1
        return deltas

    engine.step = checked_step
    return seen


# The reference backend attends over each sequence's whole block table in every step (40 s at 1024
# tokens). The default backend runs the same check in make test; test-all runs both.
@pytest.mark.parametrize("backend", ["auto", pytest.param("reference", marks=pytest.mark.slow)])
def test_window_bounds_pages_and_matches_transformers(mistral, hf_tokens, backend):
    path, _ = mistral
    # 80 pages: without the window the three sequences would need 3 x 33 and be preempted.
    t0 = time.perf_counter()
    llm = LLM(str(path), config=CPU, attention_backend=backend, max_model_len=MAX_LEN, num_pages=80)
    t1 = time.perf_counter()
    assert llm.engine.kv.sliding_window == WINDOW
    seen = watch_pages(llm)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    print(f"\n[{backend}] start {t1 - t0:.1f}s, generate {time.perf_counter() - t1:.1f}s, "
          f"steps={seen['steps']} max pages held={seen['max_held']} (decoding: {seen['max_held_decoding']}, bound {BOUND}), slid={llm.engine.kv.num_slid_pages}")
    assert seen["steps"] >= NEW_TOKENS and seen["device_checks"] >= 3 * len(PROMPTS)
    assert seen["max_held_decoding"] <= BOUND
    assert [len(t) for t in ours] == [NEW_TOKENS] * len(PROMPTS)
    assert ours == hf_tokens
    stats = llm.stats()
    assert stats["num_preemptions"] == 0
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_prefix_hit_fork_and_preemption_under_the_window(mistral, hf_tokens):
    """A prompt whose cached pages are partly dead for its first query (those entries are
    null from admission on), forked n=2, beside four requests that a 17-page pool must preempt:
    every output still equals transformers' and every page comes back."""
    path, _ = mistral
    llm = LLM(str(path), config=CPU, max_model_len=MAX_LEN, num_pages=18)
    greedy = dict(temperature=0.0, ignore_eos=True)
    first = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=8, **greedy), use_tqdm=False)
    assert first[0].outputs[0].token_ids == hf_tokens[2][:8]
    # Six sequences past their first 64 tokens hold >= 4 pages each: 24 > 17.
    prompts = PROMPTS + PROMPTS[:2]
    params = [SamplingParams(max_tokens=200, **greedy)] * 2 + [SamplingParams(max_tokens=48, n=2, **greedy)] + \
        [SamplingParams(max_tokens=200, **greedy)] * 2
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [c.token_ids for c in outs[2].outputs] == [hf_tokens[2][:48]] * 2
    for i in (0, 1, 3, 4):
        assert outs[i].outputs[0].token_ids == hf_tokens[i % 3][:200]
    stats = llm.stats()
    assert stats["prefix_cache_hit_tokens"] >= 96  # the 100-token prompt's 6 full pages
    assert stats["num_preemptions"] > 0
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_admission_counts_only_the_window(mistral, hf_tokens):
    """A 512-token generation needs 33 pages without the window; with it, a sequence never
    holds more than the window's pages plus one prefill chunk's, so an 18-page pool admits
    it (the input check caps the need at that bound) and it runs to the end, exact."""
    path, _ = mistral
    llm = LLM(str(path), config=CPU, max_model_len=MAX_LEN, num_pages=18)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_tokens[0]
    with pytest.raises(ValueError, match="KV pages"):  # still refused when even the window cannot fit
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW_TOKENS, n=4, temperature=0.0), use_tqdm=False)
