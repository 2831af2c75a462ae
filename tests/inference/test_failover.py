"""A pool of backends keeps serving when some fail: failover before the first
token, health checks, the circuit breaker, draining and backends added at run
time, all through a live gateway and live simulators."""
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
from django.db import connection

from inference.models import Backend, ServedModel
from inference.services import backend_add, backend_set_status, backends_drained_remove
from tests.conftest import (ROOT, gateway_start, pool_running, process_env, process_stop, sim_start,
                            usage_rows_wait)
from tests.inference.sim_control import sim_call, sim_faults

MESSAGES = [{"role": "user", "content": "Which backend am I on?"}]


@pytest.fixture(scope="module")
def pool(live_tmp, django_db_blocker, django_db_setup):
    """Model pool-llm on two simulators of its own, routed round robin."""
    with pool_running(live_tmp, django_db_blocker, "pool-llm", ServedModel.RoutingPolicy.ROUND_ROBIN, 2,
                      "--itl-ms", "10") as sims:
        yield sims


@pytest.fixture(scope="module")
def pool_gateway(pool, live_tmp, django_db_setup):
    gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_HEALTH_CHECK_SECONDS="0.2",
                            GATEWAY_FIRST_CHUNK_TIMEOUT_SECONDS="1", GATEWAY_BREAKER_OPEN_SECONDS="1.5",
                            GATEWAY_BREAKER_FAILURES="3", GATEWAY_REGISTRY_REFRESH_SECONDS="0.2")
    yield gateway
    process_stop(gateway.process)


@pytest.fixture(autouse=True)
def breakers_closed():
    """Each test starts with every breaker closed: wait out one opened by the last."""
    yield
    time.sleep(1.6)


def received(sim) -> int:
    return sim_call(sim, "/sim/stats")["requests_received"]


def chat(gateway, tk, stream=False, max_tokens=4):
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    if stream:
        return list(client.chat.completions.create(model="pool-llm", messages=MESSAGES, max_tokens=max_tokens,
                                                   stream=True))
    return client.chat.completions.create(model="pool-llm", messages=MESSAGES, max_tokens=max_tokens)


def test_failing_backend_is_skipped_before_the_first_token(pool_gateway, pool, make_tenant):
    tk = make_tenant(tier="premium")
    with sim_faults(pool[0], error_rate=1.0):
        for stream in (False, True, False, True):
            chat(pool_gateway, tk, stream=stream)
    rows = usage_rows_wait(api_key=tk.api_key, count=4)
    assert [r.status for r in rows] == ["ok"] * 4
    assert {r.backend for r in rows} == {pool[1].url}


def test_silent_backend_is_abandoned_after_the_first_chunk_timeout(pool_gateway, pool, make_tenant):
    tk = make_tenant(tier="premium")
    with sim_faults(pool[0], hang=True):
        started = time.monotonic()
        for _ in range(2):
            chunks = chat(pool_gateway, tk, stream=True)
            assert chunks[-1].choices[0].finish_reason == "length"
        assert time.monotonic() - started < 5
    rows = usage_rows_wait(api_key=tk.api_key, count=2)
    assert {r.backend for r in rows} == {pool[1].url}
    # The abandoned attempt was aborted on the silent backend.
    aborted = sim_call(pool[0], "/sim/stats")["abort_request_rids"]
    assert any(r.request_id in aborted for r in rows)


def test_circuit_breaker_stops_sending_to_a_failing_backend(pool_gateway, pool, make_tenant):
    tk = make_tenant(tier="premium")
    # A success on the first backend: no earlier failure counts towards its breaker.
    start = received(pool[0])
    for _ in range(6):
        if received(pool[0]) > start:
            break
        chat(pool_gateway, tk)
    with sim_faults(pool[0], error_rate=1.0):
        before = received(pool[0])
        for _ in range(12):
            chat(pool_gateway, tk)
        # Three failures open the breaker; the rest go to the other backend.
        assert received(pool[0]) - before == 3
        time.sleep(1.6)  # half-open: one request tries again, fails, reopens
        for _ in range(4):
            chat(pool_gateway, tk)
        assert received(pool[0]) - before == 4
    time.sleep(1.6)
    before = received(pool[0])
    for _ in range(4):
        chat(pool_gateway, tk)
    assert received(pool[0]) - before == 2  # closed again: round robin


