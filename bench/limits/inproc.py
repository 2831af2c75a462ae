"""Part 1 of bench/limits: the limiter's own cost, in this process.

`inference.limits.Limiter` built as `inference/runtime.py` builds it (one
`PipelinedRedis` connection, the gateway's settings), with principals whose
limits are set but far out of reach and that have monthly budgets (so the
budget path of admit.lua / settle.lua runs too). Timed with perf_counter around
each awaited call; CPU with the thread's CPU clock around each call (the event
loop runs in this thread; nothing else runs meanwhile)."""
from __future__ import annotations

import asyncio
import gc
import inspect
import time

from bench.common import cores_busy_seconds, pct, self_cpu_seconds

perf_counter = time.perf_counter
thread_cpu = time.thread_time  # CLOCK_THREAD_CPUTIME_ID: this (the event loop's) thread only

TENANTS = 4
KEYS_PER_TENANT = 2
BASE_ID = 900_000  # tenant / key ids far from the database's


def _us(values: list[float], p: float) -> float | None:
    value = pct(values, p)
    return None if value is None else value * 1e6


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_us": _us(values, 50), "p90_us": _us(values, 90), "p99_us": _us(values, 99),
            "max_us": None if not values else max(values) * 1e6}


async def _budget_load(tenant_id, api_key_id, since):
    return 0, 0  # nothing spent yet this month


async def _alert_record(*marker):
    return None


def principals_make():
    from tenants.selectors import ApiKeyPrincipal, Limits

    # Never refuse: 1e9 requests and 1e12 tokens per minute, 1e6 in flight, and
    # monthly budgets of 1e15 (micros and tokens) so both budget checks run.
    high = Limits(rpm=10**9, tpm=10**12, concurrency=10**6, budget_micros=10**15, budget_tokens=10**15)
    out = []
    for t in range(TENANTS):
        for k in range(KEYS_PER_TENANT):
            out.append(ApiKeyPrincipal(
                api_key_id=BASE_ID + t * 10 + k, api_key_prefix=f"sk-bench{t}{k}", tenant_id=BASE_ID + t,
                tenant_public_id=f"00000000-0000-0000-0000-{BASE_ID + t:012d}", tenant_slug=f"bench-inproc-{t}",
                tenant_tier="standard", tenant_status="active", suspended_reason="", expires_at=None,
                revoked=False, key_limits=high, tenant_limits=high))
    return out


def limiter_make(redis_url: str, namespace: str):
    """As GatewayRuntime does (inference/runtime.py), with stub budget loads and alerts."""
    from django.conf import settings

    from inference.limits import Limiter
    from inference.redis_pipe import PipelinedRedis

    redis = PipelinedRedis(redis_url, timeout=settings.GATEWAY_REDIS_TIMEOUT_SECONDS)
    kwargs = dict(
        lease_seconds=settings.GATEWAY_REQUEST_LEASE_SECONDS,
        retry_seconds=settings.GATEWAY_REDIS_RETRY_SECONDS,
        offline_allowance_micros=settings.GATEWAY_BUDGET_OFFLINE_ALLOWANCE_MICROS,
        offline_allowance_tokens=settings.GATEWAY_BUDGET_OFFLINE_ALLOWANCE_TOKENS,
        budget_load=_budget_load,
        alert_record=_alert_record,
    )
    if "namespace" in inspect.signature(Limiter.__init__).parameters:
        kwargs["namespace"] = namespace
    return redis, Limiter(redis, **kwargs), "namespace" in kwargs


async def _commandstats(redis) -> dict:
    """calls and usec of EVALSHA and PING from INFO commandstats (server-wide)."""
    raw = await redis.execute("INFO", "commandstats")
    out = {}
    for line in raw.decode().splitlines():
        for name in ("evalsha", "ping"):
            if line.startswith(f"cmdstat_{name}:"):
                fields = dict(item.split("=") for item in line.split(":", 1)[1].split(","))
                out[name] = (int(fields["calls"]), float(fields["usec"]))
    return out


async def _redis_cpu(redis) -> float:
    raw = (await redis.execute("INFO", "cpu")).decode()
    fields = dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)
    return float(fields.get("used_cpu_sys", 0)) + float(fields.get("used_cpu_user", 0))


