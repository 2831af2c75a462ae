"""Unit tests of the simulator's radix prefix cache."""

from __future__ import annotations

import pytest

from inference.sim.radix_cache import RadixCache, eviction_policy_checked


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
            assert len(node.key) % cache.page_size == 0, "edges hold whole pages"
            first_pages = {tuple(child.key[:cache.page_size]) for child in node.children.values()}
            assert len(first_pages) == len(node.children)
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


# ------------------------------------------------ eviction policies (SGLang's --radix-eviction-policy)

def _serve(cache: RadixCache, prompt: list[int], reply: list[int], priority: int = 0) -> None:
    """What the engine does for one request: the prompt at the end of its
    prefill, the whole sequence when it finishes, then the prompt again with
    priority + 1 (SGLang splits the prompt off the reply)."""
    cache.insert(prompt, priority=priority)
    cache.insert(prompt + reply, priority=priority, inserted=len(prompt))
    cache.insert(prompt, priority=priority + 1, inserted=len(prompt))


def test_a_request_counts_once_as_a_hit_on_every_node_it_inserts_through():
    cache = RadixCache(capacity_tokens=100, eviction_policy="lfu")
    _serve(cache, [1, 2, 3, 4], [5, 6])
    _serve(cache, [1, 2, 3, 4, 7], [8])  # shares the first prompt
    shared = cache.match_prefix([1, 2, 3, 4]).node
    first_reply = cache.match_prefix([1, 2, 3, 4, 5, 6]).node
    second_prompt = cache.match_prefix([1, 2, 3, 4, 7]).node
    second_reply = cache.match_prefix([1, 2, 3, 4, 7, 8]).node
    assert (shared.hit_count, first_reply.hit_count) == (2, 1)
    assert (second_prompt.key, second_prompt.hit_count) == ([7], 1)
    assert (second_reply.key, second_reply.hit_count) == ([8], 1)
    _assert_accounting(cache)


@pytest.mark.parametrize("policy, survivor_kept", [("lru", False), ("lfu", True)])
def test_lfu_keeps_a_prefix_many_requests_used(policy, survivor_kept):
    # given a prefix three requests inserted, used least recently of all
    cache = RadixCache(capacity_tokens=12, eviction_policy=policy)
    for _ in range(3):
        cache.insert([1, 1, 1, 1])
    cache.insert([2, 2, 2, 2])
    cache.insert([3, 3, 3, 3])

    # when two more sequences need room
    cache.insert([4, 4, 4, 4])
    cache.insert([5, 5, 5, 5])

    # then LFU evicted the once-used ones, oldest first; LRU the popular one
    assert (cache.match_prefix([1, 1, 1, 1]).length == 4) is survivor_kept
    assert cache.match_prefix([5, 5, 5, 5]).length == 4
    if survivor_kept:
        assert cache.match_prefix([2, 2, 2, 2]).length == 0 and cache.match_prefix([3, 3, 3, 3]).length == 0
    _assert_accounting(cache)


def test_slru_protects_what_a_second_request_reused():
    # given a prefix two requests used, then three used once, all more recent
    cache = RadixCache(capacity_tokens=16, eviction_policy="slru")
    cache.insert([1, 1, 1, 1])
    cache.insert([1, 1, 1, 1])
    cache.insert([2, 2, 2, 2])
    cache.insert([3, 3, 3, 3])
    cache.insert([4, 4, 4, 4])

    # when three more come, each evicting one
    for token in (5, 6, 7):
        cache.insert([token] * 4)

    # then the protected prefix outlived the newer unprotected ones
    assert cache.match_prefix([1, 1, 1, 1]).length == 4
    assert [cache.match_prefix([token] * 4).length for token in (2, 3, 4, 5, 6, 7)] == [0, 0, 0, 4, 4, 4]

    # and a threshold of 3 does not protect it
    strict = RadixCache(capacity_tokens=8, eviction_policy="slru", eviction_config={"protected_threshold": 3})
    strict.insert([1, 1, 1, 1])
    strict.insert([1, 1, 1, 1])
    strict.insert([2, 2, 2, 2])
    strict.insert([3, 3, 3, 3])
    assert strict.match_prefix([1, 1, 1, 1]).length == 0


