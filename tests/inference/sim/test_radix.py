"""Unit tests of the simulator's radix prefix cache."""

from __future__ import annotations

import pytest

from inference.sim.radix_cache import RadixCache


def _assert_accounting(cache: RadixCache) -> None:
    """Recount tokens from the tree and compare with the cached counters."""
    total = protected = 0
    for root in cache._roots.values():
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            assert node.key, "non-root nodes have non-empty edges"
            total += len(node.key)
            if node.lock_ref > 0:
                protected += len(node.key)
            assert len({child.key[0] for child in node.children.values()}) == len(node.children)
            stack.extend(node.children.values())
    assert cache.total_tokens == total
    assert cache.protected_tokens == protected


def test_longest_prefix_match():
    # given two cached sequences sharing a prefix
    cache = RadixCache(capacity_tokens=1000)
    cache.insert([1, 2, 3, 4, 5])
    cache.insert([1, 2, 3, 9, 9, 9])

    # when / then: the longest cached prefix is reported
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).length == 5
    assert cache.match_prefix([1, 2, 3, 9, 9]).length == 5
    assert cache.match_prefix([1, 2, 3, 7]).length == 3
    assert cache.match_prefix([2, 3]).length == 0
    assert cache.match_prefix([]).length == 0
    assert cache.total_tokens == 8  # 1 2 3 | 4 5 | 9 9 9
    _assert_accounting(cache)


def test_insert_reports_already_cached_length():
    cache = RadixCache(capacity_tokens=1000)
    assert cache.insert([1, 2, 3]).length == 0
    assert cache.insert([1, 2, 3, 4]).length == 3
    assert cache.insert([1, 2, 3, 4]).length == 4
    assert cache.total_tokens == 4


def test_partial_edge_match_splits_the_edge():
    # given one long edge
    cache = RadixCache(capacity_tokens=1000)
    cache.insert([10, 11, 12, 13, 14, 15])
    root = cache.root()
    assert len(root.children) == 1 and len(root.children[10].key) == 6

    # when a query matches part of it
    match = cache.match_prefix([10, 11, 12, 99])

    # then the edge is split exactly at the match and the node ends there
    assert match.length == 3
    assert match.node.key == [10, 11, 12]
    assert list(match.node.children.values())[0].key == [13, 14, 15]
    assert cache.total_tokens == 6
    # and inserting a diverging branch reuses the split node
    inserted = cache.insert([10, 11, 12, 20, 21])
    assert inserted.length == 3
    assert sorted(match.node.children) == [13, 20]
    _assert_accounting(cache)


def test_lru_eviction_of_unreferenced_leaves():
    # given three cached sequences, the first one used most recently
    cache = RadixCache(capacity_tokens=12)
    cache.insert([1, 1, 1, 1])
    cache.insert([2, 2, 2, 2])
    cache.insert([3, 3, 3, 3])
    cache.match_prefix([1, 1, 1, 1])  # touch: [2...] is now least recently used

    # when a new sequence exceeds capacity
    cache.insert([4, 4, 4, 4])

    # then the least recently used leaf went first
    assert cache.total_tokens == 12
    assert cache.match_prefix([2, 2, 2, 2]).length == 0
    assert cache.match_prefix([1, 1, 1, 1]).length == 4
    assert cache.match_prefix([3, 3, 3, 3]).length == 4
    assert cache.match_prefix([4, 4, 4, 4]).length == 4
    _assert_accounting(cache)


def test_eviction_respects_reference_counts():
    # given a locked (in-use) sequence that is also the least recently used
    cache = RadixCache(capacity_tokens=8)
    in_use = cache.insert([1, 1, 1, 1])
    cache.lock(in_use.node)
    cache.insert([2, 2, 2, 2])
    assert cache.protected_tokens == 4 and cache.evictable_tokens == 4

    # when capacity is exceeded
    cache.insert([3, 3, 3, 3])

    # then only unlocked entries were evicted
    assert cache.match_prefix([1, 1, 1, 1]).length == 4
    assert cache.match_prefix([2, 2, 2, 2]).length == 0
    assert cache.total_tokens == 8
    _assert_accounting(cache)

    # and a fully locked tree may exceed capacity rather than drop in-use tokens
    third = cache.match_prefix([3, 3, 3, 3]).node
    cache.lock(third)
    other = cache.insert_and_lock([5, 5, 5, 5, 5])
    assert cache.match_prefix([5, 5, 5, 5, 5]).length == 5
    assert cache.total_tokens == 13
    _assert_accounting(cache)

    # once unlocked, the overflow is evicted again
    cache.unlock(in_use.node)
    cache.unlock(other.node)
    cache.unlock(third)
    assert cache.total_tokens <= 8
    _assert_accounting(cache)


def test_split_keeps_lock_counts_consistent():
    cache = RadixCache(capacity_tokens=100)
    match = cache.insert_and_lock([1, 2, 3, 4, 5, 6])
    # a split below a locked node must keep the whole path protected
    upper = cache.match_prefix([1, 2, 3]).node
    assert upper.lock_ref == 1
    assert cache.protected_tokens == 6
    cache.unlock(match.node)
    assert cache.protected_tokens == 0
    assert upper.lock_ref == 0
    _assert_accounting(cache)


def test_unlock_without_lock_is_an_error():
    cache = RadixCache(capacity_tokens=10)
    match = cache.insert([1, 2])
    with pytest.raises(RuntimeError):
        cache.unlock(match.node)


def test_parent_becomes_evictable_after_its_children():
    cache = RadixCache(capacity_tokens=6)
    cache.insert([1, 2, 3, 4])
    cache.insert([1, 2, 3, 5])  # tree: [1 2 3] -> [4], [5]  (5 tokens)
    cache.evict(100)
    assert cache.total_tokens == 0
    assert cache.match_prefix([1, 2, 3]).length == 0


def test_salt_isolation():
    # given the same tokens cached under one namespace
    cache = RadixCache(capacity_tokens=1000)
    cache.insert([7, 8, 9, 10], namespace=("tenant-a", None))

    # then other namespaces (including the default one) share nothing
    assert cache.match_prefix([7, 8, 9, 10], namespace=("tenant-a", None)).length == 4
    assert cache.match_prefix([7, 8, 9, 10], namespace=("tenant-b", None)).length == 0
    assert cache.match_prefix([7, 8, 9, 10]).length == 0
    assert cache.match_prefix([7, 8, 9, 10], namespace=("tenant-a", "extra")).length == 0


def test_eviction_spans_namespaces_in_lru_order():
    cache = RadixCache(capacity_tokens=8)
    cache.insert([1, 1, 1, 1], namespace="a")
    cache.insert([1, 1, 1, 1], namespace="b")
    cache.insert([2, 2, 2, 2], namespace="a")
    assert cache.total_tokens == 8
    assert cache.match_prefix([1, 1, 1, 1], namespace="a").length == 0  # oldest went
    assert cache.match_prefix([1, 1, 1, 1], namespace="b").length == 4


def test_reset_drops_everything():
    cache = RadixCache(capacity_tokens=100)
    cache.insert([1, 2, 3])
    cache.reset()
    assert cache.total_tokens == 0
    assert cache.match_prefix([1, 2, 3]).length == 0
