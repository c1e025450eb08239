"""Per-request KV page bookkeeping on top of ``BlockPool``: block tables, prefix cache, COW.

How the scheduler drives it for one request (all host-side, no device arrays here)::

    pages, n_hit = mgr.get_computed_pages(req_id, prompt)       # pure lookup
    new = mgr.allocate_slots(req_id, tokens, n_hit, n_new, pages) # None: no room, nothing changed
    ...every step: mgr.allocate_slots(req_id, tokens, n_computed, n_new)
    copies = mgr.take_pending_copies()   # model runner: page[dst] = page[src], in order,
                                         # before the step writes any KV
    ...after the step computed the tokens:
    mgr.cache_full_pages(req_id, tokens, n_computed_after_step)
    mgr.free(req_id)                     # finish, abort or preemption

Prefix caching covers full pages only, keyed by a chain hash
(``hash_i = sha256(hash_{i-1} || page_tokens_i)``, see ``block_pool.hash_page``), so equal
page contents under different prefixes never collide. A request's chain is memoised per
request id and extended incrementally, so caching costs O(new pages) per step.

Copy-on-write: ``fork`` lets a child share all of its parent's pages. Full pages are never
written again, so only a shared, partially filled page that a request is about to write
into needs copying: ``allocate_slots`` gives the writer a fresh page in its block table and
records ``(src, dst)`` for the model runner.

Sliding window (``sliding_window=W``, only when every layer attends through the same
window, see ``uniform_sliding_window``): a query at position ``p`` sees keys in
``(p - W, p]``, so once a request's next queries start at ``q``, the block-table pages whose
last position is ``< q - W + 1`` are dead. ``slide_window`` returns them to the pool and puts
the null page in their block-table entries (the table keeps its length, so the block table
still indexes pages by position; attention masks those entries by the window and never reads
them). A running request then holds at most ``ceil(W / page_size) + 1`` pages besides the
pages of the chunk it computes. Dead pages are always a leading run of the table
(``num_null_pages``), since a request's queries only move forward.

Prefix cache with a window: a slid-out page is freed like any other page. A registered one
keeps its hash in the free queue while its contents are intact and loses it when the page
is reused (eviction), so a lookup never returns a page whose KV was overwritten. Lookups
still need the whole chain from the first page (the simplest rule: a chain with a hole is
never a hit). ``slide_window`` registers full pages before freeing them, so a long prompt
stays cached although its first pages slide out before the step that computed them has
returned; a page whose tokens were still placeholders slides out uncached. A new request's
hit pages that are already dead for its first query are not taken: null entries there.

Assumption: a request's ``token_ids`` only grow by appending between calls, and its
``num_computed_tokens`` never falls below the pages already registered in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from jaxserve.core.block_pool import NULL_PAGE, ROOT_HASH, BlockPool, hash_page


def uniform_sliding_window(per_layer_windows: Sequence[int | None]) -> int | None:
    """The window pages may slide out of: W when every layer has the same window W, else None.

    A model where only some layers are windowed (Gemma's local/global layers, Qwen2's
    ``max_window_layers``) must keep every page: its full-attention layers read all of them.
    Two different windows would need per-layer-group tables; the smallest window is not
    safe, so such models keep every page too.
    """
    windows = set(per_layer_windows)
    if len(windows) != 1:
        return None
    (window,) = windows
    return window


@dataclass
class _HashChain:
    """Chain hashes of a request's full pages, extended lazily."""

    extra_key: bytes | None
    hashes: list[bytes] = field(default_factory=list)

    def hash_at(self, i: int, token_ids: Sequence[int], page_size: int) -> bytes:
        """Hash of page ``i`` (computing pages up to ``i`` if needed); page must be full."""
        while len(self.hashes) <= i:
            j = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else ROOT_HASH
            tokens = token_ids[j * page_size : (j + 1) * page_size]
            self.hashes.append(hash_page(parent, tokens, self.extra_key))
        return self.hashes[i]


