"""bench/gateway_overhead: what the gateway adds to a streamed chat completion.

Starts an SGLang-protocol simulator (ttft = itl = 0), the gateway (one uvicorn
process; auth and usage recording on) and the real sglang-router in front of the
same simulator, then runs 16-token streamed chat completions at 1, 32 and 128
concurrent keep-alive streams against each target side by side, plus a
keep-alive stall test (sequential requests on one reused connection vs a fresh
connection each). Prints one table and writes bench/results/gateway_overhead.json.
Everything started here is stopped on exit, Ctrl-C or error.

Usage: bench/run.sh gateway_overhead [--duration S] [--warmup S] [--concurrency 1,32,128] ...
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import uvloop

from bench.common import (HOST, Processes, children_cpu_seconds, cores_busy_seconds, cores_choose,
                          cpu_seconds_delta, db_prepare as common_db_prepare, fmt, free_ports, ms,
                          named_cpu_seconds, pct, proc_cpu_seconds, self_cpu_seconds,
                          usage_rows as common_usage_rows, versions)
from loadgen import EXPECTED_TOKENS, RequestFactory, one_request, run_closed_loop, sequential

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs" / "gateway_overhead"
MODEL = "bench-llm"
TENANT = "bench"
TARGETS = ("direct", "gateway", "router")
LABEL = {"direct": "direct", "gateway": "gateway", "router": "sgl-router"}
# Command names of the PostgreSQL and Redis server processes.
STORE_PROCESSES = ("postgres", "redis-server")
# The simulator's prefix cache is kept empty. With its default capacity (1M tokens)
# the cache fills after about 40k of these requests, and from then on every insert
# walks and heapifies all leaves (inference/sim/radix_cache.py, evict()): about 23 ms
# per request, and the simulator collapses mid-run. Prompts differ per request
# anyway, so nothing would be served from the cache.
SIM_CACHE_TOKENS = 0

REFERENCE = [
    "measured on this kind of machine against an instant upstream serving about 1,700-2,000 streams/s:",
    "LiteLLM proxy (one worker): +18 ms TTFT at 1 stream, about +590 ms at 32 streams, about 30 streams/s",
    "sgl-router: +1.4 ms on a fresh connection, but stalls about 44 ms per response on a reused "
    "keep-alive connection (Nagle and delayed ACK)",
    "lean-design prototype (raw ASGI /v1/ beside Django, aiohttp upstream, uvicorn+uvloop, one Redis call "
    "per request): +0.7 ms at 1 stream, 2,700 streams/s",
]


# ---------------------------------------------------------------- database --
def db_prepare(db: str, env: dict, sim_url: str, *, tree: Path, recreate: bool) -> str:
    """The benchmark's own database, re-created and migrated (bench.common.db_prepare),
    with the model on this run's simulator only; returns a fresh API key."""
    return common_db_prepare(db, env, [sim_url], tree=tree, recreate=recreate, model=MODEL, tenant=TENANT)


def usage_rows(db: str) -> int:
    return common_usage_rows(db, TENANT)


def limits_status(tree: Path) -> str:
    """Rate limits are a later issue; say plainly whether the measured request path
    uses any (the HTTP path is apis.py -> streaming.py, built by runtime.py)."""
    pattern = re.compile(r"^\s*(from\s+(\.|inference\.)limits\s+import|import\s+inference\.limits)", re.M)
    for name in ("apis.py", "streaming.py", "runtime.py"):
        path = tree / "inference" / name
        if path.exists() and pattern.search(path.read_text(errors="replace")):
            return f"limits: on (inference/{name} imports inference.limits)"
    return "limits: not yet implemented (nothing on the /v1/ request path imports inference.limits)"


