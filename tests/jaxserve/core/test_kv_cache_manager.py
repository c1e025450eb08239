"""KVCacheManager: exact page ids on tiny pools, then a stateful property test.

The property test drives the manager the way the scheduler does (admit with a prefix
lookup, chunked prefill, decode, fork, preempt, finish), with or without a sliding window,
against a fake device that stores in each slot the token prefix whose KV it would hold.
Reading every request's tokens back through its block table (those inside the window)
checks copy-on-write, the prefix cache and window sliding end to end.
"""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from jaxserve.core.block_pool import NULL_PAGE
from jaxserve.core.kv_cache_manager import KVCacheManager

PS = 4


def make(num_pages=11, max_pages_per_seq=4, prefix=True):
    return KVCacheManager(
        num_pages, PS, max_pages_per_seq, enable_prefix_caching=prefix
    )


def admit(mgr, rid, tokens, extra_key=None):
    """Lookup + allocate the whole prompt + mark it computed and cached."""
    pages, n = mgr.get_computed_pages(rid, tokens, extra_key=extra_key)
    new = mgr.allocate_slots(rid, tokens, n, len(tokens) - n, pages)
    assert new is not None
    mgr.cache_full_pages(rid, tokens, len(tokens), extra_key=extra_key)
    return pages, new


def snapshot(mgr, request_ids=()):
    pool = mgr.pool
    return (
        pool.free_page_ids(),
        [pool.ref_count(p) for p in range(pool.num_pages)],
        [pool.page_hash(p) for p in range(pool.num_pages)],
        pool.cached_hashes(),
        {r: mgr.get_block_table(r) for r in request_ids if mgr.has_request(r)},
        mgr.pending_copies,
        mgr.stats(),
    )


# -- exact page ids --------------------------------------------------------------------


def test_allocation_order_and_growth():
    mgr = make()
    tokens = list(range(10))
    assert mgr.get_computed_pages("a", tokens) == ([], 0)
    assert mgr.allocate_slots("a", tokens, 0, 6) == [1, 2]  # chunked prefill
    assert mgr.allocate_slots("a", tokens, 6, 2) == []  # still fits in page 2
    assert mgr.allocate_slots("a", tokens, 8, 2) == [3]
    assert mgr.get_block_table("a") == [1, 2, 3]
    assert mgr.allocate_slots("b", [7] * 5, 0, 5) == [4, 5]
    assert mgr.num_free_pages == 5
    assert mgr.num_total_pages == 10
    assert mgr.usage == pytest.approx(0.5)


def test_prefix_hit_shares_pages_and_counts_tokens():
    mgr = make()
    a = list(range(10))
    admit(mgr, "a", a)  # pages [1, 2, 3]; 1 and 2 are full and cached
    b = a[:8] + [100, 101, 102]
    pages, n = mgr.get_computed_pages("b", b)
    assert (pages, n) == ([1, 2], 8)
    assert mgr.allocate_slots("b", b, n, len(b) - n, pages) == [4]
    assert mgr.get_block_table("b") == [1, 2, 4]
    assert [mgr.pool.ref_count(p) for p in (1, 2, 3, 4)] == [2, 2, 1, 1]
    assert mgr.prefix_cache_query_tokens == 10 + 11
    assert mgr.prefix_cache_hit_tokens == 8


def test_lookup_is_pure():
    mgr = make()
    admit(mgr, "a", list(range(10)))
    mgr.free("a")
    before = snapshot(mgr)
    assert mgr.get_computed_pages(None, list(range(12))) == ([1, 2], 8)
    assert snapshot(mgr) == before


def test_lookup_leaves_at_least_one_token_to_compute():
    mgr = make()
    admit(mgr, "a", list(range(12)))  # three full pages cached
    assert mgr.get_computed_pages(None, list(range(12))) == ([1, 2], 8)
    assert mgr.get_computed_pages(None, list(range(9))) == ([1, 2], 8)
    assert mgr.get_computed_pages(None, list(range(8))) == ([1], 4)
    assert mgr.get_computed_pages(None, list(range(13))) == ([1, 2, 3], 12)
    assert mgr.get_computed_pages(None, [0]) == ([], 0)
    assert mgr.get_computed_pages(None, []) == ([], 0)


