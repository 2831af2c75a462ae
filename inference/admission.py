"""Priority admission: while a model's backends are saturated, new requests wait in
a priority queue (premium, then standard, then free; first come first served
within a tier), each up to its tier's deadline, then get 503 with retry-after.
When the queue is full a request of a higher tier takes the place of the lowest
one waiting, so under overload the free tier is shed first.

Saturation is judged two ways. Per gateway process: each backend takes
GATEWAY_BACKEND_MAX_OUTSTANDING requests from this process before requests wait.
And by what the backends report, which counts every gateway process's traffic:
when each active backend of the model has more than GATEWAY_BACKEND_QUEUE_THRESHOLD
requests waiting in its own queue (GET /v1/loads, polled every
GATEWAY_BACKEND_LOAD_POLL_SECONDS), standard and free requests wait here, while
premium ones still go (the backends' queues drain meanwhile, since no one else is
sent); they are let through as soon as a poll finds a backend below the threshold.
Each tier may fill a share of that capacity (GATEWAY_TIER_CAPACITY_SHARE): free
60 %, standard 85 %, premium 125 %. Premium may go past the capacity because a
slot it waits for is a slot the others hold: with a Poisson stream of premium
requests averaging m in flight, the chance that one finds its headroom
(1.25 − 0.85 = 40 % of the capacity) full is that of m's Poisson count
exceeding it, negligible unless premium traffic alone nears the capacity. So a
premium request's time to first token does not grow with the others' load,
and the backend runs at most a quarter above the threshold, and only by
premium requests."""
from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from .errors import ApiError
from .registry import ModelEntry

TIER_RANK = {"premium": 0, "standard": 1, "free": 2}


def overloaded(model: str, *, shed: bool) -> ApiError:
    reason = "was shed to serve higher-priority traffic" if shed else "waited too long for a free slot"
    return ApiError(
        503,
        f"The model '{model}' is overloaded and this request {reason}. Please retry shortly.",
        type="server_error",
        code="overloaded",
        headers={"retry-after": "1", "retry-after-ms": "1000"},
    )


@dataclass(order=True, slots=True)
class _Waiter:
    rank: int
    seq: int
    future: asyncio.Future = field(compare=False)
    active: bool = field(default=True, compare=False)


@dataclass(slots=True)
class _ModelQueue:
    inflight: int = 0
    # Waiters by (rank, arrival); withdrawn ones stay until popped or compacted.
    heap: list[_Waiter] = field(default_factory=list)
    waiting: int = 0
    waiting_by_rank: list[int] = field(default_factory=lambda: [0] * (len(TIER_RANK) + 1))

    def withdraw(self, waiter: _Waiter) -> None:
        waiter.active = False
        self.waiting -= 1
        self.waiting_by_rank[waiter.rank] -= 1
        if len(self.heap) > 2 * self.waiting + 64:
            self.heap = [w for w in self.heap if w.active]
            heapq.heapify(self.heap)

    def anyone_ahead(self, rank: int) -> bool:
        return any(self.waiting_by_rank[: rank + 1])


# What a waiter's future resolves to.
_GRANTED, _SHED, _EXPIRED = None, "shed", "expired"


