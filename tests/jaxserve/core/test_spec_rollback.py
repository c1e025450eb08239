"""Speculative decoding on the host: page rollback (KVCacheManager.truncate) with exact page
ids, and the scheduler's proposals, caps and rollback driven without a device."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.request import Request, RequestStatus
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.spec_decode import Speculator, can_speculate
from jaxserve.sampling_params import SamplingParams
from jaxserve.speculative import SpeculativeConfig

PS = 4


def test_truncate_returns_trailing_pages_tail_first_and_keeps_cached_ones():
    mgr = KVCacheManager(9, PS, 8, enable_prefix_caching=True)
    tokens = list(range(10))
    assert mgr.allocate_slots("a", tokens, 0, 10) == [1, 2, 3]
    mgr.cache_full_pages("a", tokens, 8)  # pages 1, 2 registered
    assert mgr.allocate_slots("a", tokens, 10, 6, num_pending_tokens=6) == [4]  # 16 tokens: 4 pages
    free_before = mgr.num_free_pages
    assert mgr.truncate("a", 11) == 1  # tokens 0..10 live in pages 1, 2, 3
    assert mgr.get_block_table("a") == [1, 2, 3] and mgr.num_free_pages == free_before + 1
    assert mgr.pool.page_hash(4) is None  # a page of rejected tokens is never registered
    assert mgr.truncate("a", 12) == 0
    with pytest.raises(ValueError, match="prefix-cached"):
        mgr.truncate("a", 4)  # page 2 (tokens 4..7) is registered
    mgr.free("a")
    assert mgr.num_free_pages == mgr.num_total_pages


def request(rid: str, tokens: list[int], max_tokens: int = 20, **params) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **params),
                   max_tokens=max_tokens, eos_token_ids=frozenset(), seed=0)


def scheduler(k: int = 3, num_pages: int = 64, budget: int = 64, max_model_len: int = 64) -> Scheduler:
    kv = KVCacheManager(num_pages, PS, -(-max_model_len // PS), enable_prefix_caching=True)
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=1, prompt_lookup_max=2))
    return Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_model_len, speculator=spec)


def step(sched: Scheduler, sampled_runs: dict[str, list[int]], plain: dict[str, int] | None = None):
    """Schedules one step and applies it with the given emitted runs / plain tokens."""
    out = sched.schedule()
    rows = []
    for s in out.seqs:
        rid = s.request.request_id
        if s.draft_token_ids:
            rows.append([(t, None) for t in sampled_runs[rid]])
        elif s.num_samples:
            rows.append(((plain or {}).get(rid, 7), None))
    sched.update(out, rows, make_child=None)
    return out


def test_rejected_proposals_roll_back_and_an_emptied_page_returns():
    sched = scheduler(k=3)
    kv = sched.kv
    req = request("a", [5, 6, 7, 8, 5, 6], max_tokens=6)
    sched.add_request(req)
    assert step(sched, {}, {"a": 7}).seqs[0].draft_token_ids == ()  # the prefill samples 7
    # [5 6 7 8 5 6 7]: suffix [6 7] occurred at 1: propose 8 5 6 -> 4 tokens at positions 6..9, 3 pages
    out = step(sched, {"a": [9]})  # all three rejected, 9 is the target's token
    assert out.seqs[0].draft_token_ids == (8, 5, 6) and out.num_tokens == 4
    assert req.token_ids == [5, 6, 7, 8, 5, 6, 7, 9] and req.num_computed_tokens == 7 and req.num_pending == 0
    assert len(kv.get_block_table("a")) == 2 and kv.num_free_pages == kv.num_total_pages - 2
    assert req.spec_counts == (1, 3, 0)
    # [.. 7 9]: no earlier 9, no proposal: a plain decode step
    assert step(sched, {}, {"a": 5}).seqs[0].draft_token_ids == ()
    # [.. 9 5]: 5 occurred at 4: propose 6 7 9, cut to 2 by max_tokens (3 generated, 6 allowed)
    out = step(sched, {"a": [6, 7, 8]})  # both accepted, bonus 8: the sixth token
    assert out.seqs[0].draft_token_ids == (6, 7)
    assert req.output_token_ids == [7, 9, 5, 6, 7, 8] and req.status == RequestStatus.FINISHED_LENGTH
    assert req.spec_counts == (2, 5, 2)
    assert kv.num_free_pages == kv.num_total_pages


def test_a_stop_token_inside_the_run_ends_it_there():
    sched = scheduler(k=3)
    req = request("a", [1, 2, 3, 1, 2], stop_token_ids=[2])
    sched.add_request(req)
    step(sched, {}, {"a": 9})
    step(sched, {}, {"a": 1})  # [1 2 3 1 2 9]: no proposal for 9
    out = step(sched, {"a": [2, 9, 4]})  # [.. 9 1]: 1 at 3 -> 2 9 1; 2 and 9 accepted, bonus 4
    assert out.seqs[0].draft_token_ids == (2, 9, 1)
    assert req.output_token_ids == [9, 1, 2] and req.status == RequestStatus.FINISHED_STOPPED
    assert req.stop_reason == 2
    assert sched.kv.num_free_pages == sched.kv.num_total_pages


def test_proposals_fit_the_budget_and_are_dropped_when_pages_run_short():
    sched = scheduler(k=4, budget=3, num_pages=4)  # 3 usable pages: 12 tokens
    req = request("a", [1, 2, 1, 2, 1, 2, 1])
    pen = request("p", [4, 5, 4], structured_outputs={"regex": "a+"})
    sched.add_request(req)
    step(sched, {})
    step(sched, {})  # two prefill chunks of 3
    # the last prompt token speculates too: [1 2 1 2 1 2 1] proposes 2 1 (the budget allows 2)
    out = step(sched, {"a": [2, 1, 2]})
    assert out.seqs[0].draft_token_ids == (2, 1) and req.output_token_ids == [2, 1, 2]
    out = step(sched, {"a": [1, 1]})  # proposes 1 2: 1 accepted, 2 rejected, bonus 1
    assert out.seqs[0].draft_token_ids == (1, 2) and req.num_computed_tokens == 11
    # [.. 1 1] proposes 1: 13 tokens need a fourth page, so the step verifies nothing
    out = step(sched, {}, {"a": 3})
    assert out.seqs[0].draft_token_ids == () and out.num_tokens == 1 and sched.num_preemptions == 0
    pen.status = RequestStatus.RUNNING
    pen.num_computed_tokens = 2
    assert can_speculate(req) and not can_speculate(pen)
    assert "p" not in sched.speculator.propose([req, pen])


def test_proposals_leave_one_token_of_the_budget_to_every_later_running_request():
    sched = scheduler(k=4, budget=4)
    a, b = request("a", [1, 2, 1, 2, 1, 2]), request("b", [3, 4, 3, 4, 3])
    sched.add_request(a)
    sched.add_request(b)
    step(sched, {})  # a's prompt (6 tokens) takes the whole budget: a chunk of 4
    step(sched, {}, {"a": 1})  # a's last 2 prompt tokens (it samples 1), then b's first 2
    # a decodes and could propose 4 tokens (2 1 2 1), but b's prefill keeps one token of the 4
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("a", 3), ("b", 1)]
    assert out.seqs[0].draft_token_ids == (2, 1)
