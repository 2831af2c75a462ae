"""All server state, in memory, optionally mirrored to one JSON file.

Objects are stored in their wire shape (what the API returns), keyed by id, in creation
order. A few fields are stored as ids and filled in when rendered (a subscription item's
`price`), see `render.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import orjson

log = logging.getLogger(__name__)

COLLECTIONS = ("customers", "products", "prices", "subscriptions", "meters", "invoices",
               "webhook_endpoints", "events")
# Which collection an id belongs to, by prefix (longest prefixes first).
ID_PREFIXES = (("cus_", "customers"), ("prod_", "products"), ("price_", "prices"), ("sub_", "subscriptions"),
               ("mtr_", "meters"), ("in_", "invoices"), ("we_", "webhook_endpoints"), ("evt_", "events"))
IDEMPOTENCY_TTL_S = 24 * 3600
STATE_FORMAT = 1


class State:
    def __init__(self) -> None:
        self.on_event: Callable[[dict], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.objects: dict[str, dict[str, dict]] = {name: {} for name in COLLECTIONS}
        # Accepted meter events in arrival order: {identifier, event_name, customer, value (str),
        # timestamp (epoch s), created, source, canceled}.
        self.meter_events: list[dict] = []
        # Events dropped by the v2 stream's asynchronous validation (Stripe reports them as
        # `v1.billing.meter.error_report_triggered`): {event, code, message, created}.
        self.meter_event_errors: list[dict] = []
        # v2 meter event session tokens → {id, expires_at (epoch s)}.
        self.sessions: dict[str, dict] = {}
        # Idempotency-Key → {fingerprint, status, body (str), headers, created, request_id}.
        self.idempotency: dict[str, dict] = {}
        self._reindex()
        self.dirty = True

    def _reindex(self) -> None:
        self.meter_event_identifiers: set[str] = {e["identifier"] for e in self.meter_events}
        self.meter_events_by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for event in self.meter_events:
            self.meter_events_by_key[(event["event_name"], event["customer"])].append(event)

    # --- objects ---------------------------------------------------------------------------

    def get(self, collection: str, object_id: str) -> dict | None:
        return self.objects[collection].get(object_id)

    def put(self, collection: str, obj: dict) -> dict:
        self.objects[collection][obj["id"]] = obj
        self.dirty = True
        return obj

    def drop(self, collection: str, object_id: str) -> None:
        self.objects[collection].pop(object_id, None)
        self.dirty = True

    def newest_first(self, collection: str) -> list[dict]:
        return list(reversed(self.objects[collection].values()))

    def lookup_any(self, object_id: str) -> dict | None:
        for prefix, collection in ID_PREFIXES:
            if object_id.startswith(prefix):
                return self.objects[collection].get(object_id)
        return None

    # --- meter events ------------------------------------------------------------------------

    def meter_event_add(self, event: dict) -> None:
        self.meter_events.append(event)
        self.meter_event_identifiers.add(event["identifier"])
        self.meter_events_by_key[(event["event_name"], event["customer"])].append(event)
        self.dirty = True

    def meter_events_for(self, event_name: str, customer: str) -> list[dict]:
        return self.meter_events_by_key.get((event_name, customer), [])

    # --- idempotency -------------------------------------------------------------------------

    def idempotency_prune(self, now: float | None = None) -> int:
        cutoff = (now or time.time()) - IDEMPOTENCY_TTL_S
        stale = [key for key, record in self.idempotency.items() if record["created"] < cutoff]
        for key in stale:
            del self.idempotency[key]
        if stale:
            self.dirty = True
        return len(stale)

    # --- persistence -------------------------------------------------------------------------

    def to_json(self) -> bytes:
        return orjson.dumps({
            "format": STATE_FORMAT, "objects": self.objects, "meter_events": self.meter_events,
            "meter_event_errors": self.meter_event_errors, "sessions": self.sessions,
            "idempotency": self.idempotency,
        })

    def load_json(self, raw: bytes) -> None:
        data: dict[str, Any] = orjson.loads(raw)
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported state format {data.get('format')!r}")
        self.reset()
        for name in COLLECTIONS:
            self.objects[name].update(data["objects"].get(name, {}))
        self.meter_events = data.get("meter_events", [])
        self.meter_event_errors = data.get("meter_event_errors", [])
        self.sessions = data.get("sessions", {})
        self.idempotency = data.get("idempotency", {})
        self._reindex()
        self.dirty = False


class StateFile:
    """Mirrors `State` to `path`: written (atomically, via a temporary file) at most every
    `interval_s` after a change, and once more on shutdown, so a burst of meter events costs
    one write rather than one per event."""

    def __init__(self, state: State, path: Path, interval_s: float = 0.2) -> None:
        self.state = state
        self.path = path
        self.interval_s = interval_s

    def load(self) -> bool:
        if not self.path.exists():
            return False
        self.state.load_json(self.path.read_bytes())
        log.info("state loaded from %s", self.path)
        return True

    def flush(self) -> None:
        if not self.state.dirty:
            return
        self.state.dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(self.state.to_json())
        os.replace(temporary, self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.flush()
            except OSError:
                log.exception("writing state to %s failed", self.path)
                self.state.dirty = True
