"""bench/routing: how the gateway's routing policies use 4 backends' prefix caches.

Starts 4 SGLang-protocol simulators (a hardware preset, a KV capacity too small
for the workload, a time scale), then, one target at a time and every target
starting cold (caches flushed, statistics reset), replays the same seeded
multi-tenant chat workload (closed loop, long system prompts, conversations that
grow turn by turn, Zipf tenant popularity) through: the gateway with routing
policy round_robin, least_outstanding and cache_aware (1 process), cache_aware
with 4 gateway processes (the load spread round robin over them), and the real
sglang-router (cache_aware, defaults) directly in front of the simulators. An
oracle computes the hit rate of an unbounded cache with perfect affinity for the
same requests. Then round_robin, least_outstanding, cache_aware and sgl-router
again on further workload seeds (--more-seeds), so that every goal is also
judged on more than one sample. With --dp-size N each simulator runs N
data-parallel ranks (a cache each): the gateway routes to each rank, sgl-router
runs with --dp-aware, and the target cache_aware_dp_unseen shows the gateway
routing to each server as one backend (GATEWAY_DATA_PARALLEL_RANKS=0). The target
cache_aware_no_retention, run only when named, is cache_aware without prefix
retention (GATEWAY_PREFIX_RETENTION_SECONDS=0); the gateway's touches in each
window are printed. Prints the tables and writes bench/results/routing.json. Everything started here is
stopped on exit, Ctrl-C or error.

Usage: bench/run.sh routing [--seed N] [--more-seeds N,M] [--duration S] [--warmup S] [--concurrency N] ...
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import uvloop

from bench.common import (HOST, Connection, Processes, ResponseError, Result, db_prepare, fmt, free_ports, pct,
                          pg_connect, proc_cpu_seconds, reopen, usage_rows, versions)
from bench.routing.workload import Workload, WorkloadSpec

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
LOGS = RESULTS / "logs" / "routing"
MODEL = "bench-routing-llm"
TENANT = "bench-routing"
REQUEST_TIMEOUT_S = 120.0

# target name -> (label, kind, gateway policy, gateway processes, gateway settings)
TARGETS = {
    "round_robin": ("round_robin", "gateway", "round_robin", 1, {}),
    "least_outstanding": ("least_outstanding", "gateway", "least_outstanding", 1, {}),
    "cache_aware": ("cache_aware", "gateway", "cache_aware", 1, {}),
    "cache_aware_4p": ("cache_aware, 4 gateway processes", "gateway", "cache_aware", 4, {}),
    "cache_aware_4p_local": ("cache_aware, 4 processes, no homes", "gateway", "cache_aware", 4,
                             {"GATEWAY_ROUTING_SHARED_HOMES": "0"}),
    "sgl_router": ("sgl-router cache_aware", "router", None, 0, {}),
    # Not run unless asked for: cache_aware without prefix retention.
    "cache_aware_no_retention": ("cache_aware, no prefix retention", "gateway", "cache_aware", 1,
                                 {"GATEWAY_PREFIX_RETENTION_SECONDS": "0"}),
    # Only with --dp-size > 1 (not run unless asked for): each server one backend.
    "cache_aware_dp_unseen": ("cache_aware, ranks unseen", "gateway", "cache_aware", 1,
                              {"GATEWAY_DATA_PARALLEL_RANKS": "0"}),
    # Only with --hicache-ratio (not run unless asked for): the host pools unseen.
    "cache_aware_host_unseen": ("cache_aware, host pools unseen", "gateway", "cache_aware", 1,
                                {"GATEWAY_HIERARCHICAL_CACHE": "0"}),
}
DEFAULT_TARGETS = [name for name in TARGETS
                   if name not in ("cache_aware_dp_unseen", "cache_aware_host_unseen", "cache_aware_no_retention")]
# Targets run again on each of --more-seeds: every goal compares cache_aware with one
# of the others, and one seed is one draw of the workload.
SEED_TARGETS = ("round_robin", "least_outstanding", "cache_aware", "sgl_router", "cache_aware_no_retention")
ROUTER_FLAGS = ["--policy", "cache_aware", "--log-level", "warn", "--health-check-interval-secs", "3600"]


# ------------------------------------------------------------------ helpers --
def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def redis_flush(url: str) -> None:
    """FLUSHDB on the benchmark's own Redis database."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def gateway_touches(ports: list[int]) -> int:
    """Prefix-retention touches the gateway processes on `ports` have sent
    (`llm_gateway_prefix_touches_total` of their /metrics, summed)."""
    total = 0
    for port in ports:
        status, body = http("GET", f"http://{HOST}:{port}/metrics")
        if status != 200:
            continue
        for line in body.decode().splitlines():
            if line.startswith("llm_gateway_prefix_touches_total{"):
                total += int(float(line.rsplit(" ", 1)[1]))
    return total


def sim_stats(urls: list[str]) -> list[dict]:
    """Each simulator's /sim/stats; a data-parallel one's cache and engine
    figures summed over its ranks (its counters are the server's already)."""
    out = []
    for url in urls:
        stats = orjson.loads(http("GET", url + "/sim/stats")[1])
        ranks = stats.get("dp_ranks")
        if ranks:
            for part in ("cache", "engine"):
                stats[part] = {key: sum(rank[part][key] for rank in ranks)
                               if isinstance(value, (int, float)) and not isinstance(value, bool) else value
                               for key, value in stats[part].items()}
        out.append(stats)
    return out


def wait_until(what: str, check, procs: Processes, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            value = check()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError) as error:
            last = error
        time.sleep(interval)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f}s ({last!r})")


def sims_cold_start(urls: list[str], procs: Processes) -> None:
    """Waits until no request is active on any simulator, then empties their prefix
    caches and resets their statistics, so the next target starts cold."""
    wait_until("simulators idle", lambda: all(s["active_requests"] == 0 for s in sim_stats(urls)), procs, 150)
    for url in urls:
        status, body = http("POST", url + "/flush_cache")
        if status != 200:
            raise RuntimeError(f"{url}/flush_cache answered {status}: {body[:200]!r}")
        http("POST", url + "/sim/stats/reset")


def request_bytes(port: int, body: dict, api_key: str | None) -> bytes:
    payload = orjson.dumps(body)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n"
            + (f"Authorization: Bearer {api_key}\r\n" if api_key else "") + "\r\n").encode()
    return head + payload


