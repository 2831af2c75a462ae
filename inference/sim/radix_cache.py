"""Radix tree over token ids: the simulator's model of SGLang's RadixAttention.

Finished (and prefilled) sequences are inserted; a new request matches the
longest cached prefix of its prompt and reports it as `cached_tokens`.

Invariants:
- every non-root node has a non-empty edge `key`; siblings differ in key[0];
- `lock_ref` of a node counts the running requests whose matched or inserted
  path passes through it; locked nodes are never evicted;
- `total_tokens == evictable_tokens + protected_tokens`, where a node's tokens
  are protected exactly while its `lock_ref > 0`;
- eviction removes unlocked leaves, least recently used first, until the tree
  fits `capacity_tokens`. Only locked (in-use) tokens may keep the tree above
  capacity, as GPU memory holding running requests cannot be freed either.
  The engine sets `capacity_tokens` to the KV capacity minus what running
  requests have reserved (`set_capacity`), so the cache and the running
  requests share one token budget.

Page size is 1 token. Each namespace (a request's `cache_salt` / `extra_key`)
has its own root, so a different salt never shares a prefix.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Hashable, Sequence

Namespace = Hashable


class RadixNode:
    __slots__ = ("children", "parent", "key", "lock_ref", "last_access", "namespace")

    def __init__(self, *, key: list[int], parent: RadixNode | None, namespace: Namespace, last_access: int) -> None:
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.key = key  # token ids on the edge parent → self
        self.lock_ref = 0
        self.last_access = last_access  # value of the cache's logical clock
        self.namespace = namespace

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:  # debugging aid
        return f"RadixNode(len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """`length` tokens of the query are cached; `node` ends exactly there."""

    length: int
    node: RadixNode


class RadixCache:
    def __init__(self, *, capacity_tokens: int) -> None:
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be >= 0")
        self.capacity_tokens = capacity_tokens
        self._clock = itertools.count(1)
        self._roots: dict[Namespace, RadixNode] = {}
        self.total_tokens = 0
        self.protected_tokens = 0
        self.evicted_tokens_total = 0
        # Extra tokens evicted whenever the tree overflows (amortises the leaf scan).
        self.eviction_slack_tokens = 0

    # ------------------------------------------------------------- queries

    @property
    def evictable_tokens(self) -> int:
        return self.total_tokens - self.protected_tokens

    def root(self, namespace: Namespace = None) -> RadixNode:
        root = self._roots.get(namespace)
        if root is None:
            root = RadixNode(key=[], parent=None, namespace=namespace, last_access=0)
            # The root is permanently "locked": it is never evicted.
            root.lock_ref = 1
            self._roots[namespace] = root
        return root

    def match_prefix(self, tokens: Sequence[int], *, namespace: Namespace = None) -> PrefixMatch:
        """Longest cached prefix of `tokens`; splits an edge matched part-way."""
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        node, length = self._walk(tokens, namespace=namespace, split_partial=True)
        now = next(self._clock)
        self._touch_path(node, now)
        return PrefixMatch(length=length, node=node)

    # ------------------------------------------------------------- updates

    def insert(self, tokens: Sequence[int], *, namespace: Namespace = None) -> PrefixMatch:
        """Cache `tokens`. Returns how many were already cached and the end node.

        May evict other, unlocked entries to stay within capacity; the caller
        should lock the returned node first if it must survive (see
        `insert_and_lock`).
        """
        match = self._insert_without_eviction(tokens, namespace=namespace)
        self._evict_to_capacity()
        return match

    def insert_and_lock(self, tokens: Sequence[int], *, namespace: Namespace = None) -> PrefixMatch:
        """Insert, lock the path, then evict: the new path cannot be evicted."""
        match = self._insert_without_eviction(tokens, namespace=namespace)
        self.lock(match.node)
        self._evict_to_capacity()
        return match

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction (one reference)."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self.protected_tokens += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Drop one reference taken by `lock`; may make the path evictable."""
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.protected_tokens -= len(node.key)
            node = node.parent
        self._evict_to_capacity()

    def set_capacity(self, capacity_tokens: int) -> None:
        """Change the budget and evict unlocked LRU leaves down to it."""
        self.capacity_tokens = max(0, capacity_tokens)
        self._evict_to_capacity()

    def evict(self, num_tokens: int) -> int:
        """Evict at least `num_tokens` unlocked tokens if possible, LRU leaves first.

        Returns the number of tokens evicted (whole leaves, so it may exceed
        the request, or fall short when the rest is locked).
        """
        if num_tokens <= 0:
            return 0
        heap: list[tuple[int, int, RadixNode]] = []
        tie = itertools.count()
        for leaf in self._evictable_leaves():
            heap.append((leaf.last_access, next(tie), leaf))
        heapq.heapify(heap)
        evicted = 0
        while heap and evicted < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            if leaf.lock_ref > 0 or leaf.children or leaf.parent is None:
                continue
            parent = leaf.parent
            evicted += self._remove_leaf(leaf)
            if parent.parent is not None and parent.lock_ref == 0 and not parent.children:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        self.evicted_tokens_total += evicted
        return evicted

    def reset(self) -> None:
        """Drop everything (SGLang's /flush_cache). Callers ensure nothing is locked."""
        self._roots.clear()
        self.total_tokens = 0
        self.protected_tokens = 0

    # ------------------------------------------------------------- internals

    def _walk(self, tokens: Sequence[int], *, namespace: Namespace, split_partial: bool) -> tuple[RadixNode, int]:
        node = self.root(namespace)
        position = 0
        total = len(tokens)
        while position < total:
            child = node.children.get(tokens[position])
            if child is None:
                break
            key = child.key
            key_len = len(key)
            # Fast path: the whole edge matches (one C-level slice compare).
            if tokens[position:position + key_len] == key:
                node = child
                position += key_len
                continue
            common = _common_prefix_length(key, tokens, position)
            # common >= 1 because children are keyed by their first token.
            if split_partial:
                node = self._split(child, common)
            position += common
            break
        return node, position

    def _insert_without_eviction(self, tokens: Sequence[int], *, namespace: Namespace) -> PrefixMatch:
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        node, length = self._walk(tokens, namespace=namespace, split_partial=True)
        now = next(self._clock)
        if length < len(tokens):
            new_leaf = RadixNode(key=list(tokens[length:]), parent=node, namespace=namespace, last_access=now)
            node.children[new_leaf.key[0]] = new_leaf
            self.total_tokens += len(new_leaf.key)
            node = new_leaf
        self._touch_path(node, now)
        return PrefixMatch(length=length, node=node)

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut `child`'s edge after `at` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < at < len(child.key)
        upper = RadixNode(key=child.key[:at], parent=parent, namespace=child.namespace, last_access=child.last_access)
        # Every request locking `child` passes through `upper` too.
        upper.lock_ref = child.lock_ref
        parent.children[upper.key[0]] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _touch_path(self, node: RadixNode, now: int) -> None:
        while node is not None:
            node.last_access = now
            node = node.parent

    def _evictable_leaves(self):
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                if node.children:
                    stack.extend(node.children.values())
                elif node.lock_ref == 0:
                    yield node

    def _remove_leaf(self, leaf: RadixNode) -> int:
        parent = leaf.parent
        assert parent is not None
        del parent.children[leaf.key[0]]
        self.total_tokens -= len(leaf.key)
        leaf.parent = None
        return len(leaf.key)

    def _evict_to_capacity(self) -> None:
        overflow = self.total_tokens - self.capacity_tokens
        if overflow > 0 and self.evictable_tokens > 0:
            self.evict(overflow + self.eviction_slack_tokens)


def _common_prefix_length(key: list[int], tokens: Sequence[int], start: int) -> int:
    limit = min(len(key), len(tokens) - start)
    index = 0
    while index < limit and key[index] == tokens[start + index]:
        index += 1
    return index
