"""Counters behind `/sim/stats` and the Prometheus text behind `/metrics`.

Metric names and labels follow SGLang's collectors (`sglang:` prefix, labels
`model_name` and `engine_type`; the scheduler's gauges also `tp_rank`,
`pp_rank` and `moe_ep_rank`; `is_streaming` on the tokenizer's per-request
series (prompt and generation tokens, requests, TTFT and end-to-end latency),
each streaming flag once a request has had it, as prometheus_client makes a
labelled child on first use; `cache_source` on cached tokens; under priority
scheduling `priority` on every series, see `render_prometheus`). Histogram
buckets are SGLang's defaults.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Number of rids kept in each "recent aborts" list of /sim/stats.
RECENT_RIDS_KEPT = 100

TTFT_BUCKETS_S = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS_S = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040,
                 0.060, 0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0)
E2E_BUCKETS_S = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600,
                 1200, 1800, 2400)


class Histogram:
    __slots__ = ("bounds", "bucket_counts", "count", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.bucket_counts = [0] * (len(bounds) + 1)  # last slot is +Inf only
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.bucket_counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def observe_many(self, value: float, times: int) -> None:
        if times > 0:
            self.bucket_counts[bisect.bisect_left(self.bounds, value)] += times
            self.count += times
            self.total += value * times

    def render(self, name: str, labels: str, lines: list[str]) -> None:
        cumulative = 0
        for bound, bucket_count in zip(self.bounds, self.bucket_counts):
            cumulative += bucket_count
            lines.append(f'{name}_bucket{{{labels},le="{float(bound)}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")


@dataclass(slots=True)
class StreamingSeries:
    """The tokenizer collector's series for one value of `is_streaming` (and
    of `priority`, under priority scheduling)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS_S))


@dataclass(slots=True)
class PrioritySeries:
    """The tokenizer collector's series without `is_streaming`, for one value
    of `priority` (None: a server without priority scheduling, no label)."""

    cached_tokens: int = 0
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS_S))


@dataclass(slots=True)
class SimStats:
    """Process-wide counters. Token totals count finished and aborted requests."""

    requests_received: int = 0  # generation requests that passed parsing
    requests_finished: int = 0  # ended with stop/length (not abort, not error)
    requests_failed: int = 0  # answered with an injected error or crash
    requests_aborted: int = 0  # ended by /abort_request or by a client disconnect
    requests_rejected: int = 0  # 4xx before generation (validation, context length)
    abort_requests_received: int = 0  # POST /abort_request calls
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_tokens_total: int = 0
    # retractions: requests sent back to the queue for KV, and their tokens then
    retracted_requests_total: int = 0
    retracted_input_tokens_total: int = 0
    retracted_output_tokens_total: int = 0
    streaming_requests: int = 0
    aborted_rids: deque = field(default_factory=lambda: deque(maxlen=RECENT_RIDS_KEPT))
    aborted_by_request: deque = field(default_factory=lambda: deque(maxlen=RECENT_RIDS_KEPT))
    disconnected: deque = field(default_factory=lambda: deque(maxlen=RECENT_RIDS_KEPT))
    # rids named by POST /abort_request, in flight or not ("*" for abort_all)
    abort_request_rids: deque = field(default_factory=lambda: deque(maxlen=RECENT_RIDS_KEPT))
    # The tokenizer collector's series by (`priority` label or None, `is_streaming`),
    # and by `priority` alone, each made when first used, as prometheus_client
    # makes labelled children.
    by_streaming: dict = field(default_factory=dict)
    by_priority: dict = field(default_factory=dict)
    # Priorities the scheduler's queue gauges have shown (each then stays, at 0 when none).
    known_priorities: set = field(default_factory=set)

    def streaming(self, stream: bool, priority: str | None = None) -> StreamingSeries:
        series = self.by_streaming.get((priority, stream))
        if series is None:
            series = self.by_streaming[(priority, stream)] = StreamingSeries()
        return series

    def priority(self, priority: str | None = None) -> PrioritySeries:
        series = self.by_priority.get(priority)
        if series is None:
            series = self.by_priority[priority] = PrioritySeries()
        return series

    def record_abort(self, rid: str, *, by_disconnect: bool) -> None:
        self.requests_aborted += 1
        self.aborted_rids.append(rid)
        (self.disconnected if by_disconnect else self.aborted_by_request).append(rid)


