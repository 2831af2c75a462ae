"""Prefix retention: a tenant's shared prefix stays in its backend's cache
while the tenant may come back for it.

SGLang evicts its radix cache least recently used first. It cannot tell a
system prompt that a tenant's next conversation will start with from the
history of a conversation that has ended, and under pressure it drops
whichever was touched last the longest ago. A tenant with a long system
prompt and a conversation every few minutes then pays the whole prefill at
each one. The gateway knows better: it has seen several conversations start
with that prompt. When its picture of a backend's cache (the cache-aware
policy's tree) shows such a prompt among the oldest things there, with the
picture full, it sends the backend the prompt alone with `max_tokens` 1. The
backend matches the prompt in its cache (which refreshes it, as any match
does), prefills the few tokens of the chat template's generation header and
decodes one token; the prompt is then the most recently used again, and what
goes instead is older: mostly histories of finished conversations.

The picture keeps things longer than the backend does, hence a low
`age_fraction`; a touch costs the backend a few tokens of prefill and one of
decode. Measured on bench/routing's workload (seed 1, 24 s window, one run
each), touches and first turns whose prompt had been evicted: 0.6, 7 touches,
1 evicted; 0.35, 15 touches, none; 0.2, 32 touches, none; no touches, 2.

A prompt is kept so for `retention_seconds` after a customer request last
used it; it must have started at least `min_conversations` conversations (a
one-off prompt is not worth a touch). Touches skip a backend that reports a
queue or `max_kv_usage` of its KV held by running requests: there, room is for
the requests running. A touch that finds less than half of the prompt cached
means the picture was wrong, or the template renders a lone first message
differently; after two such in a row the prompt is touched no more.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import orjson

from ..registry import BackendState, ModelEntry
from .key import MESSAGE_START
from .policies import _FIRST_REPLY, CacheAware

logger = logging.getLogger(__name__)

# Upstream fields that decide which cache entries a request can match, copied
# from the customer's request to its touches.
_CACHE_FIELDS = ("cache_salt", "extra_key", "chat_template_kwargs")
_rids = itertools.count(1)


@dataclass(slots=True)
class Head:
    """A prefix conversations share: the first message of a chat request."""

    blocks: list[int]          # the prefix tree's blocks of the routing key's head
    touch: dict                # the upstream request for the first message alone
    conversations: int = 0     # conversations seen starting with it
    last_use: float = 0.0      # monotonic time of the last customer request using it
    misses: int = 0            # touches in a row that found it mostly uncached
    touching: set[str] = field(default_factory=set)  # backends with a touch in flight

    @property
    def retired(self) -> bool:
        return self.misses >= 2


class PrefixRetention:
    def __init__(self, policy: CacheAware, *, retention_seconds: float = 300.0, min_conversations: int = 2,
                 age_fraction: float = 0.25, full_fraction: float = 0.9, max_kv_usage: float = 0.7,
                 max_heads: int = 2_000) -> None:
        self.policy = policy
        self.retention_seconds = retention_seconds
        self.min_conversations = min_conversations
        self.age_fraction = age_fraction
        self.full_fraction = full_fraction
        self.max_kv_usage = max_kv_usage
        self.max_heads = max_heads
        # Per model: the head's block hashes → Head, least recently used first.
        self._heads: dict[str, OrderedDict[tuple[int, ...], Head]] = {}
        self.touches = self.touch_misses = 0

    def observe(self, model: ModelEntry, key: str, upstream_fields) -> None:
        """A customer's chat request with routing `key` went upstream;
        `upstream_fields()` gives its upstream body's fields (model, messages,
        tools, priority and those of `_CACHE_FIELDS`), asked for a prefix seen
        for the first time only. A few microseconds for a long key: two
        searches, and the policy's block hashes of the key (already made for
        its pick) as the prefix's identity."""
        first = key.find(MESSAGE_START)
        end = key.find(MESSAGE_START, first + 1) if first >= 0 else -1
        if end < self.policy.min_shared_chars:
            return  # no first message followed by another, or too short to matter
        tree = self.policy.tree(model.name)
        blocks = self.policy._blocks(tree, key)[:end // tree.block_chars]
        identity = tuple(blocks)
        heads = self._heads.get(model.name)
        if heads is None:
            heads = self._heads[model.name] = OrderedDict()
        entry = heads.get(identity)
        if entry is None:
            upstream = upstream_fields()
            messages = upstream.get("messages")
            if not isinstance(messages, list) or not messages or upstream.get("tools"):
                return  # the head is a tools block: not reproduced by a lone message
            touch = {"model": upstream.get("model"), "messages": messages[:1], "max_tokens": 1,
                     "temperature": 0, "stream": False}
            touch.update({name: upstream[name] for name in _CACHE_FIELDS if name in upstream})
            if "priority" in upstream:
                touch["priority"] = upstream["priority"]
            entry = heads[identity] = Head(blocks, touch)
            if len(heads) > self.max_heads:
                heads.popitem(last=False)
        else:
            heads.move_to_end(identity)
        entry.last_use = time.monotonic()
        if key.find(_FIRST_REPLY, end) < 0:  # no reply yet: a first turn, a new conversation
            entry.conversations += 1

    def due(self, model: ModelEntry, now: float) -> list[tuple[BackendState, Head]]:
        """The touches to send now: for each available backend whose picture
        is full and that is not busy, the shared prefixes it holds whose last
        use there is among its oldest (at least `age_fraction` of the age of
        its least recently used entry)."""
        heads = self._heads.get(model.name)
        tree = self.policy._trees.get(model.name)
        if not heads or tree is None:
            return []
        live = [h for h in heads.values() if not h.retired and h.conversations >= self.min_conversations
                and now - h.last_use <= self.retention_seconds]
        if not live:
            return []
        out = []
        for backend in model.backends:
            url = backend.url
            if not backend.available(now) or backend.waiting > 0 or backend.kv_usage >= self.max_kv_usage:
                continue
            if tree.chars(url) < self.full_fraction * self.policy.tree_chars_limit(model.name, backend):
                continue
            oldest = tree.oldest_use(url)
            if oldest is None:
                continue
            threshold = self.age_fraction * (now - oldest)
            for head in live:
                if url in head.touching:
                    continue
                used = tree.last_use(head.blocks, url)
                if used is not None and now - used >= threshold:
                    out.append((backend, head))
        return out

    def touched(self, model: ModelEntry, backend: BackendState, head: Head, *, prompt_tokens: int,
                cached_tokens: int) -> None:
        """A touch came back: the backend holds the prefix, freshly used."""
        self.touches += 1
        if prompt_tokens and cached_tokens * 2 < prompt_tokens:
            self.touch_misses += 1
            head.misses += 1
            if head.retired:
                logger.info("prefix retention: a %d-token prefix of %s was not found cached twice; "
                            "no more touches for it", prompt_tokens, model.name)
        else:
            head.misses = 0
        self.policy.tree(model.name).insert(head.blocks, backend.url)

    @staticmethod
    def body(head: Head) -> bytes:
        return orjson.dumps({**head.touch, "rid": f"keepalive-{os.getpid()}-{next(_rids)}"})
