"""KVCacheManager with a sliding window: exact page ids on tiny pools.

Page size 4 and window 6: a query at position p sees keys (p - 6, p], so with its next
query at q a request keeps pages from (q - 5) // 4 on and frees the rest.
"""

import pytest

from jaxserve.core.block_pool import NULL_PAGE
from jaxserve.core.kv_cache_manager import KVCacheManager, uniform_sliding_window
from jaxserve.core.request import Request
from jaxserve.core.scheduler import Scheduler
from jaxserve.sampling_params import SamplingParams

PS = 4
W = 6


def make(num_pages=11, max_pages_per_seq=8, prefix=True, window=W):
    return KVCacheManager(num_pages, PS, max_pages_per_seq, enable_prefix_caching=prefix,
                          sliding_window=window)


def decode_to(mgr, rid, tokens, start, end):
    """Steps one token at a time from `start` to `end`, sliding like the scheduler does."""
    for pos in range(start, end):
        mgr.slide_window(rid, tokens, pos)
        assert mgr.allocate_slots(rid, tokens, pos, 1) is not None
        mgr.cache_full_pages(rid, tokens, pos + 1)


def test_uniform_window_only_when_every_layer_shares_it():
    assert uniform_sliding_window((64, 64, 64)) == 64
    assert uniform_sliding_window((None, None)) is None
    assert uniform_sliding_window((64, None, 64)) is None  # Gemma-style local/global layers
    assert uniform_sliding_window((64, 32)) is None
    assert uniform_sliding_window(()) is None


def test_first_live_page():
    mgr = make()
    # query 5 sees 0..5 (page 0 live); query 8 sees 3..8 (page 0 holds 3); query 9 sees 4..9.
    assert [mgr.first_live_page(q) for q in (0, 5, 8, 9, 12, 13)] == [0, 0, 0, 1, 1, 2]
    assert make(window=None).first_live_page(1000) == 0