class AdmissionGate:
    def __init__(
        self,
        *,
        max_outstanding_per_backend: int,
        queue_max: int,
        timeouts: dict[str, float],
        shares: dict[str, float],
        backend_queue_threshold: int | None = None,
    ) -> None:
        self._per_backend = max_outstanding_per_backend
        # None: the backends' own queues are not looked at.
        self._backend_queue_threshold = backend_queue_threshold
        self._queue_max = queue_max
        self._timeouts = timeouts
        # Rank -> fraction of the capacity requests of that tier may occupy.
        self._share_by_rank = {TIER_RANK[tier]: share for tier, share in shares.items()}
        self._queues: dict[str, _ModelQueue] = {}
        self._seq = itertools.count()

    def _capacity(self, model: ModelEntry) -> int:
        return self._per_backend * sum(1 for b in model.backends if b.status == "active")

    def backends_saturated(self, model: ModelEntry) -> bool:
        """Every active backend of the model reports more requests waiting in its
        queue than the threshold (one that has not reported does not count as
        saturated)."""
        threshold = self._backend_queue_threshold
        if threshold is None:
            return False
        saturated = False
        for backend in model.backends:
            if backend.status == "active" and backend.healthy:
                if backend.waiting <= threshold:
                    return False
                saturated = True
        return saturated

    def _has_room(self, queue: "_ModelQueue", capacity: int, rank: int, saturated: bool) -> bool:
        if capacity == 0:  # no backend: let routing answer 503 at once
            return True
        if saturated and rank > 0:
            return False
        return queue.inflight < max(1, int(capacity * self._share_by_rank.get(rank, 1.0)))

    def waiting(self, model_name: str) -> int:
        queue = self._queues.get(model_name)
        return queue.waiting if queue else 0

    async def enter(self, model: ModelEntry, tier: str) -> None:
        """Returns when the request may go to a backend; raises 503 if it may not."""
        queue = self._queues.get(model.name)
        if queue is None:
            queue = self._queues[model.name] = _ModelQueue()
        capacity = self._capacity(model)
        rank = TIER_RANK.get(tier, len(TIER_RANK))
        if self._has_room(queue, capacity, rank, self.backends_saturated(model)) and not queue.anyone_ahead(rank):
            queue.inflight += 1
            return
        if queue.waiting >= self._queue_max:
            worst = max((w for w in queue.heap if w.active), default=None)
            if worst is None or worst.rank <= rank:
                raise overloaded(model.name, shed=True)
            queue.withdraw(worst)
            worst.future.set_result(_SHED)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(rank, next(self._seq), loop.create_future())
        heapq.heappush(queue.heap, waiter)
        queue.waiting += 1
        queue.waiting_by_rank[rank] += 1
        timer = loop.call_later(self._timeouts.get(tier, 5.0), _expire, queue, waiter)
        # Outcomes are results, not exceptions: an exception kept by the future
        # would hold its traceback, whose frame (this one) holds the future, a
        # cycle only the garbage collector frees.
        try:
            outcome = await waiter.future
        except asyncio.CancelledError:
            if waiter.active:
                queue.withdraw(waiter)
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.result() is _GRANTED:
                self.leave(model)  # granted just as the caller went away
            raise
        finally:
            timer.cancel()
        if outcome is not _GRANTED:
            raise overloaded(model.name, shed=outcome is _SHED)

    def leave(self, model: ModelEntry) -> None:
        queue = self._queues[model.name]
        queue.inflight -= 1
        self._grant(queue, model)

    def pump(self, model: ModelEntry) -> None:
        """Lets waiting requests through that now have room (after the backends'
        reported queues changed)."""
        queue = self._queues.get(model.name)
        if queue is not None and queue.waiting:
            self._grant(queue, model)

    def _grant(self, queue: "_ModelQueue", model: ModelEntry) -> None:
        capacity = self._capacity(model)
        saturated = self.backends_saturated(model)
        while queue.heap:
            waiter = queue.heap[0]
            if not waiter.active:
                heapq.heappop(queue.heap)
                continue
            # Shares shrink with rank: if the best waiter has no room, nobody has.
            if not self._has_room(queue, capacity, waiter.rank, saturated):
                break
            heapq.heappop(queue.heap)
            queue.withdraw(waiter)
            queue.inflight += 1
            waiter.future.set_result(_GRANTED)


def _expire(queue: _ModelQueue, waiter: _Waiter) -> None:
    # Withdrawn here, not when the waiting task resumes: a slot freed in between
    # must not be handed to it.
    if waiter.active:
        queue.withdraw(waiter)
        waiter.future.set_result(_EXPIRED)
