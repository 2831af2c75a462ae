"""bench/limits: what rate limits, budgets and priority admission cost and whether they hold.

Part 1, in this process: `inference.limits.Limiter` as the gateway builds it, on
one pipelined Redis connection: admit and settle latency (sequential and at 32
concurrent callers), event-loop CPU per admit, Redis-side script time, beside a
PING and a no-op EVALSHA on the same connection.
Part 2, 4 gateway processes (uvicorn) in front of one simulator: bursts spread
round robin over them against a requests-per-minute limit on a key, a
tokens-per-minute limit, a concurrency limit and a monthly token budget (one
tenant each); admitted versus allowed, from the responses and from the usage
rows in PostgreSQL. Over-admission must be exactly 0.
Part 3, one gateway with GATEWAY_BACKEND_MAX_OUTSTANDING=20 in front of a
simulator with 20 ms per token: premium time to first token alone, then under 3x
overload from standard and free traffic (open-loop Poisson arrivals).

Prints one report and writes bench/results/limits.json. Everything started here
is stopped on exit, Ctrl-C or error.

Usage: bench/run.sh limits [--parts 1,2,3] [--requests N] [--load-duration S] ...
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
LOGS = RESULTS / "logs" / "limits"
DEFAULT_DB = "llmplatform_bench_limits"
DEFAULT_REDIS = "redis://127.0.0.1:6379/5"


def _env_early(argv: list[str]) -> None:
    """The database and Redis of this benchmark, for Django in this process too
    (tenants are created and limits set through the ORM, as limits_set does)."""
    db, redis_url = DEFAULT_DB, DEFAULT_REDIS
    for i, arg in enumerate(argv):
        if arg == "--db" and i + 1 < len(argv):
            db = argv[i + 1]
        elif arg.startswith("--db="):
            db = arg.split("=", 1)[1]
        elif arg == "--redis-url" and i + 1 < len(argv):
            redis_url = argv[i + 1]
        elif arg.startswith("--redis-url="):
            redis_url = arg.split("=", 1)[1]
    os.environ["POSTGRES_DB"] = db
    os.environ["REDIS_URL"] = redis_url
    os.environ["GATEWAY_REDIS_NAMESPACE"] = db
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")


_env_early(sys.argv[1:])

import django  # noqa: E402

django.setup()

import uvloop  # noqa: E402

from bench.common import (HOST, Connection, Processes, cores_busy_seconds, cores_choose, db_prepare, fmt, free_ports,  # noqa: E402
                          pct, pg_connect, proc_cpu_seconds, self_cpu_seconds, versions)
from bench.limits import inproc  # noqa: E402
from bench.limits.load import ModelsProbe, Requests, TimedResult, burst, open_loop, peak_overlap, prompt_words  # noqa: E402

FAST_MODEL = "bench-limits-llm"  # simulator with ttft = itl = 0
SLOW_MODEL = "bench-limits-slow"  # simulator with --itl-ms (part 2's concurrency test, part 3)
WARM_TENANT = "bench-limits"

REFERENCE = [
    "shared/async-streaming.md section 5 (redis.asyncio on loopback, this kind of VM): EVALSHA p50 150 us "
    "(p99 440), 110-130 us of client CPU; `redis-cli --latency` averages 0.17 ms",
]
# Limits set in part 2 (a tenant each; everything else on that tenant far out of reach).
RPM_KEY, TPM_TENANT, CONCURRENCY_TENANT, TOKEN_BUDGET_TENANT = 500, 40_000, 16, 50_000
HIGH = {"rpm_limit": 1_000_000_000, "tpm_limit": 2_000_000_000, "concurrency_limit": 1_000_000}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- setup --
def redis_flush(url: str) -> None:
    """This benchmark's own Redis database starts empty (windows, budgets, leases)."""
    import redis

    redis.Redis.from_url(url).flushdb()


def tenant_make(slug: str, *, tier: str = "standard", tenant_limits: dict | None = None,
                key_limits: dict | None = None, keys: int = 1) -> dict:
    """A tenant with `keys` API keys; its limits are HIGH except those given. Done
    with the services `limits_set` (the management command) calls."""
    from tenants.services import api_key_create, limits_set, tenant_create

    tenant = tenant_create(slug=slug, name=slug, tier=tier)
    limits_set(target=tenant, **{**HIGH, **(tenant_limits or {})})
    out = {"slug": slug, "tenant_id": tenant.id, "keys": []}
    for i in range(keys):
        key, secret = api_key_create(tenant=tenant, name=f"bench {i}")
        if key_limits:
            limits_set(target=key, **key_limits)
        out["keys"].append({"id": key.id, "secret": secret})
    return out


def usage_of_key(db: str, api_key_id: int) -> dict:
    with pg_connect(db) as conn:
        rows, ok, tokens_ok, tokens_all = conn.execute(
            "select count(*), count(*) filter (where http_status = 200), "
            "coalesce(sum(prompt_tokens + completion_tokens) filter (where http_status = 200), 0), "
            "coalesce(sum(prompt_tokens + completion_tokens), 0) from billing_usagerecord where api_key_id = %s",
            (api_key_id,)).fetchone()
    return {"rows": int(rows), "ok_rows": int(ok), "tokens_ok": int(tokens_ok), "tokens_all": int(tokens_all)}


def usage_wait(db: str, api_key_id: int, count: int, timeout: float = 30.0) -> dict:
    """The key's usage totals once the shipper has stored `count` rows."""
    deadline = time.monotonic() + timeout
    while True:
        usage = usage_of_key(db, api_key_id)
        if usage["rows"] >= count or time.monotonic() > deadline:
            usage["complete"] = usage["rows"] >= count
            return usage
        time.sleep(0.1)


def server_ttft(db: str, api_key_id: int) -> dict:
    """TTFT as the gateway records it (request start -> first token), ok rows."""
    with pg_connect(db) as conn:
        values = [r[0] / 1e3 for r in conn.execute(
            "select ttft_ms from billing_usagerecord where api_key_id = %s and http_status = 200 "
            "and ttft_ms is not null", (api_key_id,))]
    return {"n": len(values), "p50_ms": ms(pct(values, 50)), "p99_ms": ms(pct(values, 99))}


