"""BlockPool: exact page ids, free-queue order, eviction of cached pages."""

import pytest

from jaxserve.core.block_pool import NULL_PAGE, ROOT_HASH, BlockPool, OutOfPagesError, hash_page


def h(name: str) -> bytes:
    return hash_page(ROOT_HASH, [ord(c) for c in name])


def test_fresh_pool_hands_out_pages_in_order_and_never_the_null_page():
    pool = BlockPool(6, enable_prefix_caching=True)
    assert pool.num_total_pages == 5
    assert pool.num_free_pages == 5
    assert pool.free_page_ids() == [1, 2, 3, 4, 5]
    assert pool.get_new_pages(3) == [1, 2, 3]
    assert pool.get_new_pages(2) == [4, 5]
    assert NULL_PAGE not in pool.free_page_ids()
    assert pool.num_free_pages == 0
    assert pool.usage == 1.0


def test_failed_allocation_changes_nothing():
    pool = BlockPool(4, enable_prefix_caching=True)
    pages = pool.get_new_pages(2)
    pool.cache_page(pages[0], h("a"))
    pool.free_pages(pages[::-1])
    before = (pool.free_page_ids(), pool.cached_hashes(), [pool.ref_count(p) for p in range(4)])
    with pytest.raises(OutOfPagesError):
        pool.get_new_pages(4)
    after = (pool.free_page_ids(), pool.cached_hashes(), [pool.ref_count(p) for p in range(4)])
    assert before == after


def test_freed_pages_go_to_the_tail_in_the_order_given():
    pool = BlockPool(6, enable_prefix_caching=False)
    a = pool.get_new_pages(2)  # [1, 2]
    b = pool.get_new_pages(2)  # [3, 4]
    assert pool.free_page_ids() == [5]
    assert pool.free_pages(reversed(b)) == [4, 3]
    assert pool.free_pages(reversed(a)) == [2, 1]
    assert pool.free_page_ids() == [5, 4, 3, 2, 1]
    assert pool.get_new_pages(3) == [5, 4, 3]


def test_shared_page_is_freed_only_when_the_last_holder_releases_it():
    pool = BlockPool(4, enable_prefix_caching=False)
    (p,) = pool.get_new_pages(1)
    pool.touch([p])
    assert pool.ref_count(p) == 2
    assert pool.free_pages([p]) == []
    assert not pool.is_free(p)
    assert pool.free_pages([p]) == [p]
    assert pool.free_page_ids()[-1] == p


def test_double_free_is_refused_and_changes_nothing():
    pool = BlockPool(4, enable_prefix_caching=False)
    pages = pool.get_new_pages(2)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_pages([pages[0], pages[1], pages[1]])
    assert [pool.ref_count(p) for p in pages] == [1, 1]
    with pytest.raises(ValueError):
        pool.touch([NULL_PAGE])
    with pytest.raises(ValueError):
        pool.free_pages([4])


def test_cache_hit_on_a_free_page_takes_it_out_of_the_middle_of_the_queue():
    pool = BlockPool(5, enable_prefix_caching=True)
    pages = pool.get_new_pages(4)  # [1, 2, 3, 4]
    assert pool.cache_page(2, h("x"))
    pool.free_pages(pages)
    assert pool.free_page_ids() == [1, 2, 3, 4]
    assert pool.get_cached_page(h("x")) == 2  # freed, still findable
    pool.touch([2])
    assert pool.ref_count(2) == 1
    assert pool.free_page_ids() == [1, 3, 4]
    # Released again it goes to the tail: it is now the most recently freed.
    pool.free_pages([2])
    assert pool.free_page_ids() == [1, 3, 4, 2]
    assert pool.get_cached_page(h("x")) == 2


def test_least_recently_freed_cached_page_is_evicted_first():
    pool = BlockPool(4, enable_prefix_caching=True)
    pages = pool.get_new_pages(3)  # [1, 2, 3]
    for page, name in zip(pages, "abc"):
        assert pool.cache_page(page, h(name))
    pool.free_pages([3])
    pool.free_pages([1])
    pool.free_pages([2])
    assert pool.free_page_ids() == [3, 1, 2]
    assert pool.get_new_pages(1) == [3]  # evicts "c"
    assert pool.get_cached_page(h("c")) is None
    assert pool.page_hash(3) is None
    assert pool.get_cached_page(h("a")) == 1
    assert pool.num_evictions == 1
    assert pool.get_new_pages(2) == [1, 2]
    assert pool.cached_hashes() == {}
    assert pool.num_evictions == 3


def test_first_mapping_of_a_hash_wins():
    pool = BlockPool(4, enable_prefix_caching=True)
    a, b = pool.get_new_pages(2)
    assert pool.cache_page(a, h("x"))
    assert not pool.cache_page(b, h("x"))
    assert pool.get_cached_page(h("x")) == a
    assert pool.page_hash(b) is None
    assert not pool.cache_page(a, h("x"))  # re-registering the same pair is a no-op
    with pytest.raises(ValueError, match="another hash"):
        pool.cache_page(a, h("y"))


def test_cache_page_needs_a_held_page_and_is_off_without_prefix_caching():
    pool = BlockPool(4, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="held"):
        pool.cache_page(1, h("x"))
    off = BlockPool(4, enable_prefix_caching=False)
    (p,) = off.get_new_pages(1)
    assert not off.cache_page(p, h("x"))
    assert off.get_cached_page(h("x")) is None


def test_reset_prefix_cache_only_when_nothing_is_held():
    pool = BlockPool(4, enable_prefix_caching=True)
    (p,) = pool.get_new_pages(1)
    pool.cache_page(p, h("x"))
    assert not pool.reset_prefix_cache()
    pool.free_pages([p])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_page(h("x")) is None
    assert pool.page_hash(p) is None


def test_hash_page_is_a_chain_and_is_salted_by_extra_key():
    page = [5, 6, 7, 8]
    first = hash_page(ROOT_HASH, [1, 2, 3, 4])
    other_first = hash_page(ROOT_HASH, [1, 2, 3, 9])
    assert hash_page(first, page) != hash_page(other_first, page)
    assert hash_page(first, page) == hash_page(first, list(page))
    assert hash_page(first, page, b"lora-1") != hash_page(first, page)
    assert hash_page(first, page, b"lora-1") != hash_page(first, page, b"lora-2")
    # Length prefix: the salt cannot be confused with token bytes.
    assert hash_page(ROOT_HASH, [1], b"") != hash_page(ROOT_HASH, [], b"\x01\x00\x00\x00")
    assert len(first) == 32


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_pages"):
        BlockPool(1, enable_prefix_caching=False)
    pool = BlockPool(3, enable_prefix_caching=False)
    with pytest.raises(ValueError):
        pool.get_new_pages(-1)
    assert pool.get_new_pages(0) == []
