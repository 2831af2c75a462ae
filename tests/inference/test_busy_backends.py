"""A backend whose queue is full (SGLang's --max-queued-requests: 503 before
any token) is busy, not broken: the gateway tries another backend and leaves
the busy one's circuit breaker closed; when every backend is busy the caller
gets 503 `overloaded` with Retry-After. Live gateway, live simulators."""
import json
import threading
import time
import urllib.request

import openai
import pytest

from inference.models import ServedModel
from tests.conftest import pool_running, usage_rows_wait
from tests.inference.sim_control import sim_call

MODEL = "busy-llm"
MESSAGES = [{"role": "user", "content": "Anyone free?"}]
# One running slot and one queued request; 50 ms per decode step.
SIM_FLAGS = ("--max-running-requests", "1", "--max-queued-requests", "1", "--decode-base-ms", "50")


@pytest.fixture(scope="module")
def busy_pool(live_tmp, django_db_blocker, django_db_setup):
    with pool_running(live_tmp, django_db_blocker, MODEL, ServedModel.RoutingPolicy.ROUND_ROBIN, 2, *SIM_FLAGS) as sims:
        yield sims


def fill(sim, tokens: int = 60) -> list[threading.Thread]:
    """Takes the simulator's slot, then its queue place, with replies of `tokens`
    (50 ms each) sent to it directly."""
    threads = []
    for index, condition in enumerate((lambda: running(sim) == 1, lambda: queued(sim) == 1)):
        body = json.dumps({"input_ids": [7, 8, 9 + index],
                           "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}).encode()
        request = urllib.request.Request(sim.url + "/generate", data=body, headers={"Content-Type": "application/json"})
        threads.append(threading.Thread(target=lambda r=request: urllib.request.urlopen(r, timeout=30).read()))
        threads[-1].start()
        wait_until(condition)
    return threads


def running(sim) -> int:
    return sim_call(sim, "/sim/stats")["engine"]["running_requests"]


def queued(sim) -> int:
    return sim_call(sim, "/sim/stats")["engine"]["queued_requests"]


def received(sim) -> int:
    return sim_call(sim, "/sim/stats")["requests_received"]


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_busy_backend_is_skipped_without_opening_its_breaker(busy_pool, gateway, make_tenant):
    busy, free = busy_pool
    tk = make_tenant(tier="premium")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    wait_until(lambda: MODEL in {m.id for m in client.models.list()})
    fillers = fill(busy, tokens=120)  # busy for 6 s: ample for 8 short requests
    before = received(busy)
    for stream in (False, True) * 4:
        if stream:
            chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
    rows = usage_rows_wait(api_key=tk.api_key, count=8)
    assert [r.status for r in rows] == ["ok"] * 8 and {r.backend for r in rows} == {free.url}
    # Round robin comes back to the busy backend after each failover, so every
    # request but perhaps the first tried it first: more refusals than the 5
    # consecutive failures that would have opened its breaker.
    assert received(busy) - before >= 7
    for filler in fillers:
        filler.join(10)


def test_when_every_backend_is_busy_the_caller_gets_overloaded(busy_pool, gateway, make_tenant):
    tk = make_tenant(tier="premium")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    wait_until(lambda: MODEL in {m.id for m in client.models.list()})
    fillers = [filler for sim in busy_pool for filler in fill(sim)]
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert raised.value.status_code == 503 and raised.value.response.headers["retry-after"] == "1"
    error = raised.value.body
    assert error["code"] == "overloaded" and "The request queue is full." in error["message"]
    for filler in fillers:
        filler.join(10)
