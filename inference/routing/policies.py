"""Routing policies: which backend of a model's pool takes a request.

All policies are synchronous and do no I/O: `pick` runs on the event loop for
every request (and again for each failover attempt).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from typing import Protocol

from ..registry import BackendState, ModelEntry
from .key import MESSAGE_START
from .prefix_tree import DEFAULT_BLOCK_CHARS, PrefixTree

# A conversation is identified by everything before its first reply.
_FIRST_REPLY = MESSAGE_START + "assistant"
# Without a reply (completions, first turns) at most this much of the key.
ANCHOR_MAX_CHARS = 32_768


def conversation_anchor(key: str) -> str:
    """The part of a routing key that every turn of its conversation shares:
    up to the first assistant message, else (a first turn, or a completion
    prompt) the key itself; at most `ANCHOR_MAX_CHARS` either way, so a first
    turn and its continuation agree."""
    end = key.find(_FIRST_REPLY, 0, ANCHOR_MAX_CHARS)
    return key[:end] if end >= 0 else key[:ANCHOR_MAX_CHARS]


def _rendezvous_order(anchor: str, backends: list[BackendState]) -> list[BackendState]:
    """Highest random weight hashing: a pseudo-random order of `backends` that
    depends only on the anchor and the URLs, so every gateway process agrees,
    and removing a backend moves only the conversations it ranked first."""
    digest = hashlib.blake2b(anchor.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return sorted(
        backends,
        key=lambda b: hashlib.blake2b(b.url.encode(), digest_size=8, key=digest).digest(),
        reverse=True,
    )


class Policy(Protocol):
    name: str

    def pick(self, model: ModelEntry, key: str, *, exclude: Collection[str] = frozenset()) -> BackendState | None:
        """A backend of `model` that is available and not in `exclude` (URLs),
        or None when there is none. `key` is `routing_key_build(...)`'s text;
        policies that ignore prefixes accept ""."""

    def observe(self, model: ModelEntry, backend: BackendState, key: str) -> None:
        """The request with `key` was sent to `backend`."""

    def forget_backend(self, url: str) -> None:
        """`url` left the pool (or lost its cache, e.g. restarted)."""


def _candidates(model: ModelEntry, exclude: Collection[str], now: float) -> tuple[list[BackendState], int]:
    """The available, not excluded backends in rotation order from
    `model.next_index`, and the pool index of the first one."""
    backends = model.backends
    count = len(backends)
    start = model.next_index % count if count else 0
    ordered = backends[start:] + backends[:start]
    return [b for b in ordered if b.url not in exclude and b.available(now)], start


class LeastOutstanding:
    """Fewest requests in flight from this process; ties rotate."""

    name = "least_outstanding"

    def pick(self, model: ModelEntry, key: str = "", *, exclude: Collection[str] = frozenset()) -> BackendState | None:
        now = time.monotonic()
        backends = model.backends
        count = len(backends)
        best: BackendState | None = None
        start = model.next_index
        for offset in range(count):
            backend = backends[(start + offset) % count]
            if backend.url in exclude or not backend.available(now):
                continue
            if best is None or backend.outstanding < best.outstanding:
                best = backend
        if best is not None:
            model.next_index = (start + 1) % count
        return best

    def observe(self, model: ModelEntry, backend: BackendState, key: str) -> None:
        pass

    def forget_backend(self, url: str) -> None:
        pass


class RoundRobin:
    """Each available backend in turn, whatever its load."""

    name = "round_robin"

    def pick(self, model: ModelEntry, key: str = "", *, exclude: Collection[str] = frozenset()) -> BackendState | None:
        now = time.monotonic()
        backends = model.backends
        count = len(backends)
        start = model.next_index
        for offset in range(count):
            index = (start + offset) % count
            backend = backends[index]
            if backend.url not in exclude and backend.available(now):
                model.next_index = (index + 1) % count
                return backend
        return None

    def observe(self, model: ModelEntry, backend: BackendState, key: str) -> None:
        pass

    def forget_backend(self, url: str) -> None:
        pass


class CacheAware:
    """Send a request where its longest prefix most likely sits in KV cache,
    unless load says otherwise. Per request, among the candidates (available,
    not excluded):

    1. Imbalance guard (sgl-router's): if max - min outstanding >
       `balance_abs_threshold` and max > `balance_rel_threshold` × min, take the
       least loaded.
    2. Bounded load (consistent hashing with bounded loads): a backend may only
       follow the cache while its outstanding + 1 ≤ (1 + `bounded_load_epsilon`)
       × (total outstanding + 1) / candidates + `bounded_load_slack`. A hot
       prefix therefore spills to (and is replicated on) further backends as
       its load grows, instead of queueing on one. None disables it.
    3. Among the backends under the bound, take the one with the longest
       matched prefix (ties: fewer outstanding, then rotation) ...
       - with `conversation_affinity` (default): if its match covers the
         conversation's anchor (everything before the first assistant message,
         see `conversation_anchor`); otherwise the first backend under the
         bound in the anchor's rendezvous-hash order. Every gateway process
         computes the same order without sharing state, so the turns of a
         conversation meet on one backend even when they pass through
         different processes, and distinct conversations spread uniformly;
       - without it (sgl-router's rule): if its match covers at least
         `cache_threshold` of the key.
    4. Otherwise the least loaded (ties: the smallest tree, i.e. the most free
       cache, then rotation), which spreads distinct prefixes.

    The tree of each model approximates its backends' caches: `observe` inserts
    the key for the backend and evicts that backend's least recently used
    leaves beyond `max_tree_chars` (about its KV capacity in characters:
    tokens × ~4). State is per process; see `sim_multiprocess` for what that
    costs with several gateway processes.
    """

    name = "cache_aware"

    def __init__(
        self,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.5,
        bounded_load_epsilon: float | None = 0.5,
        bounded_load_slack: int = 2,
        max_tree_chars: int = 2_000_000,
        block_chars: int = DEFAULT_BLOCK_CHARS,
        conversation_affinity: bool = True,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.bounded_load_epsilon = bounded_load_epsilon
        self.bounded_load_slack = bounded_load_slack
        self.max_tree_chars = max_tree_chars
        self.block_chars = block_chars
        self.conversation_affinity = conversation_affinity
        # Keyed by model name: registry reloads replace ModelEntry objects.
        self._trees: dict[str, PrefixTree] = {}
        # The last key split into blocks, so observe() after pick() does not split again.
        self._last_key: str | None = None
        self._last_blocks: list[int] = []

    def tree(self, model_name: str) -> PrefixTree:
        tree = self._trees.get(model_name)
        if tree is None:
            tree = self._trees[model_name] = PrefixTree(block_chars=self.block_chars)
        return tree

    def pick(self, model: ModelEntry, key: str, *, exclude: Collection[str] = frozenset()) -> BackendState | None:
        candidates, start = _candidates(model, exclude, time.monotonic())
        if not candidates:
            return None
        if model.backends:
            model.next_index = (start + 1) % len(model.backends)
        if len(candidates) == 1:
            return candidates[0]
        tree = self._trees.get(model.name)
        loads = [b.outstanding for b in candidates]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs_threshold and high > self.balance_rel_threshold * low:
            return self._least_loaded(candidates, low, tree)
        if not key:
            return self._least_loaded(candidates, low, tree)
        if self.bounded_load_epsilon is None:
            bound = float("inf")
        else:
            bound = (1 + self.bounded_load_epsilon) * (sum(loads) + 1) / len(candidates) + self.bounded_load_slack
        best: BackendState | None = None
        best_chars = 0
        if tree is not None:
            _, matched = tree.match(self._blocks(tree, key))
            for backend in candidates:
                chars = matched.get(backend.url, 0)
                if chars == 0 or backend.outstanding + 1 > bound:
                    continue
                if chars > best_chars or (chars == best_chars and backend.outstanding < best.outstanding):
                    best, best_chars = backend, chars
        if self.conversation_affinity:
            anchor = conversation_anchor(key)
            # The tree saw this conversation (its whole anchor, up to block
            # alignment) on a backend: follow it.
            if best is not None and best_chars > len(anchor) - self.block_chars:
                return best
            for backend in _rendezvous_order(anchor, candidates):
                if backend.outstanding + 1 <= bound:
                    return backend
        elif best is not None and best_chars >= self.cache_threshold * len(key):
            return best
        return self._least_loaded(candidates, low, tree)

    def observe(self, model: ModelEntry, backend: BackendState, key: str) -> None:
        tree = self.tree(model.name)
        tree.insert(self._blocks(tree, key), backend.url)
        if tree.chars(backend.url) > self.max_tree_chars:
            tree.evict(backend.url, self.max_tree_chars)

    def forget_backend(self, url: str) -> None:
        for tree in self._trees.values():
            tree.remove_backend(url)

    def _blocks(self, tree: PrefixTree, key: str) -> list[int]:
        if key is not self._last_key:
            self._last_key, self._last_blocks = key, tree.blocks(key)
        return self._last_blocks

    @staticmethod
    def _least_loaded(candidates: list[BackendState], low: int, tree: PrefixTree | None) -> BackendState:
        least = [b for b in candidates if b.outstanding == low]
        if len(least) == 1 or tree is None:
            return least[0]
        return min(least, key=lambda b: tree.chars(b.url))


POLICY_NAMES = ("round_robin", "least_outstanding", "cache_aware")


def policy_for(name: str, **options) -> Policy:
    """A new policy instance. `options` are CacheAware's keyword arguments and
    are refused for the policies that take none."""
    if name == "cache_aware":
        return CacheAware(**options)
    if options:
        raise TypeError(f"policy {name!r} takes no options")
    if name == "round_robin":
        return RoundRobin()
    if name == "least_outstanding":
        return LeastOutstanding()
    raise ValueError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
