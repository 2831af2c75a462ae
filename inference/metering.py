"""Usage events from the hot path to PostgreSQL, exactly once, surviving a killed
gateway process.

Write path (chosen by measurement, see bench/metering and the README):
1. `record()` appends the event as one JSON line to this process's spool file
   (an O_APPEND write to the page cache: a few µs, and it survives the process
   being killed) before the request's last bytes go to the client;
2. a background task writes pending events to PostgreSQL in batches
   (INSERT … ON CONFLICT (event_id) DO NOTHING) of at most
   GATEWAY_USAGE_BATCH_ROWS rows, at most GATEWAY_USAGE_FLUSH_SECONDS after the
   event, fsyncing the spool first; a failed write is retried with backoff;
3. a spool file whose process is gone (no one holds its lock) is replayed by
   whichever gateway process finds it, at start and every
   GATEWAY_USAGE_SPOOL_SCAN_SECONDS, then deleted. Replays are idempotent by
   event_id, so an event is stored once however often it is written.

A machine crash can lose what was written since the last fsync (at most one
flush interval); a killed process loses nothing."""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import uuid
from collections import deque
from datetime import datetime
from pathlib import Path
from uuid import UUID

import orjson
from asgiref.sync import sync_to_async
from django.db import close_old_connections

from billing.services import UsageEvent, usage_records_write

logger = logging.getLogger(__name__)

# Seconds between retries of a failed write, doubling up to the maximum.
RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
# A spool file is replaced by a new one past this size, once all it holds is stored.
SPOOL_ROTATE_BYTES = 64 * 1024 * 1024
SPOOL_SUFFIX = ".jsonl"


def _write_batch(events: list[UsageEvent]) -> int:
    close_old_connections()  # drops a connection PostgreSQL closed since the last batch
    return usage_records_write(events=events)


_EVENT_ID = UsageEvent._fields.index("event_id")
_STARTED_AT = UsageEvent._fields.index("started_at")
_FINISHED_AT = UsageEvent._fields.index("finished_at")


def usage_event_line(event: UsageEvent) -> bytes:
    """A JSON array of the event's fields, in UsageEvent's order."""
    return orjson.dumps(tuple(event)) + b"\n"


def usage_event_parse(line: bytes) -> UsageEvent:
    values = orjson.loads(line)
    if len(values) != len(UsageEvent._fields):
        raise ValueError(f"expected {len(UsageEvent._fields)} fields, got {len(values)}")
    values[_EVENT_ID] = UUID(values[_EVENT_ID])
    values[_STARTED_AT] = datetime.fromisoformat(values[_STARTED_AT])
    values[_FINISHED_AT] = datetime.fromisoformat(values[_FINISHED_AT])
    return UsageEvent(*values)


class UsageSpool:
    """This process's append-only spool file, locked for as long as the process lives."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path: Path | None = None
        self._fd = -1
        self.size = 0

    def open(self) -> None:
        name = f"usage-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SPOOL_SUFFIX}"
        self.path = self.directory / name
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.size = 0

    def append(self, data: bytes) -> None:
        os.write(self._fd, data)
        self.size += len(data)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self, *, delete: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if delete and self.path is not None:
                self.path.unlink(missing_ok=True)

    def rotate(self) -> None:
        """Starts a new file; the caller guarantees everything in the old one is stored."""
        self.close(delete=True)
        self.open()

    def orphans(self) -> list[Path]:
        """Spool files of processes that died (nobody holds their lock)."""
        return [p for p in sorted(self.directory.glob(f"usage-*{SPOOL_SUFFIX}")) if p != self.path]


def _spool_replay(path: Path, batch_rows: int) -> int:
    """Stores every event of a dead process's spool file, then deletes it.
    Returns the number of events read; 0 if another process is replaying it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # alive, or being replayed by someone else
        if not path.exists():
            return 0
        events = []
        with os.fdopen(os.dup(fd), "rb") as spool:
            for number, line in enumerate(spool, 1):
                try:
                    events.append(usage_event_parse(line))
                except (ValueError, TypeError, KeyError) as error:
                    logger.error("spool %s line %d unreadable, skipped: %s", path.name, number, error)
        for start in range(0, len(events), batch_rows):
            _write_batch(events[start:start + batch_rows])
        path.unlink(missing_ok=True)
        if events:
            logger.warning("replayed %d usage events from %s", len(events), path.name)
        return len(events)
    finally:
        os.close(fd)


class UsageRecorder:
    def __init__(
        self, *, batch_rows: int, flush_seconds: float, spool_dir: Path, spool_fsync: bool = True,
        scan_seconds: float = 30.0,
    ) -> None:
        self._batch_rows = batch_rows
        self._flush_seconds = flush_seconds
        self._scan_seconds = scan_seconds
        self._fsync = spool_fsync
        self._spool = UsageSpool(spool_dir)
        self._pending: deque[UsageEvent] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.written = 0

    def record(self, event: UsageEvent) -> None:
        """Durable against the process dying as soon as this returns."""
        self._spool.append(usage_event_line(event))
        self._pending.append(event)
        if len(self._pending) >= self._batch_rows:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._spool.open()
        await self.replay_orphans()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="usage-recorder"),
                       loop.create_task(self._scan_loop(), name="usage-spool-scan")]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._tasks[1].cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Everything is stored: the spool is no longer needed.
        self._spool.close(delete=not self._pending)

    async def replay_orphans(self) -> int:
        replayed = 0
        for path in self._spool.orphans():
            try:
                replayed += await sync_to_async(_spool_replay, thread_sensitive=True)(path, self._batch_rows)
            except Exception:
                logger.exception("replaying %s failed; will retry", path.name)
        return replayed

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self._scan_seconds)
            await self.replay_orphans()

    def _sync_and_write(self, batch: list[UsageEvent]) -> int:
        if self._fsync:
            self._spool.sync()
        return _write_batch(batch)

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
                await sync_to_async(self._sync_and_write, thread_sensitive=True)(batch)
            except Exception:
                logger.exception("writing %d usage records failed; retrying in %.1fs", len(batch), delay)
                self._pending.extendleft(reversed(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            delay = RETRY_FIRST_SECONDS
            self.written += len(batch)
            if not self._pending and self._spool.size > SPOOL_ROTATE_BYTES:
                self._spool.rotate()
