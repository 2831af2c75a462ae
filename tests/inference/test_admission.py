"""Priority admission when a model's backends are saturated: premium before
standard before free, deadlines, and the free tier shed first."""
import threading
import time

import openai
import pytest
from django.db import connection

from tests.conftest import gateway_start, process_stop, usage_rows_wait

MESSAGES = [{"role": "user", "content": "Queue me."}]


@pytest.fixture(scope="module")
def one_slot_gateway(registry, live_tmp, django_db_setup):
    """Each backend takes one request at a time from this gateway; the queue holds
    two; a free request waits at most 1.5 s."""
    gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_BACKEND_MAX_OUTSTANDING="1",
                            GATEWAY_QUEUE_MAX="2", GATEWAY_QUEUE_TIMEOUT_FREE_SECONDS="1.5",
                            GATEWAY_QUEUE_TIMEOUT_STANDARD_SECONDS="10", GATEWAY_QUEUE_TIMEOUT_PREMIUM_SECONDS="10")
    yield gateway
    process_stop(gateway.process)


def stream_in_thread(gateway, secret, max_tokens, log, name, model="slow-llm"):
    def run():
        client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
        try:
            for chunk in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens,
                                                        stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    log.append((time.monotonic(), name, "token"))
            log.append((time.monotonic(), name, "done"))
        except openai.APIStatusError as error:
            log.append((time.monotonic(), name, error.status_code, error.code,
                        error.response.headers.get("retry-after")))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def first(log, name):
    return next(entry for entry in log if entry[1] == name)


def test_premium_overtakes_waiting_free_request(one_slot_gateway, make_tenant):
    free, premium = make_tenant(tier="free"), make_tenant(tier="premium")
    log = []
    holder = stream_in_thread(one_slot_gateway, free.secret, 15, log, "holder")  # ~450 ms
    time.sleep(0.2)
    waiting_free = stream_in_thread(one_slot_gateway, free.secret, 3, log, "free")
    time.sleep(0.05)
    waiting_premium = stream_in_thread(one_slot_gateway, premium.secret, 3, log, "premium")
    for thread in (holder, waiting_free, waiting_premium):
        thread.join(timeout=20)

    assert first(log, "premium")[2] == "token" and first(log, "free")[2] == "token"
    assert first(log, "premium")[0] < first(log, "free")[0]


def test_free_request_gets_503_after_its_deadline(one_slot_gateway, make_tenant):
    holder_tenant, free = make_tenant(tier="premium"), make_tenant(tier="free")
    log = []
    holder = stream_in_thread(one_slot_gateway, holder_tenant.secret, 100, log, "holder")  # ~3 s
    time.sleep(0.2)
    started = time.monotonic()
    stream_in_thread(one_slot_gateway, free.secret, 3, log, "free").join(timeout=20)
    waited = first(log, "free")[0] - started
    _, _, status, code, retry_after = first(log, "free")
    assert (status, code, retry_after) == (503, "overloaded", "1")
    assert 1.4 < waited < 3.0
    holder.join(timeout=20)
    rows = usage_rows_wait(api_key=free.api_key, count=1)
    assert (rows[0].status, rows[0].http_status, rows[0].error_code) == ("error", 503, "overloaded")


def test_full_queue_sheds_free_first(one_slot_gateway, make_tenant):
    holder_tenant, free, standard, premium = (make_tenant(tier=t) for t in ("premium", "free", "standard", "premium"))
    log = []
    holder = stream_in_thread(one_slot_gateway, holder_tenant.secret, 30, log, "holder")  # ~900 ms
    time.sleep(0.2)
    threads = [stream_in_thread(one_slot_gateway, free.secret, 2, log, "free")]
    time.sleep(0.05)
    threads.append(stream_in_thread(one_slot_gateway, standard.secret, 2, log, "standard"))
    time.sleep(0.05)
    # The queue (2) is full: premium takes the free request's place.
    threads.append(stream_in_thread(one_slot_gateway, premium.secret, 2, log, "premium"))
    for thread in [holder, *threads]:
        thread.join(timeout=20)

    shed = first(log, "free")
    assert shed[2:4] == (503, "overloaded")
    assert shed[0] < first(log, "premium")[0]  # refused at once, not after its deadline
    assert first(log, "premium")[2] == "token" and first(log, "standard")[2] == "token"
    assert first(log, "premium")[0] < first(log, "standard")[0]