def test_priority_evicts_low_priority_first_and_a_reply_before_its_prompt():
    # given a high-priority request, then a low-priority one (more recent)
    cache = RadixCache(capacity_tokens=12, eviction_policy="priority")
    _serve(cache, [1, 1, 1, 1], [2, 2], priority=5)
    _serve(cache, [3, 3, 3, 3], [4, 4], priority=0)
    assert cache.total_tokens == 12

    # when two tokens' room is needed, then the low-priority reply goes
    cache.insert([9, 9], priority=0)
    assert cache.match_prefix([3, 3, 3, 3, 4, 4]).length == 4
    assert cache.match_prefix([1, 1, 1, 1, 2, 2]).length == 6

    # and next, for four more: the priority-0 sequence, newer as it is, then
    # that request's prompt (priority 1); nothing of the priority-5 request
    cache.insert([8, 8, 8, 8], priority=2)
    assert cache.match_prefix([9, 9]).length == 0
    assert cache.match_prefix([3, 3, 3, 3]).length == 0
    assert cache.match_prefix([1, 1, 1, 1, 2, 2]).length == 6
    _assert_accounting(cache)


@pytest.mark.parametrize("policy, tail_evicted", [("lru", False), ("tlru", True)])
def test_tlru_evicts_a_conversations_tail_first(policy, tail_evicted):
    # given a conversation grown turn by turn to 200 tokens, and an older
    # 60-token sequence inserted before its last turn
    config = {"threshold": 50, "next_prompt_estimate": 10} if policy == "tlru" else None
    cache = RadixCache(capacity_tokens=260, eviction_policy=policy, eviction_config=config)
    conversation = list(range(200))
    cache.insert(conversation[:100])
    cache.insert(conversation[:180], inserted=100)
    other = list(range(1000, 1060))
    cache.insert(other)
    cache.insert(conversation, inserted=180)

    # when another 20 tokens need room
    cache.insert(list(range(2000, 2020)))

    # then T-LRU dropped the conversation's last 20 tokens: the 180 above
    # them leave its next prefill (20 + 10 estimated) under the 50-token
    # threshold; LRU dropped the older sequence
    assert cache.match_prefix(conversation).length == (180 if tail_evicted else 200)
    assert cache.match_prefix(other).length == (60 if tail_evicted else 0)
    if not tail_evicted:
        return

    # and next: the 20 new tokens, a sequence short enough to be safe as a
    # whole (at most threshold - next_prompt_estimate), then by recency the
    # rest of the conversation's tail, which is not safe: its high-water mark
    # stays at 200, so the 100 tokens above [100, 180) are too few (the
    # conversation was matched before the older sequence just above)
    cache.insert(list(range(3000, 3050)))
    assert cache.match_prefix(list(range(2000, 2020))).length == 0
    assert cache.match_prefix(conversation).length == 100
    assert cache.match_prefix(other).length == 60
    _assert_accounting(cache)


def test_eviction_policy_settings_are_checked_as_sglang_checks_them():
    assert eviction_policy_checked("slru", None) == {"protected_threshold": 2}
    assert eviction_policy_checked("tlru", {"threshold": 4096, "next_prompt_estimate": 512}) == {
        "threshold": 4096, "next_prompt_estimate": 512}
    with pytest.raises(ValueError, match="unknown key 'protected' for eviction policy 'slru'"):
        eviction_policy_checked("slru", {"protected": 3})
    with pytest.raises(ValueError, match="for eviction policy 'lru' .it takes no keys"):
        eviction_policy_checked("lru", {"threshold": 1})
    with pytest.raises(ValueError, match="needs 'threshold' greater than 'next_prompt_estimate'"):
        eviction_policy_checked("tlru", None)
    with pytest.raises(ValueError, match="requires non-negative"):
        eviction_policy_checked("tlru", {"threshold": 10, "next_prompt_estimate": -1})
    with pytest.raises(ValueError, match="must be an integer"):
        eviction_policy_checked("slru", {"protected_threshold": "2"})
    with pytest.raises(ValueError, match="Unknown eviction policy: fifo. Supported policies: 'lru', 'lfu'"):
        RadixCache(capacity_tokens=1, eviction_policy="fifo")


