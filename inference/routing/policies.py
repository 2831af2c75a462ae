"""Routing policies: which backend of a model's pool takes a request.

All policies are synchronous and do no I/O: `pick` runs on the event loop for
every request (and again for each failover attempt).
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Collection
from typing import Protocol

from ..registry import BackendState, ModelEntry
from .key import MESSAGE_START
from .prefix_tree import DEFAULT_BLOCK_CHARS, PrefixTree

# Characters per prompt token before a model's first usage is seen (English
# text with a BPE tokenizer).
DEFAULT_CHARS_PER_TOKEN = 4.0
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


def conversation_head(key: str) -> str:
    """The part of a routing key that conversations may share with others: its
    first message (a system prompt, or the tools block), i.e. the key up to the
    start of its second message; the key itself when it has one message or
    none (a completion prompt); at most `ANCHOR_MAX_CHARS`."""
    first = key.find(MESSAGE_START, 0, ANCHOR_MAX_CHARS)
    if first < 0:
        return key[:ANCHOR_MAX_CHARS]
    second = key.find(MESSAGE_START, first + 1, ANCHOR_MAX_CHARS)
    return key[:second] if second >= 0 else key[:ANCHOR_MAX_CHARS]


def key_footprint(key: str) -> int:
    """Characters of a routing key that occupy a backend's KV cache for this
    request alone: the key past its first message (`conversation_head`, which
    conversations of a tenant share and the cache holds once); the whole key
    when it is a single message or a completion prompt."""
    return _footprint(key, conversation_head(key))


def _footprint(key: str, head: str) -> int:
    return len(key) - len(head) if len(head) < len(key) else len(key)


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


def _longest_match(candidates: list[BackendState], matched: dict[str, int],
                   bound: float) -> tuple[BackendState | None, int]:
    """The candidate under `bound` (outstanding + 1 ≤ bound) with the most
    matched characters (ties: fewer outstanding, then candidate order), and
    that count; (None, 0) when none under the bound matches anything."""
    best: BackendState | None = None
    best_chars = 0
    for backend in candidates:
        chars = matched.get(backend.url, 0)
        if chars == 0 or backend.load + 1 > bound:
            continue
        if chars > best_chars or (chars == best_chars and backend.load < best.load):
            best, best_chars = backend, chars
    return best, best_chars


class Policy(Protocol):
    name: str

    def pick(self, model: ModelEntry, key: str, *, exclude: Collection[str] = frozenset(),
             home: str | None = None) -> BackendState | None:
        """A backend of `model` that is available and not in `exclude` (URLs),
        or None when there is none. `key` is `routing_key_build(...)`'s text;
        policies that ignore prefixes accept "". `home`: the backend URL the
        shared conversation homes gave for the key's conversation, if asked."""

    def home_lookup(self, model: ModelEntry, key: str) -> str | None:
        """The conversation id to look up in the shared homes before `pick`
        (a later turn this process has not routed), or None: no lookup."""

    def observe(self, model: ModelEntry, backend: BackendState, key: str) -> str | None:
        """The request with `key` was sent to `backend`. Returns the
        conversation id to record in the shared homes when this placed the
        conversation somewhere this process had not seen it, else None."""

    def usage_observe(self, model_name: str, key_chars: int, prompt_tokens: int) -> None:
        """A request whose routing key had `key_chars` characters ended with
        `prompt_tokens` prompt tokens (what the backend's tokenizer made of it)."""

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


class _LoadOnly:
    """A policy that looks only at load: no conversations, prefixes or usage to keep."""

    def home_lookup(self, model: ModelEntry, key: str) -> None:
        return None

    def observe(self, model: ModelEntry, backend: BackendState, key: str) -> None:
        return None

    def usage_observe(self, model_name: str, key_chars: int, prompt_tokens: int) -> None:
        pass

    def forget_backend(self, url: str) -> None:
        pass


class LeastOutstanding(_LoadOnly):
    """Fewest requests in flight from this process; ties rotate."""

    name = "least_outstanding"

    def pick(self, model: ModelEntry, key: str = "", *, exclude: Collection[str] = frozenset(),
             home: str | None = None) -> BackendState | None:
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


class RoundRobin(_LoadOnly):
    """Each available backend in turn, whatever its load."""

    name = "round_robin"

    def pick(self, model: ModelEntry, key: str = "", *, exclude: Collection[str] = frozenset(),
             home: str | None = None) -> BackendState | None:
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