@pytest.fixture(scope="module")
def five_slot_gateway(registry, live_tmp, django_db_setup):
    gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_BACKEND_MAX_OUTSTANDING="5",
                            GATEWAY_QUEUE_TIMEOUT_FREE_SECONDS="10")
    yield gateway
    process_stop(gateway.process)


def test_lower_tiers_leave_headroom_for_premium(five_slot_gateway, make_tenant):
    """Free may fill 60 % of the slots (3 of 5): more free requests queue, while a
    premium request is served at once."""
    free_tenants = [make_tenant(tier="free") for _ in range(5)]
    premium = make_tenant(tier="premium")
    log = []
    threads = [stream_in_thread(five_slot_gateway, tk.secret, 60, log, f"free{i}")
               for i, tk in enumerate(free_tenants)]
    time.sleep(0.8)
    started = time.monotonic()
    stream_in_thread(five_slot_gateway, premium.secret, 2, log, "premium").join(timeout=20)
    premium_first_token = first(log, "premium")[0] - started
    for thread in threads:
        thread.join(timeout=20)
    free_first_tokens = sorted(first(log, f"free{i}")[0] for i in range(5))

    assert premium_first_token < 0.5  # the free requests run for ~1.8 s
    # Three free requests started at once; two waited for a free slot.
    assert free_first_tokens[2] < started < free_first_tokens[3]


def test_tier_shares_of_the_capacity():
    """Capacity 20: free fills 12 slots, standard 17, premium goes up to 25 past
    the others; a request past its tier's share waits."""
    import asyncio

    from django.conf import settings

    from inference.admission import AdmissionGate
    from inference.registry import BackendState, ModelEntry

    async def main():
        gate = AdmissionGate(max_outstanding_per_backend=20, queue_max=100, timeouts={},
                             shares=settings.GATEWAY_TIER_CAPACITY_SHARE)
        model = ModelEntry("m", "m", 8192, "tests", 0, backends=[BackendState("http://a")])

        async def admitted(tier: str) -> bool:
            task = asyncio.ensure_future(gate.enter(model, tier))
            await asyncio.sleep(0)
            if task.done():
                return True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False

        counts = {}
        for tier, others in (("free", 0), ("standard", 0), ("premium", 0), ("premium", 17)):
            for _ in range(others):  # standard requests already in flight
                assert await admitted("standard")
            count = 0
            while await admitted(tier):
                count += 1
            counts[(tier, others)] = count
            for _ in range(count + others):
                gate.leave(model)
        return counts

    counts = asyncio.run(main())
    assert counts == {("free", 0): 12, ("standard", 0): 17, ("premium", 0): 25, ("premium", 17): 8}


def _gate_and_model(per_backend: int = 1, queue_max: int = 100, timeouts: dict | None = None):
    from inference.admission import AdmissionGate
    from inference.registry import BackendState, ModelEntry

    gate = AdmissionGate(max_outstanding_per_backend=per_backend, queue_max=queue_max, timeouts=timeouts or {},
                         shares={"premium": 1.0, "standard": 1.0, "free": 1.0})
    return gate, ModelEntry("m", "m", 8192, "tests", 0, backends=[BackendState("http://a")])


def test_slot_freed_after_a_deadline_fired_goes_to_the_next_waiter():
    """The deadline's callback and a slot coming free can run in the same turn of
    the event loop, before the expired request's task resumes: the slot must go
    to the request still waiting, not to the expired one."""
    import asyncio

    from inference import admission
    from inference.errors import ApiError

    async def main():
        gate, model = _gate_and_model(timeouts={"free": 60.0, "standard": 60.0})
        await gate.enter(model, "standard")  # takes the only slot
        expired = asyncio.ensure_future(gate.enter(model, "standard"))
        waiting = asyncio.ensure_future(gate.enter(model, "free"))
        await asyncio.sleep(0)
        queue = gate._queues["m"]
        first = min(w for w in queue.heap if w.active)
        admission._expire(queue, first)  # what the deadline's timer does
        gate.leave(model)  # same turn: the slot comes free
        with pytest.raises(ApiError) as error:
            await expired
        await asyncio.wait_for(waiting, 1.0)
        return error.value, queue.inflight, queue.waiting

    error, inflight, waiting = asyncio.run(main())
    assert (error.status, error.code) == (503, "overloaded")
    assert (inflight, waiting) == (1, 0)