# ------------------------------------------------------------ closed loop --
@dataclass(slots=True)
class Record:
    conversation: int
    turn: int
    tenant: int
    port: int
    t_write: float
    t_first: float = 0.0
    t_end: float = 0.0
    ok: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    messages: list = field(default_factory=list)  # the request's messages (for the oracle)
    reply: str = ""


async def closed_loop(*, ports: list[int], api_key: str | None, workload: Workload, concurrency: int,
                      warmup_s: float, duration_s: float, on_window) -> tuple[list[Record], float, float]:
    """`concurrency` slots; each runs conversations one after another (the next
    conversation index from a shared counter), each turn sent when the previous
    one ended. Requests rotate over `ports` (one per gateway process). New
    requests stop at the end of the window; those in flight are awaited."""
    records: list[Record] = []
    next_conversation = iter(range(10**9))
    next_port = iter(range(10**18))
    window = [float("inf"), float("inf")]
    stop = False

    async def slot(index: int) -> None:
        await asyncio.sleep(index * 0.05)  # stagger the first turns
        conns: dict[int, Connection] = {}
        try:
            while not stop:
                conv = workload.conversation(next(next_conversation))
                for turn, (user, max_tokens) in enumerate(zip(conv.users, conv.max_tokens)):
                    if stop:
                        return
                    messages = conv.messages + [{"role": "user", "content": user}]
                    port = ports[next(next_port) % len(ports)]
                    conn = conns.get(port)
                    if conn is None or conn.lost or conn.server_closes:
                        if conn is not None:
                            conn.close()
                        conn = conns[port] = await reopen(HOST, port)
                    # ignore_eos: every reply has its drawn length (as SGLang's bench_serving).
                    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}
                    record = Record(conv.index, turn, conv.tenant, port, time.perf_counter(), messages=messages)
                    records.append(record)
                    result = Result(collect_text=True)
                    try:
                        await conn.request(request_bytes(port, body, api_key), REQUEST_TIMEOUT_S, result)
                    except (ConnectionError, ResponseError, OSError) as error:
                        record.error = repr(error)[:300]
                        conn.close()
                        conns.pop(port, None)
                        break  # the conversation cannot go on without its reply
                    record.t_write, record.t_first, record.t_end = result.t_write, result.t_first, result.t_end
                    usage = result.usage or {}
                    record.prompt_tokens = usage.get("prompt_tokens") or 0
                    record.completion_tokens = usage.get("completion_tokens") or 0
                    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    record.reply = "".join(result.text)
                    record.ok = result.ok and result.tokens > 0 and bool(usage)
                    if not record.ok:
                        record.error = result.describe() + ("" if usage else " (no usage)")
                        break
                    conv.messages = messages + [{"role": "assistant", "content": record.reply}]
        finally:
            for conn in conns.values():
                conn.close()

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(slot(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        window[0] = time.perf_counter()
        await on_window("start")
        await asyncio.sleep(duration_s)
        window[1] = time.perf_counter()
        await on_window("end")
        stop = True
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5)
    finally:
        stop = True
        for task in tasks:
            task.cancel()
    return records, window[0], window[1]


# A first turn that found fewer cached tokens than this found none of its system prompt.
FIRST_TURN_MISS_TOKENS = 64


# ------------------------------------------------------------------ oracle --
class Tokens:
    """Token ids of chat prompts as the simulator computes them. Each message renders
    as `<|role|>\\n{content}\\n` and tokenizes on its own (pieces never cross a
    message boundary), so a prompt's ids are the concatenation of its messages'."""

    def __init__(self) -> None:
        from inference.sim.tokenizer import tokenize

        self._tokenize = tokenize
        self._cache: dict[tuple[str, str], list[int]] = {}
        self.header = tokenize("<|assistant|>\n")

    def message(self, role: str, content: str) -> list[int]:
        key = (role, content)
        ids = self._cache.get(key)
        if ids is None:
            ids = self._cache[key] = self._tokenize(f"<|{role}|>\n{content}\n")
        return ids

    def prompt(self, messages: list[dict]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += self.message(m["role"], m["content"])
        return ids + self.header

    def reply(self, text: str) -> list[int]:
        return self._tokenize(text)


def oracle(records: list[Record], tokens: Tokens, t0: float, t1: float) -> dict:
    """Unbounded prefix cache, perfect affinity: every request finds the longest
    prefix of its prompt that any earlier request's prompt + reply had (on any
    backend), except the last prompt token (always recomputed, as SGLang does).
    Replayed in send order over the whole run; counted over the requests started
    in the window, like the measured hit rate."""
    from inference.sim.radix_cache import RadixCache

    cache = RadixCache(capacity_tokens=1 << 60)
    prompt_total = cached_total = mismatched = 0
    first = [0, 0]  # first turns: prompt, cached
    first_misses = 0  # first turns that find none of their system prompt
    for r in sorted((r for r in records if r.ok), key=lambda r: r.t_write):
        ids = tokens.prompt(r.messages)
        hit = cache.match_prefix(ids[:-1]).length
        cache.insert(ids + tokens.reply(r.reply))
        if t0 <= r.t_write < t1:
            prompt_total += len(ids)
            cached_total += hit
            mismatched += len(ids) != r.prompt_tokens
            if r.turn == 0:
                first[0] += len(ids)
                first[1] += hit
                first_misses += hit < FIRST_TURN_MISS_TOKENS
    later = (prompt_total - first[0], cached_total - first[1])
    return {"hit_rate": cached_total / prompt_total if prompt_total else None, "prompt_tokens": prompt_total,
            "cached_tokens": cached_total, "prompt_length_mismatches": mismatched,
            "first_turn_hit_rate": first[1] / first[0] if first[0] else None,
            "first_turn_misses": first_misses,
            "later_turn_hit_rate": later[1] / later[0] if later[0] else None}


# ---------------------------------------------------------------- analysis --
def summarize(records: list[Record], t0: float, t1: float, time_scale: float) -> dict:
    started = [r for r in records if t0 <= r.t_write < t1]
    ok_started = [r for r in started if r.ok]
    ended = [r for r in records if r.ok and t0 <= r.t_end < t1]
    sim_window_s = (t1 - t0) / time_scale
    prompt = sum(r.prompt_tokens for r in ok_started)
    cached = sum(r.cached_tokens for r in ok_started)
    ttft = [(r.t_first - r.t_write) / time_scale * 1e3 for r in ok_started]
    tokens_done = sum(r.prompt_tokens + r.completion_tokens for r in ended)
    errors = [r for r in records if not r.ok and r.error]
    return {
        "turns": turn_breakdown(records, t0, t1),
        "window_wall_s": round(t1 - t0, 3), "window_sim_s": round(sim_window_s, 3),
        "requests_started": len(started), "requests_completed": len(ended),
        "hit_rate": cached / prompt if prompt else None, "prompt_tokens": prompt, "cached_tokens": cached,
        "throughput_tokens_per_s": tokens_done / sim_window_s,
        "generated_tokens_per_s": sum(r.completion_tokens for r in ended) / sim_window_s,
        "requests_per_s": len(ended) / sim_window_s,
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "errors": len(errors), "error_samples": [r.error for r in errors[:5]],
        "conversations_started": len({r.conversation for r in records}),
        "requests_total": len(records),
    }


def turn_breakdown(records: list[Record], t0: float, t1: float) -> dict:
    """Where the hits come from (requests started in the window): first turns (only a
    system prompt to find) vs later turns, and for later turns whether the previous
    turn's whole sequence (prompt + reply) was found ("history kept"), only about the
    system prompt (the turn went elsewhere or its history was evicted), or less."""
    previous: dict[tuple[int, int], Record] = {(r.conversation, r.turn): r for r in records if r.ok}
    first_p = first_c = later_p = later_c = kept = system_only = less = 0
    first_n = first_misses = 0
    miss_gaps: list[float | None] = []  # per first-turn miss: wall s since its tenant's last request ended
    tenant_last_end: dict[int, float] = {}
    for r in sorted(records, key=lambda r: r.t_write):
        if not r.ok:
            continue
        last_end = tenant_last_end.get(r.tenant)
        if r.t_end:
            tenant_last_end[r.tenant] = max(r.t_end, last_end or 0.0)
        if not t0 <= r.t_write < t1:
            continue
        if r.turn == 0:
            first_p += r.prompt_tokens
            first_c += r.cached_tokens
            first_n += 1
            if r.cached_tokens < FIRST_TURN_MISS_TOKENS:
                first_misses += 1
                miss_gaps.append(None if last_end is None else round(max(0.0, r.t_write - last_end), 2))
            continue
        later_p += r.prompt_tokens
        later_c += r.cached_tokens
        prev = previous.get((r.conversation, r.turn - 1))
        if prev is None:
            continue
        if r.cached_tokens >= prev.prompt_tokens + prev.completion_tokens - 1:
            kept += 1
        elif r.cached_tokens >= 0.9 * len(r.messages[0]["content"].split()):
            system_only += 1
        else:
            less += 1
    later = kept + system_only + less
    return {"first_turn_hit_rate": first_c / first_p if first_p else None,
            "first_turns": first_n, "first_turn_misses": first_misses, "first_turn_miss_gaps_s": miss_gaps,
            "later_turn_hit_rate": later_c / later_p if later_p else None,
            "later_turns": later, "history_kept": kept / later if later else None,
            "system_prompt_only": system_only / later if later else None,
            "less_than_system_prompt": less / later if later else None}


class BackendSampler:
    """Each simulator's batch, queue and KV cache every `interval_s` (wall) while
    the window runs, in a thread of its own: where a backend ran short of KV or
    built a queue, which the window's totals average away."""

    def __init__(self, urls: list[str], interval_s: float = 0.25) -> None:
        self.urls = urls
        self.interval_s = interval_s
        self.samples: list[list[dict]] = []  # per sample time, one dict per backend
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="backend-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                stats = sim_stats(self.urls)
            except (OSError, urllib.error.URLError, ValueError):
                continue
            self.samples.append([{
                "running": s["engine"]["running_requests"], "queued": s["engine"]["queued_requests"],
                "used": s["engine"]["used_tokens"], "evictable": s["cache"]["evictable_tokens"],
                "capacity": s["engine"]["max_total_tokens"]} for s in stats])

    def summary(self) -> list[dict]:
        """Per backend: mean running and queued requests, the share of samples with a
        queue, mean and peak KV in use by running requests (of capacity), and the
        mean KV left to finished requests' cache (of capacity)."""
        out = []
        n = len(self.samples)
        for i in range(len(self.urls)):
            series = [sample[i] for sample in self.samples]
            if not series:
                out.append({})
                continue
            capacity = series[0]["capacity"] or 1
            out.append({
                "samples": n,
                "running_mean": sum(s["running"] for s in series) / n,
                "queued_mean": sum(s["queued"] for s in series) / n,
                "queued_max": max(s["queued"] for s in series),
                "queued_share": sum(s["queued"] > 0 for s in series) / n,
                "kv_used_mean": sum(s["used"] for s in series) / n / capacity,
                "kv_used_max": max(s["used"] for s in series) / capacity,
                "kv_cached_mean": sum(s["evictable"] for s in series) / n / capacity,
            })
        return out


def sim_delta(before: list[dict], after: list[dict]) -> dict:
    out = {"per_backend": []}
    for b, a in zip(before, after):
        out["per_backend"].append({
            "requests_finished": a["requests_finished"] - b["requests_finished"],
            "prompt_tokens": a["prompt_tokens_total"] - b["prompt_tokens_total"],
            "cached_tokens": a["cached_tokens_total"] - b["cached_tokens_total"],
            "completion_tokens": a["completion_tokens_total"] - b["completion_tokens_total"],
            "evicted_tokens": a["cache"]["evicted_tokens_total"] - b["cache"]["evicted_tokens_total"],
            "schedule_lag_resets": a["engine"]["schedule_lag_resets"] - b["engine"]["schedule_lag_resets"],
        })
    per = out["per_backend"]
    for p in per:
        p["hit_rate"] = p["cached_tokens"] / p["prompt_tokens"] if p["prompt_tokens"] else None
    total = sum(p["requests_finished"] for p in per) or 1
    out["request_share"] = [p["requests_finished"] / total for p in per]
    prompt = sum(p["prompt_tokens"] for p in per)
    out["hit_rate"] = sum(p["cached_tokens"] for p in per) / prompt if prompt else None
    out["schedule_lag_resets"] = sum(p["schedule_lag_resets"] for p in per)
    out["evicted_tokens"] = sum(p["evicted_tokens"] for p in per)
    return out


def seed_comparison(rows: dict, seeds: dict, main_seed: int) -> list[dict]:
    """cache_aware against sgl-router on each seed both ran: hit rate, its oracle,
    throughput and TTFT p99 of each."""
    out = []
    for seed, seed_rows in [(main_seed, rows)] + [(int(k), v) for k, v in seeds.items()]:
        ca, sg = seed_rows.get("cache_aware"), seed_rows.get("sgl_router")
        if not (ca and sg) or ca.get("hit_rate") is None or sg.get("hit_rate") is None:
            continue
        out.append({"seed": seed, **{
            f"{prefix}_{field}": value
            for prefix, row in (("cache_aware", ca), ("sgl_router", sg))
            for field, value in (("hit_rate", row["hit_rate"]), ("oracle", row["oracle"]["hit_rate"]),
                                 ("tokens_per_s", row["throughput_tokens_per_s"]),
                                 ("ttft_p99_ms", row["ttft_ms"]["p99"]))}})
    return out


def baseline_comparison(rows: dict, seeds: dict, main_seed: int) -> list[dict]:
    """cache_aware against round_robin (throughput) and least_outstanding (TTFT p99)
    on each seed all three ran."""
    out = []
    for seed, seed_rows in [(main_seed, rows)] + [(int(k), v) for k, v in seeds.items()]:
        ca, rr, lo = (seed_rows.get(name) for name in ("cache_aware", "round_robin", "least_outstanding"))
        if not (ca and rr and lo) or not rr["throughput_tokens_per_s"]:
            continue
        out.append({"seed": seed, "cache_aware_tokens_per_s": ca["throughput_tokens_per_s"],
                    "round_robin_tokens_per_s": rr["throughput_tokens_per_s"],
                    "throughput_ratio": ca["throughput_tokens_per_s"] / rr["throughput_tokens_per_s"],
                    "cache_aware_ttft_p99_ms": ca["ttft_ms"]["p99"],
                    "least_outstanding_ttft_p99_ms": lo["ttft_ms"]["p99"]})
    return out


def analyse(rows: dict, seeds: dict | None = None, main_seed: int = 1) -> dict:
    goals = []

    def goal(text: str, value, limit, ok_when: str, unit: str = "", note: str = "") -> None:
        if value is None or limit is None:
            goals.append({"goal": text, "value": value, "limit": limit, "met": None, "note": "not measured"})
            return
        met = value <= limit if ok_when == "<=" else value >= limit
        goals.append({"goal": text, "value": round(value, 4), "limit": round(limit, 4), "unit": unit, "met": met,
                      "note": note})

    ca, rr = rows.get("cache_aware"), rows.get("round_robin")
    lo, sg = rows.get("least_outstanding"), rows.get("sgl_router")
    ca4 = rows.get("cache_aware_4p")

    def get(row, *path):
        value = row
        for p in path:
            if value is None:
                return None
            value = value.get(p)
        return value

    ca_tput, rr_tput = get(ca, "throughput_tokens_per_s"), get(rr, "throughput_tokens_per_s")
    goal(f"cache_aware throughput >= 1.9x round_robin (seed {main_seed})",
         ca_tput / rr_tput if ca_tput and rr_tput else None, 1.9, ">=", "x")
    baselines = baseline_comparison(rows, seeds or {}, main_seed)
    if len(baselines) > 1:
        ratios = [b["throughput_ratio"] for b in baselines]
        goal(f"cache_aware throughput >= 1.9x round_robin (mean ratio over seeds "
             f"{', '.join(str(b['seed']) for b in baselines)})", sum(ratios) / len(ratios), 1.9, ">=", "x",
             note=f"at least 1.9x on {sum(r >= 1.9 for r in ratios)} of {len(ratios)} seeds")
    by_seed = seed_comparison(rows, seeds or {}, main_seed)
    # Means of the rates and throughputs (a mean of p99s would be no percentile).
    means = {field: sum(s[field] for s in by_seed) / len(by_seed) for field in by_seed[0]
             if field != "seed" and not field.endswith("_p99_ms")} if by_seed else {}
    goal(f"cache_aware hit rate >= sgl-router's (seed {main_seed})", get(ca, "hit_rate"), get(sg, "hit_rate"), ">=")
    if len(by_seed) > 1:
        goal(f"cache_aware hit rate >= sgl-router's (mean over seeds {', '.join(str(s['seed']) for s in by_seed)})",
             means["cache_aware_hit_rate"], means["sgl_router_hit_rate"], ">=",
             note=f"ahead on {sum(s['cache_aware_hit_rate'] >= s['sgl_router_hit_rate'] for s in by_seed)} "
                  f"of {len(by_seed)} seeds")
    oracle_hit = get(ca, "oracle", "hit_rate")
    goal("cache_aware hit rate >= 90% of the oracle's",
         get(ca, "hit_rate") / oracle_hit if get(ca, "hit_rate") is not None and oracle_hit else None, 0.9, ">=",
         "of oracle", f"oracle {oracle_hit:.1%}" if oracle_hit else "")
    goal(f"cache_aware TTFT p99 <= least_outstanding's (seed {main_seed})", get(ca, "ttft_ms", "p99"),
         get(lo, "ttft_ms", "p99"), "<=", "ms")
    if len(baselines) > 1:
        # p99s of different workloads do not average: the goal holds seed by seed.
        goal(f"cache_aware TTFT p99 <= least_outstanding's on every seed "
             f"({', '.join(str(b['seed']) for b in baselines)})",
             sum(b["cache_aware_ttft_p99_ms"] <= b["least_outstanding_ttft_p99_ms"] for b in baselines),
             len(baselines), ">=", "seeds")
    multi = {}
    for name, row in (("shared_homes", ca4), ("local_only", rows.get("cache_aware_4p_local"))):
        if ca and row and ca.get("hit_rate") is not None and row.get("hit_rate") is not None:
            multi[name] = {"hit_rate_1p": ca["hit_rate"], "hit_rate_4p": row["hit_rate"],
                           "difference_points": 100 * (row["hit_rate"] - ca["hit_rate"]),
                           "throughput_ratio": row["throughput_tokens_per_s"] / ca["throughput_tokens_per_s"],
                           "history_kept_4p": row["turns"]["history_kept"]}
    return {"goals": goals, "multiprocess": multi, "seeds": by_seed, "seeds_mean": means, "baselines": baselines}


def render(results: dict, meta: dict) -> str:
    lines = []
    out = lines.append
    dp_size = meta.get("dp_size", 1)
    ranks = f" of {dp_size} data-parallel ranks each" if dp_size > 1 else ""
    out(f"routing: multi-tenant chat over {meta['backends']} simulator backends{ranks}, closed loop of "
        f"{meta['concurrency']} concurrent conversations")
    out("workload: " + meta["workload"])
    out(f"backends: {meta['simulator']}")
    host = meta.get("hicache_ratio", 0) or 0
    host_pool = (f" over a host pool (HiCache) of {round(host * meta['max_total_tokens']):,}" if host else "")
    out(f"cache pressure: one {'rank' if dp_size > 1 else 'backend'}'s KV holds {meta['max_total_tokens']:,} "
        f"tokens{host_pool}; system prompts alone are "
        f"{meta['system_tokens_total']:,} tokens; the active conversations' sequences in the cache-aware window "
        f"average {meta['active_set_tokens']:,} tokens (system prompts counted once)")
    out(f"per target: cold caches, {meta['warmup_s']:.0f} s warm-up + {meta['duration_s']:.0f} s window (wall) = "
        f"{meta['duration_s'] / meta['time_scale']:.1f} simulated s; gateway: {meta['gateway']}")
    out(f"sgl-router: sglang-router {meta['versions'].get('sglang-router', '?')} "
        f"{' '.join(meta.get('router_flags', ROUTER_FLAGS))}")
    out("")
    head = (f"{'target':<34} {'hit rate':>8} {'oracle':>7} {'tok/s':>8} {'gen tok/s':>9} {'req/s':>6} "
            f"{'TTFT p50':>9} {'p99':>8} {'err':>4} {'lag':>4}  backend request share")
    out(head)
    out("-" * len(head))
    for name, row in results["targets"].items():
        share = "/".join(f"{100 * s:.0f}" for s in row["sim"]["request_share"])
        oracle_hit = row["oracle"]["hit_rate"]
        out(f"{row['label']:<34} {fmt(100 * row['hit_rate'] if row['hit_rate'] is not None else None, 1):>7}% "
            f"{fmt(100 * oracle_hit if oracle_hit is not None else None, 1):>6}% "
            f"{row['throughput_tokens_per_s']:>8.0f} {row['generated_tokens_per_s']:>9.0f} "
            f"{row['requests_per_s']:>6.1f} {fmt(row['ttft_ms']['p50'], 0):>9} {fmt(row['ttft_ms']['p99'], 0):>8} "
            f"{row['errors']:>4} {row['sim']['schedule_lag_resets']:>4}  {share} %")
    out("(hit rate = Σ cached_tokens / Σ prompt_tokens from the responses' usage, requests started in the window;")
    out(" oracle = the same requests against an unbounded cache with perfect affinity (longest prefix any earlier")
    out("   request's prompt + reply had, last prompt token recomputed);")
    out(" tok/s = (prompt + completion tokens) of requests completed in the window per simulated second, gen tok/s =")
    out("   completion tokens only; simulated s = wall s / time scale;")
    out(" TTFT = client: request written -> first content token, in simulated ms (wall / time scale), requests")
    out("   started in the window; err = failed requests (the conversation is abandoned);")
    out(" lag = simulator schedule-lag resets in the window (a busy CPU stretched simulated time; should be ~0))")
    for name, row in results["targets"].items():
        if row["errors"]:
            out(f"  errors {row['label']}: {row['error_samples'][:3]}")
    noisy = [row for row in results["targets"].values() if row["sim"]["schedule_lag_resets"] > 20]
    if noisy:
        out("  WARNING: the simulators fell behind their schedule (CPU starved) during "
            + ", ".join(r["label"] for r in noisy) + ": rerun on a quieter machine or with a larger --time-scale")
    out("")
    out(f"{'hits by turn':<34} {'first turns':>11} {'oracle':>7} {'later turns':>11} {'oracle':>7} "
        f"{'history found':>13} {'first-turn misses':>17}")
    for row in results["targets"].values():
        turns, orc = row["turns"], row["oracle"]

        def p(value):
            return f"{fmt(100 * value if value is not None else None, 1)}%"

        out(f"{row['label']:<34} {p(turns['first_turn_hit_rate']):>11} {p(orc.get('first_turn_hit_rate')):>7} "
            f"{p(turns['later_turn_hit_rate']):>11} {p(orc.get('later_turn_hit_rate')):>7} "
            f"{p(turns['history_kept']):>13} "
            f"{turns['first_turn_misses']:>5} of {turns['first_turns']:<4} (oracle {orc.get('first_turn_misses')})")
    out("(history found = later turns whose cached tokens cover the previous turn's prompt + reply;")
    out(f" first-turn misses = first turns that found fewer than {FIRST_TURN_MISS_TOKENS} cached tokens, none of their "
        "system prompt;")
    out("   the oracle misses only a tenant's first conversation)")
    for row in results["targets"].values():
        gaps = row["turns"]["first_turn_miss_gaps_s"]
        if gaps:
            shown = ", ".join("first" if g is None else f"{g / meta['time_scale']:.1f}" for g in gaps[:12])
            out(f"  {row['label']}: first-turn misses, simulated s since the tenant's previous request ended "
                f"(first: none before): {shown}{' ...' if len(gaps) > 12 else ''}")
    touched = [row for row in results["targets"].values() if row.get("prefix_touches") is not None]
    if touched:
        out("prefix retention (one-token requests keeping a shared system prompt cached, inference/routing/"
            "retention.py), in the window: " + "; ".join(
                f"{row['label']} {row['prefix_touches']} (beside {row['requests_completed']} requests)" for row in touched))
    out("")
    out(f"{'by backend (seed ' + str(meta['workload_spec']['seed']) + ')':<34} "
        "requests / hit rate / evicted tokens / running / queued (mean, max, share of time) / KV used (mean, max)")
    for row in results["targets"].values():
        for i, b in enumerate(row["sim"]["per_backend"]):
            if "running_mean" not in b:
                continue
            hit = fmt(100 * b["hit_rate"] if b["hit_rate"] is not None else None, 1)
            out(f"{row['label'] if i == 0 else '':<34} {i}: {b['requests_finished']:>5} / {hit:>5}% / "
                f"{b['evicted_tokens'] / 1e3:>5.0f}k / {b['running_mean']:>4.1f} / {b['queued_mean']:>4.1f}, "
                f"{b['queued_max']:>2}, {100 * b['queued_share']:>3.0f}% / {100 * b['kv_used_mean']:>3.0f}, "
                f"{100 * b['kv_used_max']:>3.0f}%")
    out("(sampled every 0.25 wall s in the window; KV used = tokens held by running requests, of the capacity)")
    out("")
    by_seed = results["analysis"].get("seeds") or []
    if len(by_seed) > 1:
        out(f"{'cache_aware vs sgl-router by seed':<34} {'hit rate':>9} {'oracle':>7} {'tok/s':>8} {'TTFT p99':>9}   "
            f"{'sgl hit':>8} {'oracle':>7} {'tok/s':>8} {'TTFT p99':>9}")
        def seed_row(label: str, s: dict, *, ttft: bool) -> str:
            """One line of the table: hit rate, oracle, tok/s (and TTFT p99) of each router."""
            def cells(who: str) -> str:
                line = (f"{100 * s[who + '_hit_rate']:>8.2f}% {100 * s[who + '_oracle']:>6.2f}% "
                        f"{s[who + '_tokens_per_s']:>8.0f}")
                return line + (f" {s[who + '_ttft_p99_ms']:>9.0f}" if ttft else "")
            sgl = cells("sgl_router")[1:]  # its column is a character narrower
            return f"{label:<34} {cells('cache_aware')}{'' if ttft else ' ' + ' ' * 9}   {sgl}"

        for s in by_seed:
            out(seed_row("seed " + str(s["seed"]), s, ttft=True))
        out(seed_row("mean", results["analysis"]["seeds_mean"], ttft=False))
        out("(seeds after the first: " + ", ".join(SEED_TARGETS) + " only, same windows; oracle = each target's "
            "own requests)")
        out("")
    baselines = results["analysis"].get("baselines") or []
    if len(baselines) > 1:
        out(f"{'cache_aware vs the load-only policies':<34} {'tok/s':>9} {'rr tok/s':>9} {'ratio':>6}   "
            f"{'TTFT p99':>9} {'lo p99':>7}")
        for b in baselines:
            out(f"{'seed ' + str(b['seed']):<34} {b['cache_aware_tokens_per_s']:>9.0f} "
                f"{b['round_robin_tokens_per_s']:>9.0f} {b['throughput_ratio']:>5.2f}x   "
                f"{b['cache_aware_ttft_p99_ms']:>9.0f} {b['least_outstanding_ttft_p99_ms']:>7.0f}")
        out("")
    multi = results["analysis"]["multiprocess"]
    for name, text in (("shared_homes", "prefix trees per process, conversation homes shared in Redis"),
                       ("local_only", "everything per process (GATEWAY_ROUTING_SHARED_HOMES=0)")):
        m = multi.get(name)
        if m:
            out(f"routing state: {text}. {meta['gateway_processes']} processes vs 1: hit rate "
                f"{100 * m['hit_rate_4p']:.1f}% vs {100 * m['hit_rate_1p']:.1f}% ({m['difference_points']:+.1f} "
                f"points), throughput x{m['throughput_ratio']:.2f}, later turns finding their history "
                f"{100 * (m['history_kept_4p'] or 0):.1f}%")
    ca = results["targets"].get("cache_aware")
    if ca:
        out(f"oracle (cache_aware's requests): {100 * ca['oracle']['hit_rate']:.1f}% hit rate")
    out("")
    out("goal (this run):")
    for g in results["analysis"]["goals"]:
        mark = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT MET")
        if g["value"] is None or g["limit"] is None:
            detail = ""
        elif g.get("unit") == "ms":
            detail = f": {g['value']:.0f} ms vs {g['limit']:.0f} ms"
        elif g.get("unit") == "x":
            detail = f": {g['value']:.2f}x"
        elif g.get("unit") == "seeds":
            detail = f": {g['value']:.0f} of {g['limit']:.0f} seeds"
        elif g.get("unit") == "of oracle":
            detail = f": {100 * g['value']:.1f}% of the oracle"
        else:
            detail = f": {100 * g['value']:.1f}% vs {100 * g['limit']:.1f}%"
        out(f"  [{mark}] {g['goal']}{detail}" + (f"  ({g['note']})" if g.get("note") else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------- main --
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=24.0, help="measurement window per target, wall s")
    parser.add_argument("--warmup", type=float, default=12.0, help="warm-up per target (from cold), wall s")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent conversations (closed loop)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="subset of " + ",".join(TARGETS))
    parser.add_argument("--seed", type=int, default=1, help="workload seed of every target")
    parser.add_argument("--more-seeds", default="2,3",
                        help="further workload seeds on which " + ", ".join(SEED_TARGETS)
                        + " run again (those of --targets; comma-separated, '' for none)")
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--user-tokens", default="100,1200", help="user message length range, tokens")
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--preset", default="h100-8b", help="simulator hardware preset")
    parser.add_argument("--max-total-tokens", type=int, default=96_000,
                        help="KV capacity of each simulator (of each rank with --dp-size), tokens")
    parser.add_argument("--dp-size", type=int, default=1,
                        help="data-parallel ranks of each simulator, each with its own scheduler and cache")
    parser.add_argument("--hicache-ratio", type=float, default=0.0,
                        help="give each simulator a hierarchical cache (HiCache) whose host pool is this many "
                             "times its KV pool (0: none)")
    parser.add_argument("--radix-eviction-policy", default="lru",
                        help="the simulators' --radix-eviction-policy (SGLang's: lru, lfu, slru, priority, tlru)")
    parser.add_argument("--radix-eviction-policy-config", default=None, metavar="JSON",
                        help="the simulators' --radix-eviction-policy-config")
    parser.add_argument("--time-scale", type=float, default=2.0,
                        help="simulator wall seconds per simulated second (>1: slower than real time)")
    parser.add_argument("--gateway-processes", type=int, default=4, help="processes of the multi-process target")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis DB number for the gateway processes")
    parser.add_argument("--db", default="llmplatform_bench_routing", help="PostgreSQL database for the gateway")
    parser.add_argument("--keep-db", action="store_true",
                        help="reuse the database as it is (default: drop and re-create it, then migrate)")
    parser.add_argument("--tree", default=str(ROOT),
                        help="project tree whose simulator, gateway and manage.py run (default: this one)")
    parser.add_argument("--json", default=str(RESULTS / "routing.json"), help="results file")
    args = parser.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    args.more_seeds = [int(v) for v in args.more_seeds.split(",") if v.strip()]
    if args.seed in args.more_seeds:
        parser.error("--more-seeds must not repeat --seed")
    for target in args.targets:
        if target not in TARGETS:
            parser.error(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    return args


def main() -> int:
    args = parse_args()
    loadavg_before = os.getloadavg()
    LOGS.mkdir(parents=True, exist_ok=True)
    tree = Path(args.tree).resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{tree / 'platform'}{os.pathsep}{tree}"
    env["POSTGRES_DB"] = args.db
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    env["REDIS_URL"] = f"redis://127.0.0.1:6379/{args.redis_db}"
    env["CHANNEL_LAYER_REDIS_URL"] = f"redis://127.0.0.1:6379/{args.redis_db}"
    env["GATEWAY_REGISTRY_REFRESH_SECONDS"] = "0.5"
    env["GATEWAY_FIRST_CHUNK_TIMEOUT_SECONDS"] = str(REQUEST_TIMEOUT_S)
    env["GATEWAY_UPSTREAM_READ_TIMEOUT"] = str(REQUEST_TIMEOUT_S)
    # A spool folder of this run only: files left by an earlier run's gateways (stopped with
    # events not yet shipped) must not be replayed into this run's fresh database.
    spool = RESULTS / "spool" / "routing"
    shutil.rmtree(spool, ignore_errors=True)
    env["GATEWAY_USAGE_SPOOL_DIR"] = str(spool)
    env.setdefault("LOG_LEVEL", "WARNING")
    py = sys.executable
    spec = WorkloadSpec(seed=args.seed, tenants=args.tenants, zipf_s=args.zipf,
                        user_tokens=tuple(int(v) for v in args.user_tokens.split(",")))
    workload = Workload(spec)
    sim_flags = ["--preset", args.preset, "--max-total-tokens", str(args.max_total_tokens),
                 "--time-scale", str(args.time_scale), "--enable-cache-report", "--seed", "0"]
    if args.dp_size > 1:
        sim_flags += ["--dp-size", str(args.dp_size)]
    router_flags = ROUTER_FLAGS + (["--dp-aware"] if args.dp_size > 1 else [])
    if args.radix_eviction_policy != "lru":  # (a --tree from before the flag runs with SGLang's default)
        sim_flags += ["--radix-eviction-policy", args.radix_eviction_policy]
    if args.radix_eviction_policy_config is not None:
        sim_flags += ["--radix-eviction-policy-config", args.radix_eviction_policy_config]
    if args.hicache_ratio > 0:
        sim_flags += ["--enable-hierarchical-cache", "--hicache-ratio", str(args.hicache_ratio)]

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    procs = Processes(tree, LOGS)
    ports = free_ports(args.backends + args.gateway_processes + 2)
    sim_ports = ports[:args.backends]
    gw_ports = ports[args.backends:args.backends + args.gateway_processes]
    router_port, prom_port = ports[-2:]
    sim_urls = [f"http://{HOST}:{p}" for p in sim_ports]
    results = {"targets": {}, "seeds": {}}
    tokens = Tokens()
    active_set = None
    try:
        print(f"starting {args.backends} simulators ({' '.join(sim_flags)}) on {sim_ports}", file=sys.stderr,
              flush=True)
        sims = []
        for i, port in enumerate(sim_ports):
            sims.append(procs.start(f"sim{i}", [py, "-m", "inference.sim", "--host", HOST, "--port", str(port),
                                                "--served-model-name", MODEL, "--log-level", "warning",
                                                *sim_flags], core=None, env=env))
        api_key = db_prepare(args.db, env, sim_urls, tree=tree, recreate=not args.keep_db, model=MODEL,
                             tenant=TENANT)
        wait_until("simulators", lambda: all(http("GET", u + "/health")[0] == 200 for u in sim_urls), procs)
        rows_before = usage_rows(args.db, TENANT)
        gateway_requests = 0
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)

        def run_target(name: str, workload: Workload) -> tuple[dict, list[Record], float, float]:
            """One target, from cold, over `workload`: its row of results, records and window."""
            nonlocal gateway_requests
            label, kind, policy, nproc, gateway_settings = TARGETS[name]
            if kind == "gateway" and nproc > 1:
                nproc = args.gateway_processes
                label = label.replace("4 ", f"{nproc} ")
            if kind == "router" and args.dp_size > 1:
                label += " --dp-aware"
            target_env = {**env, **gateway_settings}
            # Every target starts cold: no conversation homes (nor limit counters) left by the previous one.
            redis_flush(env["REDIS_URL"])
            started: list[subprocess.Popen] = []
            if kind == "gateway":
                with pg_connect(args.db) as conn:
                    conn.execute("update inference_servedmodel set routing_policy = %s where name = %s",
                                 (policy, MODEL))
                for i in range(nproc):
                    started.append(procs.start(
                        f"gateway-{name}-{i}",
                        [py, "-m", "uvicorn", "config.asgi:application", "--app-dir", "platform", "--host", HOST,
                         "--port", str(gw_ports[i]), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on",
                         "--no-access-log", "--log-level", "warning",
                         # A slot's connection to one of 4 processes can idle past uvicorn's 5 s default;
                         # closing it just as the slot reuses it would fail a request.
                         "--timeout-keep-alive", "75"], core=None, env=target_env))
                target_ports, key = gw_ports[:nproc], api_key
            else:
                started.append(procs.start("sgl-router", [
                    py, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(router_port),
                    "--worker-urls", *sim_urls, *router_flags, "--prometheus-host", HOST,
                    "--prometheus-port", str(prom_port)], core=None, env=env))
                target_ports, key = [router_port], None
            print(f"[{name}] {label}: ports {target_ports}", file=sys.stderr, flush=True)
            for port in target_ports:
                probe = request_bytes(port, {"model": MODEL, "max_tokens": 4, "stream": True,
                                             "messages": [{"role": "user", "content": "ready?"}]}, key)

                async def ready(port=port, probe=probe) -> bool:
                    try:
                        conn = await Connection.open(HOST, port)
                    except OSError:
                        return False
                    try:
                        return (await conn.request(probe, 20)).ok
                    except (OSError, ResponseError):
                        return False
                    finally:
                        conn.close()

                wait_until(f"{label} on :{port}", lambda: uvloop.run(ready()), procs, 90, 0.5)
            sims_cold_start(sim_urls, procs)
            snaps: dict[str, list[dict]] = {}
            cpu: dict[str, dict] = {}
            pids = {f"sim{i}": p.pid for i, p in enumerate(sims)} | {f"target{i}": p.pid for i, p in enumerate(started)}

            sampler = BackendSampler(sim_urls)

            touches: dict[str, int] = {}

            async def on_window(tag: str) -> None:
                cpu[tag] = {"wall": time.perf_counter(), **{k: proc_cpu_seconds(v) for k, v in pids.items()}}
                snaps[tag] = await asyncio.get_running_loop().run_in_executor(executor, sim_stats, sim_urls)
                if kind == "gateway":
                    touches[tag] = await asyncio.get_running_loop().run_in_executor(
                        executor, gateway_touches, target_ports)
                if tag == "start":
                    sampler.start()
                else:
                    sampler.stop()

            gc.collect()
            try:
                records, t0, t1 = uvloop.run(closed_loop(
                    ports=target_ports, api_key=key, workload=workload, concurrency=args.concurrency,
                    warmup_s=args.warmup, duration_s=args.duration, on_window=on_window))
            finally:
                sampler.stop()
            procs.check_alive()
            row = {"label": label, "kind": kind, "policy": policy or "cache_aware (sgl-router)",
                   "gateway_processes": nproc, **summarize(records, t0, t1, args.time_scale)}
            row["sim"] = sim_delta(snaps["start"], snaps["end"])
            for backend, sampled in zip(row["sim"]["per_backend"], sampler.summary()):
                backend.update(sampled)
            row["oracle"] = oracle(records, tokens, t0, t1)
            if touches:
                # Gateway processes publish their counters every 2 s: the window's, give or take that.
                row["prefix_touches"] = touches["end"] - touches["start"]
            wall = cpu["end"]["wall"] - cpu["start"]["wall"]
            row["cpu_percent"] = {
                "simulators": 100 * sum(cpu["end"][k] - cpu["start"][k] for k in pids if k.startswith("sim")) / wall,
                "target": 100 * sum(cpu["end"][k] - cpu["start"][k] for k in pids if k.startswith("target")) / wall,
            }
            if kind == "gateway":
                gateway_requests += len(records) + len(target_ports)
            hit = 100 * row["hit_rate"] if row["hit_rate"] is not None else None
            print(f"[{name}, seed {workload.spec.seed}] hit {fmt(hit, 1)}% "
                  f"(oracle {fmt(100 * row['oracle']['hit_rate'] if row['oracle']['hit_rate'] else None, 1)}%), "
                  f"{row['throughput_tokens_per_s']:.0f} tok/s, TTFT p50/p99 {fmt(row['ttft_ms']['p50'], 0)}/"
                  f"{fmt(row['ttft_ms']['p99'], 0)} ms, {row['requests_completed']} requests, errors {row['errors']}, "
                  f"lag resets {row['sim']['schedule_lag_resets']}, CPU sims {row['cpu_percent']['simulators']:.0f}% "
                  f"target {row['cpu_percent']['target']:.0f}%; {row['turns']}", file=sys.stderr, flush=True)
            procs.stop(started)
            return row, records, t0, t1

        for name in args.targets:
            row, records, t0, t1 = run_target(name, workload)
            if name == "cache_aware":
                # Average over the window of the active conversations' sequences, system prompts once.
                active_set = active_set_tokens(records, tokens, t0, t1)
            results["targets"][name] = row
        # The comparisons again on other seeds: one seed is one sample of tenants' prompt lengths,
        # popularity and arrival order.
        for seed in args.more_seeds:
            more = Workload(dataclasses.replace(spec, seed=seed))
            for name in [t for t in args.targets if t in SEED_TARGETS]:
                results["seeds"].setdefault(str(seed), {})[name] = run_target(name, more)[0]
        executor.shutdown()
        if gateway_requests:
            time.sleep(1.0)
            results["usage_check"] = {"rows_written": usage_rows(args.db, TENANT) - rows_before,
                                      "gateway_requests_sent": gateway_requests}
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()

    results["analysis"] = analyse(results["targets"], results["seeds"], args.seed)
    sim_desc = (f"{args.backends} x inference.sim --preset {args.preset} --max-total-tokens {args.max_total_tokens} "
                + (f"--dp-size {args.dp_size} " if args.dp_size > 1 else "")
                + f"--time-scale {args.time_scale} (1 simulated s = {args.time_scale} wall s), --enable-cache-report, "
                f"--radix-eviction-policy {args.radix_eviction_policy}"
                + (f" --radix-eviction-policy-config '{args.radix_eviction_policy_config}'"
                   if args.radix_eviction_policy_config is not None else "")
                + (f" --enable-hierarchical-cache --hicache-ratio {args.hicache_ratio}" if args.hicache_ratio > 0 else "")
                + ", same --seed (identical replies on every backend)")
    meta = {
        "backends": args.backends, "concurrency": args.concurrency, "workload": spec.describe(),
        "workload_spec": spec.__dict__, "simulator": sim_desc, "max_total_tokens": args.max_total_tokens,
        "system_tokens_total": workload.system_tokens_total(), "active_set_tokens": active_set or 0,
        "time_scale": args.time_scale, "warmup_s": args.warmup, "duration_s": args.duration,
        "gateway_processes": args.gateway_processes,
        "gateway": "uvicorn config.asgi:application, routing_policy set per phase in the DB, fresh processes per "
                   f"target, Redis DB {args.redis_db} flushed before each",
        "router_flags": router_flags, "dp_size": args.dp_size, "hicache_ratio": args.hicache_ratio,
        "versions": versions(), "tree": str(tree),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = render(results, meta)
    print(text)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **results}, indent=2, default=str) + "\n")
    print(f"\nresults: {path}")
    return 0


def active_set_tokens(records: list[Record], tokens: Tokens, t0: float, t1: float) -> int:
    """Tokens the backends would need to hold the active conversations at the window's
    midpoint: each in-flight or last-finished request's prompt + reply beyond its
    system prompt, plus each distinct system prompt once."""
    mid = (t0 + t1) / 2
    latest: dict[int, Record] = {}
    for r in records:
        if r.ok and r.t_write <= mid and (r.conversation not in latest or r.t_write > latest[r.conversation].t_write):
            latest[r.conversation] = r
    # Conversations still going on at the midpoint: a request after it exists, or in flight.
    going = {r.conversation for r in records if r.t_write > mid}
    total = 0
    systems = set()
    for conv, r in latest.items():
        if conv not in going and r.t_end < mid:
            continue
        system = r.messages[0]["content"]
        systems.add(system)
        total += len(tokens.prompt(r.messages)) + r.completion_tokens - len(tokens.message("system", system))
    total += sum(len(tokens.message("system", s)) for s in systems)
    return total


if __name__ == "__main__":
    sys.exit(main())