# ---------------------------------------------------------------- benchmark --
async def wait_ready(name: str, port: int, factory: RequestFactory, procs: Processes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            result = await one_request(HOST, port, factory)
            if result.ok:
                return
            last = result.describe()
        except (OSError, asyncio.TimeoutError, ConnectionError) as error:
            last = repr(error)
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{name} on port {port} did not serve a 16-token stream within {timeout:.0f}s: {last}")


async def bench(args, ports: dict, pids: dict, api_key: str, procs: Processes) -> dict:
    factories = {
        target: RequestFactory(host=HOST, port=ports[target], model=MODEL,
                               api_key=api_key if target == "gateway" else None, tag=target[:3])
        for target in args.targets
    }
    for target in args.targets:
        await wait_ready(LABEL[target], ports[target], factories[target], procs)

    gateway_requests = 0
    scenarios = []
    gc.collect()
    gc.freeze()
    for concurrency in args.concurrency:
        for target in args.targets:
            procs.check_alive()
            snaps: dict[str, dict] = {}

            def on_window(tag: str) -> None:
                snaps[tag] = {"wall": time.perf_counter(), "loadgen": self_cpu_seconds(),
                              "cores": cores_busy_seconds(args.pinned_cores),
                              **{name: proc_cpu_seconds(pid) for name, pid in pids.items()}}
                if "gateway" in pids:
                    # The gateway's usage shipper (its child): it turns the spool into PostgreSQL rows.
                    snaps[tag]["shipper"] = children_cpu_seconds(pids["gateway"])
                # The servers the gateway uses (its API keys, limits, usage rows).
                snaps[tag]["stores"] = named_cpu_seconds(STORE_PROCESSES)

            gc.disable()
            try:
                stats, t0, t1 = await run_closed_loop(
                    host=HOST, port=ports[target], factory=factories[target], concurrency=concurrency,
                    warmup_s=args.warmup, duration_s=args.duration, on_window=on_window)
            finally:
                gc.enable()
                gc.collect()
            if target == "gateway":
                gateway_requests += stats.responses
            wall = snaps["end"]["wall"] - snaps["start"]["wall"]
            cpu = {name: snaps["end"][name] - snaps["start"][name] for name in snaps["end"]
                   if name not in ("wall", "cores", "stores")}
            cpu["stores"] = cpu_seconds_delta(snaps["start"]["stores"], snaps["end"]["stores"])
            cores_busy = snaps["end"]["cores"] - snaps["start"]["cores"]
            done = stats.completed_in_window
            row = {
                "target": target, "concurrency": concurrency, "window_s": round(wall, 3),
                "requests_ok": done, "req_per_s": done / wall, "errors": stats.errors,
                "error_samples": stats.error_samples,
                "ttft_ms": {"p50": ms(pct(stats.ttft, 50)), "p99": ms(pct(stats.ttft, 99))},
                "itl_ms": {"p50": ms(pct(stats.gaps, 50)), "p99": ms(pct(stats.gaps, 99))},
                "end_ms": {"p50": ms(pct(stats.total, 50)), "p99": ms(pct(stats.total, 99))},
                "cpu_percent": {name: 100 * seconds / wall for name, seconds in cpu.items()},
                # CPU used on the benchmark's cores by everything else (unrelated
                # processes), % of one core.
                "other_cpu_percent": max(0.0, 100 * (cores_busy - sum(cpu.values())) / wall),
            }
            if target in ("gateway", "router") and done:
                server_cpu = cpu[target]
                row["server_cpu_ms_per_request"] = server_cpu * 1e3 / done
                row["server_cpu_us_per_token"] = server_cpu * 1e6 / (done * EXPECTED_TOKENS)
                row["server_capacity_req_per_s_at_one_core"] = done / server_cpu if server_cpu else None
            if target == "gateway" and done:
                row["shipper_cpu_ms_per_request"] = cpu.get("shipper", 0.0) * 1e3 / done
            core_client = row["cpu_percent"]["sim"] + row["cpu_percent"]["loadgen"]
            row["client_core_busy_percent"] = core_client
            row["loadgen_cpu_us_per_request"] = cpu["loadgen"] * 1e6 / done if done else None
            row["bound"] = ("server core" if target != "direct" and row["cpu_percent"][target] >= 80
                            else "sim+loadgen core" if core_client >= 90 else "latency")
            scenarios.append(row)
            print(f"  c={concurrency:<3} {LABEL[target]:<10} {row['req_per_s']:8.0f} req/s  "
                  f"TTFT p50 {fmt(row['ttft_ms']['p50'])} ms  errors {stats.errors}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.3)

    stall = {}
    for target in args.targets:
        reused = await sequential(host=HOST, port=ports[target], factory=factories[target],
                                  count=args.stall_requests, reuse=True)
        fresh = await sequential(host=HOST, port=ports[target], factory=factories[target],
                                 count=args.stall_requests, reuse=False)
        if target == "gateway":
            gateway_requests += 2 * (args.stall_requests + 3)
        stall[target] = {
            "requests": args.stall_requests,
            "reused": {"ttft_p50_ms": ms(pct(reused["ttft"], 50)), "end_p50_ms": ms(pct(reused["total"], 50)),
                       "end_max_ms": ms(max(reused["total"], default=None)), "errors": reused["errors"]},
            "fresh": {"ttft_p50_ms": ms(pct(fresh["ttft"], 50)), "end_p50_ms": ms(pct(fresh["total"], 50)),
                      "end_max_ms": ms(max(fresh["total"], default=None)),
                      "connect_p50_ms": ms(pct(fresh["connect"], 50)), "errors": fresh["errors"]},
        }
        r, f = stall[target]["reused"]["end_p50_ms"], stall[target]["fresh"]["end_p50_ms"]
        stall[target]["stall_ms"] = None if r is None or f is None else r - f
        print(f"  keep-alive {LABEL[target]:<10} reused end p50 {fmt(r)} ms, fresh {fmt(f)} ms",
              file=sys.stderr, flush=True)
    return {"scenarios": scenarios, "stall": stall, "gateway_requests": gateway_requests}


# ---------------------------------------------------------------- report --
def analyse(results: dict, args) -> dict:
    by = {(s["target"], s["concurrency"]): s for s in results["scenarios"]}
    added = {}
    for c in args.concurrency:
        direct = by.get(("direct", c))
        for target in ("gateway", "router"):
            row = by.get((target, c))
            if direct is None or row is None:
                continue
            d, t = direct["ttft_ms"]["p50"], row["ttft_ms"]["p50"]
            de, te = direct["end_ms"]["p50"], row["end_ms"]["p50"]
            added.setdefault(str(c), {})[target] = {
                "ttft_p50_ms": None if d is None or t is None else t - d,
                "end_p50_ms": None if de is None or te is None else te - de,
            }
    goals = []

    def goal(text: str, value, limit, ok_when: str, unit: str, note: str = "") -> None:
        if value is None:
            goals.append({"goal": text, "value": None, "met": None, "note": "not measured"})
            return
        met = value <= limit if ok_when == "<=" else value >= limit
        goals.append({"goal": text, "value": round(value, 3), "unit": unit, "met": met, "note": note})

    def added_ttft(c):
        return added.get(str(c), {}).get("gateway", {}).get("ttft_p50_ms")

    goal("added TTFT p50 <= 1 ms at 1 stream", added_ttft(1), 1.0, "<=", "ms")
    goal("added TTFT p50 <= 2 ms at 32 streams", added_ttft(32), 2.0, "<=", "ms")
    gateway_rows = [s for s in results["scenarios"] if s["target"] == "gateway"]
    best = max(gateway_rows, key=lambda s: s["req_per_s"], default=None)
    note = ""
    if best is not None:
        cap = best.get("server_capacity_req_per_s_at_one_core")
        note = (f"at c={best['concurrency']}; gateway core {best['cpu_percent']['gateway']:.0f}% busy, "
                f"sim+loadgen core {best['client_core_busy_percent']:.0f}% busy; "
                f"gateway CPU/request implies {cap:.0f} req/s at 100% of one core" if cap else "")
    goal(">= 1,500 streamed req/s in one gateway process", best["req_per_s"] if best else None, 1500, ">=",
         "req/s", note)
    row32 = by.get(("gateway", 32))
    goal("<= 60 us gateway CPU per forwarded token (at 32 streams)",
         row32.get("server_cpu_us_per_token") if row32 else None, 60, "<=", "us")
    gw_stall = results["stall"].get("gateway", {}).get("stall_ms")
    goal("no stall on keep-alive connections (reused - fresh end p50 <= 5 ms)", gw_stall, 5.0, "<=", "ms")
    return {"added_vs_direct": added, "goals": goals}


def render(results: dict, meta: dict) -> str:
    lines = []
    out = lines.append
    out(f"gateway_overhead: streamed chat completions, {EXPECTED_TOKENS} tokens each, simulator ttft=itl=0, "
        f"closed loop, keep-alive connections (one per stream)")
    out(f"window {meta['duration_s']} s per scenario after {meta['warmup_s']} s warm-up; pinning: {meta['pinning']}")
    out("gateway: auth on (API key, per-process cache), usage recording on (PostgreSQL, batched); "
        + meta["limits"])
    out("simulator: " + meta["simulator"])
    out("sgl-router: sglang-router " + meta["versions"].get("sglang-router", "?") + ", " + meta["router_flags"])
    out("")
    head = (f"{'c':>4}  {'target':<10} {'req/s':>7}  {'TTFT p50':>8} {'p99':>7}  {'ITL p50':>7} {'p99':>6}  "
            f"{'end p50':>7} {'p99':>7}  {'err':>3}  {'srv%':>4} {'shp%':>4} {'db%':>4} {'sim%':>4} {'lg%':>4} "
            f"{'oth%':>4}  bound")
    out(head)
    out("-" * len(head))
    for s in results["scenarios"]:
        cpu = s["cpu_percent"]
        srv = cpu.get(s["target"]) if s["target"] != "direct" else None
        shipper = cpu.get("shipper") if s["target"] == "gateway" else None
        out(f"{s['concurrency']:>4}  {LABEL[s['target']]:<10} {s['req_per_s']:>7.0f}  "
            f"{fmt(s['ttft_ms']['p50']):>8} {fmt(s['ttft_ms']['p99']):>7}  "
            f"{fmt(s['itl_ms']['p50'], 3):>7} {fmt(s['itl_ms']['p99']):>6}  "
            f"{fmt(s['end_ms']['p50']):>7} {fmt(s['end_ms']['p99']):>7}  {s['errors']:>3}  "
            f"{fmt(srv, 0):>4} {fmt(shipper, 0):>4} {cpu['stores']:>4.0f} {cpu['sim']:>4.0f} {cpu['loadgen']:>4.0f} "
            f"{s['other_cpu_percent']:>4.0f}  {s['bound']}")
    out("(ms; TTFT = request written -> first content token; ITL = between content tokens as read; "
        "end = request written -> end of response;")
    out(" srv/sim/lg = CPU % of one core for the server under test, the simulator and the load generator;")
    out(" shp = the gateway's usage shipper (its child process, on the gateway's core: spool -> PostgreSQL rows);")
    out(" db = PostgreSQL and Redis (every process of theirs; the gateway's usage rows, limits and keys);")
    out(" oth = CPU % used on the benchmark's cores by any other process (neighbours);")
    out(" bound = the core that ran out: 'server core' >= 80% busy, 'sim+loadgen core' >= 90%, else 'latency')")
    noisy = [s for s in results["scenarios"] if s["other_cpu_percent"] > 25]
    if noisy:
        out(f"  WARNING: other processes used > 25% of a core during {len(noisy)} scenario(s) "
            f"(up to {max(s['other_cpu_percent'] for s in noisy):.0f}%): figures are disturbed; rerun on a quiet machine")
    for s in results["scenarios"]:
        if s["errors"]:
            out(f"  errors {LABEL[s['target']]} c={s['concurrency']}: {s['error_samples']}")
    out("")
    out("added vs direct (p50, ms):      TTFT gateway  TTFT sgl-router   end gateway  end sgl-router")
    for c, row in results["added_vs_direct"].items():
        g, r = row.get("gateway", {}), row.get("router", {})
        out(f"  c={c:<4}                      {fmt(g.get('ttft_p50_ms')):>12} {fmt(r.get('ttft_p50_ms')):>16}"
            f"  {fmt(g.get('end_p50_ms')):>12} {fmt(r.get('end_p50_ms')):>15}")
    out("  (direct runs the simulator and the load generator on one core; at c >= 32 that core is full, so")
    out("   'direct' is a floor of that core's capacity, not of the simulator's, and added figures there are rough)")
    out("")
    out("server CPU per request / per forwarded token:")
    for s in results["scenarios"]:
        if "server_cpu_ms_per_request" in s:
            shipper = (f"; + usage shipper {s['shipper_cpu_ms_per_request']:.3f} ms/request"
                       if "shipper_cpu_ms_per_request" in s else "")
            out(f"  {LABEL[s['target']]:<10} c={s['concurrency']:<4} {s['server_cpu_ms_per_request']:.3f} ms/request  "
                f"{s['server_cpu_us_per_token']:.1f} us/token  "
                f"(=> {s['server_capacity_req_per_s_at_one_core']:.0f} req/s at 100% of one core){shipper}")
    lg = [s for s in results["scenarios"] if s.get("loadgen_cpu_us_per_request")]
    if lg:
        worst = max(lg, key=lambda s: s["cpu_percent"]["loadgen"])
        out(f"load generator: {min(s['loadgen_cpu_us_per_request'] for s in lg):.0f}-"
            f"{max(s['loadgen_cpu_us_per_request'] for s in lg):.0f} us CPU per request; busiest at "
            f"{LABEL[worst['target']]} c={worst['concurrency']}: {worst['cpu_percent']['loadgen']:.0f}% of a core "
            f"(it shares its core with the simulator: 'bound' says which core ran out)")
    u = results.get("usage_check")
    if u:
        out(f"usage recording: {u['rows_written']} usage rows written for {u['gateway_responses']} gateway responses")
    out("")
    out(f"keep-alive stall ({meta['stall_requests']} sequential requests each; ms, p50):")
    out(f"  {'target':<10} {'reused TTFT':>11} {'reused end':>10} {'fresh TTFT':>10} {'fresh end':>9} "
        f"{'connect':>7} {'stall':>7}")
    for target, st in results["stall"].items():
        r, f = st["reused"], st["fresh"]
        flag = "STALL" if st["stall_ms"] is not None and st["stall_ms"] > 5 else "ok"
        out(f"  {LABEL[target]:<10} {fmt(r['ttft_p50_ms']):>11} {fmt(r['end_p50_ms']):>10} "
            f"{fmt(f['ttft_p50_ms']):>10} {fmt(f['end_p50_ms']):>9} {fmt(f['connect_p50_ms']):>7} "
            f"{fmt(st['stall_ms']):>7}  {flag}")
    out("")
    out("reference (from the issue):")
    for line in REFERENCE:
        out("  " + line)
    out("")
    out("goal (this run, gateway):")
    for g in results["goals"]:
        mark = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT MET")
        value = "" if g["value"] is None else f" {g['value']:.2f} {g['unit']}"
        out(f"  [{mark}] {g['goal']}:{value}" + (f"  ({g['note']})" if g["note"] else ""))
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh gateway_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="measurement window per scenario, s")
    parser.add_argument("--warmup", type=float, default=1.5, help="warm-up per scenario, s")
    parser.add_argument("--concurrency", default="1,32,128", help="comma-separated stream counts")
    parser.add_argument("--targets", default=",".join(TARGETS), help="subset of direct,gateway,router")
    parser.add_argument("--stall-requests", type=int, default=40, help="requests per keep-alive stall test")
    parser.add_argument("--server-core", type=int, default=0, help="core for the gateway and sgl-router")
    parser.add_argument("--client-core", type=int, default=1, help="core for the simulator and load generator")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--db", default="llmplatform_bench", help="PostgreSQL database for the gateway")
    parser.add_argument("--keep-db", action="store_true",
                        help="reuse the database as it is (default: drop and re-create it, then migrate)")
    parser.add_argument("--tree", default=str(ROOT),
                        help="project tree whose simulator, gateway and manage.py run (default: this one)")
    parser.add_argument("--json", default=str(RESULTS / "gateway_overhead.json"), help="results file")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.targets = [t for t in args.targets.split(",") if t]
    for target in args.targets:
        if target not in TARGETS:
            parser.error(f"unknown target {target!r}")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")  # the baseline everything is compared with
    return args


def main() -> int:
    args = parse_args()
    loadavg_before = os.getloadavg()
    LOGS.mkdir(parents=True, exist_ok=True)
    pin, server_core, client_core, cores = cores_choose(server_core=args.server_core, client_core=args.client_core,
                                                        no_pin=args.no_pin)
    pinning = (f"gateway and sgl-router on core {server_core} (one at a time under load); simulator and load "
               f"generator on core {client_core}; PostgreSQL and Redis unpinned" if pin
               else f"not pinned (cores available: {cores})")
    if pin:
        os.sched_setaffinity(0, {client_core})
    args.pinned_cores = [server_core, client_core] if pin else cores

    sim_port, gw_port, router_port, prom_port = free_ports(4)
    sim_url = f"http://{HOST}:{sim_port}"
    env = dict(os.environ)
    tree = Path(args.tree).resolve()
    env["PYTHONPATH"] = f"{tree / 'platform'}{os.pathsep}{tree}"
    env["POSTGRES_DB"] = args.db
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    env.setdefault("LOG_LEVEL", "WARNING")
    # A spool folder of this run only: files an earlier run's gateway left (killed
    # before its shipper stored them) must not be shipped into this run's database.
    spool = RESULTS / "spool" / "gateway_overhead"
    shutil.rmtree(spool, ignore_errors=True)
    env["GATEWAY_USAGE_SPOOL_DIR"] = str(spool)
    py = sys.executable
    router_flags = ("--policy round_robin --log-level warn --health-check-interval-secs 3600 "
                    "(retries and circuit breaker at their defaults)")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes(tree, LOGS)
    try:
        print(f"starting simulator :{sim_port}, gateway :{gw_port}, sgl-router :{router_port} ({pinning})",
              file=sys.stderr, flush=True)
        sim_help = subprocess.run([py, "-m", "inference.sim", "--help"], cwd=tree, env=env,
                                  capture_output=True, text=True).stdout
        sim_args = ["--host", HOST, "--port", str(sim_port), "--served-model-name", MODEL, "--enable-cache-report",
                    "--log-level", "warning"]
        sim_note = "ttft 0, itl 0"
        for flag in ("--ttft-ms", "--itl-ms"):
            if flag in sim_help:
                sim_args += [flag, "0"]
        if "--max-total-tokens" in sim_help:
            # A newer simulator: the same number is its KV capacity, so keep its default.
            sim_note += ", KV/prefix cache at the simulator's default capacity"
        else:
            sim_args += ["--cache-capacity-tokens", str(SIM_CACHE_TOKENS)]
            sim_note += f", prefix cache capacity {SIM_CACHE_TOKENS} tokens (a full cache makes it collapse: run.py)"
        sim = procs.start("sim", [py, "-m", "inference.sim", *sim_args], core=client_core, env=env)
        api_key = db_prepare(args.db, env, sim_url, tree=tree, recreate=not args.keep_db)
        pids = {"sim": sim.pid}
        ports = {"direct": sim_port}
        if "gateway" in args.targets:
            gateway = procs.start("gateway", [py, "-m", "uvicorn", "config.asgi:application", "--app-dir", "platform",
                                              "--host", HOST, "--port", str(gw_port), "--loop", "uvloop",
                                              "--http", "httptools", "--lifespan", "on", "--no-access-log",
                                              "--log-level", "warning"], core=server_core, env=env)
            pids["gateway"], ports["gateway"] = gateway.pid, gw_port
        if "router" in args.targets:
            router = procs.start("router", [py, "-m", "sglang_router.launch_router", "--host", HOST,
                                            "--port", str(router_port), "--worker-urls", sim_url,
                                            "--policy", "round_robin", "--log-level", "warn",
                                            "--health-check-interval-secs", "3600",
                                            "--prometheus-host", HOST, "--prometheus-port", str(prom_port)],
                                 core=server_core, env=env)
            pids["router"], ports["router"] = router.pid, router_port
        rows_before = usage_rows(args.db)
        results = uvloop.run(bench(args, ports, pids, api_key, procs))
        if "gateway" in args.targets:
            time.sleep(1.0)  # the recorder flushes every GATEWAY_USAGE_FLUSH_SECONDS
            results["usage_check"] = {"rows_written": usage_rows(args.db) - rows_before,
                                      "gateway_responses": results.pop("gateway_requests")}
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()

    results.update(analyse(results, args))
    meta = {
        "duration_s": args.duration, "warmup_s": args.warmup, "stall_requests": args.stall_requests,
        "pinning": pinning, "router_flags": router_flags, "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg()},
        "simulator": sim_note, "tree": str(tree), "model": MODEL, "max_tokens": EXPECTED_TOKENS, "limits": limits_status(tree),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = render(results, meta)
    print(text)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