def test_admission_outcomes_leave_no_reference_cycles():
    """Granted, expired, shed and cancelled waiters are freed by reference
    counting alone: under overload every request passes here, and garbage
    left to the cycle collector costs pauses of the whole event loop."""
    import asyncio
    import gc

    from inference.errors import ApiError

    async def main():
        gate, model = _gate_and_model(queue_max=4, timeouts={"free": 0.01, "standard": 5.0, "premium": 5.0})
        await gate.enter(model, "premium")
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                granted = asyncio.ensure_future(gate.enter(model, "standard"))
                expired = asyncio.ensure_future(gate.enter(model, "free"))
                shed = asyncio.ensure_future(gate.enter(model, "free"))
                cancelled = asyncio.ensure_future(gate.enter(model, "standard"))
                await asyncio.sleep(0)
                asyncio.ensure_future(gate.enter(model, "premium"))  # queue full: sheds the newest free
                await asyncio.sleep(0.03)  # the free one left expires
                cancelled.cancel()
                outcomes = []
                for task in (expired, shed):
                    try:
                        await task
                    except ApiError as error:
                        outcomes.append(error.code)
                    del task
                await asyncio.gather(cancelled, return_exceptions=True)
                assert outcomes == ["overloaded", "overloaded"]
                gate.leave(model)  # the holder leaves: the queued premium gets the slot
                await asyncio.sleep(0)
                gate.leave(model)  # then the standard one, the next round's holder
                await granted
                del granted, expired, shed, cancelled
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(main()) == 0


def test_backends_reported_queues_hold_standard_and_free_but_not_premium():
    """Every backend reporting more waiting requests than the threshold saturates
    the model whatever this process has in flight: premium still goes, standard
    waits until a poll finds a backend below it, free is turned away at its deadline."""
    import asyncio

    from inference.admission import AdmissionGate
    from inference.errors import ApiError
    from inference.registry import BackendState, ModelEntry

    async def main():
        gate = AdmissionGate(max_outstanding_per_backend=100, queue_max=100,
                             timeouts={"standard": 60.0, "free": 0.2},
                             shares={"premium": 1.25, "standard": 0.85, "free": 0.6}, backend_queue_threshold=4)
        a, b = BackendState("http://a"), BackendState("http://b")
        model = ModelEntry("m", "m", 8192, "tests", 0, backends=[a, b])
        # A backend that has not reported does not count as saturated.
        a.waiting = 9
        assert not gate.backends_saturated(model)
        b.waiting = 5
        assert gate.backends_saturated(model)
        await asyncio.wait_for(gate.enter(model, "premium"), 0.1)
        standard = asyncio.ensure_future(gate.enter(model, "standard"))
        free = asyncio.ensure_future(gate.enter(model, "free"))
        await asyncio.sleep(0.05)
        gate.pump(model)  # still saturated: nothing moves
        assert not standard.done() and not free.done()
        with pytest.raises(ApiError) as refused:
            await free
        assert (refused.value.status, refused.value.code) == (503, "overloaded")
        assert not standard.done()
        b.waiting = 4  # at the threshold, not above it
        gate.pump(model)
        await asyncio.wait_for(standard, 0.1)
        return gate._queues["m"].inflight

    assert asyncio.run(main()) == 2


@pytest.fixture(scope="module")
def queued_backend(live_tmp, django_db_blocker, django_db_setup):
    """Model queued-llm on one simulator that runs one request at a time."""
    from inference.models import ServedModel
    from tests.conftest import pool_start

    [sim] = pool_start(live_tmp, django_db_blocker, "queued-llm", ServedModel.RoutingPolicy.ROUND_ROBIN, 1,
                       "--max-running-requests", "1", "--itl-ms", "10")
    yield sim
    process_stop(sim.process)