async def run(redis_url: str, *, requests: int, concurrency: int, namespace: str, log) -> dict:
    redis, limiter, namespaced = limiter_make(redis_url, namespace)
    principals = principals_make()
    tokens, cost = 120, 900  # reserved at admission
    used_tokens, used_cost = 40, 300  # settled
    rid_counter = iter(range(10**9))

    def rid() -> str:
        return f"chatcmpl-benchlimits{next(rid_counter):012d}"

    # Warm-up: connection, SCRIPT LOAD on NOSCRIPT, the budgets' first load (status 3).
    for i in range(300):
        admission = await limiter.admit(principal=principals[i % len(principals)], rid=rid(), tokens=tokens,
                                        cost_micros=cost)
        limiter.settle(admission, tokens=used_tokens, cost_micros=used_cost)
    await limiter.drain()
    for _ in range(200):
        await redis.execute("PING")

    gc.collect()
    gc.freeze()
    gc.disable()
    import os

    cores = sorted(os.sched_getaffinity(0))
    w0, busy0, self0, redis0 = perf_counter(), cores_busy_seconds(cores), self_cpu_seconds(), await _redis_cpu(redis)
    try:
        stats0 = await _commandstats(redis)
        # Reference: one PING round trip on the same connection.
        ping = []
        for _ in range(requests):
            t0 = perf_counter()
            await redis.execute("PING")
            ping.append(perf_counter() - t0)
        stats1 = await _commandstats(redis)
        # Reference: EVALSHA of a script that does nothing (the call's own cost).
        from inference.redis_pipe import Script

        noop = Script("return 1")
        await redis.evalsha(noop, [], [])
        evalsha_noop = []
        for _ in range(requests // 2):
            t0 = perf_counter()
            await redis.evalsha(noop, [], [])
            evalsha_noop.append(perf_counter() - t0)
        stats1b = await _commandstats(redis)

        # Sequential: admit (timed), then settle + drain (timed): one request's
        # life at a time, nothing in flight in between.
        admit_s, admit_cpu, settle_s, settle_cpu = [], [], [], []
        local = 0
        for i in range(requests):
            principal = principals[i % len(principals)]
            c0 = thread_cpu()
            t0 = perf_counter()
            admission = await limiter.admit(principal=principal, rid=rid(), tokens=tokens, cost_micros=cost)
            t1 = perf_counter()
            c1 = thread_cpu()
            local += admission.via != "redis"
            limiter.settle(admission, tokens=used_tokens, cost_micros=used_cost)
            await limiter.drain()
            t2 = perf_counter()
            c2 = thread_cpu()
            admit_s.append(t1 - t0)
            admit_cpu.append(c1 - c0)
            settle_s.append(t2 - t1)
            settle_cpu.append(c2 - c1)
        stats2 = await _commandstats(redis)
        log(f"  part 1: sequential admit p50 {_us(admit_s, 50):.0f} us, settle+drain p50 {_us(settle_s, 50):.0f} us")

        # Concurrent: `concurrency` callers, each admit (timed) then settle in the
        # background (as the gateway does at the end of a stream).
        conc_s: list[float] = []
        per_caller = requests // concurrency

        async def caller(index: int) -> None:
            nonlocal local
            for j in range(per_caller):
                principal = principals[(index + j) % len(principals)]
                t0 = perf_counter()
                admission = await limiter.admit(principal=principal, rid=rid(), tokens=tokens, cost_micros=cost)
                conc_s.append(perf_counter() - t0)
                local += admission.via != "redis"
                limiter.settle(admission, tokens=used_tokens, cost_micros=used_cost)

        c0 = thread_cpu()
        t0 = perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        await limiter.drain()
        conc_wall = perf_counter() - t0
        conc_cpu = thread_cpu() - c0
        log(f"  part 1: {concurrency} concurrent callers: admit p50 {_us(conc_s, 50):.0f} us, "
            f"{len(conc_s) / conc_wall:.0f} admit+settle/s")

        # Concurrent PING for the same picture at 32 callers.
        ping_conc: list[float] = []

        async def pinger() -> None:
            for _ in range(per_caller):
                t0 = perf_counter()
                await redis.execute("PING")
                ping_conc.append(perf_counter() - t0)

        await asyncio.gather(*(pinger() for _ in range(concurrency)))

        # Settle in batches: 100 admitted requests settled at once, time to drain.
        batch, batches = 100, max(1, requests // 100 // 5)
        batch_s = []
        admit_server = [0, 0.0]
        settle_server = [0, 0.0]
        for b in range(batches):
            sa = await _commandstats(redis)
            admissions = [await limiter.admit(principal=principals[i % len(principals)], rid=rid(), tokens=tokens,
                                              cost_micros=cost) for i in range(batch)]
            sb = await _commandstats(redis)
            t0 = perf_counter()
            for admission in admissions:
                limiter.settle(admission, tokens=used_tokens, cost_micros=used_cost)
            await limiter.drain()
            batch_s.append(perf_counter() - t0)
            sc = await _commandstats(redis)
            if "evalsha" in sa:
                admit_server[0] += sb["evalsha"][0] - sa["evalsha"][0]
                admit_server[1] += sb["evalsha"][1] - sa["evalsha"][1]
                settle_server[0] += sc["evalsha"][0] - sb["evalsha"][0]
                settle_server[1] += sc["evalsha"][1] - sb["evalsha"][1]
    finally:
        gc.enable()
        gc.unfreeze()
    wall = perf_counter() - w0
    redis_cpu = await _redis_cpu(redis) - redis0
    own = self_cpu_seconds() - self0
    other = cores_busy_seconds(cores) - busy0 - own - redis_cpu
    cpu = {"wall_s": wall, "bench_percent": 100 * own / wall, "redis_percent": 100 * redis_cpu / wall,
           "other_percent": max(0.0, 100 * other / wall)}

    # Everything was settled: nothing may be left in flight.
    leftover = 0
    pattern = f"lim:{{{namespace}:t*" if namespaced else f"lim:{{t{BASE_ID // 1000}*"
    cursor = b"0"
    inflight_keys = []
    while True:
        cursor, keys = await redis.execute("SCAN", cursor, "MATCH", pattern + ":inf", "COUNT", 1000)
        inflight_keys += keys
        if cursor in (b"0", 0):
            break
    for key in inflight_keys:
        leftover += int(await redis.execute("ZCARD", key))
    await redis.aclose()

    def server_us(a: dict, b: dict, name: str, expected: int):
        if name not in a or name not in b:
            return None, None
        calls = b[name][0] - a[name][0]
        usec = b[name][1] - a[name][1]
        return (usec / calls if calls else None), calls - expected

    evalsha_server_us, evalsha_foreign = server_us(stats1b, stats2, "evalsha", 2 * requests)
    noop_server_us, noop_foreign = server_us(stats1, stats1b, "evalsha", requests // 2 + 1)
    ping_server_us, ping_foreign = server_us(stats0, stats1, "ping", requests)
    return {
        "requests": requests, "concurrency": concurrency, "principals": len(principals),
        "namespaced_keys": namespaced,
        "ping": _summary(ping), "ping_concurrent": _summary(ping_conc), "evalsha_noop": _summary(evalsha_noop),
        "admit_sequential": _summary(admit_s),
        "admit_cpu_us_per_call": sum(admit_cpu) / len(admit_cpu) * 1e6,
        "settle_sequential": _summary(settle_s),  # settle() + drain(): one EVALSHA settle.lua round trip
        "settle_cpu_us_per_call": sum(settle_cpu) / len(settle_cpu) * 1e6,
        "admit_concurrent": {**_summary(conc_s), "admits_per_s": len(conc_s) / conc_wall,
                             "cpu_us_per_admit_and_settle": conc_cpu / len(conc_s) * 1e6},
        "settle_batch": {"batch": batch, "batches": len(batch_s),
                         "drain_ms_p50": (pct(batch_s, 50) or 0) * 1e3,
                         "us_per_settle": (pct(batch_s, 50) or 0) / batch * 1e6},
        "redis_server": {"admit_lua_us_per_call": admit_server[1] / admit_server[0] if admit_server[0] else None,
                         "settle_lua_us_per_call": settle_server[1] / settle_server[0] if settle_server[0] else None,
                         "batch_phase_calls": admit_server[0] + settle_server[0],
                         "batch_phase_expected_calls": 2 * batch * len(batch_s),
                         "evalsha_us_per_call": evalsha_server_us, "evalsha_noop_us_per_call": noop_server_us, "ping_us_per_call": ping_server_us,
                         "foreign_evalsha_calls": evalsha_foreign, "foreign_ping_calls": ping_foreign},
        "cpu": cpu,
        "admitted_by_local_fallback": local,
        "left_in_flight_after_settle": leftover,
    }