@dataclass(slots=True)
class SchedulerGauges:
    """One scheduler's gauges. `dp_rank`: its data-parallel rank, labelled as
    SGLang labels its collectors when the server runs several (None with one);
    `kv_tokens`: num_used, kv_available, kv_evictable, kv_used token counts;
    `lora_slots`: (adapters in the running batch, max_loras_per_batch);
    `evicted_tokens`: what its radix cache has evicted; `num_retracted_reqs`:
    requests its last retraction sent back (cleared as SGLang does);
    `queues_by_priority`: under priority scheduling, its running and waiting
    requests by priority."""

    num_running_reqs: int
    num_queue_reqs: int
    token_usage: float
    cache_hit_rate: float
    gen_throughput: float
    dp_rank: int | None = None
    kv_tokens: dict[str, int] | None = None
    lora_slots: tuple[int, int] | None = None
    evicted_tokens: int | None = None
    num_retracted_reqs: int = 0
    queues_by_priority: tuple[dict[str, int], dict[str, int]] | None = None
    # HiCache: host pool (used, total) tokens, and the counters of tokens
    # copied to the host, loaded back and dropped from the device uncopied.
    hicache_host_tokens: tuple[int, int] | None = None
    hicache_counters: dict[str, int] | None = None


def render_prometheus(*, stats: SimStats, model_name: str, schedulers: list[SchedulerGauges]) -> str:
    """SGLang's /metrics text: the tokenizer manager's series from `stats`, and
    each scheduler's gauges (`schedulers`, one per data-parallel rank). Under
    priority scheduling (`queues_by_priority` given) every series has a
    `priority` label, the scheduler's "" for totals, with the two queues also
    broken down by priority."""
    labels = f'model_name="{_escape_label(model_name)}",engine_type="unified"'
    by_priority_scheduling = schedulers[0].queues_by_priority is not None

    def scheduler_labels(scheduler: SchedulerGauges) -> str:
        text = f'{labels},tp_rank="0",pp_rank="0",moe_ep_rank="0"'
        if by_priority_scheduling:
            text += ',priority=""'
        if scheduler.dp_rank is not None:
            text += f',dp_rank="{scheduler.dp_rank}"'
        return text

    lines: list[str] = []

    def gauge(name: str, help_text: str, value: Callable[[SchedulerGauges], float],
              by_priority: Callable[[SchedulerGauges], dict[str, int] | None] = lambda _: None) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        for scheduler in schedulers:
            own = scheduler_labels(scheduler)
            lines.append(f"{name}{{{own}}} {float(value(scheduler))}")
            queues = by_priority(scheduler)
            if queues is not None:
                stats.known_priorities.update(queues)
                base = own.replace(',priority=""', "")
                for priority in sorted(stats.known_priorities):
                    lines.append(f'{name}{{{base},priority="{priority}"}} {float(queues.get(priority, 0))}')

    def with_priority(priority: str | None) -> str:
        return labels if priority is None else f'{labels},priority="{_escape_label(priority)}"'

    def by_streaming(name: str, help_text: str, kind: str, value) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for (priority, stream), series in sorted(stats.by_streaming.items(), key=lambda item: (str(item[0][0]),
                                                                                               item[0][1])):
            stream_labels = f'{with_priority(priority)},is_streaming="{"true" if stream else "false"}"'
            if kind == "histogram":
                value(series).render(name, stream_labels, lines)
            else:
                lines.append(f"{name}{{{stream_labels}}} {float(value(series))}")

    by_priority_series = sorted(stats.by_priority.items(), key=lambda item: str(item[0]))

    def counter(name: str, help_text: str, value: int) -> None:  # the schedulers' (their shared total)
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} counter")
        lines.append(f"{name}{{{scheduler_labels(schedulers[0])}}} {float(value)}")

    def queues(index: int) -> Callable[[SchedulerGauges], dict[str, int] | None]:
        return lambda scheduler: scheduler.queues_by_priority[index] if scheduler.queues_by_priority else None

    gauge("sglang:num_running_reqs", "The number of running requests.", lambda g: g.num_running_reqs, queues(0))
    gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", lambda g: g.num_queue_reqs,
          queues(1))
    gauge("sglang:token_usage", "The token usage.", lambda g: g.token_usage)
    gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", lambda g: g.cache_hit_rate)
    gauge("sglang:gen_throughput", "The generation throughput (token/s).", lambda g: g.gen_throughput)
    if schedulers[0].kv_tokens is not None:
        for name, key, help_text in (
                ("sglang:num_used_tokens", "num_used", "The number of used tokens."),
                ("sglang:kv_available_tokens", "kv_available", "Number of free token slots in the KV cache pool."),
                ("sglang:kv_evictable_tokens", "kv_evictable",
                 "Number of evictable (radix-cached) token slots in the KV cache pool."),
                ("sglang:kv_used_tokens", "kv_used", "Number of actively used token slots in the KV cache pool.")):
            gauge(name, help_text, lambda g, key=key: g.kv_tokens[key])
    if schedulers[0].lora_slots is not None:
        gauge("sglang:lora_pool_slots_used", "Number of LoRA adapter slots currently occupied in GPU memory.",
              lambda g: g.lora_slots[0])
        gauge("sglang:lora_pool_slots_total", "Total number of LoRA adapter slots available (max_loras_per_batch).",
              lambda g: g.lora_slots[1])
        gauge("sglang:lora_pool_utilization", "LoRA pool utilization ratio (used/total). 1.0 means pool is full.",
              lambda g: g.lora_slots[0] / g.lora_slots[1] if g.lora_slots[1] else 0.0)
    by_streaming("sglang:prompt_tokens_total", "Number of prefill tokens processed.", "counter",
                 lambda series: series.prompt_tokens)
    by_streaming("sglang:generation_tokens_total", "Number of generation tokens processed.", "counter",
                 lambda series: series.generation_tokens)
    lines.append("# HELP sglang:cached_tokens_total Number of cached prompt tokens by source (device/host/storage).")
    lines.append("# TYPE sglang:cached_tokens_total counter")
    for priority, series in by_priority_series:
        if series.cached_tokens:  # counted only when a request had some, as SGLang does
            lines.append(f'sglang:cached_tokens_total{{{with_priority(priority)},cache_source="device"}} '
                         f"{float(series.cached_tokens)}")
    by_streaming("sglang:num_requests_total", "Number of requests processed.", "counter",
                 lambda series: series.requests)
    gauge("sglang:num_retracted_reqs", "The number of retracted requests.", lambda g: g.num_retracted_reqs)
    counter("sglang:num_retracted_requests_total", "Total number of retracted requests.",
            stats.retracted_requests_total)
    counter("sglang:num_retracted_input_tokens_total", "Total number of retracted input tokens.",
            stats.retracted_input_tokens_total)
    counter("sglang:num_retracted_output_tokens_total", "Total number of retracted output tokens.",
            stats.retracted_output_tokens_total)
    by_streaming("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "histogram",
                 lambda series: series.ttft)
    lines.append("# HELP sglang:inter_token_latency_seconds Histogram of inter-token latency in seconds.")
    lines.append("# TYPE sglang:inter_token_latency_seconds histogram")
    for priority, series in by_priority_series:
        series.itl.render("sglang:inter_token_latency_seconds", with_priority(priority), lines)
    by_streaming("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                 "histogram", lambda series: series.e2e)
    if schedulers[0].evicted_tokens is not None:
        # SGLang's RadixCacheMetricsCollector labels its series by cache and rank, not model.
        lines.append("# HELP sglang:evicted_tokens_total The number of device KV token slots freed by eviction, "
                     "regardless of whether the data was backed up to host (see sglang:hicache_backup_tokens_total) "
                     "or destroyed (see sglang:hicache_dropped_tokens_total).")
        lines.append("# TYPE sglang:evicted_tokens_total counter")
        for scheduler in schedulers:
            lines.append('sglang:evicted_tokens_total{cache_type="UnifiedRadixCache",tp_rank="0",pp_rank="0",'
                         f'dp_rank="{scheduler.dp_rank or 0}"}} {float(scheduler.evicted_tokens)}')
    if schedulers[0].hicache_host_tokens is not None:
        _render_hicache(schedulers, lines)
    return "\n".join(lines) + "\n"


# SGLang's HiCache series (srt/observability/metrics_collector.py): name, type, help.
_HICACHE_SERIES = (
    ("sglang:hicache_host_used_tokens", "gauge", "The number of tokens in the HiCache host pool."),
    ("sglang:hicache_host_total_tokens", "gauge", "The capacity of the HiCache host pool in tokens."),
    ("sglang:hicache_backup_tokens_total", "counter",
     "The number of tokens backed up from GPU to local host DRAM (L2)."),
    ("sglang:load_back_tokens_total", "counter",
     "The number of tokens loaded back from local host DRAM (L2) to GPU."),
    ("sglang:hicache_dropped_tokens_total", "counter",
     "The number of logical device KV tokens destroyed by eviction without a host copy."),
)


def _render_hicache(schedulers: list[SchedulerGauges], lines: list[str]) -> None:
    for name, kind, help_text in _HICACHE_SERIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for scheduler in schedulers:
            used, total = scheduler.hicache_host_tokens
            counters = scheduler.hicache_counters or {}
            value = {"sglang:hicache_host_used_tokens": used, "sglang:hicache_host_total_tokens": total}.get(
                name, counters.get(name.removeprefix("sglang:"), 0))
            labels = f'tp_rank="0",pp_rank="0",dp_rank="{scheduler.dp_rank or 0}"'
            if kind == "counter" and name != "sglang:hicache_backup_tokens_total":
                labels = f'cache_type="UnifiedRadixCache",{labels}'
            lines.append(f"{name}{{{labels}}} {float(value)}")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