def test_pages_of_four_tokens_cache_and_match_whole_pages_only():
    # given a cache of 4-token pages holding a 10-token sequence
    cache = RadixCache(capacity_tokens=1000, page_size=4)
    cache.insert(list(range(10)))

    # then its last partial page is not cached
    assert cache.total_tokens == 8
    # and a match counts whole pages: 0-6 shares 7 tokens, of which one page and
    # three tokens of the next; a divergence inside the first page matches nothing
    assert cache.match_prefix(list(range(7)) + [99]).length == 4
    assert cache.match_prefix(list(range(10))).length == 8
    assert cache.match_prefix([0, 1, 99, 3, 4, 5, 6, 7]).length == 0

    # when a sequence diverging inside the second page is inserted
    assert cache.insert([0, 1, 2, 3, 4, 5, 77, 78]).length == 4
    # then the edge split at the page boundary, and both branches are kept whole
    root = cache.root()
    (top,) = root.children.values()
    assert top.key == [0, 1, 2, 3]
    assert sorted(child.key for child in top.children.values()) == [[4, 5, 6, 7], [4, 5, 77, 78]]
    # and one in the first page is a sibling keyed by its own first page
    cache.insert([0, 1, 2, 9])
    assert len(root.children) == 2 and cache.total_tokens == 16
    _assert_accounting(cache)


def test_dropping_a_namespace_frees_its_unlocked_tokens():
    # given a namespace with one locked path and one free branch, and another namespace
    cache = RadixCache(capacity_tokens=1000)
    locked = cache.insert_and_lock([1, 2, 3, 4], namespace="a")
    cache.insert([1, 2, 8, 9], namespace="a")
    cache.insert([1, 2, 3], namespace="b")

    # when the namespace is dropped
    freed = cache.drop_namespace("a")

    # then only its free branch went: the locked path stays until unlocked
    assert freed == 2 and cache.total_tokens == 4 + 3
    assert cache.match_prefix([1, 2, 8, 9], namespace="a").length == 2
    cache.unlock(locked.node)
    assert cache.drop_namespace("a") == 4
    assert cache.total_tokens == 3 and cache.match_prefix([1, 2, 3], namespace="b").length == 3
    assert cache.drop_namespace("missing") == 0
    _assert_accounting(cache)


def _assert_tiers(cache: RadixCache) -> None:
    """HiCache accounting: device tokens, host copies, residency closed under ancestors."""
    device = host = 0
    for root in cache._roots.values():
        stack = [(child, True) for child in root.children.values()]
        while stack:
            node, parent_on_device = stack.pop()
            assert parent_on_device or not node.device, "a resident node's ancestors are resident"
            assert node.device or node.backed_up, "a node off the device has a host copy"
            assert node.lock_ref == 0 or node.device, "locked KV is on the device"
            device += len(node.key) if node.device else 0
            host += len(node.key) if node.backed_up else 0
            stack.extend((child, node.device) for child in node.children.values())
    assert cache.total_tokens == device <= cache.capacity_tokens
    assert cache.host_tokens == host <= cache.host_capacity_tokens


def test_hierarchical_cache_keeps_evicted_prefixes_on_the_host_and_loads_them_back():
    # given a device pool of 10 tokens over a host pool of 30, copying at first use
    cache = RadixCache(capacity_tokens=10, host_capacity_tokens=30, write_policy="write_through")
    first, second = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 8, 8, 7, 7, 6, 6]
    cache.insert(first)
    assert cache.host_tokens == 8 and cache.backup_tokens_total == 8

    # when another sequence takes the device
    cache.insert(second)
    _assert_tiers(cache)

    # then the first is on the host only: no device hit, a host hit
    match = cache.match_prefix(first + [10])
    assert (match.length, match.host_length) == (0, 8)
    assert cache.evicted_tokens_total == 8 and cache.dropped_tokens_total == 0

    # when it is loaded back and locked, the other is evicted in its turn (also to the host)
    loaded = cache.load_back(match)
    cache.lock(loaded.node)
    cache.set_capacity(10)
    assert (loaded.length, cache.load_back_tokens_total) == (8, 8)
    assert cache.match_prefix(first).length == 8
    assert cache.match_prefix(second).host_length == 8
    _assert_tiers(cache)
    cache.unlock(loaded.node)

    # and a flush drops both tiers
    cache.reset()
    assert (cache.total_tokens, cache.host_tokens) == (0, 0)
    assert cache.match_prefix(first).host_length == 0