def test_same_page_tokens_under_another_prefix_do_not_hit():
    mgr = make()
    admit(mgr, "a", [1, 1, 1, 1, 5, 6, 7, 8, 0])  # [1, 2, 3]
    admit(mgr, "b", [2, 2, 2, 2, 9])  # [4, 5]
    # Page [5, 6, 7, 8] is cached, but under the prefix [1, 1, 1, 1] only.
    pages, n = mgr.get_computed_pages(None, [2, 2, 2, 2, 5, 6, 7, 8, 0])
    assert (pages, n) == ([4], 4)
    pages, n = mgr.get_computed_pages(None, [1, 1, 1, 1, 5, 6, 7, 8, 0])
    assert (pages, n) == ([1, 2], 8)
    # The extra key salts every page.
    assert mgr.get_computed_pages(None, [1, 1, 1, 1, 5, 6, 7, 8, 0], extra_key=b"lora") == ([], 0)


def test_extra_key_requests_hit_each_other_only():
    mgr = make()
    admit(mgr, "a", list(range(9)), extra_key=b"lora-1")
    assert mgr.get_computed_pages(None, list(range(9)), extra_key=b"lora-1") == ([1, 2], 8)
    assert mgr.get_computed_pages(None, list(range(9)), extra_key=b"lora-2") == ([], 0)
    with pytest.raises(ValueError, match="extra_key"):
        mgr.get_computed_pages("a", list(range(9)))


def test_free_order_and_cache_hit_on_freed_pages():
    mgr = make()
    a = list(range(10))
    admit(mgr, "a", a)  # [1, 2, 3]
    admit(mgr, "b", a[:8] + [50, 51, 52])  # [1, 2, 4]
    mgr.free("a")  # tail first: 3 becomes free; 2 and 1 are still held by b
    assert mgr.pool.free_page_ids() == [5, 6, 7, 8, 9, 10, 3]
    mgr.free("b")
    assert mgr.pool.free_page_ids() == [5, 6, 7, 8, 9, 10, 3, 4, 2, 1]
    assert mgr.num_free_pages == mgr.num_total_pages
    # A hit on the freed prefix touches 1 and 2 out of the queue; the new page is the head.
    c = a[:8] + [9]
    pages, n = mgr.get_computed_pages("c", c)
    assert (pages, n) == ([1, 2], 8)
    assert mgr.allocate_slots("c", c, n, 1, pages) == [5]
    assert mgr.pool.free_page_ids() == [6, 7, 8, 9, 10, 3, 4]
    assert mgr.get_block_table("c") == [1, 2, 5]


def test_least_recently_freed_is_evicted_first():
    mgr = make(num_pages=5, max_pages_per_seq=4)  # pages 1..4
    x = [1] * 4 + [2] * 4 + [3]
    y = [7, 7, 8]
    admit(mgr, "x", x)  # [1, 2, 3]; 1 and 2 cached
    admit(mgr, "y", y)  # [4]; nothing full
    mgr.free("x")  # queue [3, 2, 1]
    mgr.free("y")  # queue [3, 2, 1, 4]
    assert mgr.pool.free_page_ids() == [3, 2, 1, 4]
    assert mgr.allocate_slots("z", [0] * 8, 0, 8) == [3, 2]  # evicts x's second page
    assert mgr.pool.num_evictions == 1
    # x's prefix now hits only its first page.
    assert mgr.get_computed_pages(None, x) == ([1], 4)


def test_duplicate_prefix_keeps_the_first_mapping():
    mgr = make()
    p = list(range(9))
    for rid in ("a", "b"):  # both admitted before either is cached
        assert mgr.allocate_slots(rid, p, 0, 9) is not None
    assert mgr.cache_full_pages("a", p, 9) == 2
    assert mgr.cache_full_pages("b", p, 9) == 0
    assert mgr.get_block_table("b") == [4, 5, 6]
    assert mgr.pool.page_hash(4) is None
    assert mgr.get_computed_pages(None, p) == ([1, 2], 8)
    mgr.free("a")
    mgr.free("b")
    assert mgr.get_computed_pages(None, p) == ([1, 2], 8)


def test_cache_full_pages_is_incremental():
    mgr = make()
    t = list(range(14))
    mgr.allocate_slots("a", t, 0, 5)
    assert mgr.cache_full_pages("a", t, 5) == 1
    assert mgr.cache_full_pages("a", t, 5) == 0
    mgr.allocate_slots("a", t, 5, 9)
    assert mgr.cache_full_pages("a", t, 14) == 2
    assert mgr.get_computed_pages(None, t + [99]) == ([1, 2, 3], 12)
    with pytest.raises(ValueError, match="cached"):
        mgr.allocate_slots("a", t, 8, 1)  # cannot rewrite cached pages