def test_unhealthy_backend_gets_no_traffic_until_it_recovers(pool_gateway, pool, make_tenant):
    tk = make_tenant(tier="premium")
    with sim_faults(pool[0], unhealthy=True):
        time.sleep(0.8)  # two failed checks at 0.2 s
        before = received(pool[0])
        for _ in range(6):
            chat(pool_gateway, tk)
        assert received(pool[0]) == before
    time.sleep(0.5)
    before = received(pool[0])
    for _ in range(6):
        chat(pool_gateway, tk)
    # Round robin again: where the gateway says it sent each request, and what
    # the recovered simulator received.
    served = [r.backend for r in usage_rows_wait(api_key=tk.api_key, count=12)[6:]]
    assert sorted(served) == sorted([pool[0].url, pool[1].url] * 3), served
    assert received(pool[0]) - before == 3


def test_backend_killed_under_load_loses_no_request_that_had_not_started(live_tmp, pool_gateway, make_tenant,
                                                                          django_db_blocker):
    victim = sim_start(live_tmp, "pool-llm", "--itl-ms", "20")
    with django_db_blocker.unblock():
        backend_add(model=ServedModel.objects.get(name="pool-llm"), url=victim.url)
    time.sleep(0.6)  # the gateway picks up the new backend
    tk = make_tenant(tier="premium")
    outcomes = []

    def one(i):
        client = openai.OpenAI(base_url=pool_gateway.base_url, api_key=tk.secret, max_retries=0)
        tokens = 0
        try:
            for chunk in client.chat.completions.create(model="pool-llm", max_tokens=30, stream=True,
                                                        extra_body={"ignore_eos": True},
                                                        messages=[{"role": "user", "content": f"load {i}"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    tokens += 1
            outcomes.append(("ok", tokens))
        except openai.APIError as error:
            outcomes.append(("error", tokens, getattr(error, "status_code", None)))

    threads = []
    for i in range(45):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        if i == 25:
            os.kill(victim.process.pid, signal.SIGKILL)
        time.sleep(0.02)
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(outcomes) == 45
        failed = [o for o in outcomes if o[0] == "error"]
        # Only streams already under way on the killed backend may fail, never one
        # that had not delivered a token.
        assert all(o[1] > 0 for o in failed), failed
        assert sum(o[0] == "ok" for o in outcomes) >= 30
        rows = usage_rows_wait(api_key=tk.api_key, count=45)
        assert all(r.status == "ok" or r.completion_tokens > 0 for r in rows)
    finally:
        with django_db_blocker.unblock():
            Backend.objects.filter(url=victim.url).delete()


def test_backends_added_and_drained_while_traffic_flows(live_tmp, pool_gateway, pool, make_tenant, live_db):
    tk = make_tenant(tier="premium")
    newcomer = sim_start(live_tmp, "pool-llm")
    stop = threading.Event()
    outcomes = []

    def traffic():
        client = openai.OpenAI(base_url=pool_gateway.base_url, api_key=tk.secret, max_retries=0)
        while not stop.is_set():
            try:
                client.chat.completions.create(model="pool-llm", messages=MESSAGES, max_tokens=3)
                outcomes.append("ok")
            except openai.APIError as error:
                outcomes.append(repr(error))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(0.3)
        # Added with the management command, while requests flow.
        subprocess.run([sys.executable, "manage.py", "model_register", "pool-llm", "--backend", newcomer.url],
                       cwd=ROOT, env=process_env(POSTGRES_DB=connection.settings_dict["NAME"]), check=True,
                       capture_output=True)
        deadline = time.monotonic() + 5
        while received(newcomer) == 0:
            assert time.monotonic() < deadline, "the new backend never got traffic"
            time.sleep(0.05)

        drained = Backend.objects.get(url=pool[0].url)
        backend_set_status(backend=drained, status=Backend.Status.DRAINING)
        time.sleep(0.5)
        before = received(pool[0])
        time.sleep(0.5)
        assert received(pool[0]) == before  # takes no new requests
        assert backends_drained_remove() == [f"pool-llm @ {pool[0].url}"]  # idle: removed
        assert not Backend.objects.filter(url=pool[0].url).exists()
    finally:
        stop.set()
        worker.join(timeout=10)
        Backend.objects.filter(url=newcomer.url).delete()
        backend_add(model=ServedModel.objects.get(name="pool-llm"), url=pool[0].url)
        process_stop(newcomer.process)
    assert outcomes and all(o == "ok" for o in outcomes), [o for o in outcomes if o != "ok"][:3]