def ms(value):
    return None if value is None else value * 1e3


def gateway_argv(py: str, port: int) -> list[str]:
    return [py, "-m", "uvicorn", "config.asgi:application", "--app-dir", "platform", "--host", HOST,
            "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on",
            "--no-access-log", "--log-level", "warning"]


async def wait_ready(port: int, requests: Requests, procs: Processes, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            conn = await Connection.open(HOST, port)
            try:
                result = await conn.request(requests.encode(port), timeout=10)
            finally:
                conn.close()
            if result.status == 200 and result.done:
                return
            last = result.describe()
        except (OSError, ConnectionError, Exception) as error:  # noqa: BLE001 - still starting
            last = repr(error)
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{name} on port {port} did not serve a stream within {timeout:.0f}s: {last}")


def statuses(results: list[TimedResult]) -> dict:
    out: dict[str, int] = {}
    for r in results:
        key = f"{r.status} {r.code}".strip() if r.status else "connection error"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def admitted(results: list[TimedResult]) -> list[TimedResult]:
    return [r for r in results if r.status == 200]


def failures(results: list[TimedResult]) -> list[str]:
    """Anything other than a complete 200 stream or a 429."""
    out = []
    for r in results:
        if r.status == 429:
            continue
        if r.status != 200 or not r.ok:
            out.append(r.error or r.describe())
    return out


# ---------------------------------------------------------------- part 2 --
async def part2(args, ports: list[int], tenants: dict, procs: Processes) -> dict:
    db = args.db
    rows = []
    long_prompt = prompt_words(100, seed=1)

    async def run(name, limit_text, requests, api_key_id, topup: int = 0, **kw):
        procs.check_alive()
        t0 = time.perf_counter()
        results, burst_wall = await burst(ports, requests, **kw)
        burst_ok = len(admitted(results))
        topped = []
        if topup:
            # Then one request at a time (round robin) until refused three times in a row
            # (50 ms apart, so the previous request is surely settled): fills the limit
            # to its edge, where an off-by-one would show.
            refused = 0
            for i in range(topup):
                result = (await burst([ports[i % len(ports)]], requests, count=1, concurrency=1))[0][0]
                result.target = i % len(ports)
                topped.append(result)
                if result.status == 200:
                    refused = 0
                    continue
                refused += 1
                if refused == 3:
                    break
                await asyncio.sleep(0.05)
        wall = time.perf_counter() - t0
        results = results + topped
        usage = usage_wait(db, api_key_id, len(results))
        ok = admitted(results)
        row = {"name": name, "limit": limit_text, "sent": len(results), "wall_s": wall,
               "statuses": statuses(results), "admitted_requests": len(ok),
               "client_tokens_ok": sum(r.total_tokens for r in ok), "usage": usage,
               "failures": len(failures(results)), "failure_samples": failures(results)[:3],
               "reserved_per_request": requests.reserved_tokens(), "burst_sent": len(results) - len(topped),
               "burst_wall_s": burst_wall, "burst_admitted": burst_ok, "topup_sent": len(topped),
               "topup_admitted": len(admitted(topped)),
               "per_gateway_admitted": [sum(1 for r in ok if r.target == g) for g in range(len(ports))]}
        log(f"  part 2: {name}: sent {len(results)} in {wall:.1f}s, {row['statuses']}")
        return row, results

    # Requests per minute on one key.
    t = tenants["rpm"]
    reqs = Requests(model=FAST_MODEL, api_key=t["keys"][0]["secret"], max_tokens=8, tag="rpm")
    row, _ = await run("requests/min (key)", f"rpm {RPM_KEY}", reqs, t["keys"][0]["id"],
                       count=args.rpm_requests, concurrency=args.burst_concurrency)
    row["allowed"] = min(row["sent"], RPM_KEY) if row["wall_s"] < 60 else None
    row["measure"] = "requests admitted (200)"
    row["admitted"] = row["admitted_requests"]
    rows.append(row)

    # Tokens per minute on a tenant: tokens of the admitted requests, as metered.
    t = tenants["tpm"]
    reqs = Requests(model=FAST_MODEL, api_key=t["keys"][0]["secret"], max_tokens=16, prompt=long_prompt, tag="tpm")
    row, _ = await run("tokens/min (tenant)", f"tpm {TPM_TENANT:,}", reqs, t["keys"][0]["id"],
                       count=args.tpm_requests, concurrency=args.burst_concurrency, topup=args.topup)
    row["allowed"] = TPM_TENANT if row["wall_s"] < 60 else None
    row["measure"] = "tokens of admitted requests (usage rows)"
    row["admitted"] = row["usage"]["tokens_ok"]
    rows.append(row)

    # Monthly token budget on a tenant.
    t = tenants["budget"]
    reqs = Requests(model=FAST_MODEL, api_key=t["keys"][0]["secret"], max_tokens=16, prompt=long_prompt,
                    tag="budget")
    row, _ = await run("token budget (tenant, month)", f"budget {TOKEN_BUDGET_TENANT:,} tokens", reqs,
                       t["keys"][0]["id"], count=args.budget_requests, concurrency=args.burst_concurrency,
                       topup=args.topup)
    row["allowed"] = TOKEN_BUDGET_TENANT
    row["measure"] = "tokens spent (usage rows)"
    row["admitted"] = row["usage"]["tokens_all"]
    rows.append(row)

    # Concurrency on a tenant: streams of ~0.2 s from the slow simulator, a closed loop
    # of 64 workers for a few seconds (a worker refused with 429 retries ~20 ms later).
    t = tenants["concurrency"]
    reqs = Requests(model=SLOW_MODEL, api_key=t["keys"][0]["secret"], max_tokens=10, tag="conc")
    row, results = await run("concurrency (tenant)", f"concurrency {CONCURRENCY_TENANT}", reqs, t["keys"][0]["id"],
                             concurrency=args.burst_concurrency, duration_s=args.concurrency_duration,
                             backoff_429_s=0.02)
    ok = admitted(results)
    row["allowed"] = CONCURRENCY_TENANT
    row["measure"] = "peak streams in flight (client: first byte -> end)"
    row["admitted"] = peak_overlap([(r.t_head, r.t_end) for r in ok])
    row["peak_write_to_end"] = peak_overlap([(r.t_write, r.t_end) for r in ok])
    rows.append(row)

    for row in rows:
        row["over_admission"] = None if row["allowed"] is None else max(0, row["admitted"] - row["allowed"])
        row["used_percent"] = None if not row["allowed"] else 100 * row["admitted"] / row["allowed"]
    return {"gateways": len(ports), "burst_concurrency": args.burst_concurrency, "rows": rows}


# ---------------------------------------------------------------- part 3 --
def steal_seconds(cores: list[int]) -> float:
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cores:
                total += int(values[7])
    return total / os.sysconf("SC_CLK_TCK")


def involuntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("nonvoluntary_ctxt_switches"):
                return int(line.split()[1])
    return 0


def gc_pauses(path: Path, pid: int) -> list[tuple[float, float, int]]:
    """(start, duration, generation) of the gateway's collections >= 1 ms (gcprobe/)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) == 4 and int(fields[0]) == pid:
                out.append((float(fields[1]), float(fields[2]), int(fields[3])))
    return out


async def part3(args, port: int, sim_port: int, tenants: dict, pids: dict, pinned_cores: list[int],
                pin: bool, gc_log: Path) -> dict:
    keys = {tier: tenants[tier]["keys"] for tier in ("premium", "standard", "free")}
    mk = args.priority_max_tokens

    def reqs(tier: str, key_index: int = 0) -> Requests:
        return Requests(model=SLOW_MODEL, api_key=keys[tier][key_index]["secret"], max_tokens=mk, tag=tier)

    # Warm-up: every key once (auth cache, connections).
    for tier in ("premium", "standard", "free"):
        for i in range(len(keys[tier])):
            results, _ = await burst([port], reqs(tier, i), count=3, concurrency=1)
            bad = failures(results)
            if bad:
                raise RuntimeError(f"part 3 warm-up {tier}: {bad[:2]}")

    def window():
        snaps = {}

        def on_window(tag: str) -> None:
            snaps[tag + "_extra"] = {"steal": steal_seconds(pinned_cores),
                                     "switches": involuntary_switches(pids["gateway"])}
            snaps[tag] = {"wall": time.perf_counter(), "loadgen": self_cpu_seconds(),
                          **{f"core{c}": cores_busy_seconds([c]) for c in pinned_cores},
                          **{name: proc_cpu_seconds(pid) for name, pid in pids.items()}}
        return snaps, on_window

    def cpu_of(snaps: dict) -> dict:
        wall = snaps["end"]["wall"] - snaps["start"]["wall"]
        delta = {name: 100 * (snaps["end"][name] - snaps["start"][name]) / wall
                 for name in snaps["end"] if name != "wall"}
        t0, t1 = snaps["start"]["wall"], snaps["end"]["wall"]
        pauses = [p for p in gc_pauses(gc_log, pids["gateway"]) if t0 <= p[0] < t1]
        extra = {"steal_percent": 100 * (snaps["end_extra"]["steal"] - snaps["start_extra"]["steal"]) / wall,
                 "gateway_involuntary_switches_per_s":
                     (snaps["end_extra"]["switches"] - snaps["start_extra"]["switches"]) / wall,
                 "gateway_gc_pauses_over_1ms": len(pauses),
                 "gateway_gc_pause_total_ms": 1e3 * sum(p[1] for p in pauses),
                 "gateway_gc_pause_max_ms": 1e3 * max((p[1] for p in pauses), default=0.0),
                 "gateway_gc_gen2": sum(1 for p in pauses if p[2] == 2)}
        cpu = {name: v for name, v in delta.items() if not name.startswith("core")}
        busy = sum(v for name, v in delta.items() if name.startswith("core"))
        cpu["other"] = max(0.0, busy - sum(cpu.values()))
        if pin:
            # Neighbours on the gateway's own core: what it had to share its core with.
            cpu["other_on_gateway_core"] = max(0.0, delta[f"core{pinned_cores[0]}"] - cpu["gateway"])
        cpu.update(extra)
        return cpu

    def tier_stats(results: list[TimedResult]) -> dict:
        ok = [r for r in results if r.ok]
        ttft = [r.t_first - r.t_write for r in ok]
        return {"sent": len(results), "ok": len(ok),
                "shed_503": sum(1 for r in results if r.status == 503),
                "other": sum(1 for r in results if not r.ok and r.status != 503),
                "codes": statuses(results),
                "success_percent": 100 * len(ok) / len(results) if results else None,
                "ttft_ms": {"p50": ms(pct(ttft, 50)), "p90": ms(pct(ttft, 90)), "p99": ms(pct(ttft, 99)),
                            "max": ms(max(ttft, default=None))},
                "wait_503_ms_p50": ms(pct([r.t_end - r.t_write for r in results if r.status == 503], 50))}

    def probe_stats(results: list[TimedResult]) -> dict:
        ok = [r.t_end - r.t_write for r in results if r.status == 200]
        return {"sent": len(results), "ok": len(ok), "p50_ms": ms(pct(ok, 50)), "p99_ms": ms(pct(ok, 99))}

    models_probe = ModelsProbe(keys["premium"][0]["secret"])

    # Unloaded: premium alone (and the /v1/models probe).
    snaps, on_window = window()
    results = await open_loop(port, {"premium": (reqs("premium", 0), args.premium_rate),
                                     "models": (models_probe, args.premium_rate)},
                              duration_s=args.load_duration, seed=1, on_window=on_window)
    unloaded = {"premium": tier_stats(results["premium"]), "cpu_percent": cpu_of(snaps),
                "models_probe": probe_stats(results["models"])}
    log(f"  part 3: unloaded premium TTFT p99 {fmt(unloaded['premium']['ttft_ms']['p99'])} ms")
    await asyncio.sleep(0.5)

    # Loaded: the same premium stream (another key, to tell its usage rows apart; the
    # control phase below uses a third),
    # standard and free streams to 3x capacity, and a probe straight to the simulator.
    capacity = args.max_outstanding / (mk * args.itl_ms / 1e3)
    streams = {"premium": (reqs("premium", 1), args.premium_rate),
               "standard": (reqs("standard"), args.standard_rate),
               "free": (reqs("free"), args.free_rate),
               "models": (models_probe, args.premium_rate)}
    snaps, on_window = window()
    probe_task = asyncio.get_running_loop().create_task(open_loop(
        sim_port, {"sim-direct": (Requests(model=SLOW_MODEL, api_key="none", max_tokens=mk, tag="probe"),
                                  args.premium_rate)}, duration_s=args.load_duration, seed=3))
    results = await open_loop(port, streams, duration_s=args.load_duration, seed=2, on_window=on_window)
    probe = await probe_task
    loaded = {tier: tier_stats(results[tier]) for tier in ("premium", "standard", "free")}
    loaded["models_probe"] = probe_stats(results["models"])
    loaded["cpu_percent"] = cpu_of(snaps)
    loaded["sim_direct_probe"] = tier_stats(probe["sim-direct"])
    log(f"  part 3: loaded premium TTFT p99 {fmt(loaded['premium']['ttft_ms']['p99'])} ms, free 503 "
        f"{loaded['free']['shed_503']}/{loaded['free']['sent']}")

    # Control: the same load without the free stream (which is shed anyway): what the
    # shed traffic itself costs premium.
    await asyncio.sleep(1.0)
    control_streams = {"premium": (reqs("premium", 2), args.premium_rate),
                       "standard": (reqs("standard"), args.standard_rate),
                       "models": (models_probe, args.premium_rate)}
    snaps_c, on_window_c = window()
    control_results = await open_loop(port, control_streams, duration_s=args.load_duration, seed=4,
                                      on_window=on_window_c)
    loaded_no_free = {tier: tier_stats(control_results[tier]) for tier in ("premium", "standard")}
    loaded_no_free["models_probe"] = probe_stats(control_results["models"])
    loaded_no_free["cpu_percent"] = cpu_of(snaps_c)
    log(f"  part 3: loaded without free: premium TTFT p99 {fmt(loaded_no_free['premium']['ttft_ms']['p99'])} ms")

    # Why premium TTFT moves: the premium headroom is int(capacity * premium share) -
    # int(capacity * standard share) slots (inference/admission.py); a premium request
    # arriving while that many premium requests are in flight waits for the next slot to
    # free. Counted client-side.
    from django.conf import settings

    share_prem = settings.GATEWAY_TIER_CAPACITY_SHARE["premium"]
    share_std = settings.GATEWAY_TIER_CAPACITY_SHARE["standard"]
    share_free = settings.GATEWAY_TIER_CAPACITY_SHARE["free"]
    headroom = (max(1, int(args.max_outstanding * share_prem))
                - max(1, int(args.max_outstanding * share_std)))
    prem = [r for r in results["premium"] if r.ok]
    spans = [(r.t_write, r.t_end) for r in results["premium"]]
    blocked, free_slot = [], []
    for r in prem:
        in_flight = sum(1 for (s, e) in spans if s < r.t_write < e)
        (blocked if in_flight >= headroom else free_slot).append(r.t_first - r.t_write)
    diagnosis = {
        "capacity_slots": args.max_outstanding, "premium_share": share_prem, "standard_share": share_std,
        "free_share": share_free,
        "premium_headroom_slots": headroom,
        "premium_found_headroom_full": {"n": len(blocked), "ttft_p50_ms": ms(pct(blocked, 50)),
                                        "ttft_p99_ms": ms(pct(blocked, 99))},
        "premium_found_a_free_slot": {"n": len(free_slot), "ttft_p50_ms": ms(pct(free_slot, 50)),
                                      "ttft_p99_ms": ms(pct(free_slot, 99))},
        "server_ttft_unloaded": server_ttft(args.db, keys["premium"][0]["id"]),
        "server_ttft_loaded": server_ttft(args.db, keys["premium"][1]["id"]),
    }
    # The slowest loaded premium requests: did a GC pause of the gateway, or a slow
    # /v1/models probe (a stalled event loop), fall inside their wait for the first token?
    unloaded_p99 = unloaded["premium"]["ttft_ms"]["p99"] or 0.0
    pauses = gc_pauses(gc_log, pids["gateway"])
    slow_probes = [(r.t_write, r.t_end) for r in results["models"] if r.status == 200 and r.t_end - r.t_write > 0.02]
    slowest = sorted(prem, key=lambda r: r.t_first - r.t_write, reverse=True)
    slow = [r for r in slowest if (r.t_first - r.t_write) * 1e3 > 1.2 * unloaded_p99]
    detail = []
    for r in slow:
        overlap = [p for p in pauses if p[0] < r.t_first and p[0] + p[1] > r.t_write]
        stalled = [s for s in slow_probes if s[0] < r.t_first and s[1] > r.t_write]
        detail.append({"ttft_ms": (r.t_first - r.t_write) * 1e3,
                       "gc_pause_ms": 1e3 * sum(p[1] for p in overlap),
                       "slow_models_probe_overlapping": bool(stalled)})
    diagnosis["premium_over_1_2x_unloaded_p99"] = {
        "n": len(slow), "with_gc_pause": sum(1 for d in detail if d["gc_pause_ms"] > 0),
        "with_slow_models_probe": sum(1 for d in detail if d["slow_models_probe_overlapping"]),
        "gc_pause_ms_in_them": sum(d["gc_pause_ms"] for d in detail), "worst": detail[:5]}
    offered = args.premium_rate + args.standard_rate + args.free_rate
    return {"capacity_req_per_s": capacity, "offered_req_per_s": offered, "overload": offered / capacity,
            "max_outstanding": args.max_outstanding, "itl_ms": args.itl_ms, "max_tokens": mk,
            "duration_s": args.load_duration,
            "rates": {"premium": args.premium_rate, "standard": args.standard_rate, "free": args.free_rate},
            "unloaded": unloaded, "loaded": loaded, "loaded_no_free": loaded_no_free, "diagnosis": diagnosis}


# ---------------------------------------------------------------- goals --
def goals_of(results: dict) -> list[dict]:
    goals = []

    def goal(text, value, met, unit="", note=""):
        goals.append({"goal": text, "value": value, "unit": unit, "met": met, "note": note})

    p1 = results.get("part1")
    if p1:
        v = p1["admit_sequential"]["p50_us"]
        goal("limiter overhead p50 <= 200 us (admit, sequential)", v, v <= 200, "us",
             f"32 concurrent callers: p50 {p1['admit_concurrent']['p50_us']:.0f} us")
    p2 = results.get("part2")
    if p2:
        over = [r["over_admission"] for r in p2["rows"]]
        total = None if any(o is None for o in over) else sum(over)
        goal("over-admission exactly 0 (4 gateway processes, every limit)", total,
             None if total is None else total == 0, "",
             ", ".join(f"{r['name']}: {fmt(r['over_admission'], 0)}" for r in p2["rows"]))
    p3 = results.get("part3")
    if p3:
        u = p3["unloaded"]["premium"]["ttft_ms"]["p99"]
        loaded = p3["loaded"]["premium"]["ttft_ms"]["p99"]
        if u is not None and loaded is not None:
            goal("premium TTFT p99 under 3x overload <= 1.2 x unloaded", loaded / u,
                 loaded <= 1.2 * u, "x", f"{loaded:.1f} ms loaded vs {u:.1f} ms unloaded")
        lf, ls = p3["loaded"]["free"], p3["loaded"]["standard"]
        shed_first = lf["shed_503"] > 0 and (lf["shed_503"] / max(1, lf["sent"])) > (
            ls["shed_503"] / max(1, ls["sent"])) and p3["loaded"]["premium"]["shed_503"] == 0
        goal("free requests are shed (503) first", lf["shed_503"], shed_first, "free 503s",
             f"503 share: free {100 * lf['shed_503'] / max(1, lf['sent']):.0f}%, standard "
             f"{100 * ls['shed_503'] / max(1, ls['sent']):.0f}%, premium {p3['loaded']['premium']['shed_503']}")
    return goals


# ---------------------------------------------------------------- report --
def render(results: dict, meta: dict) -> str:
    lines = []
    out = lines.append
    out("limits: rate limits, budgets and priority admission "
        f"(load average {meta['machine']['loadavg_before'][0]:.2f} before, "
        f"{meta['machine']['loadavg_after'][0]:.2f} after; {meta['machine']['cpus']} cores)")
    p1 = results.get("part1")
    if p1:
        out("")
        out(f"1. limiter overhead, in process: Limiter + PipelinedRedis ({meta['redis_url']}), "
            f"{p1['principals']} keys over {p1['principals'] // inproc.KEYS_PER_TENANT} tenants, "
            f"all limits and monthly budgets set (never reached), {p1['requests']:,} calls per row")
        head = f"   {'call':<44} {'p50 us':>7} {'p90 us':>7} {'p99 us':>7} {'max us':>7}"
        out(head)
        out("   " + "-" * (len(head) - 3))

        def row(label, s):
            out(f"   {label:<44} {fmt(s['p50_us'], 0):>7} {fmt(s['p90_us'], 0):>7} {fmt(s['p99_us'], 0):>7} "
                f"{fmt(s['max_us'], 0):>7}")
        row("PING (reference round trip)", p1["ping"])
        row("EVALSHA 'return 1' (no-op script)", p1["evalsha_noop"])
        row("admit(), sequential", p1["admit_sequential"])
        row("settle() + drain(), sequential", p1["settle_sequential"])
        row(f"PING, {p1['concurrency']} concurrent callers", p1["ping_concurrent"])
        row(f"admit(), {p1['concurrency']} concurrent callers (+ settle)", p1["admit_concurrent"])
        rs = p1["redis_server"]
        out(f"   event-loop CPU: {p1['admit_cpu_us_per_call']:.0f} us per admit, {p1['settle_cpu_us_per_call']:.0f} us "
            f"per settle (sequential); {p1['admit_concurrent']['cpu_us_per_admit_and_settle']:.0f} us per "
            f"admit+settle at {p1['concurrency']} callers, {p1['admit_concurrent']['admits_per_s']:,.0f} admit+settle/s")
        out(f"   settle in batches of {p1['settle_batch']['batch']}: drain p50 {p1['settle_batch']['drain_ms_p50']:.1f} ms "
            f"= {p1['settle_batch']['us_per_settle']:.0f} us per settle (pipelined)")
        out(f"   Redis server time per call (INFO commandstats): admit.lua {fmt(rs['admit_lua_us_per_call'], 0)} us, "
            f"settle.lua {fmt(rs['settle_lua_us_per_call'], 0)} us, no-op script {fmt(rs['evalsha_noop_us_per_call'], 0)} us, "
            f"PING {fmt(rs['ping_us_per_call'], 1)} us"
            + (f"  (server-wide counters: {rs['batch_phase_calls'] - rs['batch_phase_expected_calls']} "
               f"EVALSHA calls of other clients mixed in)" if rs["batch_phase_calls"] != rs["batch_phase_expected_calls"]
               else ""))
        c = p1["cpu"]
        out(f"   CPU % of one core over {c['wall_s']:.1f} s: this process {c['bench_percent']:.0f}, Redis "
            f"{c['redis_percent']:.0f}, other processes {c['other_percent']:.0f}"
            + ("  WARNING: busy neighbours, tails are disturbed" if c["other_percent"] > 25 else ""))
        out(f"   checks: {p1['admitted_by_local_fallback']} admitted by the local fallback (Redis away), "
            f"{p1['left_in_flight_after_settle']} left in flight after all settled")
    p2 = results.get("part2")
    if p2:
        out("")
        out(f"2. exactness, {p2['gateways']} gateway processes (uvicorn, one simulator behind), bursts round robin "
            f"over them, {p2['burst_concurrency']} connections")
        head = (f"   {'limit':<30} {'sent':>5} {'wall s':>6} {'200':>5} {'429':>5}  {'admitted':>8} {'allowed':>8} "
                f"{'used %':>6} {'over':>4}  measure")
        out(head)
        out("   " + "-" * (len(head) - 3))
        for r in p2["rows"]:
            n429 = sum(v for k, v in r["statuses"].items() if k.startswith("429"))
            out(f"   {r['limit']:<30} {r['sent']:>5} {r['wall_s']:>6.1f} {r['admitted_requests']:>5} {n429:>5}  "
                f"{r['admitted']:>8,} {fmt(r['allowed'], 0) if r['allowed'] is None else format(r['allowed'], ','):>8} "
                f"{fmt(r['used_percent'], 1):>6} {fmt(r['over_admission'], 0):>4}  {r['measure']}")
        for r in p2["rows"]:
            u = r["usage"]
            extra = ""
            if r["name"].startswith("concurrency"):
                extra = f"; peak counted request written -> end: {r['peak_write_to_end']}"
            if r["topup_sent"]:
                extra += (f"; burst {r['burst_sent']} in {r['burst_wall_s']:.1f}s admitted {r['burst_admitted']}, "
                          f"then {r['topup_sent']} one at a time admitted {r['topup_admitted']}")
            out(f"   {r['limit']}: statuses {r['statuses']}; usage rows {u['rows']}/{r['sent']}"
                f"{'' if u['complete'] else ' (INCOMPLETE)'}, tokens ok {u['tokens_ok']:,} (client saw "
                f"{r['client_tokens_ok']:,}); reserved/request {r['reserved_per_request']}; admitted per gateway "
                f"{r['per_gateway_admitted']}{extra}")
            if r["failures"]:
                out(f"     {r['failures']} failures: {r['failure_samples']}")
        out("   (over = max(0, admitted - allowed); the rpm and tpm bursts end well inside one minute, so exactly "
            "the limit may be admitted; tokens are the backend's prompt + completion counts)")
    p3 = results.get("part3")
    if p3:
        out("")
        out(f"3. priority admission: 1 gateway, GATEWAY_BACKEND_MAX_OUTSTANDING={p3['max_outstanding']}, simulator "
            f"{p3['itl_ms']:g} ms/token, max_tokens {p3['max_tokens']} -> capacity ~{p3['capacity_req_per_s']:.0f} req/s; "
            f"open-loop Poisson, {p3['duration_s']:g} s per phase")
        out(f"   offered: unloaded premium {p3['rates']['premium']:g}/s; loaded premium {p3['rates']['premium']:g} + "
            f"standard {p3['rates']['standard']:g} + free {p3['rates']['free']:g} = {p3['offered_req_per_s']:g} req/s "
            f"({p3['overload']:.1f}x capacity)")
        head = (f"   {'phase / tier':<26} {'sent':>5} {'ok':>5} {'503':>5} {'other':>5} {'ok %':>5}  "
                f"{'TTFT p50':>8} {'p90':>7} {'p99':>7} {'max':>7}  {'503 after':>9}")
        out(head)
        out("   " + "-" * (len(head) - 3))

        def trow(label, s):
            t = s["ttft_ms"]
            out(f"   {label:<26} {s['sent']:>5} {s['ok']:>5} {s['shed_503']:>5} {s['other']:>5} "
                f"{fmt(s['success_percent'], 0):>5}  {fmt(t['p50'], 1):>8} {fmt(t['p90'], 1):>7} {fmt(t['p99'], 1):>7} "
                f"{fmt(t['max'], 1):>7}  {fmt(s['wait_503_ms_p50'], 0):>9}")
        trow("unloaded premium", p3["unloaded"]["premium"])
        for tier in ("premium", "standard", "free"):
            trow(f"loaded {tier}", p3["loaded"][tier])
        trow("loaded sim-direct probe", p3["loaded"]["sim_direct_probe"])
        trow("control, no free: premium", p3["loaded_no_free"]["premium"])
        trow("control, no free: standard", p3["loaded_no_free"]["standard"])
        out("   (ms; TTFT = request written -> first content token; '503 after' = p50 time to the 503; the probe "
            "goes straight to the simulator at the premium rate: the engine's own TTFT under that load;")
        out("    control = the loaded phase again without the free stream; below 100 samples p99 is the largest one)")
        for phase in ("unloaded", "loaded", "loaded_no_free"):
            c = p3[phase]["cpu_percent"]
            out(f"   CPU % of one core, {phase}: gateway {c.get('gateway', 0):.0f}, simulator {c.get('sim', 0):.0f}, "
                f"load generator {c.get('loadgen', 0):.0f}, other processes {c.get('other', 0):.0f}"
                + (f" (on the gateway's core: {c['other_on_gateway_core']:.0f})" if "other_on_gateway_core" in c
                   else ""))
            if c.get("other", 0) > 25:
                out(f"     WARNING: other processes used {c['other']:.0f}% of a core on these 2 cores during the "
                    f"{phase} phase: latency tails are theirs as much as the gateway's; rerun on a quiet machine")
        d = p3["diagnosis"]
        out(f"   premium headroom: {d['capacity_slots']} slots, premium may fill {d['premium_share']:.0%}, standard "
            f"{d['standard_share']:.0%}, free {d['free_share']:.0%} -> {d['premium_headroom_slots']} slots only "
            f"premium can take")
        b, f = d["premium_found_headroom_full"], d["premium_found_a_free_slot"]
        out(f"   loaded premium requests that arrived with >= {d['premium_headroom_slots']} premium in flight: "
            f"{b['n']} (TTFT p50 {fmt(b['ttft_p50_ms'], 1)}, p99 {fmt(b['ttft_p99_ms'], 1)} ms); the others "
            f"{f['n']} (p50 {fmt(f['ttft_p50_ms'], 1)}, p99 {fmt(f['ttft_p99_ms'], 1)} ms)")
        mu, ml, mc = (p3[phase]["models_probe"] for phase in ("unloaded", "loaded", "loaded_no_free"))
        out(f"   GET /v1/models probe ({p3['rates']['premium']:g}/s; auth + registry, no Redis, no backend: the "
            f"gateway's event-loop lag): unloaded p50 {fmt(mu['p50_ms'], 1)} / p99 {fmt(mu['p99_ms'], 1)} ms, "
            f"loaded p50 {fmt(ml['p50_ms'], 1)} / p99 {fmt(ml['p99_ms'], 1)} ms, control p50 {fmt(mc['p50_ms'], 1)} "
            f"/ p99 {fmt(mc['p99_ms'], 1)} ms")
        for phase in ("unloaded", "loaded", "loaded_no_free"):
            c = p3[phase]["cpu_percent"]
            out(f"   gateway, {phase}: {c['gateway_gc_pauses_over_1ms']} GC pauses >= 1 ms ({c['gateway_gc_gen2']} full), "
                f"{c['gateway_gc_pause_total_ms']:.0f} ms in all, longest {c['gateway_gc_pause_max_ms']:.1f} ms; "
                f"{c['gateway_involuntary_switches_per_s']:.0f} involuntary context switches/s; "
                f"steal {c['steal_percent']:.1f}% of the 2 cores")
        so = d["premium_over_1_2x_unloaded_p99"]
        out(f"   loaded premium requests slower than 1.2 x the unloaded p99: {so['n']}; a gateway GC pause fell "
            f"inside {so['with_gc_pause']} of them ({so['gc_pause_ms_in_them']:.0f} ms), a slow (> 20 ms) "
            f"/v1/models probe overlapped {so['with_slow_models_probe']}; worst: "
            + ", ".join(f"{w['ttft_ms']:.0f} ms (GC {w['gc_pause_ms']:.0f} ms"
                        f"{', probe stalled too' if w['slow_models_probe_overlapping'] else ''})"
                        for w in so["worst"][:3]))
        su, sl = d["server_ttft_unloaded"], d["server_ttft_loaded"]
        out(f"   premium TTFT as the gateway records it (usage rows): unloaded p50 {fmt(su['p50_ms'], 1)} / p99 "
            f"{fmt(su['p99_ms'], 1)} ms, loaded p50 {fmt(sl['p50_ms'], 1)} / p99 {fmt(sl['p99_ms'], 1)} ms")
    out("")
    out("reference:")
    for line in REFERENCE:
        out("  " + line)
    out("")
    out("goals (this run):")
    for g in results["goals"]:
        mark = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT MET")
        value = "" if g["value"] is None else (f" {g['value']:.2f} {g['unit']}" if isinstance(g["value"], float)
                                               else f" {g['value']} {g['unit']}")
        out(f"  [{mark}] {g['goal']}:{value}" + (f"  ({g['note']})" if g["note"] else ""))
    for note in results.get("notes", []):
        out(f"  note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main --
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (1 in process, 2 exactness, 3 priority)")
    parser.add_argument("--requests", type=int, default=5000, help="part 1: calls per measurement")
    parser.add_argument("--callers", type=int, default=32, help="part 1: concurrent callers")
    parser.add_argument("--gateways", type=int, default=4, help="part 2: gateway processes")
    parser.add_argument("--burst-concurrency", type=int, default=64, help="part 2: connections")
    parser.add_argument("--rpm-requests", type=int, default=800, help=f"part 2: requests against rpm {RPM_KEY}")
    parser.add_argument("--tpm-requests", type=int, default=500, help="part 2: requests against the tpm limit")
    parser.add_argument("--budget-requests", type=int, default=600, help="part 2: requests against the budget")
    parser.add_argument("--topup", type=int, default=300,
                        help="part 2: after the tpm and budget bursts, up to this many sequential requests")
    parser.add_argument("--concurrency-duration", type=float, default=3.0, help="part 2: concurrency test, s")
    parser.add_argument("--max-outstanding", type=int, default=20, help="part 3: GATEWAY_BACKEND_MAX_OUTSTANDING")
    parser.add_argument("--itl-ms", type=float, default=20.0, help="part 3 simulator: ms per token")
    parser.add_argument("--priority-max-tokens", type=int, default=20, help="part 3: max_tokens")
    parser.add_argument("--premium-rate", type=float, default=4.0, help="part 3: premium req/s")
    parser.add_argument("--standard-rate", type=float, default=46.0, help="part 3: standard req/s (loaded)")
    parser.add_argument("--free-rate", type=float, default=100.0, help="part 3: free req/s (loaded)")
    parser.add_argument("--load-duration", type=float, default=60.0,
                        help="part 3: seconds per phase (60: ~240 premium samples, so p99 is not the largest one)")
    parser.add_argument("--server-core", type=int, default=0, help="part 3: core of the gateway")
    parser.add_argument("--client-core", type=int, default=1, help="part 3: core of the simulator and load generator")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--db", default=DEFAULT_DB, help="PostgreSQL database (dropped, re-created, migrated)")
    parser.add_argument("--keep-db", action="store_true", help="reuse the database as it is")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS,
                        help="Redis of this benchmark (its database is flushed at the start)")
    parser.add_argument("--json", default=str(RESULTS / "limits.json"), help="results file")
    args = parser.parse_args()
    args.parts = {int(p) for p in args.parts.split(",") if p}
    return args


def main() -> int:
    args = parse_args()
    loadavg_before = os.getloadavg()
    LOGS.mkdir(parents=True, exist_ok=True)
    pin, server_core, client_core, cores = cores_choose(server_core=args.server_core, client_core=args.client_core,
                                                        no_pin=args.no_pin)
    pinned_cores = [server_core, client_core] if pin else cores
    py = sys.executable
    tree = ROOT
    spool = Path(tempfile.mkdtemp(prefix="bench-limits-spool-"))
    env = dict(os.environ)
    env.update({"PYTHONPATH": f"{tree / 'platform'}{os.pathsep}{tree}", "POSTGRES_DB": args.db,
                "REDIS_URL": args.redis_url, "GATEWAY_REDIS_NAMESPACE": args.db,
                "DJANGO_SETTINGS_MODULE": "config.settings", "GATEWAY_REGISTRY_REFRESH_SECONDS": "0.5",
                "GATEWAY_USAGE_SPOOL_DIR": str(spool), "LOG_LEVEL": env.get("LOG_LEVEL", "WARNING")})

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes(tree, LOGS)
    results: dict = {"notes": []}
    started = time.monotonic()
    try:
        redis_flush(args.redis_url)
        if 1 in args.parts:
            log("part 1: limiter overhead in process")
            results["part1"] = uvloop.run(inproc.run(args.redis_url, requests=args.requests,
                                                     concurrency=args.callers, namespace="bench_limits_inproc",
                                                     log=log))
        if args.parts & {2, 3}:
            fast_port, slow_port, *gw_ports = free_ports(2 + args.gateways)
            log(f"starting simulators :{fast_port} (itl 0) and :{slow_port} (itl {args.itl_ms:g} ms)")
            sim_common = ["--host", HOST, "--enable-cache-report", "--log-level", "warning", "--ttft-ms", "0"]
            procs.start("sim-fast", [py, "-m", "inference.sim", "--port", str(fast_port), *sim_common,
                                     "--served-model-name", FAST_MODEL, "--itl-ms", "0"], core=None, env=env)
            slow_sim = procs.start("sim-slow", [py, "-m", "inference.sim", "--port", str(slow_port), *sim_common,
                                                "--served-model-name", SLOW_MODEL, "--itl-ms", str(args.itl_ms)],
                                   core=client_core, env=env)
            log(f"preparing database {args.db}")
            warm_key = db_prepare(args.db, env, [f"http://{HOST}:{fast_port}"], tree=tree,
                                  recreate=not args.keep_db, model=FAST_MODEL, tenant=WARM_TENANT)
            from inference.services import backend_add, served_model_upsert

            slow = served_model_upsert(name=SLOW_MODEL)
            slow.backends.all().delete()
            backend_add(model=slow, url=f"http://{HOST}:{slow_port}")
            suffix = f"{int(time.time())}"
            tenants = {
                "rpm": tenant_make(f"lim-rpm-{suffix}", key_limits={"rpm_limit": RPM_KEY}),
                "tpm": tenant_make(f"lim-tpm-{suffix}", tenant_limits={"tpm_limit": TPM_TENANT}),
                "concurrency": tenant_make(f"lim-conc-{suffix}",
                                           tenant_limits={"concurrency_limit": CONCURRENCY_TENANT}),
                "budget": tenant_make(f"lim-budget-{suffix}",
                                      tenant_limits={"monthly_token_budget": TOKEN_BUDGET_TENANT}),
                "premium": tenant_make(f"prio-premium-{suffix}", tier="premium", keys=3),
                "standard": tenant_make(f"prio-standard-{suffix}", tier="standard"),
                "free": tenant_make(f"prio-free-{suffix}", tier="free"),
            }
            warm = Requests(model=FAST_MODEL, api_key=warm_key, max_tokens=4, tag="warm")
            warm_slow = Requests(model=SLOW_MODEL, api_key=warm_key, max_tokens=2, tag="warm")

            if 2 in args.parts:
                log(f"part 2: starting {args.gateways} gateway processes")
                gateways = [procs.start(f"gateway-{i}", gateway_argv(py, port), core=None, env=env)
                            for i, port in enumerate(gw_ports)]

                async def run2():
                    for i, port in enumerate(gw_ports):
                        await wait_ready(port, warm, procs, f"gateway-{i}")
                        await wait_ready(port, warm_slow, procs, f"gateway-{i}")
                    return await part2(args, gw_ports, tenants, procs)
                results["part2"] = uvloop.run(run2())
                procs.stop(gateways)

            if 3 in args.parts:
                (port3,) = free_ports(1)
                log(f"part 3: one gateway, GATEWAY_BACKEND_MAX_OUTSTANDING={args.max_outstanding}")
                # The registry refreshes at its default pace here (part 2 needs 0.5 s, this part does not).
                gc_log = LOGS / "gateway-priority-gc.log"
                gc_log.write_text("")
                env3 = {**env, "GATEWAY_BACKEND_MAX_OUTSTANDING": str(args.max_outstanding),
                        "GATEWAY_REGISTRY_REFRESH_SECONDS": "5", "BENCH_GC_LOG": str(gc_log),
                        "PYTHONPATH": f"{Path(__file__).resolve().parent / 'gcprobe'}{os.pathsep}{env['PYTHONPATH']}"}
                gateway = procs.start("gateway-priority", gateway_argv(py, port3), core=server_core, env=env3)
                if pin:
                    os.sched_setaffinity(0, {client_core})

                async def run3():
                    await wait_ready(port3, warm_slow, procs, "gateway-priority")
                    return await part3(args, port3, slow_port, tenants,
                                       {"gateway": gateway.pid, "sim": slow_sim.pid}, pinned_cores, pin, gc_log)
                results["part3"] = uvloop.run(run3())
                if pin:
                    os.sched_setaffinity(0, set(cores))
    except KeyboardInterrupt:
        log("interrupted; stopping everything started")
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(spool, ignore_errors=True)

    results["goals"] = goals_of(results)
    meta = {
        "redis_url": args.redis_url, "db": args.db, "versions": versions(),
        "pinning": (f"part 3: gateway on core {server_core}, simulator and load generator on core {client_core}"
                    if pin else "none"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg()},
        "run_seconds": time.monotonic() - started, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = render(results, meta)
    print(text)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **results}, indent=2, default=str) + "\n")
    print(f"\nresults: {path} ({meta['run_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