def test_fork_then_copy_on_write_of_the_partial_page():
    mgr = make()
    t = list(range(6))  # pages [1 full, 2 half]
    admit(mgr, "a", t)
    mgr.fork("a", "b")
    assert mgr.get_block_table("b") == [1, 2]
    assert [mgr.pool.ref_count(p) for p in (1, 2)] == [2, 2]
    ta, tb = t + [100], t + [200]
    assert mgr.num_pages_needed("a", 6, 1) == 1
    assert mgr.allocate_slots("a", ta, 6, 1) == [3]
    assert mgr.get_block_table("a") == [1, 3]
    assert mgr.take_pending_copies() == [(2, 3)]
    assert mgr.take_pending_copies() == []
    assert [mgr.pool.ref_count(p) for p in (1, 2, 3)] == [2, 1, 1]
    # b now owns page 2 alone and writes in place.
    assert mgr.num_pages_needed("b", 6, 1) == 0
    assert mgr.allocate_slots("b", tb, 6, 1) == []
    assert mgr.pending_copies == ()
    assert mgr.get_block_table("b") == [1, 2]
    mgr.free("a")
    mgr.free("b")
    assert mgr.num_free_pages == mgr.num_total_pages


def test_fork_at_a_page_boundary_needs_no_copy():
    mgr = make()
    t = list(range(8))
    mgr.allocate_slots("a", t, 0, 8)
    mgr.fork("a", "b")
    assert mgr.allocate_slots("a", t + [1], 8, 1) == [3]
    assert mgr.allocate_slots("b", t + [2], 8, 1) == [4]
    assert mgr.pending_copies == ()
    assert mgr.get_block_table("a") == [1, 2, 3]
    assert mgr.get_block_table("b") == [1, 2, 4]


def test_three_way_fork_copies_for_all_but_the_last_writer():
    mgr = make()
    t = list(range(5))
    mgr.allocate_slots("a", t, 0, 5)  # [1, 2]
    mgr.fork("a", "b")
    mgr.fork("a", "c")
    assert mgr.pool.ref_count(2) == 3
    for rid, dst in (("a", 3), ("b", 4)):
        assert mgr.allocate_slots(rid, t + [0], 5, 1) == [dst]
    assert mgr.allocate_slots("c", t + [0], 5, 1) == []
    assert mgr.take_pending_copies() == [(2, 3), (2, 4)]
    assert mgr.get_block_table("c") == [1, 2]
    assert [mgr.pool.ref_count(p) for p in (1, 2, 3, 4)] == [3, 1, 1, 1]


def test_free_drops_copies_into_pages_nobody_holds():
    mgr = make()
    t = list(range(5))
    mgr.allocate_slots("a", t, 0, 5)
    mgr.fork("a", "b")
    mgr.allocate_slots("a", t + [0], 5, 1)
    assert mgr.pending_copies == ((2, 3),)
    mgr.free("a")  # aborted before the step ran
    assert mgr.pending_copies == ()


def test_failed_allocation_changes_nothing():
    mgr = make(num_pages=6)  # pages 1..5
    a = list(range(9))
    admit(mgr, "a", a)  # [1, 2, 3]
    mgr.free("a")  # all free, 1 and 2 cached
    mgr.allocate_slots("x", [9] * 8, 0, 8)  # takes 4, 5
    b = a[:8] + [1, 2, 3, 4, 5]
    pages, n = mgr.get_computed_pages("b", b)
    assert (pages, n) == ([1, 2], 8)
    # Needs 2 free pages for the hits plus 2 new ones: only 3 are free.
    assert mgr.num_pages_needed("b", n, 5, pages) == 4
    before = snapshot(mgr, ["a", "b", "x"])
    assert mgr.allocate_slots("b", b, n, 5, pages) is None
    assert snapshot(mgr, ["a", "b", "x"]) == before
    assert not mgr.has_request("b")
    # Copy-on-write with no free page also fails cleanly.
    mgr.allocate_slots("y", [0] * 5, 0, 5)  # takes 3 and then a cached page
    mgr.fork("y", "z")
    assert mgr.num_free_pages == 1
    mgr.allocate_slots("x", [9] * 9, 8, 1)  # last free page
    before = snapshot(mgr, ["x", "y", "z"])
    assert mgr.num_pages_needed("y", 5, 1) == 1
    assert mgr.allocate_slots("y", [0] * 6, 5, 1) is None
    assert snapshot(mgr, ["x", "y", "z"]) == before