def test_hierarchical_cache_write_policies_and_a_full_host():
    """write_back copies at eviction, write_through_selective from the second
    use (a sequence used once is dropped); a full host drops its least recently
    used host-only leaves; an insert through a host-only path makes it resident."""
    back = RadixCache(capacity_tokens=8, host_capacity_tokens=16, write_policy="write_back")
    back.insert([1, 2, 3, 4, 5, 6])
    assert back.host_tokens == 0
    back.insert([7, 7, 7, 7, 7, 7])
    assert back.match_prefix([1, 2, 3, 4, 5, 6]).host_length == 6 and back.backup_tokens_total == 6
    _assert_tiers(back)

    selective = RadixCache(capacity_tokens=8, host_capacity_tokens=16, write_policy="write_through_selective")
    selective.insert([1, 2, 3, 4, 5, 6])
    selective.insert([1, 2, 3, 4, 5, 6, 8])  # a second request through the same prefix
    selective.insert([7, 7, 7, 7, 7, 7])
    assert selective.match_prefix([1, 2, 3, 4, 5, 6]).host_length == 6
    selective.insert([5, 5, 5, 5, 5, 5])  # used once: not copied, so dropped when evicted
    selective.insert([4, 4, 4, 4, 4, 4])
    assert selective.match_prefix([7, 7, 7, 7, 7, 7]).host_length == 0
    assert selective.dropped_tokens_total > 0
    _assert_tiers(selective)

    full = RadixCache(capacity_tokens=6, host_capacity_tokens=12)
    sequences = [[n] * 6 for n in (1, 2, 3, 4)]
    for sequence in sequences:
        full.insert(sequence)
    # the host's 12 tokens hold the last two, one of them also on the device
    # (write-through copies what is resident too); older host-only copies went for room
    assert [(full.match_prefix(s).length, full.match_prefix(s).host_length) for s in sequences] == [
        (0, 0), (0, 0), (0, 6), (6, 0)]
    assert full.host_evicted_tokens_total == 12
    _assert_tiers(full)

    # an insert that extends a host-only prefix makes the whole path resident
    full.set_capacity(20)
    full.insert(sequences[2] + [9, 9])
    match = full.match_prefix(sequences[2] + [9, 9])
    assert (match.length, match.host_length) == (8, 0)
    _assert_tiers(full)


@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_hierarchical_cache_keeps_its_accounting_through_random_traffic(policy, page_size):
    """Inserts, matches, loads back, locks and unlocks at random over a few
    shared prefixes: the device and host counters always match the tree,
    residency stays closed under ancestors, and a match never reports more
    than was inserted."""
    import random

    rng = random.Random(f"{policy}-{page_size}")
    cache = RadixCache(capacity_tokens=96, host_capacity_tokens=160, write_policy=policy, page_size=page_size)
    prefixes = [[base + i for i in range(rng.randrange(8, 24))] for base in (100, 200, 300)]
    locked = []
    for _ in range(600):
        sequence = rng.choice(prefixes) + [rng.randrange(1000, 1010) for _ in range(rng.randrange(0, 20))]
        action = rng.random()
        if action < 0.45:
            cache.insert(sequence)
        elif action < 0.8:
            match = cache.match_prefix(sequence)
            assert match.length + match.host_length <= len(sequence)
            assert (match.length + match.host_length) % page_size == 0
            if match.host_length and rng.random() < 0.7:
                match = cache.load_back(match)
                assert match.host_length == 0
            if rng.random() < 0.3:
                cache.lock(match.node)
                locked.append(match.node)
            cache.set_capacity(96)
        elif locked:
            cache.unlock(locked.pop(rng.randrange(len(locked))))
        _assert_tiers_unbounded(cache)
    for node in locked:
        cache.unlock(node)
    cache.set_capacity(96)
    _assert_tiers(cache)
    _assert_accounting_devices(cache)


def _assert_tiers_unbounded(cache: RadixCache) -> None:
    """_assert_tiers while locks may hold the device over its capacity."""
    capacity = cache.capacity_tokens
    cache.capacity_tokens = max(capacity, cache.total_tokens)
    try:
        _assert_tiers(cache)
    finally:
        cache.capacity_tokens = capacity


def _assert_accounting_devices(cache: RadixCache) -> None:
    protected = 0
    for root in cache._roots.values():
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            protected += len(node.key) if node.lock_ref > 0 else 0
            stack.extend(node.children.values())
    assert cache.protected_tokens == protected == 0