def test_pages_slide_out_and_become_null():
    mgr = make(prefix=False)
    tokens = list(range(40))
    assert mgr.allocate_slots("a", tokens, 0, 6) == [1, 2]
    assert mgr.slide_window("a", tokens, 6) == 0  # query 6 still sees key 1 in page 1
    decode_to(mgr, "a", tokens, 6, 9)
    assert mgr.get_block_table("a") == [1, 2, 3]
    assert mgr.slide_window("a", tokens, 9) == 1  # query 9 sees 4..9: page 1 (keys 0..3) is dead
    assert mgr.get_block_table("a") == [NULL_PAGE, 2, 3]
    assert mgr.pool.is_free(1) and mgr.num_null_pages("a") == 1 and mgr.num_held_pages("a") == 2
    assert mgr.slide_window("a", tokens, 9) == 0  # idempotent
    decode_to(mgr, "a", tokens, 9, 30)
    assert mgr.num_null_pages("a") == mgr.first_live_page(29)
    assert mgr.num_held_pages("a") <= -(-W // PS) + 1
    assert mgr.num_free_pages == mgr.num_total_pages - mgr.num_held_pages("a")
    assert mgr.stats()["num_slid_pages"] == mgr.num_null_pages("a")
    mgr.free("a")
    assert mgr.num_free_pages == mgr.num_total_pages
    assert all(mgr.pool.ref_count(p) == 0 for p in range(mgr.pool.num_pages))


def test_freed_pages_feed_the_next_page():
    """A long decode never needs more than the window's pages: a pool of 4 usable pages
    serves 100 tokens (without the window it would need 25)."""
    mgr = make(num_pages=5, max_pages_per_seq=25, prefix=False)
    tokens = list(range(100))
    assert mgr.allocate_slots("a", tokens, 0, 1) == [1]
    decode_to(mgr, "a", tokens, 1, 100)
    assert len(mgr.get_block_table("a")) == 25 and mgr.num_held_pages("a") <= 3
    with pytest.raises(ValueError):  # slide_window never frees a page twice
        mgr.pool.free_pages([mgr.get_block_table("a")[-1]] * 2)


def test_no_window_keeps_every_page():
    mgr = make(window=None, prefix=False)
    tokens = list(range(20))
    mgr.allocate_slots("a", tokens, 0, 20)
    assert mgr.slide_window("a", tokens, 20) == 0
    assert NULL_PAGE not in mgr.get_block_table("a")


def test_prefix_cache_never_hits_a_freed_and_reused_page():
    mgr = make(num_pages=8)
    a = list(range(24))
    assert mgr.allocate_slots("a", a, 0, 13) == [1, 2, 3, 4]
    mgr.cache_full_pages("a", a, 13)  # pages 1, 2, 3 hold tokens 0..11, cached
    assert mgr.slide_window("a", a, 13) == 2  # query 13 sees 8..13: pages 1, 2 are free, still cached
    assert mgr.get_block_table("a") == [NULL_PAGE, NULL_PAGE, 3, 4]
    assert mgr.pool.free_page_ids() == [5, 6, 7, 1, 2]
    # Freed but intact: a later request with the same prefix hits them (they are its prefix).
    pages, n = mgr.get_computed_pages("b", a[:13])
    assert (pages, n) == ([1, 2, 3], 12)
    # Take every free page: 1 and 2 are reused (evicted). The chain now has a hole at its
    # first page, so nothing is a hit, although page 3 still holds its hash.
    assert mgr.allocate_slots("c", [9] * 20, 0, 20) == [5, 6, 7, 1, 2]
    assert mgr.pool.page_hash(1) is None and mgr.pool.page_hash(3) is not None
    assert mgr.get_computed_pages("b2", a[:13]) == ([], 0)
    with pytest.raises(ValueError, match="no longer cached"):  # a stale lookup is refused
        mgr.allocate_slots("b", a[:13], n, 1, pages)
    for rid in ("a", "c", "b", "b2"):
        mgr.free(rid)
    assert mgr.num_free_pages == mgr.num_total_pages


def test_prefix_hit_takes_only_the_live_pages():
    mgr = make(num_pages=9)
    a = list(range(17))
    mgr.allocate_slots("a", a, 0, 17)
    mgr.cache_full_pages("a", a, 17)  # pages 1..4 full and cached, 5 holds token 16
    mgr.free("a")
    pages, n = mgr.get_computed_pages("b", a)
    assert (pages, n) == ([1, 2, 3, 4], 16)
    assert mgr.num_pages_needed("b", n, 1, pages) == 3  # pages 3 and 4 leave the free queue, + 1 new
    free = mgr.num_free_pages
    new = mgr.allocate_slots("b", a, n, 1, pages)
    # query 16 sees 11..16: pages 1 and 2 (tokens 0..7) are dead and stay free (still cached).
    assert mgr.get_block_table("b") == [NULL_PAGE, NULL_PAGE, 3, 4] + new
    assert mgr.num_null_pages("b") == 2 and mgr.num_free_pages == free - 3
    assert mgr.pool.is_free(1) and mgr.pool.page_hash(1) is not None
    mgr.free("b")
    assert mgr.num_free_pages == mgr.num_total_pages


def test_pages_are_cached_before_they_slide_out():
    """Overlap: the next step is scheduled (and slides) before cache_full_pages runs for
    this step, so slide_window registers the dead full pages itself."""
    mgr = make()
    a = list(range(20))
    mgr.allocate_slots("a", a[:16], 0, 16)
    assert mgr.slide_window("a", a[:16], 16) == 2  # query 16 sees 11..16
    assert mgr.pool.page_hash(1) is not None and mgr.pool.is_free(1)
    assert mgr.cache_full_pages("a", a[:16], 16) == 2  # after the step: the live pages 3 and 4
    mgr.free("a")
    assert mgr.get_computed_pages(None, a) == ([1, 2, 3, 4], 16)
    assert mgr.num_free_pages == mgr.num_total_pages


def test_page_of_placeholder_tokens_slides_out_uncached():
    """Window 1: a page is dead once the query moves past it, maybe while its last token is
    still a placeholder (its id unknown): it is freed without a hash."""
    mgr = make(window=1)
    a = list(range(7))
    mgr.allocate_slots("a", a, 0, 7)
    assert mgr.allocate_slots("a", a, 7, 1, num_pending_tokens=1) == []  # token 7: a placeholder
    assert mgr.slide_window("a", a, 8) == 2  # query 8 sees only itself
    assert mgr.pool.page_hash(1) is not None and mgr.pool.page_hash(2) is None
    assert mgr.cache_full_pages("a", a + [99], 8) == 0  # page 2 is null now: skipped
    mgr.free("a")
    assert mgr.get_computed_pages(None, a + [99, 1]) == ([1], 4)
    assert mgr.num_free_pages == mgr.num_total_pages


def test_fork_shares_live_pages_and_frees_exactly_once():
    mgr = make(prefix=False)
    tokens = list(range(30))
    mgr.allocate_slots("p", tokens, 0, 10)
    assert mgr.slide_window("p", tokens, 10) == 1
    mgr.fork("p", "c")
    assert mgr.get_block_table("c") == [NULL_PAGE, 2, 3]
    assert [mgr.pool.ref_count(p) for p in (1, 2, 3)] == [0, 2, 2]
    # Both decode on: the shared partial page 3 is copied for the first writer.
    copies = []
    for pos in range(10, 20):
        for rid in ("p", "c"):
            mgr.slide_window(rid, tokens, pos)
            assert mgr.allocate_slots(rid, tokens, pos, 1) is not None
        copies += mgr.take_pending_copies()  # once per step, as the scheduler does
    assert len(copies) == 1 and copies[0][0] == 3
    for rid in ("p", "c"):
        assert mgr.num_null_pages(rid) == mgr.first_live_page(19)
    held = set(mgr.get_block_table("p")[3:]) | set(mgr.get_block_table("c")[3:])
    assert mgr.num_free_pages == mgr.num_total_pages - len(held - {NULL_PAGE})
    mgr.free("p")
    mgr.free("c")
    mgr.free("c")  # a second free of the same request is a no-op
    assert mgr.num_free_pages == mgr.num_total_pages
    assert all(mgr.pool.ref_count(p) == 0 for p in range(mgr.pool.num_pages))


# -- through the scheduler ------------------------------------------------------------


def make_request(rid, n_prompt, max_tokens, n=1):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)
    return Request(rid, list(range(1, n_prompt + 1)), params, max_tokens=max_tokens,
                   eos_token_ids=frozenset(), seed=0)


