"""Limits hold exactly across gateway processes, and the gateway keeps serving
(rate limits fail-open, budgets fail-closed) while Redis is away."""
import asyncio
import shutil
import subprocess
import time

import aiohttp
import pytest
from django.db import connection

from tests.conftest import free_port, gateway_start, process_stop, usage_rows_wait

BODY = {"model": "test-llm", "max_tokens": 50, "ignore_eos": True, "messages": [{"role": "user", "content": "Count to ten."}]}
RESERVED_PER_REQUEST = len("Count to ten.") + 8 + 8 + 50


@pytest.fixture(scope="module")
def four_gateways(registry, live_tmp, django_db_setup):
    gateways = [gateway_start(live_tmp, connection.settings_dict["NAME"]) for _ in range(4)]
    yield gateways
    for gateway in gateways:
        process_stop(gateway.process)


def limiter_warnings(gateways) -> list[str]:
    """What the gateways logged about the limiter: a fallback to per-process
    counters would explain an over-admission."""
    return [line for g in gateways for line in g.log.read_text(errors="replace").splitlines()
            if "inference.limits" in line]


async def burst(base_urls: list[str], secret: str, count: int, concurrency: int, body: dict = BODY) -> list[int]:
    """`count` requests spread over the gateways, `concurrency` at a time; their statuses."""
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {secret}"}

    async def one(session, i):
        async with semaphore:
            async with session.post(base_urls[i % len(base_urls)] + "/chat/completions", json=body,
                                    headers=headers) as response:
                await response.read()
                return response.status

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(session, i) for i in range(count)))


def test_four_processes_admit_exactly_the_request_limit(four_gateways, make_tenant):
    tk = make_tenant(key_limits={"rpm_limit": 25})
    statuses = asyncio.run(burst([g.base_url for g in four_gateways], tk.secret, count=120, concurrency=40))
    # Every request falls in one minute: exactly the limit is admitted, none more.
    assert statuses.count(200) == 25, limiter_warnings(four_gateways)
    assert statuses.count(429) == 95


def test_four_processes_never_exceed_the_token_limit(four_gateways, make_tenant):
    tpm = 3000
    tk = make_tenant(tenant_limits={"tpm_limit": tpm})
    statuses = asyncio.run(burst([g.base_url for g in four_gateways], tk.secret, count=150, concurrency=50))
    admitted = statuses.count(200)
    assert statuses.count(429) == 150 - admitted
    assert not limiter_warnings(four_gateways)
    # Reservations alone allow this many; settlement to the (smaller) actual use
    # can only let more in, never past the limit.
    assert admitted >= tpm // RESERVED_PER_REQUEST
    rows = [r for r in usage_rows_wait(api_key=tk.api_key, count=150) if r.status == "ok"]
    assert len(rows) == admitted
    assert sum(r.prompt_tokens + r.completion_tokens for r in rows) <= tpm


def test_four_processes_hold_one_concurrency_limit(four_gateways, make_tenant):
    tk = make_tenant(key_limits={"concurrency_limit": 3})
    body = {**BODY, "model": "slow-llm", "max_tokens": 10}
    statuses = asyncio.run(burst([g.base_url for g in four_gateways], tk.secret, count=12, concurrency=12,
                                 body=body))
    # All 12 start within a few ms and each streams for ~300 ms.
    assert statuses.count(200) == 3, limiter_warnings(four_gateways)


@pytest.fixture
def private_redis(live_tmp):
    """A Redis of the test's own, which the test may stop and start again."""
    port = free_port()
    server = shutil.which("redis-server")

    def start() -> subprocess.Popen:
        process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(live_tmp)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        return process

    state = {"process": start()}
    yield port, state, start
    process_stop(state["process"])


def timed_chat(base_url: str, secret: str) -> tuple[int, dict, float]:
    async def main():
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            async with session.post(base_url + "/chat/completions", json=BODY,
                                    headers={"Authorization": f"Bearer {secret}"}) as response:
                body = await response.json()
                return response.status, dict(response.headers), time.monotonic() - started, body
    status, headers, elapsed, body = asyncio.run(main())
    return status, {**headers, "_body": body}, elapsed


def test_redis_down_fail_open_limits_fail_closed_budgets_and_recovery(private_redis, registry, live_tmp,
                                                                       make_tenant):
    port, state, start = private_redis
    gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], REDIS_URL=f"redis://127.0.0.1:{port}/0",
                            GATEWAY_REDIS_RETRY_SECONDS="0.3", GATEWAY_BUDGET_OFFLINE_ALLOWANCE_TOKENS="300")
    try:
        plain = make_tenant(key_limits={"rpm_limit": 1000})
        budgeted = make_tenant(tenant_limits={"monthly_token_budget": 1_000_000})
        for tk in (plain, budgeted):
            status, headers, _ = timed_chat(gateway.base_url, tk.secret)
            assert status == 200 and "x-ratelimit-limit-requests" in headers

        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        state["process"].wait(timeout=10)

        # Rate limits fail open: served, and no request waits on Redis.
        for _ in range(5):
            status, _, elapsed = timed_chat(gateway.base_url, plain.secret)
            assert status == 200 and elapsed < 2.0
        # Budgets fail closed past the offline allowance (300 tokens, ~4 requests).
        statuses = []
        for _ in range(8):
            status, headers, elapsed = timed_chat(gateway.base_url, budgeted.secret)
            statuses.append(status)
            assert elapsed < 2.0
        assert 200 in statuses and statuses[-1] == 429
        assert headers["_body"]["error"]["code"] == "insufficient_quota"
        offline = [r for r in usage_rows_wait(api_key=budgeted.api_key, count=9)[1:] if r.status == "ok"]
        assert len(offline) == statuses.count(200)
        assert sum(r.prompt_tokens + r.completion_tokens for r in offline) <= 300

        state["process"] = start()
        deadline = time.monotonic() + 10
        while True:
            status, headers, _ = timed_chat(gateway.base_url, budgeted.secret)
            if status == 200 and "x-ratelimit-limit-requests" in headers:
                break  # back on Redis, month-to-date spend reloaded from PostgreSQL
            assert time.monotonic() < deadline, f"did not recover: {status} {headers}"
            time.sleep(0.1)
        status, headers, _ = timed_chat(gateway.base_url, plain.secret)
        assert status == 200 and "x-ratelimit-remaining-requests" in headers
    finally:
        process_stop(gateway.process)