class CacheAware:
    """Send a request where its longest prefix most likely sits in KV cache,
    unless load says otherwise. A backend's load ("outstanding" below) is
    `BackendState.load`: the sequences in flight there from every gateway
    process, as the backend last reported them plus what this process sent
    since (this process's own alone, with 4 processes, counted a quarter of
    the load and copied prompts on noise). Per request, among the candidates
    (available, not excluded), with `mean` = (total outstanding + 1) / candidates:

    1. Imbalance guard (sgl-router's): if max - min outstanding >
       `balance_abs_threshold` and max > `balance_rel_threshold` × min, take the
       least loaded.
    2. With `conversation_affinity` (default), the conversation is what is
       placed (its anchor: everything before the first assistant message, see
       `conversation_anchor`):
       a. a conversation this process has routed before (the tree holds its
          whole anchor on a backend), or whose `home` the shared conversation
          homes gave, stays on that backend while its outstanding + 1 ≤
          (1 + 2ε) × mean + slack (ε = `bounded_load_epsilon`, slack =
          `bounded_load_slack`): elsewhere its whole history would be
          prefilled again. Except from a saturated home, one that last
          reported (GET /v1/loads) at least `saturated_waiting` requests
          queued with `saturated_kv_usage` of its KV held by running ones,
          while another candidate reported no queue and under
          `relief_kv_usage` in use: then the turn is placed as in (b) among
          the others. A saturated backend evicts its queued turns'
          histories to make room for the running ones, so staying saves
          little and waits in the queue; and while its conversations keep
          coming back it cannot recover (bench/routing with 64k-token
          caches: one backend held 6 requests queued for the whole window
          and served 40 % of prompt tokens from cache, the others 77–88 %).
          Measured on seed 1, cache_aware alone, alternated runs: 64k
          caches, TTFT p99 528–1,017 ms in 7 runs against 885–1,637 ms in
          8 without, the hit rate unchanged (77.8 against 77.9 % mean);
          96k caches, 87.0–87.2 % in 7 runs, every later turn finding its
          history, against 85.0–87.2 % (two runs lost histories after a
          cold start crowded one backend); seeds 2 and 3 unchanged.
          A home with a hierarchical cache (`BackendState.host_tier`) is
          never counted saturated: its host pool keeps the histories the
          device evicts and loads them back (bench/routing
          `--max-total-tokens 64000 --hicache-ratio 1.5`, one run each:
          84.3 % hit rate and 94.5 % of histories found with the rule,
          86.8 % and 100 % without);
       b. a new one goes, when backends hold a long prefix of it (at least
          `min_shared_chars`: a system prompt other conversations share), to
          the least loaded of those holding the longest, if its outstanding +
          1 ≤ the new-placement bound, min((1 + ε) × mean + slack, least
          outstanding + 1 + max(slack, ε × mean)); else to the first backend
          in the rendezvous-hash order of the conversation's first message
          (`conversation_head`, the same in every gateway process) within that
          bound. It keeps every backend within a few requests of the others (a
          backend left idle costs its whole share). Holders once had twice the
          room (2ε), since joining one saves the prefill of the shared prefix;
          but a backend holding several tenants' only copies then ran up to
          2ε × mean above the least loaded, filled its KV, and those tenants
          copied their prompts anyway (bench/routing, seed 1, six alternated
          runs each: 342,300 against 337,700 simulated tok/s, hit rate 87.03
          against 86.90 %, TTFT p99 85-103 against 91-153 ms; seeds 2 and 3,
          three each: +1.2 and +1.0 % throughput, hit rate +0.07 and -0.16
          point). A shared prefix is thus copied to another backend only when
          load pushes it there, and a popular one ends up on several. Only
          backends with room in their KV cache are considered for (b): the
          key footprints (`key_footprint`: the key past its first message) of
          the requests in flight there, plus this one's, within `kv_fill` of
          its KV capacity (`kv_chars_limit`); if none has
          room, all are. Counting requests alone, a backend of long
          conversations took new ones until its cache could no longer keep
          their histories between turns (bench/routing with 64k-token
          caches: later turns then had to prefill their history again).
          Of those, a backend past `kv_balance_floor` of that capacity, or
          reporting more than `kv_balance_reported_floor` of its KV in use by
          running requests (`token_usage` of GET /v1/loads, polled with its
          queue: what the other gateway processes' requests hold too; the
          footprints leave out system prompts and replies, hence the higher
          floor), is considered only while its footprints plus this one stay
          within (1 + ε_kv) × the mean over the candidates + slack × the mean
          footprint of a request in flight (if none is, all are), with ε_kv =
          2 × `kv_balance_epsilon` for a holder of the prompt's longest prefix
          and `kv_balance_epsilon` for the others (sending a conversation
          away from the holders copies its system prompt; with ε_kv the same
          for both, bench/routing's first turns missed their system prompt
          13 times in a 60 s window instead of 6):
          requests are balanced by count, but conversations differ in size,
          and the backend that happened to home the long ones kept taking
          new ones until its running requests filled its KV; its queued
          turns then lost their histories, prefilled them again and kept it
          full (bench/routing, 96k-token caches: in 4 runs of 6, 1-4 % of
          later turns lost their history there; with this bound, in none of
          3, and with ε_kv = `kv_balance_epsilon` for holders too, none of 6).
       Every pick after (a) or (b) had no candidate: the least loaded.
    3. Without it (sgl-router's rule): the backend under the bound
       (1 + ε) × mean + slack with the longest matched prefix, if that covers at
       least `cache_threshold` of the key; else the least loaded (ties: the
       smallest tree, i.e. the most free cache, then rotation). None as ε
       disables the bounds.

    The tree of each model approximates its backends' caches: `observe` inserts
    the key for the backend and evicts that backend's least recently used
    leaves beyond the backend's KV capacity (`max_total_num_tokens` read
    from its /server_info into `BackendState.kv_tokens`) × the characters per
    prompt token this model's usage shows (`usage_observe`), or beyond
    `max_tree_chars` while the capacity is unknown. Trees are per process. What several gateway processes need
    to agree on, where each conversation lives, is shared through
    `homes.ConversationHomes`: `home_lookup` says when to ask, `observe` when
    to tell.
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
        min_shared_chars: int = 512,
        max_conversations: int = 100_000,
        kv_fill: float | None = 1.0,
        kv_balance_epsilon: float | None = 0.25,
        kv_balance_floor: float = 0.6,
        kv_balance_reported_floor: float = 0.7,
        saturated_waiting: int | None = 2,
        saturated_kv_usage: float = 0.85,
        relief_kv_usage: float = 0.7,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.bounded_load_epsilon = bounded_load_epsilon
        self.bounded_load_slack = bounded_load_slack
        self.max_tree_chars = max_tree_chars
        self.block_chars = block_chars
        self.conversation_affinity = conversation_affinity
        self.min_shared_chars = min_shared_chars
        self.kv_fill = kv_fill
        self.kv_balance_epsilon = kv_balance_epsilon
        self.kv_balance_floor = kv_balance_floor
        self.kv_balance_reported_floor = kv_balance_reported_floor
        self.saturated_waiting = saturated_waiting
        self.saturated_kv_usage = saturated_kv_usage
        self.relief_kv_usage = relief_kv_usage
        # Keyed by model name: registry reloads replace ModelEntry objects.
        self._trees: dict[str, PrefixTree] = {}
        # The last key split into blocks, so observe() after pick() does not split again.
        self._last_key: str | None = None
        self._last_blocks: list[int] = []
        # Per model: characters of routing key per prompt token (moving average).
        self._chars_per_token: dict[str, float] = {}
        # Per model: conversation id → the backend this process last sent it to
        # (least recently used first, at most `max_conversations`).
        self._homes: dict[str, OrderedDict[str, str]] = {}
        self.max_conversations = max_conversations
        # The last key's conversation id, so pick() and observe() digest it once.
        self._last_id_key: str | None = None
        self._last_id = ""

    def tree(self, model_name: str) -> PrefixTree:
        tree = self._trees.get(model_name)
        if tree is None:
            tree = self._trees[model_name] = PrefixTree(block_chars=self.block_chars)
        return tree

    @staticmethod
    def conversation_id(key: str) -> str:
        """A digest of the key's conversation anchor: the same for every turn."""
        anchor = conversation_anchor(key)
        return hashlib.blake2b(anchor.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()

    def _id(self, key: str) -> str:
        if key is not self._last_id_key:
            self._last_id_key, self._last_id = key, self.conversation_id(key)
        return self._last_id

    def home_lookup(self, model: ModelEntry, key: str) -> str | None:
        if not (self.conversation_affinity and key) or len(model.backends) < 2:
            return None
        if len(conversation_anchor(key)) == len(key):
            return None  # a first turn: nobody has placed it yet
        conversation = self._id(key)
        homes = self._homes.get(model.name)
        if homes is not None and conversation in homes:
            return None
        return conversation

    def pick(self, model: ModelEntry, key: str, *, exclude: Collection[str] = frozenset(),
             home: str | None = None) -> BackendState | None:
        candidates, start = _candidates(model, exclude, time.monotonic())
        if not candidates:
            return None
        if model.backends:
            model.next_index = (start + 1) % len(model.backends)
        if len(candidates) == 1:
            return candidates[0]
        tree = self._trees.get(model.name)
        loads = [b.load for b in candidates]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs_threshold and high > self.balance_rel_threshold * low:
            return self._least_loaded(candidates, low, tree)
        if not key or not any(b.prefix_cache for b in candidates):
            # Nothing to route for: no prefix, or backends that cache none
            # (SGLang's --disable-radix-cache), where keeping conversations
            # together would only cost balance.
            return self._least_loaded(candidates, low, tree)
        if self.bounded_load_epsilon is None:
            bound = sticky_bound = new_bound = float("inf")
        else:
            mean = (sum(loads) + 1) / len(candidates)
            bound = (1 + self.bounded_load_epsilon) * mean + self.bounded_load_slack
            sticky_bound = (1 + 2 * self.bounded_load_epsilon) * mean + self.bounded_load_slack
            new_bound = min(bound, low + 1 + max(self.bounded_load_slack, self.bounded_load_epsilon * mean))
        matched = tree.match(self._blocks(tree, key))[1] if tree is not None else {}
        if not self.conversation_affinity:
            best, best_chars = _longest_match(candidates, matched, bound)
            if best is not None and best_chars >= self.cache_threshold * len(key):
                return best
            return self._least_loaded(candidates, low, tree)
        # (a) A conversation with a known home stays there, unless the home is
        # saturated and another backend has room: then it is placed as a new
        # one, anywhere but there.
        homes = self._homes.get(model.name)
        known = homes.get(self._id(key)) if homes is not None else None
        for url in (known, home):
            if url is not None:
                for backend in candidates:
                    if backend.url == url and backend.load + 1 <= sticky_bound:
                        if not self._saturated(backend) or not any(
                                self._relieves(other) for other in candidates if other is not backend):
                            return backend
                        candidates = [other for other in candidates if other is not backend]
                        low = min(other.load for other in candidates)
                        break
        # (b) A new conversation (or one whose home is gone or full), among the
        # backends whose KV cache has room for it beside what is in flight there.
        head = conversation_head(key)
        footprint = _footprint(key, head)
        for_holders, for_others = self._with_room(model.name, candidates, footprint)
        best, best_chars = _longest_match(for_holders, matched, new_bound)
        if best is not None and best_chars >= self.min_shared_chars:
            holders = [b for b in for_holders
                       if matched.get(b.url, 0) >= best_chars and b.load + 1 <= new_bound]
            return min(_rendezvous_order(head, holders), key=lambda b: b.load)
        for backend in _rendezvous_order(head, for_others):
            if backend.load + 1 <= new_bound:
                return backend
        return self._least_loaded(candidates, low, tree)

    def _saturated(self, backend: BackendState) -> bool:
        """The backend last reported a queue of at least `saturated_waiting`
        with `saturated_kv_usage` of its KV held by running requests, and
        has no hierarchical cache: one with a host tier keeps the histories
        its device evicts and loads them back, so a turn gains by staying."""
        return (self.saturated_waiting is not None and backend.waiting >= self.saturated_waiting
                and backend.kv_usage >= self.saturated_kv_usage and not backend.host_tier)

    def _relieves(self, backend: BackendState) -> bool:
        """The backend last reported no queue and under `relief_kv_usage` of its KV in use."""
        return backend.waiting == 0 and 0 <= backend.kv_usage < self.relief_kv_usage

    def _with_room(self, model_name: str, candidates: list[BackendState],
                   footprint: int) -> tuple[list[BackendState], list[BackendState]]:
        """The candidates a new conversation may go to: for the holders of its
        prefix, and for the others. With `kv_fill`, those whose in-flight
        requests' footprints plus this one stay within `kv_fill` of their KV
        capacity (in characters, as the tree counts); all of them when none has
        room, or capacities are unknown. Of those, with `kv_balance_epsilon`,
        the ones whose footprints plus this one stay within (1 + ε) × the
        candidates' mean footprint (2ε for holders) + slack × the mean
        footprint of a request in flight, or that are not yet full: their
        footprints plus this one within `kv_balance_floor` of their capacity
        and their reported KV use (`BackendState.kv_usage`) under
        `kv_balance_reported_floor`; all of them when none is. The balance is
        skipped when every candidate has a hierarchical cache: it exists to keep
        histories between turns, which a host tier keeps (bench/routing
        `--max-total-tokens 64000 --hicache-ratio 1.5`, alternated runs:
        87.0, 87.0, 87.1 % hit rate without it against 86.8, 86.8, 87.1, 86.8 %)."""
        limits = {b.url: self.kv_chars_limit(model_name, b) for b in candidates if b.kv_tokens}
        roomy = candidates
        if self.kv_fill is not None:
            roomy = [b for b in candidates
                     if b.url not in limits or b.outstanding_chars + footprint <= self.kv_fill * limits[b.url]]
            roomy = roomy or candidates
        if self.kv_balance_epsilon is None or len(roomy) < 2 or all(b.host_tier for b in roomy):
            return roomy, roomy
        total = sum(b.outstanding_chars for b in candidates) + footprint
        mean = total / len(candidates)
        slack = self.bounded_load_slack * total / (sum(b.outstanding for b in candidates) + 1)
        after = [(b, b.outstanding_chars + footprint) for b in roomy]
        not_full = {b.url for b, chars in after
                    if (b.url not in limits or chars <= self.kv_balance_floor * limits[b.url])
                    and b.kv_usage < self.kv_balance_reported_floor}

        def within(epsilon: float) -> list[BackendState]:
            bound = (1 + epsilon) * mean + slack
            return [b for b, chars in after if chars <= bound or b.url in not_full] or roomy

        return within(2 * self.kv_balance_epsilon), within(self.kv_balance_epsilon)

    def observe(self, model: ModelEntry, backend: BackendState, key: str) -> str | None:
        tree = self.tree(model.name)
        blocks = self._blocks(tree, key)
        placed = None
        if self.conversation_affinity and key:
            homes = self._homes.get(model.name)
            if homes is None:
                homes = self._homes[model.name] = OrderedDict()
            conversation = self._id(key)
            # With one backend there is nothing for other processes to learn.
            if homes.get(conversation) != backend.url and len(model.backends) > 1:
                placed = conversation
            homes[conversation] = backend.url
            homes.move_to_end(conversation)
            if len(homes) > self.max_conversations:
                homes.popitem(last=False)
        tree.insert(blocks, backend.url)
        limit = self.tree_chars_limit(model.name, backend)
        if tree.chars(backend.url) > limit:
            tree.evict(backend.url, limit)
        return placed

    def tree_chars_limit(self, model_name: str, backend: BackendState) -> int:
        """How much of a backend's cache the tree pictures, in characters: what
        its prefix cache can serve from in tokens (its KV capacity, with a
        hierarchical cache its host tier too) × the characters per token seen
        on this model, when the backend reported its capacity; else
        `max_tree_chars`."""
        if not backend.kv_tokens:
            return self.max_tree_chars
        tokens = max(backend.kv_tokens, backend.cache_tokens)
        return int(tokens * self._chars_per_token.get(model_name, DEFAULT_CHARS_PER_TOKEN))

    def kv_chars_limit(self, model_name: str, backend: BackendState) -> int:
        """A backend's KV capacity (the device pool) in characters, as the tree counts."""
        return int(backend.kv_tokens * self._chars_per_token.get(model_name, DEFAULT_CHARS_PER_TOKEN))

    def usage_observe(self, model_name: str, key_chars: int, prompt_tokens: int) -> None:
        if prompt_tokens < 16 or key_chars < 64:
            return  # too short to say much: chat templates add their own tokens
        ratio = key_chars / prompt_tokens
        current = self._chars_per_token.get(model_name)
        self._chars_per_token[model_name] = ratio if current is None else current + 0.05 * (ratio - current)

    def forget_backend(self, url: str) -> None:
        for tree in self._trees.values():
            tree.remove_backend(url)
        for homes in self._homes.values():
            for conversation in [c for c, home in homes.items() if home == url]:
                del homes[conversation]

    def _blocks(self, tree: PrefixTree, key: str) -> list[int]:
        if key is not self._last_key:
            self._last_key, self._last_blocks = key, tree.blocks(key)
        return self._last_blocks

    @staticmethod
    def _least_loaded(candidates: list[BackendState], low: int, tree: PrefixTree | None) -> BackendState:
        least = [b for b in candidates if b.load == low]
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
