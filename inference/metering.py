"""Usage events from the hot path to PostgreSQL, exactly once, with no database
work in the gateway process.

1. `record()` appends the event as one JSON line to this process's spool file
   (an O_APPEND write to the page cache: a few µs, and it survives the process
   being killed) before the request's last bytes go to the client; the file is
   fsynced every GATEWAY_USAGE_FLUSH_SECONDS.
2. A shipper process (inference/shipper.py; the gateway starts one per spool
   folder unless GATEWAY_USAGE_SHIPPER=off) tails every spool file of the folder,
   stores new events in batches (COPY, then INSERT … ON CONFLICT (event_id) DO
   NOTHING) and deletes a file once its writer is gone and all of it is stored.
   A file left by a killed gateway is shipped like any other; events shipped
   twice (a shipper killed between its INSERT and its bookkeeping) are stored once.

A killed gateway loses nothing; a machine crash can lose what was written since
the last fsync (at most one flush interval)."""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from uuid import UUID

import orjson

from billing.services import UsageEvent

logger = logging.getLogger(__name__)

# A spool file is replaced by a new one past this size.
SPOOL_ROTATE_BYTES = 64 * 1024 * 1024
SPOOL_SUFFIX = ".jsonl"


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
        # Locked before it gets its name: a shipper never sees it unowned.
        hidden = self.directory / f".{name}"
        self._fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = self.directory / name
        os.rename(hidden, self.path)
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


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"usage-*{SPOOL_SUFFIX}"))


def spool_writer_alive(path: Path) -> bool:
    """Whether a gateway process still holds the file open for writing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


SHIPPER_LOCK = "shipper.lock"


def shipper_running(directory: Path) -> bool:
    path = directory / SHIPPER_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class UsageRecorder:
    def __init__(self, *, flush_seconds: float, spool_dir: Path, spool_fsync: bool = True,
                 shipper: bool = True) -> None:
        self._flush_seconds = flush_seconds
        self._fsync = spool_fsync
        self._spool = UsageSpool(spool_dir)
        self._shipper_wanted = shipper
        self._shipper: subprocess.Popen | None = None
        self._dirty = False
        self._task: asyncio.Task | None = None

    @property
    def spool_dir(self) -> Path:
        return self._spool.directory

    def record(self, event: UsageEvent) -> None:
        """Durable against the process dying as soon as this returns."""
        self._spool.append(usage_event_line(event))
        self._dirty = True

    async def start(self) -> None:
        self._spool.open()
        self._shipper_ensure()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-spool")

    async def stop(self) -> None:
        """Closes the spool; the shipper stores what is left and removes it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._fsync and self._dirty:
            self._spool.sync()
        self._spool.close(delete=False)
        if self._shipper is not None and self._shipper.poll() is None:
            # Ours: ask it to drain the folder (our file included) and exit.
            self._shipper.terminate()
            try:
                await asyncio.to_thread(self._shipper.wait, 30)
            except subprocess.TimeoutExpired:
                logger.warning("usage shipper still draining; leaving it to finish")

    def _shipper_ensure(self) -> None:
        if not self._shipper_wanted:
            return
        if self._shipper is not None and self._shipper.poll() is None:
            return  # ours is running (or still starting)
        if shipper_running(self.spool_dir):
            return
        self._shipper = subprocess.Popen(
            [sys.executable, "-m", "inference.shipper", "--spool-dir", str(self.spool_dir),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL,
        )

    async def _run(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self._flush_seconds)
            if self._dirty:
                self._dirty = False
                if self._fsync:
                    await asyncio.to_thread(self._spool.sync)
                if self._spool.size > SPOOL_ROTATE_BYTES:
                    # The shipper finishes the old file and deletes it.
                    self._spool.close(delete=False)
                    self._spool.open()
            ticks += 1
            if ticks % 20 == 0:
                self._shipper_ensure()  # e.g. the one we relied on has exited