@dataclass
class _Plan:
    """What one ``allocate_slots`` call would do, computed without changing anything."""

    cow_indices: list[int]  # block-table slots holding a shared page the request writes into
    num_grow: int  # pages appended to the block table
    num_touched_free: int  # computed (cache-hit) pages that leave the free queue

    @property
    def num_free_pages_needed(self) -> int:
        return len(self.cow_indices) + self.num_grow + self.num_touched_free


class KVCacheManager:
    """Block tables per request over one ``BlockPool`` of ``num_pages`` (page 0 = null)."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        max_pages_per_seq: int,
        *,
        enable_prefix_caching: bool,
        sliding_window: int | None = None,
    ) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_pages_per_seq < 1:
            raise ValueError(f"max_pages_per_seq must be >= 1, got {max_pages_per_seq}")
        self.pool = BlockPool(num_pages, enable_prefix_caching=enable_prefix_caching)
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[str, list[int]] = {}
        # Leading block-table pages already registered in (or taken from) the prefix cache.
        self._num_cached: dict[str, int] = {}
        self._chains: dict[str, _HashChain] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.sliding_window = sliding_window
        # Leading block-table entries that are the null page (slid out of the window).
        self._num_null: dict[str, int] = {}
        self.num_slid_pages = 0  # block-table entries nulled by the window since start

    # -- sizes and stats -------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    @property
    def num_total_pages(self) -> int:
        return self.pool.num_total_pages

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_hit_tokens(self) -> int:
        return self.pool.prefix_cache_hit_tokens

    @property
    def prefix_cache_query_tokens(self) -> int:
        return self.pool.prefix_cache_query_tokens

    def stats(self) -> dict[str, int | float]:
        return {
            "num_free_pages": self.num_free_pages,
            "num_total_pages": self.num_total_pages,
            "kv_cache_usage": self.usage,
            "prefix_cache_query_tokens": self.prefix_cache_query_tokens,
            "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
            "num_evictions": self.pool.num_evictions,
            "num_requests": len(self._tables),
            "num_slid_pages": self.num_slid_pages,
        }

    # -- requests --------------------------------------------------------------------

    def has_request(self, request_id: str) -> bool:
        """True once ``allocate_slots`` (or ``fork``) created its block table."""
        return request_id in self._tables

    def get_block_table(self, request_id: str) -> list[int]:
        """A copy of the request's page ids, in token order."""
        return list(self._tables[request_id])

    def block_table_view(self, request_id: str) -> Sequence[int]:
        """The request's live page list (no copy, for the per-step hot path): read only,
        and valid until the next call that changes this request's pages."""
        return self._tables[request_id]

    def num_null_pages(self, request_id: str) -> int:
        """Leading block-table entries of the request that are the null page (slid out)."""
        return self._num_null.get(request_id, 0)

    def num_held_pages(self, request_id: str) -> int:
        """Pages the request holds: its block table less the null entries."""
        return len(self._tables[request_id]) - self._num_null[request_id]

    def first_live_page(self, first_query_position: int) -> int:
        """Index of the first block-table page a query at ``first_query_position`` (or
        later) can see: 0 without a window. Pages before it are dead."""
        if self.sliding_window is None:
            return 0
        return max(0, (first_query_position - self.sliding_window + 1) // self.page_size)

    def slide_window(self, request_id: str, token_ids: Sequence[int], first_query_position: int) -> int:
        """Frees the request's pages that no query at ``>= first_query_position`` can see
        and nulls their block-table entries. Returns how many were nulled now.

        Call with the request's ``num_computed_tokens`` (safe at any time: queries only
        move forward). Full dead pages whose tokens are all in ``token_ids`` are registered
        in the prefix cache first: their KV is written by a step dispatched earlier, which
        the device runs before any later step can read or overwrite the page. Without that,
        a long prefill chunk's first pages would slide out before ``cache_full_pages`` (after
        the step) could register them. A no-op without a window or for an unknown request.
        """
        table = self._tables.get(request_id)
        if table is None or self.sliding_window is None:
            return 0
        lo = self._num_null[request_id]
        hi = min(self.first_live_page(first_query_position), len(table))
        if hi <= lo:
            return 0
        if self.enable_prefix_caching and self._num_cached[request_id] < hi:
            self.cache_full_pages(request_id, token_ids, min(hi * self.page_size, len(token_ids)),
                                  extra_key=self._chain_key(request_id))
        dead = table[lo:hi]
        table[lo:hi] = [NULL_PAGE] * (hi - lo)
        self._num_null[request_id] = hi
        self._release(dead)
        self.num_slid_pages += hi - lo
        return hi - lo

    def get_computed_pages(
        self,
        request_id: str | None,
        token_ids: Sequence[int],
        *,
        extra_key: bytes | None = None,
    ) -> tuple[list[int], int]:
        """Longest cached prefix of full pages: ``(pages, num_computed_tokens)``.

        Capped at ``(len(token_ids) - 1) // page_size`` pages so at least one token is
        left to compute (it yields the logits). A pure lookup: no ref counts, free queue
        or stats change. With a ``request_id`` the chain hashes are memoised for later
        calls; ``free(request_id)`` drops them, also for a request that never got pages.
        """
        if not self.enable_prefix_caching or not token_ids:
            return [], 0
        max_hit = min((len(token_ids) - 1) // self.page_size, self.max_pages_per_seq)
        chain = self._chain(request_id, extra_key)
        pages = []
        for i in range(max_hit):
            page = self.pool.get_cached_page(chain.hash_at(i, token_ids, self.page_size))
            if page is None:
                break
            pages.append(page)
        return pages, len(pages) * self.page_size

    def num_pages_needed(
        self,
        request_id: str,
        num_computed_tokens: int,
        num_new_tokens: int,
        computed_pages: Sequence[int] = (),
    ) -> int:
        """Free pages the same ``allocate_slots`` call would consume.

        Counts new pages, copy-on-write pages and cache-hit pages that sit in the free
        queue; it succeeds iff this is ``<= num_free_pages``. Raises like allocate_slots.
        """
        plan = self._plan(request_id, num_computed_tokens, num_new_tokens, computed_pages)
        return plan.num_free_pages_needed

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        computed_pages: Sequence[int] = (),
        *,
        num_pending_tokens: int = 0,
    ) -> list[int] | None:
        """Own pages for ``num_computed_tokens + num_new_tokens`` tokens.

        ``num_pending_tokens``: tokens sampled by steps still on the device, past the end of
        ``token_ids`` (the overlapped loop schedules them before their ids are known).

        On a request's first call, ``computed_pages`` (from ``get_computed_pages``, called
        just before) are touched and head its block table, and the admission is counted
        in the prefix-cache stats. Returns the newly allocated page ids in block-table
        order (copy-on-write replacements first, then appended pages; ``[]`` when none
        were needed), or None when too few pages are free, in which case nothing changed.
        Raises ValueError past ``max_pages_per_seq`` or on inconsistent arguments.
        """
        if num_computed_tokens + num_new_tokens > len(token_ids) + num_pending_tokens:
            raise ValueError(
                f"num_computed_tokens + num_new_tokens = {num_computed_tokens + num_new_tokens} exceeds "
                f"len(token_ids) + num_pending_tokens = {len(token_ids) + num_pending_tokens}"
            )
        table = self._tables.get(request_id)
        ps = self.page_size
        if (table is not None and num_new_tokens == 1 and not computed_pages
                and self._num_cached[request_id] * ps <= num_computed_tokens < len(table) * ps
                and self.pool.ref_count(table[num_computed_tokens // ps]) == 1):
            return []  # the common decode step: one token into a page only this request holds
        plan = self._plan(request_id, num_computed_tokens, num_new_tokens, computed_pages)
        if plan.num_free_pages_needed > self.pool.num_free_pages:
            return None
        if table is None:
            # Hit pages already dead for the first query are not taken (null entries).
            num_null = min(self.first_live_page(num_computed_tokens), len(computed_pages))
            self.pool.touch(computed_pages[num_null:])
            table = self._tables[request_id] = [NULL_PAGE] * num_null + list(computed_pages[num_null:])
            self._num_null[request_id] = num_null
            self._num_cached[request_id] = len(computed_pages)
            if self.enable_prefix_caching:
                self.pool.record_prefix_lookup(len(token_ids), num_computed_tokens)
        new_pages = self.pool.get_new_pages(len(plan.cow_indices) + plan.num_grow)
        sources = []
        for i, dst in zip(plan.cow_indices, new_pages):
            sources.append(table[i])
            self._pending_copies.append((table[i], dst))
            table[i] = dst
        self.pool.free_pages(sources)  # still held by the sharers: ref_count stays >= 1
        table.extend(new_pages[len(plan.cow_indices) :])
        return new_pages

    def cache_full_pages(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        *,
        extra_key: bytes | None = None,
    ) -> int:
        """Register the request's newly full, computed pages in the prefix cache.

        Call after the step that computed the tokens. A page whose hash another page
        already holds is left uncached (the existing mapping wins). ``extra_key`` must
        match the one given to ``get_computed_pages``. Returns how many were registered.
        """
        table = self._table(request_id)
        if num_computed_tokens > len(token_ids):
            raise ValueError(
                f"num_computed_tokens {num_computed_tokens} exceeds len(token_ids) {len(token_ids)}"
            )
        if not self.enable_prefix_caching:
            return 0
        num_full = min(num_computed_tokens // self.page_size, len(table))
        start = self._num_cached[request_id]
        if num_full <= start:
            return 0
        chain = self._chain(request_id, extra_key)
        registered = 0
        for i in range(start, num_full):
            if table[i] == NULL_PAGE:
                continue  # slid out of the window uncached (its tokens were placeholders)
            page_hash = chain.hash_at(i, token_ids, self.page_size)
            registered += self.pool.cache_page(table[i], page_hash)
        self._num_cached[request_id] = num_full
        return registered

    def free(self, request_id: str) -> None:
        """Release the request's pages (tail first, so its tail is evicted first).

        For finish, abort and preemption; a no-op for an unknown request id.
        """
        self._chains.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        num_null = self._num_null.pop(request_id, 0)
        table = self._tables.pop(request_id, None)
        if table:
            self._release(reversed(table[num_null:]))

    def truncate(self, request_id: str, num_tokens: int) -> int:
        """Keep only the pages that hold the first ``num_tokens`` tokens; the trailing pages
        return to the pool (tail first). For speculative decoding: the KV slots of rejected
        proposals are past ``num_tokens`` and are written again by later steps. Registered
        (prefix-cached) pages are never dropped. Returns how many pages were released."""
        table = self._table(request_id)
        keep = -(-num_tokens // self.page_size)
        if keep < self._num_cached[request_id]:
            raise ValueError(f"truncate to {num_tokens} tokens would drop {self._num_cached[request_id] - keep} "
                             "prefix-cached pages")
        keep = max(keep, self._num_null[request_id])
        dropped = table[keep:]
        if dropped:
            del table[keep:]
            self._release(reversed(dropped))
        return len(dropped)

    def _release(self, ordered_pages) -> None:
        """free_pages, then drops copy-on-write copies into pages nobody holds any more."""
        freed = set(self.pool.free_pages(ordered_pages))
        if freed and self._pending_copies:
            # A copy into a page nobody holds any more is moot (and the page may be reused).
            self._pending_copies = [(s, d) for s, d in self._pending_copies if d not in freed]

    def fork(self, parent_id: str, child_id: str) -> None:
        """Let ``child_id`` share all of the parent's pages (ref_count += 1 each)."""
        parent = self._table(parent_id)
        if child_id in self._tables:
            raise ValueError(f"request {child_id!r} already has pages")
        num_null = self._num_null[parent_id]
        self.pool.touch(parent[num_null:])
        self._tables[child_id] = list(parent)
        self._num_null[child_id] = num_null
        num_cached = self._num_cached[parent_id]
        self._num_cached[child_id] = num_cached
        self._chains.pop(child_id, None)
        chain = self._chains.get(parent_id)
        if chain is not None:
            # Only hashes of registered pages are surely shared tokens; the rest are rebuilt.
            self._chains[child_id] = _HashChain(chain.extra_key, chain.hashes[:num_cached])

    @property
    def pending_copies(self) -> tuple[tuple[int, int], ...]:
        """Copy-on-write instructions not yet taken (read-only view)."""
        return tuple(self._pending_copies)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Return and clear ``(src_page, dst_page)`` pairs, to run in order before writes."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible (True) while no page is held."""
        return self.pool.reset_prefix_cache()

    # -- internals -------------------------------------------------------------------

    def _table(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        if table is None:
            raise ValueError(f"unknown request {request_id!r}")
        return table

    def _chain_key(self, request_id: str) -> bytes | None:
        chain = self._chains.get(request_id)
        return chain.extra_key if chain is not None else None

    def _chain(self, request_id: str | None, extra_key: bytes | None) -> _HashChain:
        if request_id is None:
            return _HashChain(extra_key)
        chain = self._chains.get(request_id)
        if chain is None:
            chain = self._chains[request_id] = _HashChain(extra_key)
        elif chain.extra_key != extra_key:
            raise ValueError(f"request {request_id!r} changed its prefix-cache extra_key")
        return chain

    def _plan(
        self,
        request_id: str,
        num_computed_tokens: int,
        num_new_tokens: int,
        computed_pages: Sequence[int],
    ) -> _Plan:
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got {num_computed_tokens} and {num_new_tokens}"
            )
        ps = self.page_size
        table = self._tables.get(request_id)
        if table is None:
            self._check_computed_pages(request_id, num_computed_tokens, computed_pages)
            held: Sequence[int] = computed_pages
            num_null = min(self.first_live_page(num_computed_tokens), len(computed_pages))
            num_touched_free = sum(self.pool.is_free(p) for p in computed_pages[num_null:])
        else:
            if computed_pages:
                raise ValueError("computed_pages are only accepted on a request's first call")
            if num_computed_tokens < self._num_cached[request_id] * ps:
                raise ValueError(
                    f"num_computed_tokens {num_computed_tokens} is below the "
                    f"{self._num_cached[request_id]} cached (immutable) pages"
                )
            held, num_touched_free = table, 0
        total = num_computed_tokens + num_new_tokens
        num_needed = -(-total // ps)
        if num_needed > self.max_pages_per_seq:
            raise ValueError(
                f"{total} tokens need {num_needed} pages, more than "
                f"max_pages_per_seq = {self.max_pages_per_seq}"
            )
        # Pages the new tokens land in: [num_computed // ps, ceil(total / ps)).
        write_end = min(num_needed, len(held)) if num_new_tokens else 0
        cow = [
            i for i in range(num_computed_tokens // ps, write_end)
            if self.pool.ref_count(held[i]) > 1
        ]
        return _Plan(cow, max(0, num_needed - len(held)), num_touched_free)

    def _check_computed_pages(
        self, request_id: str, num_computed_tokens: int, computed_pages: Sequence[int]
    ) -> None:
        if len(computed_pages) * self.page_size != num_computed_tokens:
            raise ValueError(
                f"a new request's num_computed_tokens ({num_computed_tokens}) must equal "
                f"len(computed_pages) * page_size ({len(computed_pages) * self.page_size})"
            )
        if len(set(computed_pages)) != len(computed_pages):
            raise ValueError(f"computed_pages has duplicates: {list(computed_pages)}")
        chain = self._chains.get(request_id)
        for i, page in enumerate(computed_pages):
            if not NULL_PAGE < page < self.pool.num_pages:
                raise ValueError(f"computed page out of range: {page}")
            page_hash = self.pool.page_hash(page)
            if page_hash is None or (
                chain is not None and i < len(chain.hashes) and chain.hashes[i] != page_hash
            ):
                raise ValueError(
                    f"computed page {page} is no longer cached for this prefix; "
                    "call get_computed_pages right before allocate_slots"
                )
