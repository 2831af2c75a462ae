"""The usage shipper: stores the events of a folder of spool files in PostgreSQL.

    python -m inference.shipper --spool-dir PATH

Started by the gateway (inference/metering.py) unless GATEWAY_USAGE_SHIPPER=off;
one runs per folder (a lock file decides). It tails every spool file, stores
complete lines in batches through billing.services.usage_records_write
(idempotent by event_id), and deletes a file once its writer has closed it and
all of it is stored. It exits on SIGTERM after draining (waiting a few seconds
for gateways still writing to close their files), or by itself once its parent
gateway is gone and nothing is left to ship."""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path

logger = logging.getLogger("inference.shipper")

# Seconds between looks at the folder, unless a full batch was stored (a backlog).
POLL_SECONDS = 0.05
# Bytes read from one file at a time.
READ_BYTES = 4 * 1024 * 1024
# Seconds between retries after the database refused a batch, doubling up to the last.
RETRY_SECONDS = (0.2, 0.5, 1, 2, 5)
# Told to stop while gateways still write to the folder (a service manager
# signals the gateway and us at once): seconds to wait for them to close their
# files, so that those are stored whole and deleted, not shipped again by the
# next start.
STOP_WAIT_SECONDS = 5.0


class Shipper:
    def __init__(self, directory: Path, batch_rows: int) -> None:
        from billing.services import usage_records_write

        from .metering import usage_event_parse

        self._store = usage_records_write
        self._parse = usage_event_parse
        self.directory = directory
        self.batch_rows = batch_rows
        # path -> offset of the first byte not stored yet
        self.offsets: dict[Path, int] = {}
        self.failures = 0

    def ship_new_lines(self, path: Path) -> int:
        """Stores the complete lines written since the last call; returns how many."""
        offset = self.offsets.get(path, 0)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.offsets.pop(path, None)
            return 0
        stored = 0
        try:
            while True:
                data = os.pread(fd, READ_BYTES, offset)
                end = data.rfind(b"\n") + 1
                if end == 0:
                    return stored
                events = []
                for number, line in enumerate(data[:end].splitlines()):
                    try:
                        events.append(self._parse(line))
                    except (ValueError, TypeError, KeyError) as error:
                        logger.error("%s: unreadable line at byte %d skipped: %s", path.name, offset, error)
                for start in range(0, len(events), self.batch_rows):
                    self._store(events=events[start:start + self.batch_rows])
                offset += end
                self.offsets[path] = offset
                stored += len(events)
                if len(data) < READ_BYTES:
                    # Caught up: lines written meanwhile wait for the next round, in
                    # one batch, rather than going one transaction per line or two.
                    return stored
        finally:
            os.close(fd)

    def finish_if_closed(self, path: Path) -> None:
        """Deletes a file whose writer is gone, after storing its last lines."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.offsets.pop(path, None)
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # still being written
            self.ship_new_lines(path)
            path.unlink(missing_ok=True)
            self.offsets.pop(path, None)
        finally:
            os.close(fd)

    def round(self) -> int:
        """One pass over the folder; returns the events stored."""
        from .metering import spool_files

        stored = 0
        for path in spool_files(self.directory):
            stored += self.ship_new_lines(path)
            self.finish_if_closed(path)
        return stored

    def writers_alive(self) -> bool:
        from .metering import spool_files, spool_writer_alive

        return any(spool_writer_alive(path) for path in spool_files(self.directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spool-dir", required=True, type=Path)
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit once this process is gone and nothing is left to ship")
    parser.add_argument("--nice", type=int, default=None,
                        help="lower this process's CPU priority by this much (default: GATEWAY_USAGE_SHIPPER_NICE)")
    args = parser.parse_args()
    parent = args.parent_pid or os.getppid()
    # First thing: a gateway stopping right after starting us still gets its
    # events stored (SIGTERM means "drain, then exit").
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.db import close_old_connections, connection

    # Shipping is background work: a few milliseconds later in PostgreSQL cost
    # nobody anything, while the gateway it runs beside (and whose CPU it
    # shares) answers requests. Lowering one's own priority needs no privilege.
    nice = settings.GATEWAY_USAGE_SHIPPER_NICE if args.nice is None else args.nice
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass

    from .metering import SHIPPER_LOCK

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args.spool_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(args.spool_dir / SHIPPER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another shipper serves this folder

    shipper = Shipper(args.spool_dir, args.batch_rows)
    stop_deadline: float | None = None
    while True:
        try:
            close_old_connections()
            stored = shipper.round()
            shipper.failures = 0
        except Exception:
            delay = RETRY_SECONDS[min(shipper.failures, len(RETRY_SECONDS) - 1)]
            shipper.failures += 1
            logger.exception("storing usage events failed; retrying in %ss", delay)
            connection.close()
            time.sleep(delay)
            continue
        if stored >= shipper.batch_rows:
            continue  # a backlog: straight on
        # Otherwise a pause first, even after storing some: what arrives in the
        # meantime goes in one transaction.
        orphaned = not _alive(parent)
        if stopping and stop_deadline is None:
            stop_deadline = time.monotonic() + STOP_WAIT_SECONDS
        if (stopping or orphaned) and (
                not shipper.writers_alive() or (stopping and time.monotonic() >= stop_deadline)):
            if not shipper.round():
                connection.close()
                return 0
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