def test_max_pages_per_seq_is_refused_without_changes():
    mgr = make(max_pages_per_seq=2)
    t = list(range(12))
    before = snapshot(mgr, ["a"])
    with pytest.raises(ValueError, match="max_pages_per_seq"):
        mgr.allocate_slots("a", t, 0, 9)
    with pytest.raises(ValueError, match="max_pages_per_seq"):
        mgr.num_pages_needed("a", 0, 9)
    assert snapshot(mgr, ["a"]) == before
    assert mgr.allocate_slots("a", t, 0, 8) == [1, 2]
    with pytest.raises(ValueError, match="max_pages_per_seq"):
        mgr.allocate_slots("a", t, 8, 1)
    assert mgr.get_block_table("a") == [1, 2]


def test_lookup_is_capped_by_max_pages_per_seq():
    mgr = make(max_pages_per_seq=4)
    admit(mgr, "a", list(range(16)))
    assert mgr.get_computed_pages(None, list(range(20))) == ([1, 2, 3, 4], 16)


def test_argument_checks():
    mgr = make()
    admit(mgr, "a", list(range(9)))
    with pytest.raises(ValueError, match="len\\(token_ids\\)"):
        mgr.allocate_slots("b", [1, 2], 0, 3)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        mgr.allocate_slots("b", list(range(9)), 4, 1, [1, 2])
    with pytest.raises(ValueError, match="duplicates"):
        mgr.allocate_slots("b", list(range(9)), 8, 1, [1, 1])
    with pytest.raises(ValueError, match="no longer cached"):
        mgr.allocate_slots("b", list(range(9)), 4, 1, [3])  # page 3 is not cached
    with pytest.raises(ValueError, match="first call"):
        mgr.allocate_slots("a", list(range(10)), 9, 1, [1])
    with pytest.raises(ValueError, match=">= 0"):
        mgr.allocate_slots("a", list(range(10)), 9, -1)
    with pytest.raises(ValueError, match="unknown"):
        mgr.fork("nope", "c")
    with pytest.raises(ValueError, match="already"):
        mgr.fork("a", "a")
    mgr.free("nope")  # unknown ids are a no-op
    with pytest.raises(ValueError):
        KVCacheManager(4, 0, 4, enable_prefix_caching=True)


def test_stale_cache_hit_is_refused():
    mgr = make(num_pages=4)  # pages 1..3
    a = list(range(9))
    admit(mgr, "a", a)
    mgr.free("a")  # queue [3, 2, 1]; 1 and 2 cached
    pages, n = mgr.get_computed_pages("b", a)
    assert pages == [1, 2]
    mgr.allocate_slots("x", [5] * 12, 0, 12)  # evicts every cached page
    with pytest.raises(ValueError, match="no longer cached"):
        mgr.allocate_slots("b", a, n, 1, pages)


def test_prefix_caching_disabled():
    mgr = make(prefix=False)
    t = list(range(9))
    admit(mgr, "a", t)
    assert mgr.cache_full_pages("a", t, 9) == 0
    assert mgr.pool.cached_hashes() == {}
    mgr.free("a")
    assert mgr.get_computed_pages("b", t) == ([], 0)
    assert mgr.prefix_cache_query_tokens == 0
    with pytest.raises(ValueError, match="no longer cached"):
        mgr.allocate_slots("b", t, 4, 1, [1])


def test_reset_prefix_cache():
    mgr = make()
    admit(mgr, "a", list(range(9)))
    assert not mgr.reset_prefix_cache()
    mgr.free("a")
    assert mgr.reset_prefix_cache()
    assert mgr.get_computed_pages(None, list(range(9))) == ([], 0)


# -- stateful property test -------------------------------------------------------------

# Shared "system prompts" plus a short random tail over a two-token vocabulary, so prefix
# hits, duplicate pages under different prefixes and partial-page forks are all common.
SYSTEM_PROMPTS = [[], [0] * 8, [0, 1] * 4 + [1] * 3, [1, 1, 0, 0] * 3]
prompts = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(SYSTEM_PROMPTS),
    st.lists(st.integers(0, 1), max_size=14),
).filter(bool)


def kv(tokens, pos):
    """Fake KV of position ``pos``: like real attention KV it depends on the whole prefix."""
    return tuple(tokens[: pos + 1])


