"""Radix tree over token ids: the simulator's model of SGLang's RadixAttention.

Finished (and prefilled) sequences are inserted; a new request matches the
longest cached prefix of its prompt and reports it as `cached_tokens`.

Invariants:
- every non-root node has a non-empty edge `key`; siblings differ in their
  first page (`page_size` tokens: key[0] with pages of one token);
- `lock_ref` of a node counts the running requests whose matched or inserted
  path passes through it; locked nodes are never evicted;
- `total_tokens == evictable_tokens + protected_tokens`, where a node's tokens
  are protected exactly while its `lock_ref > 0`;
- eviction removes unlocked leaves, in the order of the eviction policy
  (`EVICTION_POLICIES`; least recently used first by default), until the tree
  fits `capacity_tokens`. Only locked (in-use) tokens may keep the tree above
  capacity, as GPU memory holding running requests cannot be freed either.
  The engine sets `capacity_tokens` to the KV capacity minus what running
  requests have reserved (`set_capacity`), so the cache and the running
  requests share one token budget.

With `page_size` P > 1 (SGLang's `--page-size`) the cache holds whole pages
only, as SGLang's paged RadixCache does: keys are cut to a multiple of P before
a match or an insert (a sequence's last partial page stays private to its
request and is freed with it), edges split at page boundaries only, so every
match is a multiple of P. Each namespace (a request's `cache_salt` /
`extra_key`) has its own root, so a different salt never shares a prefix.

Eviction policies, as SGLang's `--radix-eviction-policy` (sglang 0.5.23,
`mem_cache/evict_policy.py`) orders a leaf, least first, ties by recency:
- `lru`: last access;
- `lfu`: hit count (the requests whose inserts passed through the node; a
  request counts once, however often it inserts), then last access;
- `slru`: protected (hit count at least `protected_threshold`, default 2) or
  not, then last access: nodes reused by a second request outlive the others;
- `priority`: the highest `priority` of the requests that inserted through the
  node (a finished request's prompt gets its priority + 1, its reply its
  priority, so replies go before prompts), then last access;
- `tlru` (Tail-Optimized LRU, arXiv:2510.15152): first the nodes of a
  conversation past what keeps its next prefill within `threshold` tokens
  (its branch's deepest sequence + `next_prompt_estimate` - `threshold`
  tokens from the root suffice), then last access.

Hierarchical cache (SGLang's HiCache, `--enable-hierarchical-cache`): with a
host capacity (`host_capacity_tokens` > 0) a node's KV may also have a copy in
host memory (`backed_up`), and a node may live on the host only (`device`
False). Residency on the device is closed under ancestors: device eviction
takes device leaves (no child on the device), so a path is on the device down
to some node and on the host only below it.
- backup: under `write_through` a node is copied to the host when a request
  inserts through it (hit count 1), under `write_through_selective` at its
  second, under `write_back` only when it is evicted from the device. A backup
  that finds the host full first evicts host-only leaves, least recently used
  first; when that is not enough the node is not backed up;
- device eviction of a backed-up node keeps it in the tree, on the host only;
  a node without a copy leaves the tree (with any host-only nodes under it);
- `match_prefix` reports the device part as `length`/`node` and the host-only
  part after it as `host_length`/`host_node`; `load_back` makes that part
  resident again (the scheduler loads it before the request's prefill);
- an insert through host-only nodes makes them resident again (the request
  has just computed their KV on the device).
`total_tokens` counts device tokens; `host_tokens` the tokens with a host copy.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, Hashable, NamedTuple, Sequence

Namespace = Hashable

EVICTION_POLICIES = ("lru", "lfu", "slru", "priority", "tlru")
HICACHE_WRITE_POLICIES = ("write_back", "write_through", "write_through_selective")
# Each policy's tuning keys (SGLang's --radix-eviction-policy-config) and their defaults.
_POLICY_CONFIG_KEYS: dict[str, dict[str, int]] = {
    "lru": {}, "lfu": {}, "priority": {},
    "slru": {"protected_threshold": 2},
    "tlru": {"threshold": 0, "next_prompt_estimate": 0},
}


class RadixNode:
    __slots__ = ("children", "parent", "key", "lock_ref", "last_access", "namespace", "hit_count", "priority",
                 "depth", "history", "device", "backed_up")

    def __init__(self, *, key: list[int], parent: RadixNode | None, namespace: Namespace, last_access: int,
                 priority: int = 0) -> None:
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.key = key  # token ids on the edge parent → self
        self.lock_ref = 0
        self.last_access = last_access  # value of the cache's logical clock
        self.namespace = namespace
        self.hit_count = 0  # requests whose inserts passed through (lfu, slru)
        self.priority = priority  # the highest priority inserted through (priority)
        # Tokens from the root to the end of this node, and the most its subtree
        # ever reached (the branch's high-water depth; tlru).
        self.depth = (parent.depth if parent is not None else 0) + len(key)
        self.history = self.depth
        self.device = True  # its KV is in the device pool (else on the host only)
        self.backed_up = False  # a copy of its KV is in the host pool (hierarchical cache)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:  # debugging aid
        return f"RadixNode(len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


class PrefixMatch(NamedTuple):
    """`length` tokens of the query are cached on the device; `node` ends
    exactly there. With a hierarchical cache, `host_length` more are cached on
    the host only, ending at `host_node`."""

    length: int
    node: RadixNode
    host_length: int = 0
    host_node: RadixNode | None = None


def eviction_policy_checked(policy: str, config: dict[str, Any] | None) -> dict[str, int]:
    """The policy's settings: its defaults updated by `config` (SGLang's
    --radix-eviction-policy-config). Raises ValueError, as SGLang fails at
    startup, for an unknown policy or key, a value that is not an integer,
    and tlru settings under which nothing would ever be evicted early."""
    if policy not in _POLICY_CONFIG_KEYS:
        supported = "', '".join(EVICTION_POLICIES)
        raise ValueError(f"Unknown eviction policy: {policy}. Supported policies: '{supported}'.")
    settings = dict(_POLICY_CONFIG_KEYS[policy])
    for name, value in (config or {}).items():
        if name not in settings:
            raise ValueError(f"--radix-eviction-policy-config: unknown key {name!r} for eviction policy {policy!r}"
                             f" (it takes {', '.join(settings) or 'no keys'})")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"--radix-eviction-policy-config: {name} must be an integer, not {value!r}")
        settings[name] = value
    if policy == "tlru":
        threshold, estimate = settings["threshold"], settings["next_prompt_estimate"]
        if threshold < 0 or estimate < 0:
            raise ValueError("--radix-eviction-policy tlru requires non-negative 'threshold' and "
                             "'next_prompt_estimate' in --radix-eviction-policy-config, got "
                             f"{threshold} and {estimate}.")
        if threshold <= estimate:
            raise ValueError("--radix-eviction-policy tlru needs 'threshold' greater than 'next_prompt_estimate' "
                             f"in --radix-eviction-policy-config, got {threshold} <= {estimate}; otherwise no "
                             "tokens are ever TEL-safe and T-LRU is exactly LRU.")
    return settings


def _eviction_order(policy: str, settings: dict[str, int]) -> Callable[[RadixNode], Any]:
    """The key a leaf is evicted by, least first (`eviction_policy_checked`'s settings)."""
    if policy == "lfu":
        return lambda node: (node.hit_count, node.last_access)
    if policy == "slru":
        protected = settings["protected_threshold"]
        return lambda node: (node.hit_count >= protected, node.last_access)
    if policy == "priority":
        return lambda node: (node.priority, node.last_access)
    if policy == "tlru":
        slack = settings["next_prompt_estimate"] - settings["threshold"]

        def tail_first(node: RadixNode) -> tuple[int, int]:
            # Safe to evict: what stays cached above the node covers all but
            # `threshold - next_prompt_estimate` tokens of its branch's history.
            safe = node.depth - len(node.key) >= max(node.history + slack, 0)
            return (-1 if safe else 0, node.last_access)
        return tail_first
    return lambda node: node.last_access


class RadixCache:
    def __init__(self, *, capacity_tokens: int, eviction_policy: str = "lru",
                 eviction_config: dict[str, Any] | None = None, page_size: int = 1,
                 host_capacity_tokens: int = 0, write_policy: str = "write_through") -> None:
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be >= 0")
        if host_capacity_tokens < 0:
            raise ValueError("host_capacity_tokens must be >= 0")
        if write_policy not in HICACHE_WRITE_POLICIES:
            raise ValueError(f"unknown write policy {write_policy!r}")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.page_size = page_size
        self.eviction_policy = eviction_policy
        self.eviction_settings = eviction_policy_checked(eviction_policy, eviction_config)
        self._eviction_key = _eviction_order(eviction_policy, self.eviction_settings)
        self.capacity_tokens = capacity_tokens
        self._clock = itertools.count(1)
        self._roots: dict[Namespace, RadixNode] = {}
        self.total_tokens = 0
        self.protected_tokens = 0
        self.evicted_tokens_total = 0
        # Extra tokens evicted whenever the tree overflows (amortises the leaf scan).
        self.eviction_slack_tokens = 0
        # The host tier (0: none). A node is backed up once this many requests
        # inserted through it (None: only when evicted, write_back).
        self.host_capacity_tokens = host_capacity_tokens
        self.write_policy = write_policy
        self._backup_at_hits = {"write_through": 1, "write_through_selective": 2}.get(write_policy)
        self.host_tokens = 0
        self.backup_tokens_total = 0  # copied to the host
        self.load_back_tokens_total = 0  # copied back to the device
        self.host_evicted_tokens_total = 0  # host copies dropped for room
        self.dropped_tokens_total = 0  # evicted from the device without a host copy

    @property
    def hierarchical(self) -> bool:
        return self.host_capacity_tokens > 0

    def hicache_counters(self) -> dict[str, int]:
        """The host tier's token counters, by their SGLang metric names."""
        return {"hicache_backup_tokens_total": self.backup_tokens_total,
                "load_back_tokens_total": self.load_back_tokens_total,
                "hicache_dropped_tokens_total": self.dropped_tokens_total,
                "hicache_host_evicted_tokens_total": self.host_evicted_tokens_total}

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
        """Longest cached prefix of `tokens` (whole pages); splits an edge matched part-way."""
        tokens = self.page_aligned(tokens)
        node, length = self._walk(tokens, namespace=namespace, split_partial=True)
        now = next(self._clock)
        self._touch_path(node, now)
        if node.device:
            return PrefixMatch(length=length, node=node)
        # The path ends on the host: its device part ends at the deepest resident ancestor.
        device_node = node
        while not device_node.device:
            device_node = device_node.parent
        return PrefixMatch(length=device_node.depth, node=device_node, host_length=length - device_node.depth,
                           host_node=node)

    def load_back(self, match: PrefixMatch) -> PrefixMatch:
        """Make the host-only part of `match` resident on the device again;
        returns the match it then is. The caller locks it (or lets it be
        evicted again)."""
        if not match.host_length:
            return match
        node = match.host_node
        while not node.device:
            node.device = True
            self.total_tokens += len(node.key)
            node = node.parent
        self.load_back_tokens_total += match.host_length
        return PrefixMatch(length=match.length + match.host_length, node=match.host_node)

    # ------------------------------------------------------------- updates

    def insert(self, tokens: Sequence[int], *, namespace: Namespace = None, priority: int = 0,
               inserted: int = 0) -> PrefixMatch:
        """Cache `tokens`. Returns how many were already cached and the end node.

        `priority`: the request's (SGLang's `priority`, 0 when it gave none);
        `inserted`: how many of `tokens` this request inserted before, whose
        nodes have counted it as a hit already.

        May evict other, unlocked entries to stay within capacity; the caller
        should lock the returned node first if it must survive (see
        `insert_and_lock`).
        """
        match = self._insert_without_eviction(tokens, namespace=namespace, priority=priority, inserted=inserted)
        self._evict_to_capacity()
        return match

    def insert_and_lock(self, tokens: Sequence[int], *, namespace: Namespace = None,
                        priority: int = 0) -> PrefixMatch:
        """Insert, lock the path, then evict: the new path cannot be evicted."""
        match = self._insert_without_eviction(tokens, namespace=namespace, priority=priority, inserted=0)
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
        """Evict at least `num_tokens` unlocked tokens from the device if
        possible, device leaves in the eviction policy's order (least recently
        used first under `lru`). With a hierarchical cache a leaf with a host
        copy stays in the tree on the host only.

        Returns the number of tokens evicted (whole leaves, so it may exceed
        the request, or fall short when the rest is locked).
        """
        if num_tokens <= 0:
            return 0
        order = self._eviction_key
        heap: list[tuple[Any, int, RadixNode]] = []
        tie = itertools.count()
        for leaf in self._evictable_leaves():
            heap.append((order(leaf), next(tie), leaf))
        heapq.heapify(heap)
        evicted = 0
        hierarchical = self.hierarchical
        while heap and evicted < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            if leaf.lock_ref > 0 or leaf.parent is None or not leaf.device or self._has_device_child(leaf):
                continue
            parent = leaf.parent
            if hierarchical and (leaf.backed_up or (self._backup_at_hits is None and self._backup(leaf))):
                leaf.device = False
                self.total_tokens -= len(leaf.key)
                evicted += len(leaf.key)
            else:
                evicted += self._remove_leaf(leaf)
                self.dropped_tokens_total += len(leaf.key) if hierarchical else 0
            if parent.parent is not None and parent.lock_ref == 0 and not self._has_device_child(parent):
                heapq.heappush(heap, (order(parent), next(tie), parent))
        self.evicted_tokens_total += evicted
        return evicted

    def evict_host(self, num_tokens: int) -> int:
        """Drop at least `num_tokens` of host-only KV if possible, host-only
        leaves least recently used first. Returns the tokens dropped."""
        heap: list[tuple[int, int, RadixNode]] = []
        tie = itertools.count()
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                if node.children:
                    stack.extend(node.children.values())
                elif not node.device:
                    heap.append((node.last_access, next(tie), node))
        heapq.heapify(heap)
        dropped = 0
        while heap and dropped < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            if leaf.parent is None or leaf.children or leaf.device:
                continue
            parent = leaf.parent
            dropped += self._remove_leaf(leaf)
            if parent.parent is not None and not parent.device and not parent.children:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        self.host_evicted_tokens_total += dropped
        return dropped

    def _backup(self, node: RadixNode) -> bool:
        """Copy `node`'s KV to the host, dropping host-only leaves for room
        (never `node`'s own descendants' ancestors: only leaves go). False
        when the host cannot make room."""
        need = len(node.key)
        short = self.host_tokens + need - self.host_capacity_tokens
        if short > 0 and self.evict_host(short) < short:
            return False
        node.backed_up = True
        self.host_tokens += need
        self.backup_tokens_total += need
        return True

    def _has_device_child(self, node: RadixNode) -> bool:
        if not node.children:
            return False
        if not self.hierarchical:
            return True
        for child in node.children.values():
            if child.device:
                return True
        return False

    def drop_namespace(self, namespace: Namespace) -> int:
        """Free every unlocked token of `namespace` at once (a request's own
        KV when prefix caching is off). Returns the device tokens freed."""
        root = self._roots.get(namespace)
        if root is None:
            return 0
        freed = 0
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            if node.lock_ref > 0:
                stack.extend(node.children.values())  # a locked path stays; its free leaves go
                continue
            subtree = [node]
            while subtree:
                dropped = subtree.pop()
                freed += len(dropped.key) if dropped.device else 0
                self.host_tokens -= len(dropped.key) if dropped.backed_up else 0
                subtree.extend(dropped.children.values())
            del node.parent.children[self._child_key(node.key)]
            node.parent = None
        self.total_tokens -= freed
        if not root.children:
            del self._roots[namespace]
        return freed

    def reset(self) -> None:
        """Drop everything, host copies too (SGLang's /flush_cache). Callers ensure nothing is locked."""
        self._roots.clear()
        self.total_tokens = 0
        self.protected_tokens = 0
        self.host_tokens = 0

    # ------------------------------------------------------------- internals

    def page_aligned(self, tokens: Sequence[int]) -> list[int]:
        """`tokens` cut to whole pages (a list either way)."""
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        page = self.page_size
        if page > 1 and len(tokens) % page:
            return tokens[:len(tokens) // page * page]
        return tokens

    def _child_key(self, tokens: Sequence[int], start: int = 0) -> Hashable:
        """The children-dict key of the edge starting at `tokens[start]`: its first page."""
        page = self.page_size
        return tokens[start] if page == 1 else tuple(tokens[start:start + page])

    def _walk(self, tokens: Sequence[int], *, namespace: Namespace, split_partial: bool) -> tuple[RadixNode, int]:
        node = self.root(namespace)
        position = 0
        total = len(tokens)
        page = self.page_size
        while position < total:
            child = node.children.get(self._child_key(tokens, position))
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
            # common >= 1 page because children are keyed by their first page;
            # only whole pages match.
            common -= common % page
            if split_partial:
                node = self._split(child, common)
            position += common
            break
        return node, position

    def _insert_without_eviction(self, tokens: Sequence[int], *, namespace: Namespace, priority: int,
                                 inserted: int) -> PrefixMatch:
        tokens = self.page_aligned(tokens)
        node, length = self._walk(tokens, namespace=namespace, split_partial=True)
        now = next(self._clock)
        end = node
        if length < len(tokens):
            end = RadixNode(key=list(tokens[length:]), parent=node, namespace=namespace, last_access=now,
                            priority=priority)
            node.children[self._child_key(end.key)] = end
            self.total_tokens += len(end.key)
            # The branch's high-water depth rises along the path (tlru).
            ancestor = node
            while ancestor is not None and ancestor.history < end.depth:
                ancestor.history = end.depth
                ancestor = ancestor.parent
        # SGLang's _insert_helper: every node on the path takes the highest
        # priority inserted through it, and counts the request as a hit unless
        # it ends within what this request inserted before.
        hierarchical = self.hierarchical
        backup_at = self._backup_at_hits
        visit = end
        while visit.parent is not None:
            visit.last_access = now
            if visit.priority < priority:
                visit.priority = priority
            if visit.depth > inserted:
                visit.hit_count += 1
            if hierarchical:
                if not visit.device:  # the request computed it again on the device
                    visit.device = True
                    self.total_tokens += len(visit.key)
                if backup_at is not None and not visit.backed_up and visit.hit_count >= backup_at:
                    self._backup(visit)
            visit = visit.parent
        visit.last_access = now
        return PrefixMatch(length=length, node=end)

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut `child`'s edge after `at` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < at < len(child.key)
        upper = RadixNode(key=child.key[:at], parent=parent, namespace=child.namespace, last_access=child.last_access,
                          priority=child.priority)
        # Every request locking `child` passes through `upper` too, and every
        # hit on it and its branch's history are `upper`'s as well.
        upper.lock_ref = child.lock_ref
        upper.hit_count = child.hit_count
        upper.history = child.history
        upper.device = child.device
        upper.backed_up = child.backed_up
        parent.children[self._child_key(upper.key)] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        return upper

    def _touch_path(self, node: RadixNode, now: int) -> None:
        while node is not None:
            node.last_access = now
            node = node.parent

    def _evictable_leaves(self):
        """Unlocked device leaves: nodes on the device none of whose children are."""
        hierarchical = self.hierarchical
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                if hierarchical and not node.device:
                    continue  # its subtree is on the host only
                if node.children and (not hierarchical or self._has_device_child(node)):
                    stack.extend(node.children.values())
                elif node.lock_ref == 0:
                    yield node

    def _remove_leaf(self, leaf: RadixNode) -> int:
        """Take `leaf` (and any host-only nodes under it) out of the tree.
        Returns the device tokens freed, or the host tokens for a host-only leaf."""
        parent = leaf.parent
        assert parent is not None
        del parent.children[self._child_key(leaf.key)]
        leaf.parent = None
        stack = list(leaf.children.values())
        while stack:  # host-only descendants of a device leaf without a copy
            below = stack.pop()
            self.host_tokens -= len(below.key) if below.backed_up else 0
            stack.extend(below.children.values())
        if leaf.backed_up:
            self.host_tokens -= len(leaf.key)
        if leaf.device:
            self.total_tokens -= len(leaf.key)
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
