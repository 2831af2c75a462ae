"""Hands usage events from the hot path to PostgreSQL in batches, off the event loop.

`record()` never blocks or does I/O; a background task writes at most
GATEWAY_USAGE_BATCH_ROWS rows per INSERT, at most GATEWAY_USAGE_FLUSH_SECONDS
after the event. A failed write is retried with backoff (rows are idempotent by
event_id), and `stop()` writes everything still pending."""
import asyncio
import logging
from collections import deque

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from billing.services import UsageEvent, usage_records_write

logger = logging.getLogger(__name__)

# Seconds between retries of a failed write, doubling up to the maximum.
RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0


def _write_batch(events: list[UsageEvent]) -> int:
    close_old_connections()  # drops a connection PostgreSQL closed since the last batch
    return usage_records_write(events=events)


class UsageRecorder:
    def __init__(self, *, batch_rows: int, flush_seconds: float) -> None:
        self._batch_rows = batch_rows
        self._flush_seconds = flush_seconds
        self._pending: deque[UsageEvent] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.written = 0

    def record(self, event: UsageEvent) -> None:
        self._pending.append(event)
        if len(self._pending) >= self._batch_rows:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-recorder")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            if not self._pending:
                if self._stopping:
                    return
                try:
                    await asyncio.wait_for(self._wake.wait(), self._flush_seconds)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                continue
            # Events that arrive while a batch is written form the next batch.
            batch = [self._pending.popleft() for _ in range(min(self._batch_rows, len(self._pending)))]
            try:
                await sync_to_async(_write_batch, thread_sensitive=True)(batch)
            except Exception:
                logger.exception("writing %d usage records failed; retrying in %.1fs", len(batch), delay)
                self._pending.extendleft(reversed(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            delay = RETRY_FIRST_SECONDS
            self.written += len(batch)
