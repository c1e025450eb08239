"""Host-side page pool: ref counts, the eviction-ordered free queue, prefix hashes.

The device holds, per layer, a fixed page array ``[num_pages, page_size, 2 * kv_heads,
head_dim]``. This module only does the bookkeeping for it; it never touches an array.

Page 0 is the null page: padded tokens write there and it is never handed out, so the
usable pages are ``1 .. num_pages - 1``.

Life of a page::

    free queue (head ... tail)  --get_new_pages-->  held (ref_count >= 1)
          ^                                             |
          +---- free_pages: ref_count drops to 0 -------+   (appended at the tail)

A full page may carry a prefix hash (``cache_page``). When it is freed it keeps that hash
and stays findable through ``get_cached_page``; a cache hit ``touch``es it back out of the
middle of the free queue. Only when ``get_new_pages`` takes it from the head for reuse is
it evicted: its hash is dropped then. So the least recently freed page is evicted first.

Invariant: ``page_hash(p) == h`` if and only if ``cached_hashes()[h] == p``.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

NULL_PAGE = 0

# hash_{-1}: the parent of the first page of every sequence.
ROOT_HASH: bytes = hashlib.sha256(b"jaxserve-prefix-cache-v1").digest()


def hash_page(
    parent_hash: bytes, token_ids: Sequence[int], extra_key: bytes | None = None
) -> bytes:
    """Chain hash of one full page: ``sha256(parent || extra_key || tokens)``.

    Tokens are encoded as little-endian int32 and the extra key (LoRA / multimodal salt,
    applied to every page) is length-prefixed, so the encoding is unambiguous and stable
    across processes and platforms. Raises ``struct.error`` for ids outside int32.
    """
    h = hashlib.sha256(parent_hash)
    extra = extra_key or b""
    h.update(struct.pack("<I", len(extra)))
    h.update(extra)
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return h.digest()


class OutOfPagesError(RuntimeError):
    """``get_new_pages`` was asked for more pages than are free (nothing changed)."""


class BlockPool:
    """Ref-counted pages with an LRU free queue and an optional prefix-hash map."""

    def __init__(self, num_pages: int, *, enable_prefix_caching: bool) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_pages
        self._page_hash: list[bytes | None] = [None] * num_pages
        # OrderedDict as an O(1) doubly linked list: head = next to evict, tail = last freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))
        self._cached: dict[bytes, int] = {}
        self.prefix_cache_query_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.num_evictions = 0

    # -- sizes -----------------------------------------------------------------------

    @property
    def num_total_pages(self) -> int:
        """Usable pages, excluding the null page."""
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages with ref_count 0, including evictable cached ones."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by at least one request."""
        return 1.0 - self.num_free_pages / self.num_total_pages

    # -- allocation ------------------------------------------------------------------

    def get_new_pages(self, n: int) -> list[int]:
        """Take ``n`` pages from the head of the free queue, each with ref_count 1.

        A taken page that still carried a prefix hash is evicted from the hash map.
        Raises ``OutOfPagesError`` (changing nothing) when fewer than ``n`` are free.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self._evict(page)
            self._ref_count[page] = 1
            pages.append(page)
        return pages

    def touch(self, pages: Iterable[int]) -> None:
        """ref_count += 1 for each page; a free page leaves the free queue (cache hit)."""
        pages = list(pages)
        for page in pages:
            self._check_page(page)
        for page in pages:
            if self._ref_count[page] == 0:
                del self._free[page]
            self._ref_count[page] += 1

    def free_pages(self, ordered_pages: Iterable[int]) -> list[int]:
        """ref_count -= 1 for each page; pages reaching 0 join the free-queue tail.

        Pages are appended in the order given, so the first is evicted first: pass a
        request's pages in reverse to have its tail pages evicted before its prefix.
        Returns the pages that became free. Raises ``ValueError`` (changing nothing) on a
        double free.
        """
        ordered_pages = list(ordered_pages)
        for page, count in Counter(ordered_pages).items():
            self._check_page(page)
            if count > self._ref_count[page]:
                raise ValueError(f"page {page} freed more often than it is held")
        freed = []
        for page in ordered_pages:
            self._ref_count[page] -= 1
            if self._ref_count[page] == 0:
                self._free[page] = None
                freed.append(page)
        return freed

    # -- prefix cache ----------------------------------------------------------------

    def cache_page(self, page: int, page_hash: bytes) -> bool:
        """Register a held, full page under ``page_hash``; True if newly registered.

        When another page already holds the hash the existing mapping is kept and this
        page stays uncached (False). No-op (False) when prefix caching is disabled.
        """
        self._check_page(page)
        if not self.enable_prefix_caching:
            return False
        if self._ref_count[page] == 0:
            raise ValueError(f"page {page} must be held to be cached")
        current = self._page_hash[page]
        if current is not None:
            if current != page_hash:
                raise ValueError(f"page {page} is already cached under another hash")
            return False
        if page_hash in self._cached:
            return False
        self._cached[page_hash] = page
        self._page_hash[page] = page_hash
        return True

    def get_cached_page(self, page_hash: bytes) -> int | None:
        """The page holding ``page_hash`` (held or free-but-not-yet-evicted), or None."""
        if not self.enable_prefix_caching:
            return None
        return self._cached.get(page_hash)

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Add one admission's prefix-cache lookup to the token counters."""
        self.prefix_cache_query_tokens += num_query_tokens
        self.prefix_cache_hit_tokens += num_hit_tokens

    def reset_prefix_cache(self) -> bool:
        """Drop every prefix hash; only allowed (True) when no page is held."""
        if self.num_free_pages != self.num_total_pages:
            return False
        self._cached.clear()
        self._page_hash = [None] * self.num_pages
        return True

    # -- inspection (tests, stats, debugging) ----------------------------------------

    def ref_count(self, page: int) -> int:
        return self._ref_count[page]

    def page_hash(self, page: int) -> bytes | None:
        return self._page_hash[page]

    def free_page_ids(self) -> list[int]:
        """The free queue from head (evicted next) to tail (freed last)."""
        return list(self._free)

    def is_free(self, page: int) -> bool:
        return page in self._free

    def cached_hashes(self) -> dict[bytes, int]:
        """A copy of the hash -> page map."""
        return dict(self._cached)

    # -- internals -------------------------------------------------------------------

    def _evict(self, page: int) -> None:
        page_hash = self._page_hash[page]
        if page_hash is None:
            return
        del self._cached[page_hash]
        self._page_hash[page] = None
        self.num_evictions += 1

    def _check_page(self, page: int) -> None:
        if not NULL_PAGE < page < self.num_pages:
            raise ValueError(f"page must be in [1, {self.num_pages - 1}], got {page}")