class KVCacheMachine(RuleBasedStateMachine):
    """The scheduler's use of the manager, checked against a fake device after each step."""

    MAX_PAGES = 6

    @initialize(num_pages=st.sampled_from([5, 9, 14]), prefix=st.booleans(),
                window=st.sampled_from([None, None, 1, 3, 6, 9]))
    def setup(self, num_pages, prefix, window):
        self.mgr = KVCacheManager(
            num_pages, PS, self.MAX_PAGES, enable_prefix_caching=prefix, sliding_window=window
        )
        self.tokens: dict[str, list[int]] = {}  # every live request (running or waiting)
        self.computed: dict[str, int] = {}  # running requests
        self.running: list[str] = []  # admission order; the newest is preempted first
        self.waiting: list[str] = []
        self.device: dict[int, list] = {p: [None] * PS for p in range(num_pages)}
        self.next_id = 0

    # helpers

    def ids(self):
        return set(self.tokens)

    def snap(self):
        return snapshot(self.mgr, self.ids())

    def pick(self, ids, i):
        return ids[i % len(ids)]

    def preempt(self, rid):
        self.mgr.free(rid)
        self.running.remove(rid)
        del self.computed[rid]
        self.waiting.append(rid)

    def run_step(self, scheduled, data):
        """Execute pending copies, then write each scheduled request's new tokens."""
        for src, dst in self.mgr.take_pending_copies():
            self.device[dst] = list(self.device[src])
        for rid, num_new in scheduled:
            table, toks = self.mgr.get_block_table(rid), self.tokens[rid]
            start = self.computed[rid]
            for pos in range(start, start + num_new):
                self.device[table[pos // PS]][pos % PS] = kv(toks, pos)
            self.computed[rid] = start + num_new
            self.mgr.cache_full_pages(rid, toks, self.computed[rid])
            if self.computed[rid] == len(toks):  # sampled a token
                toks.append(data.draw(st.integers(0, 1)))
                if len(toks) > self.MAX_PAGES * PS:  # hit max_model_len
                    self.finish(rid)

    def finish(self, rid):
        self.mgr.free(rid)
        self.running.remove(rid)
        del self.computed[rid], self.tokens[rid]

    def try_allocate(self, rid, num_new, pages=(), num_hit=0):
        """allocate_slots; on failure check nothing changed and preempt the newest."""
        while True:
            before, free = self.snap(), self.mgr.num_free_pages
            computed = self.computed.get(rid, num_hit)
            needed = self.mgr.num_pages_needed(rid, computed, num_new, pages)
            new = self.mgr.allocate_slots(rid, self.tokens[rid], computed, num_new, pages)
            if new is not None:
                assert needed <= free
                assert self.mgr.num_free_pages == free - needed
                assert len(set(new)) == len(new) and NULL_PAGE not in new
                return True
            assert needed > free
            assert self.snap() == before
            if not self.running or rid not in self.running:
                return False
            victim = self.running[-1]
            self.preempt(victim)
            if victim == rid:
                return False

    # rules

    @rule(prompt=prompts)
    def add_request(self, prompt):
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.tokens[rid] = list(prompt)
        self.waiting.append(rid)

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 50), chunk=st.integers(1, 30), data=st.data())
    def admit(self, i, chunk, data):
        rid = self.pick(self.waiting, i)
        toks = self.tokens[rid]
        before = self.snap()
        pages, n = self.mgr.get_computed_pages(rid, toks)
        assert self.snap() == before
        assert n == len(pages) * PS and n <= (len(toks) - 1) // PS * PS
        for j, page in enumerate(pages):  # a hit holds exactly these tokens
            assert self.device[page] == [kv(toks, pos) for pos in range(j * PS, (j + 1) * PS)]
        if -(-len(toks) // PS) > self.MAX_PAGES:  # longer than max_model_len: refused
            with pytest.raises(ValueError, match="max_pages_per_seq"):
                self.mgr.allocate_slots(rid, toks, n, len(toks) - n, pages)
            assert self.snap() == before
            self.waiting.remove(rid)
            del self.tokens[rid]
            self.mgr.free(rid)  # drops the memoised hashes
            return
        num_new = min(chunk, len(toks) - n)
        if self.try_allocate(rid, num_new, pages, n):
            self.waiting.remove(rid)
            self.running.append(rid)
            self.computed[rid] = n
            self.run_step([(rid, num_new)], data)

    @precondition(lambda self: self.running)
    @rule(chunk=st.integers(1, 9), data=st.data())
    def step(self, chunk, data):
        """One scheduler step over all running requests, oldest first."""
        scheduled = []
        for rid in self.running:  # the scheduler slides every window first
            self.mgr.slide_window(rid, self.tokens[rid], self.computed[rid])
            table = self.mgr.get_block_table(rid)
            assert self.mgr.num_null_pages(rid) == min(self.mgr.first_live_page(self.computed[rid]), len(table))
        for rid in list(self.running):
            if rid not in self.running:  # preempted earlier in this step
                continue
            num_new = min(chunk, len(self.tokens[rid]) - self.computed[rid])
            if self.try_allocate(rid, num_new):
                scheduled.append((rid, num_new))
        self.run_step(scheduled, data)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 50), n=st.integers(1, 3))
    def fork(self, i, n):
        """Parallel sampling: n children share the parent's pages."""
        parent = self.pick(self.running, i)
        for _ in range(n):
            child = f"r{self.next_id}"
            self.next_id += 1
            free = self.mgr.num_free_pages
            self.mgr.fork(parent, child)
            assert self.mgr.num_free_pages == free
            assert self.mgr.get_block_table(child) == self.mgr.get_block_table(parent)
            self.tokens[child] = list(self.tokens[parent])
            self.computed[child] = self.computed[parent]
            self.running.append(child)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 50))
    def finish_one(self, i):
        self.finish(self.pick(self.running, i))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 50))
    def preempt_one(self, i):
        self.preempt(self.pick(self.running, i))

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 50))
    def abort_waiting(self, i):
        rid = self.pick(self.waiting, i)
        self.waiting.remove(rid)
        del self.tokens[rid]
        self.mgr.free(rid)

    @rule(prompt=prompts)
    def lookup(self, prompt):
        before = self.snap()
        pages, n = self.mgr.get_computed_pages(None, prompt)
        assert self.snap() == before
        for j, page in enumerate(pages):
            assert self.device[page] == [kv(prompt, pos) for pos in range(j * PS, (j + 1) * PS)]

    # invariants

    @invariant()
    def pages_are_consistent(self):
        if not hasattr(self, "mgr"):
            return
        mgr, pool = self.mgr, self.mgr.pool
        tables = {rid: mgr.get_block_table(rid) for rid in self.running}
        assert mgr.stats()["num_requests"] == len(self.running)
        assert not any(mgr.has_request(rid) for rid in self.waiting)
        holders = [0] * pool.num_pages
        for rid, table in tables.items():
            num_null = mgr.num_null_pages(rid)
            # Only pages no future query of the request can see are gone.
            assert num_null <= mgr.first_live_page(self.computed[rid])
            assert table[:num_null] == [NULL_PAGE] * num_null
            live = table[num_null:]
            assert len(set(live)) == len(live) and NULL_PAGE not in live
            for page in live:
                holders[page] += 1
        assert [pool.ref_count(p) for p in range(pool.num_pages)] == holders
        free = pool.free_page_ids()
        assert len(set(free)) == len(free) and NULL_PAGE not in free
        assert all(holders[p] == 0 for p in free)
        used = sum(1 for p in range(1, pool.num_pages) if holders[p] > 0)
        assert len(free) + used == mgr.num_total_pages == pool.num_pages - 1
        cached = pool.cached_hashes()
        assert all(pool.page_hash(page) == h for h, page in cached.items())
        assert all(
            cached[pool.page_hash(p)] == p
            for p in range(pool.num_pages)
            if pool.page_hash(p) is not None
        )
        assert mgr.pending_copies == ()

    @invariant()
    def every_request_reads_back_its_tokens(self):
        if not hasattr(self, "mgr"):
            return
        for rid in self.running:
            table, toks = self.mgr.get_block_table(rid), self.tokens[rid]
            assert len(table) * PS >= self.computed[rid]
            for pos in range(self.mgr.num_null_pages(rid) * PS, self.computed[rid]):
                assert self.device[table[pos // PS]][pos % PS] == kv(toks, pos), (rid, pos)

    def teardown(self):
        if not hasattr(self, "mgr"):
            return
        for rid in list(self.tokens):
            self.mgr.free(rid)
        assert self.mgr.num_free_pages == self.mgr.num_total_pages
        assert all(self.mgr.pool.ref_count(p) == 0 for p in range(self.mgr.pool.num_pages))


KVCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None
)
TestKVCacheMachine = KVCacheMachine.TestCase
