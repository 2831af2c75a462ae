"""What operators see of the backend pools.

Health, the circuit breaker and in-flight counts live in each gateway process
(`registry.BackendState`). Every GATEWAY_POOL_REPORT_SECONDS each process
publishes its view of every backend to Redis, with the last minute of the
traffic it sent there (`TrafficWindow`: requests, failures, prompt, cached and
completion tokens, time to first token); the reports expire when their process
stops reporting. `pools_read` merges the live reports per model and backend for
`manage.py pool_status` and the admin's backend list.
"""
from __future__ import annotations

import os
import socket
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

# The traffic figures cover this many seconds, kept in buckets of BUCKET_SECONDS.
WINDOW_SECONDS = 60
BUCKET_SECONDS = 5
# Upper bounds (ms) of the time-to-first-token histogram's buckets; one more for the rest.
TTFT_BOUNDS_MS = (25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800)
_FIGURES = ("requests", "errors", "failed_attempts", "prompt_tokens", "cached_tokens", "completion_tokens")


class TrafficWindow:
    """One process's traffic to one backend: the last `WINDOW_SECONDS` (for
    the operators' view) and everything since the process started (counters
    for Prometheus). Cheap enough for every request's end: a few additions
    into the current bucket; a bucket leaving the window is added to the rest."""

    __slots__ = ("_buckets", "_past")

    def __init__(self) -> None:
        # [bucket number, requests, errors, failed attempts, prompt, cached,
        #  completion, ttft counts, ttft sum (ms)]
        self._buckets: deque[list] = deque()
        # What left the window, the same fields (its bucket number unused).
        self._past = self._bucket_new(0)

    @staticmethod
    def _bucket_new(number: int) -> list:
        return [number, 0, 0, 0, 0, 0, 0, [0] * (len(TTFT_BOUNDS_MS) + 1), 0.0]

    @staticmethod
    def _add(into: list, bucket: list) -> None:
        for index in range(1, 7):
            into[index] += bucket[index]
        counts = into[7]
        for index, count in enumerate(bucket[7]):
            counts[index] += count
        into[8] += bucket[8]

    def _bucket(self, now: float) -> list:
        number = int(now // BUCKET_SECONDS)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != number:
            buckets.append(self._bucket_new(number))
            oldest = number - WINDOW_SECONDS // BUCKET_SECONDS + 1
            while buckets[0][0] < oldest:
                self._add(self._past, buckets.popleft())
        return buckets[-1]

    def request_end(self, now: float, *, ok: bool, prompt_tokens: int, cached_tokens: int,
                    completion_tokens: int, ttft_ms: float | None) -> None:
        """A request served here ended (`ok`: as asked, else failed or cut off
        after its first token); `ttft_ms` for a stream that delivered one."""
        bucket = self._bucket(now)
        bucket[1] += 1
        if not ok:
            bucket[2] += 1
        bucket[4] += prompt_tokens
        bucket[5] += cached_tokens
        bucket[6] += completion_tokens
        if ttft_ms is not None:
            bucket[7][bisect_left(TTFT_BOUNDS_MS, ttft_ms)] += 1
            bucket[8] += ttft_ms

    def attempt_failed(self, now: float) -> None:
        """A request failed here before its first token (and was failed over, or refused)."""
        self._bucket(now)[3] += 1

    @staticmethod
    def _as_dict(sums: list) -> dict:
        return {**dict(zip(_FIGURES, sums[1:7])), "ttft_ms_buckets": sums[7], "ttft_ms_sum": round(sums[8], 3)}

    def totals(self, now: float) -> dict:
        """The window's sums: `_FIGURES`, `ttft_ms_buckets` and `ttft_ms_sum`."""
        oldest = int(now // BUCKET_SECONDS) - WINDOW_SECONDS // BUCKET_SECONDS + 1
        sums = self._bucket_new(0)
        for bucket in self._buckets:
            if bucket[0] >= oldest:
                self._add(sums, bucket)
        return self._as_dict(sums)

    def cumulative(self) -> dict:
        """The same sums since the process started."""
        sums = self._bucket_new(0)
        self._add(sums, self._past)
        for bucket in self._buckets:
            self._add(sums, bucket)
        return self._as_dict(sums)


def ttft_percentile(buckets: list[int], fraction: float) -> float | None:
    """The upper bound (ms) of the histogram bucket holding the `fraction`
    quantile; None without samples, infinity past the last bound."""
    total = sum(buckets)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank and count:
            return float(TTFT_BOUNDS_MS[index]) if index < len(TTFT_BOUNDS_MS) else float("inf")
    return float("inf")


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def report_key(namespace: str, process: str) -> str:
    return f"{namespace}:pool:{process}"


def report_build(models, now_monotonic: float, *, process: str, interval: float,
                 prefix_touches: int = 0, prefix_touch_misses: int = 0) -> bytes:
    """One process's report: every backend of every model as it sees it, and
    the prefix-retention touches it sent since it started (routing.retention)."""
    entries = []
    for model in models:
        for backend in model.backends:
            entries.append({
                "model": model.name,
                "url": backend.url,
                "status": backend.status,
                "healthy": backend.healthy,
                "failed_checks": backend.failed_checks,
                "circuit_open_seconds": round(max(0.0, backend.cooldown_until - now_monotonic), 3),
                "failures": backend.failures,
                "in_flight": backend.outstanding,
                "running": backend.running,
                "waiting": backend.waiting,
                "kv_usage": backend.kv_usage,
                "kv_tokens": backend.kv_tokens,
                "cache_tokens": backend.cache_tokens,
                "prefix_cache": backend.prefix_cache,
                **backend.traffic.totals(now_monotonic),
                "since_start": backend.traffic.cumulative(),
            })
    return orjson.dumps({"process": process, "at": time.time(), "interval": interval, "backends": entries,
                         "prefix_touches": prefix_touches, "prefix_touch_misses": prefix_touch_misses})


@dataclass
class BackendHealth:
    """One backend of one model, over every gateway process that reported it."""

    model: str
    url: str
    status: str = ""            # active / draining / disabled, as configured
    processes: int = 0          # gateway processes that reported it
    healthy_in: int = 0         # of those, how many see its health checks pass
    circuit_open_in: int = 0    # and how many have its circuit breaker open
    in_flight: int = 0          # requests the gateways have in flight there
    running: int = -1           # as the backend last reported (-1: not known)
    waiting: int = -1
    kv_usage: float = -1.0
    kv_tokens: int = 0
    cache_tokens: int = 0
    requests: int = 0           # the last minute, every process together
    errors: int = 0
    failed_attempts: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms_buckets: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BOUNDS_MS) + 1))
    _reported_at: float = field(default=-1.0, repr=False)
    _fresh_report: int = field(default=-1, repr=False)
    _last_report: int = field(default=-1, repr=False)
    _circuit_counted: bool = field(default=False, repr=False)

    @property
    def health(self) -> str:
        """One word for the list: what stops traffic first."""
        if self.status == "disabled":
            return "disabled"
        if not self.processes:
            return "not reported"
        if self.healthy_in < self.processes:
            return "unhealthy"
        if self.circuit_open_in:
            return "circuit open"
        return "draining" if self.status == "draining" else "healthy"

    @property
    def hit_rate(self) -> float | None:
        """Cached prompt tokens over prompt tokens, the last minute."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def completion_tokens_per_second(self) -> float:
        return self.completion_tokens / WINDOW_SECONDS

    @property
    def ttft_p50_ms(self) -> float | None:
        return ttft_percentile(self.ttft_ms_buckets, 0.5)

    @property
    def ttft_p99_ms(self) -> float | None:
        return ttft_percentile(self.ttft_ms_buckets, 0.99)

    @property
    def host_tier(self) -> bool:
        return 0 < self.kv_tokens < self.cache_tokens

    def as_dict(self) -> dict:
        return {
            "model": self.model, "url": self.url, "status": self.status, "health": self.health,
            "processes": self.processes, "healthy_in": self.healthy_in, "circuit_open_in": self.circuit_open_in,
            "in_flight": self.in_flight, "running": self.running, "waiting": self.waiting,
            "kv_usage": self.kv_usage, "kv_tokens": self.kv_tokens, "cache_tokens": self.cache_tokens,
            "window_seconds": WINDOW_SECONDS, "requests": self.requests, "errors": self.errors,
            "failed_attempts": self.failed_attempts, "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens, "completion_tokens": self.completion_tokens,
            "hit_rate": self.hit_rate, "completion_tokens_per_second": self.completion_tokens_per_second,
            # Past the histogram's last bound: null here, the buckets tell.
            "ttft_p50_ms": _finite(self.ttft_p50_ms), "ttft_p99_ms": _finite(self.ttft_p99_ms),
            "ttft_bounds_ms": list(TTFT_BOUNDS_MS), "ttft_ms_buckets": list(self.ttft_ms_buckets),
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or value == float("inf") else value


def reports_merge(reports: Iterable[dict], configured: Iterable[tuple[str, str, str]] = (), *,
                  ranks: bool = True) -> list[BackendHealth]:
    """Merges processes' reports per (model, backend). `configured`: the
    (model, URL, status) rows of the registry, so that a backend no process
    reported is listed too, and the configured status wins over a process's
    stale one. A server with several data-parallel ranks is reported rank by
    rank ("<server URL>@<rank>"): listed so with `ranks`, else folded into one
    row for the server (its ranks' load and traffic added up). Sorted by
    model, then URL."""
    rows: dict[tuple[str, str], BackendHealth] = {}
    for model, url, status in configured:
        rows[(model, url)] = BackendHealth(model, url, status)
    for number, report in enumerate(reports):
        at = float(report.get("at", 0))
        for entry in report.get("backends", ()):
            base = entry["url"].split("@", 1)[0]
            key = (entry["model"], entry["url"] if ranks else base)
            row = rows.get(key)
            if row is None:
                parent = rows.get((entry["model"], base))
                row = rows[key] = BackendHealth(*key, parent.status if parent else entry.get("status", ""))
            if row._last_report != number:  # a process counts once per row, whatever its ranks
                row._last_report, row._circuit_counted = number, False
                row.processes += 1
                row.healthy_in += bool(entry.get("healthy"))
                if at > row._reported_at:  # the backend's own figures: the freshest report's
                    row._reported_at, row._fresh_report = at, number
                    row.running = row.waiting = -1
                    row.kv_usage, row.kv_tokens, row.cache_tokens = -1.0, 0, 0
            if row._fresh_report == number:
                for name in ("running", "waiting"):
                    value = int(entry.get(name, -1))
                    if value >= 0:
                        setattr(row, name, max(getattr(row, name), 0) + value)
                row.kv_usage = max(row.kv_usage, float(entry.get("kv_usage", -1.0)))
                row.kv_tokens += int(entry.get("kv_tokens", 0))
                row.cache_tokens += int(entry.get("cache_tokens", 0))
            if entry.get("circuit_open_seconds", 0) > 0 and not row._circuit_counted:
                row._circuit_counted = True
                row.circuit_open_in += 1
            row.in_flight += int(entry.get("in_flight", 0))
            for name in _FIGURES:
                setattr(row, name, getattr(row, name) + int(entry.get(name, 0)))
            for index, count in enumerate(entry.get("ttft_ms_buckets", ())[:len(row.ttft_ms_buckets)]):
                row.ttft_ms_buckets[index] += int(count)
    # A server reported by rank is listed by rank only.
    folded = {(model, url.split("@", 1)[0]) for model, url in rows if "@" in url}
    return sorted((row for key, row in rows.items() if key not in folded), key=lambda r: (r.model, r.url))


def reports_read(client, namespace: str) -> list[dict]:
    """Every live process's report, from Redis (`client`: a redis.Redis)."""
    keys = list(client.scan_iter(match=f"{namespace}:pool:*", count=500))
    reports = []
    for raw in client.mget(keys) if keys else ():
        if raw:
            try:
                reports.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
    return reports


def _pools_load(model: str | None) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """The live reports, cut to the configured backends (of `model`, if given:
    what a process still reports of a backend since removed is left out), and
    the configured (model, URL, status) rows."""
    from django.conf import settings

    from config.redis import redis_sync

    from .models import Backend

    backends = Backend.objects.select_related("model").order_by("model__name", "url")
    if model is not None:
        backends = backends.filter(model__name=model)
    configured = [(b.model.name, b.url, b.status) for b in backends]
    known = {(name, url) for name, url, _ in configured}
    reports = reports_read(redis_sync(), settings.GATEWAY_REDIS_NAMESPACE)
    for report in reports:
        report["backends"] = [e for e in report.get("backends", ())
                              if (e.get("model"), str(e.get("url", "")).split("@", 1)[0]) in known]
    return reports, configured


def pools_read(model: str | None = None, *, ranks: bool = True) -> list[BackendHealth]:
    """The pools as the gateway processes see them now, merged; with `model`,
    its pool only; `ranks` as for `reports_merge`."""
    reports, configured = _pools_load(model)
    return reports_merge(reports, configured, ranks=ranks)


def metrics_read() -> str:
    """Every pool in Prometheus' text format (`metrics_text`)."""
    return metrics_text(*_pools_load(None))


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


# Per gateway process. Gauges: (name, help, what of a report's entry).
_PROCESS_GAUGES = (
    ("llm_gateway_backend_healthy", "1 while this gateway process's health checks pass on the backend, else 0.",
     lambda e: int(bool(e.get("healthy")))),
    ("llm_gateway_backend_circuit_open",
     "1 while this gateway process's circuit breaker keeps the backend out, else 0.",
     lambda e: int(e.get("circuit_open_seconds", 0) > 0)),
    ("llm_gateway_backend_in_flight_requests", "Requests this gateway process has in flight on the backend.",
     lambda e: int(e.get("in_flight", 0))),
)
# Counters since the process started: (name, help, field of the entry's "since_start").
_PROCESS_COUNTERS = (
    ("llm_gateway_backend_requests_total",
     "Requests this gateway process served through the backend, however they ended.", "requests"),
    ("llm_gateway_backend_request_errors_total",
     "Of those, requests that failed after the backend took them (mid-stream and the like).", "errors"),
    ("llm_gateway_backend_failed_attempts_total",
     "Requests that failed on the backend before their first token (then failed over, or refused).",
     "failed_attempts"),
    ("llm_gateway_backend_prompt_tokens_total",
     "Prompt tokens of the requests this gateway process served through the backend.", "prompt_tokens"),
    ("llm_gateway_backend_cached_tokens_total",
     "Of those, prompt tokens the backend's prefix cache served.", "cached_tokens"),
    ("llm_gateway_backend_completion_tokens_total", "Completion tokens delivered from the backend.",
     "completion_tokens"),
)
# (name, help, field): as the backend itself last reported, from the freshest report.
_BACKEND_SERIES = (
    ("llm_gateway_backend_running_requests", "Requests running on the backend, as it last reported.", "running"),
    ("llm_gateway_backend_waiting_requests", "Requests queued on the backend, as it last reported.", "waiting"),
    ("llm_gateway_backend_kv_usage_ratio", "Share of the backend's KV cache held by running requests.", "kv_usage"),
    ("llm_gateway_backend_kv_capacity_tokens", "The backend's KV cache capacity in tokens.", "kv_tokens"),
    ("llm_gateway_backend_cache_capacity_tokens",
     "Tokens the backend's prefix cache can serve from (more than its KV with a host tier).", "cache_tokens"),
)


def metrics_text(reports: list[dict], configured: list[tuple[str, str, str]]) -> str:
    """The pools in Prometheus' text format (0.0.4): per gateway process (label
    `gateway`) its view and its counters since it started, so that a process
    that stops ends its series instead of resetting a sum; per backend what it
    last reported. `reports` cut to the backends in `configured` ((model, URL,
    status) rows), as `_pools_load` gives them."""
    lines = ["# HELP llm_gateway_backend_configured Backends of the model pools; `status` as configured.",
             "# TYPE llm_gateway_backend_configured gauge"]
    for model, url, status in sorted(configured):
        lines.append(f'llm_gateway_backend_configured{{model="{_label(model)}",backend="{_label(url)}",'
                     f'status="{_label(status)}"}} 1')
    entries = [(report.get("process", ""), entry) for report in reports for entry in report.get("backends", ())
               if isinstance(entry.get("since_start"), dict)]
    entries.sort(key=lambda item: (item[1]["model"], item[1]["url"], item[0]))
    lines += ["# HELP llm_gateway_processes_reporting Gateway processes whose pool reports are live.",
              "# TYPE llm_gateway_processes_reporting gauge",
              f"llm_gateway_processes_reporting {len(reports)}"]

    def labels(process: str, entry: dict) -> str:
        return f'gateway="{_label(process)}",model="{_label(entry["model"])}",backend="{_label(entry["url"])}"'

    series = [(name, "gauge", text, value) for name, text, value in _PROCESS_GAUGES]
    series += [(name, "counter", text, lambda e, f=field_name: e["since_start"][f])
               for name, text, field_name in _PROCESS_COUNTERS]
    for name, kind, text, value in series:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{{{labels(process, entry)}}} {_number(value(entry))}" for process, entry in entries]
    for name, field_name, text in (
            ("llm_gateway_prefix_touches_total", "prefix_touches",
             "One-token requests this gateway process sent to keep a shared prefix cached (prefix retention)."),
            ("llm_gateway_prefix_touch_misses_total", "prefix_touch_misses",
             "Of those, touches that found less than half of the prefix cached.")):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{gateway="{_label(report.get("process", ""))}"}} {int(report.get(field_name, 0))}'
                  for report in sorted(reports, key=lambda r: str(r.get("process", "")))]
    name = "llm_gateway_backend_time_to_first_token_seconds"
    lines += [f"# HELP {name} Time to the first token of streamed requests, as the client saw it "
              "(gateway queueing included).", f"# TYPE {name} histogram"]
    for process, entry in entries:
        since = entry["since_start"]
        base = labels(process, entry)
        seen = 0
        for bound, count in zip((*TTFT_BOUNDS_MS, None), since["ttft_ms_buckets"]):
            seen += count
            le = "+Inf" if bound is None else _number(bound / 1000)
            lines.append(f'{name}_bucket{{{base},le="{le}"}} {seen}')
        lines.append(f"{name}_sum{{{base}}} {_number(since['ttft_ms_sum'] / 1000)}")
        lines.append(f"{name}_count{{{base}}} {seen}")
    merged = reports_merge(reports, configured)
    for name, text, field_name in _BACKEND_SERIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        for row in merged:
            value = getattr(row, field_name)
            if row.processes and value >= 0 and (field_name not in ("kv_tokens", "cache_tokens") or value):
                lines.append(f'{name}{{model="{_label(row.model)}",backend="{_label(row.url)}"}} {_number(value)}')
    return "\n".join(lines) + "\n"