@pytest.fixture(scope="module")
def queue_watching_gateway(queued_backend, live_tmp, django_db_setup):
    gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_BACKEND_QUEUE_THRESHOLD="2",
                            GATEWAY_BACKEND_LOAD_POLL_SECONDS="0.1", GATEWAY_QUEUE_TIMEOUT_FREE_SECONDS="0.5",
                            GATEWAY_QUEUE_TIMEOUT_STANDARD_SECONDS="20", GATEWAY_REGISTRY_REFRESH_SECONDS="0.2")
    yield gateway
    process_stop(gateway.process)


def test_backend_saturated_by_other_traffic_holds_lower_tiers(queue_watching_gateway, queued_backend, make_tenant):
    """Traffic this gateway never saw (another gateway process's, here straight to
    the backend) fills the backend's queue: a free request is turned away, a premium
    one is served, a standard one waits until the backend's queue is short again."""
    import json
    import urllib.request

    from tests.inference.sim_control import sim_call

    def direct(max_tokens: int) -> None:
        body = json.dumps({"model": "queued-llm", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                           "messages": MESSAGES}).encode()
        request = urllib.request.Request(queued_backend.url + "/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def waiting() -> int:
        return sim_call(queued_backend, "/v1/loads")["loads"][0]["num_waiting_reqs"]

    free, standard, premium = (make_tenant(tier=t) for t in ("free", "standard", "premium"))
    # Eight requests of ~0.6 s each, one at a time: about 4 s of queue.
    others = [threading.Thread(target=direct, args=(60,)) for _ in range(8)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 5
    while waiting() < 5:
        assert time.monotonic() < deadline, "the backend never queued the direct requests"
        time.sleep(0.02)
    time.sleep(0.3)  # a poll of the gateway's has seen it
    log = []
    threads = [stream_in_thread(queue_watching_gateway, tk.secret, 3, log, name, model="queued-llm")
               for tk, name in ((free, "free"), (standard, "standard"), (premium, "premium"))]
    for thread in threads + others:
        thread.join(timeout=30)

    assert first(log, "free")[2:4] == (503, "overloaded")
    assert first(log, "premium")[2] == "token" and first(log, "standard")[2] == "token"
    # Premium joined the backend's queue at once; standard waited here until it was short.
    assert first(log, "premium")[0] < first(log, "standard")[0]
    assert waiting() == 0


def test_backend_queue_and_kv_use_are_read_from_v1_loads_or_get_load():
    """SGLang 0.5.23 answers GET /v1/loads; earlier releases only /get_load (a list of
    per-rank dicts). Queues are summed over data-parallel ranks, KV use is the fullest
    rank's; what a backend does not say (no token_usage, no answer, nothing
    there) reads -1 (unknown)."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from inference.registry import BackendState
    from inference.sglang import backend_loads
    from tests.conftest import free_port

    def answer(body):
        async def handler(request):
            return web.json_response(body)
        return handler

    async def main():
        new, old, neither = web.Application(), web.Application(), web.Application()
        new.router.add_get("/v1/loads", answer(
            {"loads": [{"dp_rank": 0, "num_running_reqs": 5, "num_waiting_reqs": 3, "token_usage": 0.25},
                       {"dp_rank": 1, "num_running_reqs": 6, "num_waiting_reqs": 4, "token_usage": 0.5}]}))
        old.router.add_get("/get_load", answer([{"dp_rank": 0, "num_reqs": 9, "num_waiting_reqs": 5}]))
        neither.router.add_get("/health", answer({}))
        runners, urls = [], []
        for app in (new, old, neither):
            runner = web.AppRunner(app)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{port}")
        urls.append(f"http://127.0.0.1:{free_port()}")  # nothing listening
        try:
            async with aiohttp.ClientSession() as session:
                return [await backend_loads(session, BackendState(url), timeout=2.0) for url in urls]
        finally:
            for runner in runners:
                await runner.cleanup()

    new, old, neither, nothing = asyncio.run(main())
    # the server's (None: every rank together), and each data-parallel rank's
    assert new == {None: (7, 0.5, 11), 0: (3, 0.25, 5), 1: (4, 0.5, 6)}
    assert old == {None: (5, -1.0, 4), 0: (5, -1.0, 4)}
    assert neither == nothing == {None: (-1, -1.0, -1)}