def drive(sched, steps, *, abort_after=None):
    """Synchronous steps with token 7 sampled for every row; checks the window bound."""
    bound = -(-W // PS) + 1
    for step in range(steps):
        out = sched.schedule()
        for s in out.seqs:
            rid = s.request.request_id
            assert s.num_null_pages == sched.kv.num_null_pages(rid)
            if s.num_new_tokens == 1:  # decode: only the window's pages are held
                assert sched.kv.num_held_pages(rid) <= bound
        sched.update(out, [(7, None)] * out.num_sample_rows, make_child)
        if abort_after is not None and step == abort_after:
            for rid in list(sched.requests):
                sched.abort(rid)
        if not sched.has_unfinished():
            return


def make_child(parent, k):
    child = Request(f"{parent.request_id}/{k}", parent.prompt_token_ids, parent.params,
                    max_tokens=parent.max_tokens, eos_token_ids=parent.eos_token_ids, seed=parent.seed,
                    sample_index=k, parent_id=parent.request_id)
    return child


def scheduler(num_pages, **kw):
    kv = make(num_pages=num_pages, max_pages_per_seq=16, **kw)
    return Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)


@pytest.mark.parametrize("case", ["finish", "abort", "fork", "preempt"])
def test_scheduler_returns_every_page(case):
    # 8 usable pages; each request alone never holds more than 3 at a decode step.
    sched = scheduler(9 if case != "preempt" else 7)
    n = 2 if case == "fork" else 1
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 5 + 3 * i, 40, n=n))
    drive(sched, 200, abort_after=20 if case == "abort" else None)
    assert not sched.has_unfinished()
    assert sched.kv.num_free_pages == sched.kv.num_total_pages
    assert sched.kv.num_slid_pages > 0
    if case == "preempt":
        assert sched.num_preemptions > 0
