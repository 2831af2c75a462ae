"""Webhook delivery: each event is POSTed, signed, to every enabled endpoint that wants it.

One queue and worker per endpoint, so first attempts reach an endpoint in emission order;
a failed attempt (non-2xx, connection error, timeout) is put back on the queue after a
backoff (`backoff_s × 2^(attempt−1)`) until `attempts` have been made. The body is the event
as it was emitted; each attempt is signed afresh with the current time, as Stripe does.
Nothing here runs inside an API request: emission only enqueues.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

import aiohttp
import orjson

from .events import endpoint_wants, signature_header
from .state import State

log = logging.getLogger(__name__)

DELIVERY_LOG_SIZE = 2000


@dataclass
class Delivery:
    event_id: str
    event_type: str
    endpoint_id: str
    body: bytes
    attempt: int = 1


class WebhookDispatcher:
    def __init__(self, state: State, *, attempts: int = 4, backoff_s: float = 1.0, timeout_s: float = 10.0) -> None:
        self.state = state
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.queues: dict[str, asyncio.Queue[Delivery]] = {}
        self.workers: dict[str, asyncio.Task] = {}
        self.retry_handles: set[asyncio.TimerHandle] = set()
        # Recent attempts, oldest first, for GET /_local/webhook_deliveries.
        self.log: deque[dict] = deque(maxlen=DELIVERY_LOG_SIZE)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def stop(self) -> None:
        for handle in self.retry_handles:
            handle.cancel()
        for task in self.workers.values():
            task.cancel()
        await asyncio.gather(*self.workers.values(), return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    def reset(self) -> None:
        """Forget queued deliveries and the log (POST /_local/reset)."""
        for handle in self.retry_handles:
            handle.cancel()
        self.retry_handles.clear()
        for queue in self.queues.values():
            while not queue.empty():
                queue.get_nowait()
        self.log.clear()

    def event_enqueue(self, event: dict) -> None:
        """Called synchronously as each event is emitted (State.on_event)."""
        body = orjson.dumps(event, option=orjson.OPT_INDENT_2)
        for endpoint in self.state.objects["webhook_endpoints"].values():
            if endpoint_wants(endpoint, event["type"]):
                self._queue(endpoint["id"]).put_nowait(Delivery(event["id"], event["type"], endpoint["id"], body))

    def _queue(self, endpoint_id: str) -> asyncio.Queue[Delivery]:
        queue = self.queues.get(endpoint_id)
        if queue is None:
            queue = self.queues[endpoint_id] = asyncio.Queue()
            self.workers[endpoint_id] = asyncio.get_running_loop().create_task(self._work(queue))
        return queue

    async def _work(self, queue: asyncio.Queue[Delivery]) -> None:
        while True:
            delivery = await queue.get()
            try:
                await self._attempt(delivery)
            except Exception:  # a bug here must not stop later deliveries
                log.exception("webhook delivery of %s failed unexpectedly", delivery.event_id)

    async def _attempt(self, delivery: Delivery) -> None:
        endpoint = self.state.get("webhook_endpoints", delivery.endpoint_id)
        if endpoint is None or endpoint["status"] != "enabled":
            return  # deleted or disabled since: Stripe stops trying too
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "Stripe-Signature": signature_header(delivery.body, endpoint["secret"], timestamp),
                   "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}
        status: int | None = None
        error: str | None = None
        assert self.session is not None
        try:
            async with self.session.post(endpoint["url"], data=delivery.body, headers=headers) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        delivered = status is not None and 200 <= status < 300
        self.log.append({"event": delivery.event_id, "type": delivery.event_type, "endpoint": endpoint["id"],
                         "url": endpoint["url"], "attempt": delivery.attempt, "status": status, "error": error,
                         "delivered": delivered, "at": timestamp})
        if delivered:
            event = self.state.get("events", delivery.event_id)
            if event is not None and event["pending_webhooks"] > 0:
                event["pending_webhooks"] -= 1
                self.state.dirty = True
            return
        if delivery.attempt >= self.attempts:
            log.warning("webhook %s to %s gave up after %d attempts (%s)", delivery.event_id, endpoint["url"],
                        delivery.attempt, error or status)
            return
        delay = self.backoff_s * 2 ** (delivery.attempt - 1)
        retry = Delivery(delivery.event_id, delivery.event_type, delivery.endpoint_id, delivery.body,
                         delivery.attempt + 1)
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def requeue() -> None:
            self.retry_handles.discard(handle)
            self._queue(retry.endpoint_id).put_nowait(retry)

        handle = loop.call_later(delay, requeue)
        self.retry_handles.add(handle)
