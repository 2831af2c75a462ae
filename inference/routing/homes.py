"""Conversation homes shared by every gateway process: which backend holds a
conversation's history, kept in Redis.

Each gateway process keeps its own prefix tree (`prefix_tree`), so it knows
only the conversations whose turns it routed itself. When consecutive turns
pass through different processes, the process that sees a later turn of a
conversation it does not know asks here where the conversation lives, and the
process that places a conversation (its first turn, or a move) says so here.

Key: `{namespace}:home:{model}:{conversation id}` → backend URL, with a TTL
(`ttl_seconds`, refreshed on every placement). The conversation id is
`CacheAware.conversation_id` (a digest of the conversation's anchor), so the
map holds no prompt text.

Cost on the request path: one GET on the gateway's pipelined Redis connection,
only for a later turn this process has not seen; placements are written in
batches after the pick, never awaited by a request. When Redis fails, homes
are skipped for `retry_seconds` (routing falls back to the local tree and
rendezvous hashing); no request waits on Redis beyond its timeout once.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ..redis_pipe import PipelinedRedis, RedisReplyError, RedisUnavailable

logger = logging.getLogger(__name__)

_FAILURES = (RedisUnavailable, RedisReplyError, OSError)


class ConversationHomes:
    def __init__(self, redis: PipelinedRedis, *, namespace: str, ttl_seconds: int = 3600,
                 retry_seconds: float = 1.0) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:home:"
        self._ttl = int(ttl_seconds)
        self._retry_seconds = retry_seconds
        self._down_until = 0.0
        self._pending: dict[str, str] = {}
        self._flush_task: asyncio.Task | None = None
        self.lookups = 0
        self.found = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, error: Exception) -> None:
        if self.available:
            logger.warning("conversation homes unavailable (%s); routing uses local state for %.1fs",
                           error, self._retry_seconds)
        self._down_until = time.monotonic() + self._retry_seconds

    def _key(self, model: str, conversation: str) -> str:
        return f"{self._prefix}{model}:{conversation}"

    async def get(self, model: str, conversation: str) -> str | None:
        """The backend URL a conversation was last placed on, or None (unknown,
        expired, or Redis unavailable)."""
        if not self.available:
            return None
        self.lookups += 1
        try:
            reply = await self._redis.execute("GET", self._key(model, conversation))
        except _FAILURES as error:
            self._failed(error)
            return None
        if reply is None:
            return None
        self.found += 1
        return reply.decode()

    def put(self, model: str, conversation: str, url: str) -> None:
        """Records a placement; written with the others of this loop turn, in one
        pipelined write, without making the caller wait."""
        self._pending[self._key(model, conversation)] = url
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)
            batch, self._pending = self._pending, {}
            if not batch or not self.available:
                return
            replies = await self._redis.execute_many(
                [("SET", key, url, "EX", self._ttl) for key, url in batch.items()])
            for reply in replies:
                if isinstance(reply, Exception):
                    self._failed(reply)
                    break
        except _FAILURES as error:
            self._failed(error)
        finally:
            self._flush_task = None
            if self._pending:
                self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def drain(self) -> None:
        """Waits for placements not yet written (at shutdown)."""
        while self._flush_task is not None:
            await asyncio.gather(self._flush_task, return_exceptions=True)
