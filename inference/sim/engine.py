"""The simulated inference engine: a continuous-batching scheduler over a radix cache.

Transport-independent: the HTTP layer turns a parsed request into a
`GenerationRequest`, calls `admit_async` (or `admit` without LoRA), then
iterates `run`, which yields one `Step` per generated token (stream interval
1) and a last step carrying the finish reason.

Life of a request:
1. admission (`admit`): validation, `error_rate`, output length decided;
2. held: the `hang` fault, then the fixed `ttft_ms` delay (per request);
3. waiting queue (FCFS, or longest prefix match first with `--schedule-policy lpm`;
   with `--enable-priority-scheduling`, FCFS by request priority first, and a
   request that finds every slot taken may preempt lower ones);
4. running: the scheduler admits it when a slot is free (`max_running_requests`),
   its adapter fits the batch (`max_loras_per_batch`) and its KV fits: it
   matches the radix cache and locks the matched prefix; its uncached prompt
   plus its whole output (`max_new_estimate`, at most `clip_max_new_tokens`)
   must fit in what the cache can free beside what the running requests may
   still write, their remaining output × the new-token ratio (see KV
   accounting). FCFS stops at the first request that does not fit, as
   SGLang's PrefillAdder does;
5. prefill in chunks of at most `chunked_prefill_size` tokens per step (one
   request at a time is chunked); the step that completes the prompt
   inserts it in the cache and samples the first token;
6. decode: one token per decode step; at the end the sequence (prompt +
   output) stays in the cache, unlocked. A decode step that finds no KV for
   its tokens retracts requests first (`_retract_decode`): they go back to
   the waiting queue, their output's KV freed, and later prefill prompt +
   output again and go on.

The scheduler loop (`_scheduler_loop`) runs one step at a time, SGLang's
default without mixed chunks: a prefill step when a request can be
prefilled, else a decode step for every running request. A step's duration
comes from `timing.StepTiming`; its tokens become visible when it ends.

Zero-cost fast path (every step duration 0, the default): consecutive decode
steps take no time, so a decode "burst" advances each running request by up
to INSTANT_BURST_TOKENS tokens at once (the same outcome as that many
zero-length steps, since nothing can arrive in between); when the scheduler
is idle the request's own task runs the steps inline, and a consumer drains
every token it has been given in one go (one socket write). This keeps the
default configuration an instant upstream.

KV accounting (tokens): `cache.total_tokens` (cached sequences, locked or
evictable) + `_private_tokens` (written by running requests, not in the
cache: prefill chunks, output) + `_pending_prefill` (admitted prompt tokens
not yet prefilled) never exceeds `max_total_tokens`: as SGLang's scheduler
does (`_length_bounds`), a prompt must leave room in the pool for its output
and max_new_tokens is cut to what it leaves. The cache's own capacity
is set to what those leave, so it evicts least-recently-used unlocked leaves
as running requests write. Admission works on estimates, as SGLang's
PrefillAdder: a running request may still write its remaining output (at
most `clip_max_new_tokens`) × the new-token ratio, 1 with `ignore_eos`. The
ratio (`NewTokenRatio`) starts at 0.7 and falls by every decode step to 0.098,
since requests without `ignore_eos` mostly stop early; when that bet fails
and a decode step finds no room, retraction sets it from what the remaining
requests have written, and it is back at its start when the engine is idle.

Output rules (deterministic):
- Text is pseudo-text from `tokenizer.PseudoTextSource`, seeded by the prompt
  ids, `--seed`, the request's `seed` and the LoRA adapter's name; sampling
  parameters other than stop / max tokens do not change it.
- A request ends at a natural EOS, its `natural_length`-th token in [16, 64]
  (finish `stop`, matched = EOS_TOKEN_ID; the token counts in completion_tokens
  and output_ids but adds no text), as a model does, unless its max-token
  limit comes first (finish `length`; a limit under 16 always does), the
  context length does (`length`), or a stop string appears first
  (finish `stop`, matched = the string, which is trimmed from the text as
  SGLang does). With `ignore_eos` it runs to the limit (or the context).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import re
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Hashable

from .config import CACHE_AWARE_POLICIES, RuntimeSettings, ServerConfig
from .lora import LoraError, LoraRegistry
from .metrics import SimStats
from .weights import ServedWeights, weights_seed
from .radix_cache import RadixCache, RadixNode
from .timing import EngineCosts, StepTiming
from .tokenizer import (
    EOS_TOKEN_ID,
    BiasedTextSource,
    PseudoTextSource,
    ScriptedTextSource,
    generation_seed,
    natural_length,
)

logger = logging.getLogger("inference.sim.engine")

# Window over which gen_throughput is averaged, simulated seconds.
THROUGHPUT_WINDOW_S = 10.0
THROUGHPUT_BUCKET_S = 0.25

# Zero-duration steps run back to back; yield to the event loop after this many
# so new requests are accepted and consumers can write.
INSTANT_STEPS_PER_YIELD = 64
# Tokens per request in one zero-duration decode burst (then other work runs).
INSTANT_BURST_TOKENS = 32

# When the loop falls this far behind its schedule (wall seconds, e.g. a busy
# CPU), it stops catching up and restarts the timeline from now.
MAX_SCHEDULE_LAG_S = 0.05

# SGLang falls back from lpm and hrrn to fcfs when the queue is longer than this.
LPM_MAX_QUEUE = 128
# In-batch prefix caching (SGLang's IN_BATCH_PREFIX_CACHING_*_THRESHOLD): under
# a cache-aware policy, a waiting request whose cached prefix is at most this
# long and that shares at least as many tokens with one earlier in the queue
# goes last, so that one prefills the shared prefix for both.
IN_BATCH_PREFIX_THRESHOLD = 32
# SGLang (schedule_policy.py, 0.5.23): under fcfs and LRU eviction, every this
# many scheduling passes it touches the cached prefixes of the first
# LPM_MAX_QUEUE waiting requests, so that what they will reuse is not evicted
# while they wait (SGLANG_ENABLE_WAITING_PREFIX_REFRESH, on by default).
WAITING_PREFIX_REFRESH_INTERVAL = 32

# SGLang clears its retracted-requests gauge when it logs decode statistics,
# every --decode-log-interval (40) decode steps.
DECODE_LOG_INTERVAL = 40

ABORT_MESSAGE = "Aborted"
WAITING_ABORT_MESSAGE = "Abort in waiting queue"
PRIORITY_DISABLED_MESSAGE = "Using priority is disabled for this server. Please send a new request without a priority."
QUEUE_FULL_MESSAGE = "The request queue is full."
OUTRANKED_MESSAGE = "The request is aborted by a higher priority request."

# Request states
HELD, WAITING, RUNNING, DONE = "held", "waiting", "running", "done"


class RequestRejected(Exception):
    """A request SGLang would refuse before generating (HTTP 400 by default).

    `error_type` is the OpenAI error `type` SGLang uses for this failure.
    """

    def __init__(self, message: str, *, status_code: int = 400, error_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type


class InjectedFailure(Exception):
    """The `error_rate` fault fired: answer 500 before any token."""


@dataclass(slots=True)
class GenerationRequest:
    rid: str
    prompt_ids: list[int]
    max_new_tokens: int | None  # None: stop at a natural EOS (capped by context)
    stop: tuple[str, ...] = ()
    stop_regex: tuple[re.Pattern, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    cache_namespace: Hashable = None  # from cache_salt / extra_key; None = shared
    # SGLang's request priority (None: none given): the radix cache's
    # `priority` eviction policy keeps higher ones longer.
    priority: int | None = None
    stream: bool = False
    lora_path: str | None = None  # the adapter *name* (SGLang's lora_path field)
    sample: int = 0  # which of a prompt's parallel samples (n > 1) this is: each answers differently
    # What the model writes, then stops (a tool call, a constrained reply), unless max_new_tokens cuts it.
    forced_text: str | None = None
    # /generate's return_logprob (protocol.NativeLogprobs): what meta_info reports; the engine ignores it.
    logprobs: object = None
    # What the model writes before its reply (a reasoning model's think block,
    # `reasoning.Thinking`), and how many of its tokens count as reasoning.
    preamble: str | None = None
    reasoning_tokens: int = 0
    # SGLang's min_new_tokens: EOS and stop_token_ids are masked until the
    # reply has that many tokens (stop strings still match).
    min_new_tokens: int = 0
    # no_stop_trim: the matched stop string (or stop token's text) stays in the reply.
    no_stop_trim: bool = False
    # Native sampling_params.stream_interval: stream every this many tokens
    # (None: the server's --stream-interval).
    stream_interval: int | None = None
    # SGLang's routing_key (native field, or the OpenAI routes' X-SMG-Routing-Key
    # header): --schedule-policy routing-key favours keys the running batch has most.
    routing_key: str | None = None
    # Sampling params' logit_bias, by token id (`tokenizer.BiasedTextSource`).
    logit_bias: dict[int, float] | None = None
    # False under --skip-tokenizer-init: native outputs carry ids, no text.
    detokenize: bool = True
    # The data-parallel rank a router asked for (SGLang's routed_dp_rank, or
    # its deprecated alias data_parallel_rank, or the X-Data-Parallel-Rank header).
    routed_dp_rank: int | None = None


@dataclass(slots=True)
class Step:
    """What one engine step produced for one request."""

    delta_text: str  # new visible text (may be "" after stop trimming or abort)
    token_id: int | None  # the token generated this step, if any
    finish_reason: dict | None  # SGLang's finish_reason object, on the last step only
    error: dict | None = None  # set on an injected mid-stream crash (last step)
    more_ready: bool = False  # the next step follows without delay (a write-coalescing hint)
    # The request's state right after this step (steps may be consumed later,
    # when the request has moved on): output tokens so far, visible text length.
    completion_tokens: int = 0
    text_end: int = 0
    # A stream event of several tokens (--stream-interval): output tokens before
    # its first; -1 for a step of one token.
    tokens_from: int = -1


@dataclass(slots=True, eq=False)
class RunningRequest:
    request: GenerationRequest
    prompt_tokens: int
    token_limit: int  # tokens this request will generate at most
    stops_naturally: bool  # reaching token_limit means EOS, not length
    # The output the scheduler budgets KV for: max_new_tokens as it bounds it
    # (SGLang cannot know the EOS ahead).
    max_new_estimate: int
    admitted_at: float  # simulated seconds (StepTiming.now)
    clock: Callable[[], float]  # simulated clock, for latencies of unfinished requests
    adapter: str | None = None  # LoRA adapter name, None = base model
    namespace: Hashable = None  # radix-cache namespace (adapter, cache_salt, extra_key)
    cached_tokens: int = 0  # prompt tokens served from the cache (known once running)
    cached_tokens_host: int = 0  # of those, the ones loaded back from the host tier (HiCache)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict | None = None
    abort_cause: str | None = None  # "request" or "disconnect"
    aborted_waiting: bool = False  # /abort_request took it from the waiting queue
    metric_priority: str | None = None  # its `priority` label on /metrics (SimEngine._metric_priority)
    first_token_at: float | None = None  # simulated seconds
    last_token_at: float | None = None
    finished_at: float | None = None
    locked_node: RadixNode | None = None  # holds one cache lock while running
    text_source: PseudoTextSource | ScriptedTextSource | None = None
    crash_after: int | None = None  # crash_after_tokens fault, fixed at admission
    state: str = HELD
    scheduled_at: float | None = None  # simulated seconds: left the waiting queue
    prefill_needed: int = 0  # uncached prompt tokens to prefill
    prefill_scheduled: int = 0
    prefill_done: int = 0
    kv_private: int = 0  # tokens of KV written and not in the cache (prefill chunks, output)
    pending: deque = field(default_factory=deque)  # Steps produced, not yet consumed
    waiter: asyncio.Future | None = None  # resolved when output arrives or on abort/release
    hung: bool = False  # waiting in the `hang` fault
    finalized: bool = False
    retractions: int = 0  # times a full KV (or a preempting request) sent it back to the waiting queue
    # The priority the scheduler orders by: the request's, else the default or the least preferred.
    priority: int = 0
    queued_seq: int = 0  # when it (last) entered the waiting queue
    arrival_processed: int = 0  # prompt tokens the engine had prefilled when it arrived (hrrn)
    refusal: str | None = None  # why the scheduler refuses it (too long for the KV pool)
    engine: SimEngine | None = None  # the scheduler (data-parallel rank) serving it
    weight_version: str = "default"  # of the weights that served it

    def fill_ids(self) -> list[int]:
        """What its prefill computes: the prompt, and after a retraction the output so far too."""
        return self.request.prompt_ids + self.output_ids if self.retractions else self.request.prompt_ids

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def e2e_latency_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else self.clock()
        return end - self.admitted_at


@dataclass(slots=True)
class _Plan:
    prefill: bool
    entries: list  # prefill: [(request, tokens)], decode: [request]
    duration_s: float  # simulated
    retracted: bool = False  # a decode step planned after retracting requests


class NewTokenRatio:
    """SGLang's new-token ratio (NewTokenRatioTracker): the share of a running
    request's remaining max_new_tokens that admission expects it to write."""

    __slots__ = ("start", "floor", "decay", "current")

    def __init__(self, config: ServerConfig) -> None:
        self.start = min(config.init_new_token_ratio * config.schedule_conservativeness, 1.0)
        self.floor = min(self.start * config.min_new_token_ratio_factor, 1.0)
        self.decay = (self.start - self.floor) / config.new_token_ratio_decay_steps
        self.current = self.start

    def decay_steps(self, steps: int) -> None:
        self.current = max(self.current - self.decay * steps, self.floor)

    def reset(self) -> None:
        self.current = self.start


class SimEngine:
    """One scheduler: its batch, queue, KV pool and radix cache. With
    `--dp-size` N the server runs N of them (`dp_rank` 0..N-1), which share the
    tokenizer manager's state: `stats` (its series and totals) and the rids in
    flight (which must differ across ranks)."""

    def __init__(self, *, config: ServerConfig, settings: RuntimeSettings, dp_rank: int = 0,
                 stats: SimStats | None = None, active_rids: set[str] | None = None,
                 weights: ServedWeights | None = None) -> None:
        self.config = config
        self.dp_rank = dp_rank
        # The weights served (every rank's; /update_weights_from_disk changes them).
        self.weights = weights if weights is not None else ServedWeights.launched(config)
        self.settings = settings
        self.timing = StepTiming(EngineCosts(
            prefill_tokens_per_s=config.prefill_tokens_per_s, decode_base_ms=config.decode_base_ms,
            decode_per_request_ms=config.decode_per_request_ms, time_scale=config.time_scale), settings)
        self.capacity_tokens = config.max_total_tokens
        self.cache = RadixCache(capacity_tokens=config.max_total_tokens,
                                eviction_policy=config.radix_eviction_policy,
                                eviction_config=config.radix_eviction_policy_config,
                                page_size=config.page_size, host_capacity_tokens=config.hicache_host_tokens(),
                                write_policy=config.hicache_write_policy)
        self._load_back_s_per_token = config.load_back_s_per_token()
        self._load_back_pending = 0  # host tokens admitted requests load back in the next prefill step
        # Evict 1/32 (≈ 3 %) of the budget beyond the overflow, so that a full cache
        # is not rescanned for every new sequence: each eviction pass walks all
        # leaves (≈ 2 ms per 2,000 leaves). The slack costs a little hit rate.
        self.cache.eviction_slack_tokens = config.max_total_tokens // 32
        self.lora = LoraRegistry(enabled=config.enable_lora, max_loras_per_batch=config.max_loras_per_batch,
                                 max_loaded_loras=config.max_loaded_loras, load_delay=self._lora_load_delay,
                                 eviction_policy=config.lora_eviction_policy)
        for entry in config.lora_paths:
            self.lora.preload(name=entry["lora_name"], path=entry["lora_path"], pinned=entry["pinned"])
        if config.enable_lora:
            self.lora.settle_shape(max_rank=config.max_lora_rank, target_modules=config.lora_target_modules)
        self.stats = stats if stats is not None else SimStats()
        # This scheduler's own prompt and cached token totals (its cache hit rate).
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self._active: set[RunningRequest] = set()  # admitted and not finalized (any state)
        # The rids in flight, which must differ (on every rank: the tokenizer manager's).
        self._active_rids: set[str] = active_rids if active_rids is not None else set()
        self._waiting: deque[RunningRequest] = deque()
        self._running: dict[RunningRequest, None] = {}  # admitted to the batch (prefill or decode), ordered
        self._decoding: dict[RunningRequest, None] = {}  # prefill done
        self._chunked: RunningRequest | None = None  # the request whose prefill is split over steps
        # SGLang's batch_is_full: a request found no KV room; no scheduling pass
        # (so no waiting-prefix refresh) until a running request leaves.
        self._batch_full = False
        self._refresh_waiting = (config.waiting_prefix_refresh and config.radix_eviction_policy == "lru")
        self._refresh_passes = 0
        # SGLang's priority scheduling: the queue order (fcfs only) and preemption.
        self._priority_sign = 1 if config.schedule_low_priority_values_first else -1
        self._priority_queue = config.enable_priority_scheduling and config.schedule_policy == "fcfs"
        self._preemption = config.enable_priority_scheduling and not config.disable_priority_preemption
        self._queue_seq = itertools.count()
        self._uncached_ids = itertools.count()  # --disable-radix-cache: each request's own namespace
        self._pending_prefill = 0
        self._private_tokens = 0
        self.new_token_ratio = NewTokenRatio(config)
        # Requests the last retraction sent back (SGLang's num_retracted_reqs
        # gauge: cleared after DECODE_LOG_INTERVAL decode steps).
        self.last_retracted = 0
        self._decode_steps_since_retraction = 0
        self._to_wake: list[RunningRequest] = []
        self._scheduler_task: asyncio.Task | None = None
        self._scheduler_wakeup: asyncio.Future | None = None
        # Wall time at which work arrived for an idle scheduler (its timeline start).
        self._wake_anchor: float | None = None
        # Drives error_rate; seeded so a run's fault pattern is reproducible.
        self._fault_rng = random.Random(config.seed)
        self._schedule_rng = random.Random(config.seed)  # --schedule-policy random
        self._prefill_tokens_processed = 0  # hrrn's clock: prompt tokens prefilled so far
        # [bucket start (simulated s), tokens generated in the bucket]
        self._throughput_buckets: deque[list] = deque()
        self.steps_total = {"prefill": 0, "decode": 0}
        self.schedule_lag_resets = 0

    # ------------------------------------------------------------ admission

    def check_lengths(self, *, prompt_tokens: int, max_new_tokens: int | None) -> None:
        """SGLang's context-length checks (tokenizer_manager), same wording."""
        context_length = self.config.context_length
        if prompt_tokens >= context_length:
            raise RequestRejected(
                f"The input ({prompt_tokens} tokens) is longer than the "
                f"model's context length ({context_length} tokens)."
            )
        if max_new_tokens is not None and max_new_tokens + prompt_tokens > context_length:
            total = max_new_tokens + prompt_tokens
            raise RequestRejected(
                f"Requested token count exceeds the model's maximum context length of {context_length} tokens. "
                f"You requested a total of {total} tokens: {prompt_tokens} tokens from the input messages and "
                f"{max_new_tokens} tokens for the completion. Please reduce the number "
                f"of tokens in the input messages or the completion to fit within the limit."
            )

    async def embed(self, inputs: list[list[int]]) -> None:
        """An embedding request (`--is-embedding`): checks each input's length,
        counts it, and takes the prefill time of all its tokens. Embedding
        requests are not batched with one another here, nor cached. Raises
        RequestRejected or InjectedFailure, as `admit` does."""
        for token_ids in inputs:
            self.check_lengths(prompt_tokens=len(token_ids), max_new_tokens=None)
        stats = self.stats
        stats.requests_received += 1
        self._error_rate_roll()
        tokens = sum(len(token_ids) for token_ids in inputs)
        delay = self.timing.admission_delay_s()
        if not self.timing.is_instant():
            delay += self.timing.prefill_step_s(tokens)
        if delay > 0:
            await asyncio.sleep(self.timing.wall_s(delay))
        stats.prompt_tokens_total += tokens
        self.prompt_tokens_total += tokens
        stats.requests_finished += 1
        series = stats.streaming(False, self._metric_priority(None))
        series.prompt_tokens += tokens
        series.requests += 1

    def _error_rate_roll(self, request: GenerationRequest | None = None) -> None:
        """The `error_rate` fault: raises InjectedFailure for that share of requests."""
        if self.settings.error_rate > 0 and self._fault_rng.random() < self.settings.error_rate:
            self.stats.requests_failed += 1
            stream, priority = (request.stream, request.priority) if request is not None else (False, None)
            self.stats.streaming(stream, self._metric_priority(priority)).requests += 1
            raise InjectedFailure("Injected failure (simulator error_rate)")

    def _metric_priority(self, priority: int | None) -> str | None:
        """A request's `priority` label on the tokenizer's series: none without
        priority scheduling; else its priority, the default's if it gave none,
        or "" (the label's default) when there is neither."""
        if not self.config.enable_priority_scheduling:
            return None
        if priority is None:
            priority = self.config.default_priority_value
        return "" if priority is None else str(priority)

    def queues_by_priority(self) -> tuple[dict[str, int], dict[str, int]] | None:
        """Under priority scheduling, the running and the waiting requests by
        priority (SGLang's QueueCount: a request without one counts as "None")."""
        if not self.config.enable_priority_scheduling:
            return None

        def label(running: RunningRequest) -> str:
            priority = running.request.priority
            return str(self.config.default_priority_value if priority is None else priority)

        return dict(Counter(map(label, self._running))), dict(Counter(map(label, self._waiting)))

    def _validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise RequestRejected("The input is empty.")
        if request.max_new_tokens is not None and request.max_new_tokens < 0:
            raise RequestRejected(f"max_new_tokens must be at least 0, got {request.max_new_tokens}.")
        if not self.config.allow_auto_truncate:
            self.check_lengths(prompt_tokens=len(request.prompt_ids), max_new_tokens=request.max_new_tokens)
            return
        # --allow-auto-truncate: the prompt is cut to the context, and
        # max_new_tokens to what the prompt leaves of it (tokenizer_manager).
        context_length = self.config.context_length
        if len(request.prompt_ids) > context_length:
            request.prompt_ids = request.prompt_ids[:context_length]
        if request.max_new_tokens is not None and request.max_new_tokens + len(request.prompt_ids) > context_length:
            request.max_new_tokens = max(0, context_length - len(request.prompt_ids))

    @property
    def max_req_len(self) -> int:
        """The most a request (prompt and output) may take: the context or the
        KV pool, less a token (tp_worker's max_req_len)."""
        return min(self.config.context_length, self.capacity_tokens) - 1

    def _length_bounds(self, request: GenerationRequest) -> tuple[int, str | None]:
        """The scheduler's bounds on a request (init_req_max_new_tokens, then
        validate_input_length): the most it may generate, and why it is refused
        (None if it is not). Neither a prompt with its output nor a prompt
        alone may take more than the context or the KV pool less a token;
        a prompt of that less 5 or more is refused, or cut to it under
        --allow-auto-truncate (its output bound is taken before the cut)."""
        max_req_len = self.max_req_len
        max_req_input_len = max_req_len - 5
        prompt_tokens = len(request.prompt_ids)
        # (SGLang's second bound, the pool less the prompt, a page and a token,
        # is never tighter than this one with pages of a token.)
        wanted = request.max_new_tokens if request.max_new_tokens is not None else 1 << 30
        max_new = max(0, min(wanted, max_req_len - prompt_tokens - 1))
        if prompt_tokens < max_req_input_len:
            return max_new, None
        if self.config.allow_auto_truncate:
            request.prompt_ids = request.prompt_ids[:max_req_input_len]
            return max_new, None
        return max_new, (f"Input length ({prompt_tokens} tokens) exceeds the maximum allowed length "
                         f"({max_req_input_len} tokens). Use a shorter input or enable --allow-auto-truncate.")

    async def admit_async(self, request: GenerationRequest) -> RunningRequest:
        """`admit`, resolving (and if needed reloading) the request's LoRA adapter first."""
        self._validate(request)
        if request.lora_path:
            try:
                await self.lora.resolve(request.lora_path)
            except LoraError as error:
                raise RequestRejected(error.message, error_type="BadRequest") from error
        return self._track(request)

    def admit(self, request: GenerationRequest) -> RunningRequest:
        """Validate, maybe inject a failure, start tracking.

        Raises RequestRejected (4xx) or InjectedFailure (500). After a
        successful return the caller must end the request through `run`
        and/or `finalize` (idempotent). An adapter must already be loaded
        (use `admit_async` to reload evicted ones).
        """
        self._validate(request)
        if request.lora_path and not self.lora.is_loaded(request.lora_path):
            raise RequestRejected(f"Got LoRA adapter that has never been loaded: {request.lora_path}",
                                  error_type="BadRequest")
        return self._track(request)

    def _track(self, request: GenerationRequest) -> RunningRequest:
        if request.rid in self._active_rids:  # SGLang's tokenizer manager holds one state per rid
            raise RequestRejected(f"Duplicate request ID detected: {request.rid}", error_type="BadRequest")
        prompt_ids = request.prompt_ids
        self.stats.requests_received += 1
        if request.stream:
            self.stats.streaming_requests += 1
        self._error_rate_roll(request)

        adapter = request.lora_path or None
        room, refusal = self._length_bounds(request)
        prompt_ids = request.prompt_ids
        seed = generation_seed(prompt_ids=prompt_ids, server_seed=self.config.seed, request_seed=request.seed)
        seed ^= self.weights.seed  # other weights answer differently
        if adapter is not None:
            seed ^= weights_seed(self.lora.weights_of(adapter))  # each adapter's weights answer differently
        if request.sample:
            seed = generation_seed(prompt_ids=(request.sample,), server_seed=seed & 0x7FFF_FFFF_FFFF_FFFF,
                                   request_seed=None)
        text_source = PseudoTextSource(seed)
        forced_token = False
        if BiasedTextSource.decisive(request.logit_bias):
            text_source = BiasedTextSource(text_source, request.logit_bias)
            forced_token = text_source.forces
        if request.preamble or request.forced_text is not None:
            text_source = ScriptedTextSource((request.preamble or "") + (request.forced_text or ""), text_source)
        # Where the EOS lands: the reply's last token, counted but never shown.
        natural = natural_length(seed, self.config.natural_length_min, self.config.natural_length_max)
        if request.preamble and request.forced_text is None:
            natural += len(text_source)  # the think block, then a reply of the usual length
        natural = max(natural, min(request.min_new_tokens + 1, room))  # EOS masked until then
        # `room` is max_new_tokens as the scheduler bounds it.
        if request.ignore_eos or room < natural or (forced_token and request.forced_text is None):
            # (An EOS on the last allowed token still ends the reply as `stop`: sglang
            # 0.5.23's Req.check_finished tries stop tokens before the length cap.)
            token_limit, stops_naturally = room, False
        else:
            token_limit, stops_naturally = natural, True
        if request.forced_text is not None and not request.ignore_eos:
            # The model writes that text (after its preamble), then EOS, unless
            # max_new_tokens cuts it (ignore_eos: it goes on, as above).
            ends = len(text_source) + 1
            token_limit, stops_naturally = min(ends, room), ends <= room
        # Like SGLang's radix key extra_key: adapters never share KV.
        # SGLang keys it on the adapter's load (lora_id): a reloaded adapter finds nothing cached.
        namespace = request.cache_namespace if adapter is None else \
            ("lora", self.lora.load_id(adapter), request.cache_namespace)
        if self.config.disable_radix_cache:
            # SGLang's ChunkCache: a request's KV is its own, freed when it leaves.
            namespace = ("uncached", next(self._uncached_ids))
        running = RunningRequest(
            engine=self,
            weight_version=self.weights.weight_version,
            request=request,
            prompt_tokens=len(prompt_ids),
            token_limit=token_limit,
            max_new_estimate=room,
            stops_naturally=stops_naturally,
            admitted_at=self.timing.now(),
            clock=self.timing.now,
            adapter=adapter,
            namespace=namespace,
            text_source=text_source,
            crash_after=self.settings.crash_after_tokens,
            refusal=refusal,
            metric_priority=self._metric_priority(request.priority),
        )
        self._active.add(running)
        self._active_rids.add(request.rid)
        return running

    # ------------------------------------------------------------ consumer side

    async def run(self, running: RunningRequest) -> AsyncIterator[Step]:
        """Generate `running`'s tokens; the last Step carries the finish reason.

        Use as `async with contextlib.aclosing(engine.run(r)) as steps:` so the
        request is finalized (cache insert, unlock, stats) even when the
        consumer stops early (client disconnect).
        """
        try:
            async for step in self._consume(running):
                yield step
        finally:
            self.finalize(running)

    async def _consume(self, running: RunningRequest) -> AsyncIterator[Step]:
        if self.settings.hang:
            running.hung = True
            await self._hold(running, None)  # ends on abort, cancellation or release_hung_requests
            running.hung = False
        delay = self.timing.admission_delay_s()
        if delay > 0 and running.abort_cause is None:
            await self._hold(running, self.timing.wall_s(delay))
        if running.abort_cause is not None:
            yield self._abort_step(running)
            return
        self._enqueue(running)
        pending = running.pending
        while True:
            if not pending:
                if running.abort_cause is not None and running.finish_reason is None:
                    yield self._abort_step(running)
                    return
                await self._hold(running, None)
                continue
            step = pending.popleft()
            step.more_ready = bool(pending)
            yield step
            if step.finish_reason is not None:
                return

    async def _hold(self, running: RunningRequest, delay_s: float | None) -> None:
        """Wait for output, an abort or a release; at most `delay_s` wall seconds if given."""
        loop = asyncio.get_running_loop()
        wakeup = loop.create_future()
        running.waiter = wakeup
        timer = loop.call_later(delay_s, _resolve_future, wakeup) if delay_s is not None else None
        try:
            await wakeup
        finally:
            running.waiter = None
            if timer is not None:
                timer.cancel()

    def _enqueue(self, running: RunningRequest) -> None:
        if running.refusal is not None:  # the scheduler's bounds on its length
            self._fail(running, running.refusal, 400, "BadRequestError", self.timing.now())
            self._flush_wakeups()
            return
        if not (self._priority_set(running) and self._queue_admits(running)):
            self._flush_wakeups()
            return
        running.state = WAITING
        running.queued_seq = next(self._queue_seq)
        running.arrival_processed = self._prefill_tokens_processed
        self._waiting.append(running)
        task = self._scheduler_task
        scheduler_idle = task is None or self._scheduler_wakeup is not None
        if scheduler_idle and self.timing.is_instant():
            # Zero-cost fast path: run the steps in this task, no event-loop hop.
            if self._run_instant_steps():
                self._notify_scheduler()  # work left over
            self._flush_wakeups()
            return
        self._notify_scheduler()

    def _priority_set(self, running: RunningRequest) -> bool:
        """SGLang's _set_or_validate_priority: the priority `running` is
        scheduled by; False when it is refused (a priority given to a server
        without priority scheduling, under --abort-on-priority-when-disabled)."""
        config = self.config
        priority = running.request.priority
        if config.enable_priority_scheduling and priority is None:
            priority = config.default_priority_value
        elif not config.enable_priority_scheduling and priority is not None \
                and config.abort_on_priority_when_disabled:
            self._fail(running, PRIORITY_DISABLED_MESSAGE, 503, None, self.timing.now())
            return False
        if priority is None:  # the least preferred
            priority = sys.maxsize if self._priority_sign == 1 else -sys.maxsize - 1
        running.priority = priority
        return True

    def _queue_admits(self, running: RunningRequest) -> bool:
        """SGLang's _abort_on_queued_limit, for a request about to join the
        waiting queue: past --max-queued-requests it is refused with 503, unless
        under priority scheduling it is strictly preferred to the least preferred
        queued request (the lowest priority, then the newest), which goes instead."""
        limit = self.config.max_queued_requests
        if limit is None or len(self._waiting) + 1 <= limit:
            return True
        refused, message = running, QUEUE_FULL_MESSAGE
        if self.config.enable_priority_scheduling and self._waiting:
            sign = self._priority_sign
            last = max(self._waiting, key=lambda r: (r.priority * sign, r.queued_seq))
            if running.priority * sign < last.priority * sign:
                refused, message = last, OUTRANKED_MESSAGE
        self._fail(refused, message, 503, None, self.timing.now())
        if refused is not running:
            self._flush_wakeups()
        return refused is not running

    def _queue_key(self, running: RunningRequest) -> tuple[int, int]:
        return running.priority * self._priority_sign, running.queued_seq

    def _run_instant_steps(self) -> bool:
        """Run up to INSTANT_STEPS_PER_YIELD zero-duration steps now. True if work remains.

        Only while every step is free (`timing.is_instant`), and only when the
        scheduler loop is parked (or absent), so no planned step is in flight.
        """
        for _ in range(INSTANT_STEPS_PER_YIELD):
            plan = self._plan_step()
            if plan is None:
                return False
            self._apply_step(plan, burst=INSTANT_BURST_TOKENS)
        return True

    def _notify_scheduler(self) -> None:
        if self._wake_anchor is None and (self._scheduler_task is None or self._scheduler_wakeup is not None):
            # The idle scheduler's timeline restarts at this moment, not at whenever
            # the event loop gets round to waking it (jitter is not simulated time).
            self._wake_anchor = time.monotonic()
        task = self._scheduler_task
        if task is None or task.done():
            if task is not None and not task.cancelled() and task.exception() is not None:
                logger.error("scheduler loop died; restarting", exc_info=task.exception())
            self._scheduler_task = asyncio.get_running_loop().create_task(self._scheduler_loop())
            return
        _resolve_future(self._scheduler_wakeup)

    # ------------------------------------------------------------ scheduler

    async def _scheduler_loop(self) -> None:
        """Steps on a schedule: each timed step ends at `deadline` (wall, time.monotonic()),
        and its tokens carry that scheduled time, so reported latencies do not
        include event-loop jitter."""
        loop = asyncio.get_running_loop()
        clock = time.monotonic
        deadline = self._wake_anchor if self._wake_anchor is not None else clock()
        self._wake_anchor = None
        instant_steps = 0
        while True:
            plan = self._plan_step()
            if plan is None:
                self._flush_wakeups()
                instant_steps = 0
                self.new_token_ratio.reset()  # as SGLang's scheduler does when idle
                self._scheduler_wakeup = loop.create_future()
                try:
                    await self._scheduler_wakeup
                finally:
                    self._scheduler_wakeup = None
                deadline = self._wake_anchor if self._wake_anchor is not None else clock()
                self._wake_anchor = None
                continue
            if plan.duration_s > 0:
                self._flush_wakeups()
                instant_steps = 0
                now = clock()
                if deadline < now - MAX_SCHEDULE_LAG_S:
                    deadline = now
                    self.schedule_lag_resets += 1
                deadline += self.timing.wall_s(plan.duration_s)
                if deadline > now:
                    await asyncio.sleep(deadline - now)
                self._apply_step(plan, burst=1, now=deadline / self.timing.time_scale)
                self._flush_wakeups()
            else:
                # A zero-length decode step may stand for a burst of them.
                self._apply_step(plan, burst=INSTANT_BURST_TOKENS)
                instant_steps += 1
                if instant_steps >= INSTANT_STEPS_PER_YIELD:
                    instant_steps = 0
                    self._flush_wakeups()
                    await asyncio.sleep(0)
                    deadline = clock()

    def _plan_step(self) -> _Plan | None:
        entries = self._plan_prefill()
        if entries:
            tokens = 0
            for _, count in entries:
                tokens += count
            self._prefill_tokens_processed += tokens
            duration = self.timing.prefill_step_s(tokens)
            if self._load_back_pending:
                # HiCache: the batch's prefixes found on the host are copied back first.
                duration += self._load_back_pending * self._load_back_s_per_token
                self._load_back_pending = 0
            if self.config.enable_lora:
                # The batch's adapters the GPU pool lacks are copied in first.
                copied = self.lora.fetch({r.adapter for r in self._running})
                if copied and self.config.lora_h2d_bytes_per_s > 0:
                    duration += copied / self.config.lora_h2d_bytes_per_s
            return _Plan(True, entries, duration)
        if self._decoding:
            retracted = len(self._decoding) > 1 and not self._decode_fits(len(self._decoding))
            if retracted:
                self._retract_decode()
            batch = list(self._decoding)
            return _Plan(False, batch, self.timing.decode_step_s(len(batch)), retracted)
        return None

    def _plan_prefill(self) -> list:
        chunk = self.config.chunked_prefill_size
        budget = chunk if chunk > 0 else 1 << 62
        entries: list = []
        chunked = self._chunked
        waiting = self._waiting
        max_running = self.config.max_running_requests
        # A cache-aware policy matches (so touches) the whole queue itself.
        policy = self.config.schedule_policy
        if policy in ("lpm", "hrrn") and len(waiting) > LPM_MAX_QUEUE:
            policy = "fcfs"
        cache_aware = policy in CACHE_AWARE_POLICIES
        # A scheduling pass, as SGLang's: work to place and room for it (a
        # chunked prefill always continues); under fcfs every so many refresh
        # the queue's prefixes.
        scheduling = chunked is not None or (not self._batch_full and len(self._running) < max_running)
        if self._refresh_waiting and waiting and scheduling and not cache_aware:
            if self._refresh_passes % WAITING_PREFIX_REFRESH_INTERVAL == 0:
                self._touch_waiting_prefixes()
            self._refresh_passes += 1
        if chunked is not None:
            count = min(chunked.prefill_needed - chunked.prefill_scheduled, budget)
            chunked.prefill_scheduled += count
            entries.append((chunked, count))
            budget -= count
            if chunked.prefill_scheduled < chunked.prefill_needed:
                return entries
            self._chunked = None
        if not waiting or budget <= 0:
            return entries
        if len(self._running) >= max_running and not self._preemption:
            return entries
        lora_enabled = self.config.enable_lora
        if policy != "fcfs" and len(waiting) > 1:
            candidates = self._ordered_waiting(policy)
        elif self._priority_queue:
            candidates = sorted(waiting, key=self._queue_key)
        elif lora_enabled:
            candidates = list(waiting)  # a request may be skipped for its adapter
        else:
            # FCFS without skipping: at most one candidate per free slot.
            candidates = list(itertools.islice(waiting, max_running - len(self._running)))
        adapters_in_batch = {r.adapter for r in self._running} if lora_enabled else None
        now = self.timing.now()
        offset = self._output_offset()
        for running in candidates:
            if budget <= 0:
                break
            if len(self._running) >= max_running:
                if not (self._preemption and self._preempt_for(running, offset)):
                    break
                offset = self._output_offset()
            if lora_enabled and running.adapter not in adapters_in_batch and \
                    not self.lora.batch_fits(adapters_in_batch | {running.adapter}):
                continue  # its adapter would exceed the batch's adapter slots; others may fit
            charge = self._admit_to_batch(running, offset)
            if charge is None:
                self._batch_full = True
                break  # no KV room: FCFS head-of-line blocking, as in SGLang
            offset += charge
            if waiting[0] is running:
                waiting.popleft()
            else:
                waiting.remove(running)
            running.scheduled_at = now
            if lora_enabled:
                adapters_in_batch.add(running.adapter)
            count = min(running.prefill_needed, budget)
            running.prefill_scheduled = count
            entries.append((running, count))
            budget -= count
            if count < running.prefill_needed:
                self._chunked = running
                break
        return entries

    def _ordered_waiting(self, policy: str) -> list[RunningRequest]:
        """The waiting queue in the order SGLang's SchedulePolicy.calc_priority
        puts it under `policy` (not fcfs)."""
        waiting = list(self._waiting)
        if policy == "lof":
            if self.config.enable_priority_scheduling:
                return sorted(waiting, key=lambda r: (r.priority * self._priority_sign, -r.max_new_estimate))
            return sorted(waiting, key=lambda r: -r.max_new_estimate)
        if policy == "random":
            self._schedule_rng.shuffle(waiting)
            return waiting
        if policy == "routing-key":
            counts = Counter(r.request.routing_key for r in self._running if r.request.routing_key)
            if not counts:
                return waiting

            def by_key(r: RunningRequest) -> tuple:
                key = r.request.routing_key
                return (0, -counts[key], key) if key in counts else (1, 0, key or "")
            return sorted(waiting, key=by_key)
        matches = {r: self.cache.match_prefix(r.fill_ids()[:-1], namespace=r.namespace) for r in waiting}
        deferred = self._sharing_a_waiting_prefix(waiting, matches)
        if policy == "lpm":
            return sorted(waiting, key=lambda r: math.inf if r in deferred else -matches[r].length)
        if policy == "shortest-prefill-first":
            return sorted(waiting, key=lambda r: (r in deferred, max(1, len(r.fill_ids()) - matches[r].length)))
        if policy == "hrrn":
            def response_ratio(r: RunningRequest) -> tuple:
                if r in deferred:
                    return (math.inf, r.rid)
                uncached = r.prompt_tokens - matches[r].length
                if uncached <= 0:
                    return (-math.inf, r.rid)
                return (-max(0, self._prefill_tokens_processed - r.arrival_processed) / uncached, r.rid)
            return sorted(waiting, key=response_ratio)
        return self._dfs_weight_order(waiting, matches)

    @staticmethod
    def _sharing_a_waiting_prefix(waiting: list[RunningRequest], matches: dict) -> set[RunningRequest]:
        """In-batch prefix caching: the waiting requests with little cached that
        share IN_BATCH_PREFIX_THRESHOLD tokens or more with one before them."""
        deferred, earlier = set(), RadixCache(capacity_tokens=1 << 62)
        for running in waiting:
            if matches[running].length > IN_BATCH_PREFIX_THRESHOLD:
                continue
            fill_ids = running.fill_ids()
            if earlier.match_prefix(fill_ids, namespace=running.namespace).length >= IN_BATCH_PREFIX_THRESHOLD:
                deferred.add(running)
            else:
                earlier.insert(fill_ids, namespace=running.namespace)
        return deferred

    def _dfs_weight_order(self, waiting: list[RunningRequest], matches: dict) -> list[RunningRequest]:
        """dfs-weight: a depth-first walk of the cache, heavier subtrees (more
        waiting requests end their match there) first, each node's requests
        after its subtrees'."""
        at_node: dict[RadixNode, list[RunningRequest]] = {}
        weight: dict[RadixNode, int] = {}  # waiting requests whose match ends in the node's subtree
        for running in waiting:
            node = matches[running].node
            at_node.setdefault(node, []).append(running)
            while node is not None:
                weight[node] = weight.get(node, 0) + 1
                node = node.parent
        order: list[RunningRequest] = []
        roots = list({running.namespace: self.cache.root(running.namespace) for running in waiting}.values())
        stack = [(root, False) for root in reversed(roots)]
        while stack:
            node, visited = stack.pop()
            if visited:
                order.extend(at_node.get(node, ()))
                continue
            stack.append((node, True))
            children = sorted((child for child in node.children.values() if child in weight),
                              key=lambda child: -weight[child])
            stack.extend((child, False) for child in reversed(children))
        return order

    def _touch_waiting_prefixes(self) -> None:
        """Refresh the recency of what the first waiting requests will reuse,
        the queue's head last (the most recent), as SGLang's scheduler does."""
        cache = self.cache
        for running in reversed(list(itertools.islice(self._waiting, LPM_MAX_QUEUE))):
            cache.match_prefix(running.fill_ids(), namespace=running.namespace)

    def _output_estimate(self, running: RunningRequest, ratio: float) -> float:
        """What `running` may still write as SGLang's PrefillAdder counts it: its
        remaining output, at most `clip_max_new_tokens`, × `ratio` unless it
        ignores EOS (then it will write all of it)."""
        remaining = min(max(running.max_new_estimate - running.completion_tokens, 0), self.config.clip_max_new_tokens)
        return remaining if running.request.ignore_eos else remaining * ratio

    def _output_offset(self) -> float:
        """The output the running requests may still write, at the current new-token ratio."""
        ratio = self.new_token_ratio.current
        return sum(self._output_estimate(r, ratio) for r in self._running)

    def _unclaimed(self) -> int:
        """KV neither held by running requests (locked in the cache, written
        outside it) nor promised to admitted prompts: free or evictable."""
        return self.capacity_tokens - self.cache.protected_tokens - self._private_tokens - self._pending_prefill

    def _fit_cache(self) -> None:
        """Give the cache what running requests' written and admitted tokens leave; it evicts down to that."""
        self.cache.set_capacity(self.capacity_tokens - self._private_tokens - self._pending_prefill)

    def _decode_fits(self, requests: int) -> bool:
        """A decode step of `requests` finds a token of KV for each, evicting what it must."""
        return self._unclaimed() >= requests

    def _admit_to_batch(self, running: RunningRequest, offset: float) -> float | None:
        """Match the cache and lock the prefix; start `running` if its uncached
        prompt and whole output fit in the unclaimed KV beside `offset` (the
        output the running requests may still write). Returns what it counts
        against that room; None if it does not fit."""
        cache = self.cache
        fill_ids = running.fill_ids()
        # SGLang always recomputes the last prompt token, so at most
        # len(prompt) - 1 tokens can come from the cache.
        match = cache.match_prefix(fill_ids[:-1], namespace=running.namespace)
        host_hit = match.host_length
        if host_hit:  # HiCache: the part found on the host is loaded back, not prefilled
            match = cache.load_back(match)
        cache.lock(match.node)
        uncached = len(fill_ids) - match.length
        charge = uncached + self._output_estimate(running, 1.0)
        # Alone, it is started whatever it needs (the length bounds make it fit the
        # pool once the cache has evicted): never a deadlock.
        if charge > self._unclaimed() - offset and self._running:
            cache.unlock(match.node)
            return None
        running.state = RUNNING
        if not running.retractions:
            running.cached_tokens = match.length  # SGLang counts the first attempt's hit only
            running.cached_tokens_host = host_hit
        self._load_back_pending += host_hit
        running.locked_node = match.node
        running.prefill_needed = uncached
        running.prefill_scheduled = running.prefill_done = 0
        self._pending_prefill += uncached
        self._running[running] = None
        self._fit_cache()
        return charge

    def _preempt_for(self, new: RunningRequest, offset: float) -> bool:
        """SGLang's preempt_to_schedule, for `new` when every slot is taken:
        retract decoding requests whose priority is more than the threshold
        below its own, the lowest (then the newest) first, until its prompt and
        output fit beside what the others may still write (at least one).
        False, and nothing retracted, when those are not enough."""
        sign = self._priority_sign
        fill_ids = new.fill_ids()
        cached = self.cache.match_prefix(fill_ids[:-1], namespace=new.namespace).length
        short = len(fill_ids) - cached + self._output_estimate(new, 1.0) - (self._unclaimed() - offset)
        ratio = self.new_token_ratio.current
        victims = []
        for running in sorted(self._decoding, key=lambda r: (r.priority * -sign, -r.queued_seq)):
            if (new.priority - running.priority) * -sign <= self.config.priority_scheduling_preemption_threshold:
                break
            victims.append(running)
            short -= self._output_estimate(running, ratio)
            if short <= 0:
                break
        if not victims or short > 0:
            return False
        for running in victims:
            self._retract(running)
        return True

    def _retract_decode(self) -> None:
        """SGLang's retract_decode: send decoding requests back to the waiting
        queue until the rest can take a step (at least one, and one stays),
        those with the least output first (ties: the longest prompt; with
        `--retraction-policy priority`, the lowest priority before that); then
        evict so that each left has `retract_decode_steps` tokens of room, and
        set the new-token ratio from what those have written."""
        sign = -self._priority_sign if self.config.retraction_policy == "priority" else 0
        keep = sorted(self._decoding, key=lambda r: (r.priority * sign, r.completion_tokens, -r.prompt_tokens),
                      reverse=True)
        retracted = []
        while len(keep) > 1:
            victim = keep.pop()
            self._retract(victim)
            retracted.append(victim)
            if self._decode_fits(len(keep)):
                break
        steps = self.config.retract_decode_steps
        self.cache.set_capacity(self.capacity_tokens - self._private_tokens - self._pending_prefill
                                - len(keep) * steps)
        self._fit_cache()
        written = sum(r.completion_tokens for r in keep)
        self.new_token_ratio.current = min(1.0, (written + steps * len(keep))
                                           / (sum(r.max_new_estimate for r in keep) + 1))
        self.last_retracted = len(retracted)
        self._decode_steps_since_retraction = 0
        stats = self.stats
        stats.retracted_requests_total += len(retracted)
        stats.retracted_input_tokens_total += sum(r.prompt_tokens for r in retracted)
        stats.retracted_output_tokens_total += sum(r.completion_tokens for r in retracted)
        logger.warning("KV cache pool is full. Retract requests. #retracted_reqs: %d, #new_token_ratio: %.4f",
                       len(retracted), self.new_token_ratio.current)

    def _retract(self, running: RunningRequest) -> None:
        """Back to the end of the waiting queue: its output's KV is freed, not
        cached (SGLang needs the room at once); its prompt stays cached, unlocked."""
        del self._running[running]
        self._decoding.pop(running, None)
        self._private_tokens -= running.kv_private
        running.kv_private = 0
        if running.locked_node is not None:
            self.cache.unlock(running.locked_node)
            running.locked_node = None
        if self.config.disable_radix_cache:
            self.cache.drop_namespace(running.namespace)
        running.retractions += 1
        running.state = WAITING
        if self._queue_admits(running):  # SGLang re-queues it as it queues a new one
            running.queued_seq = next(self._queue_seq)
            self._waiting.append(running)
        self._batch_full = False

    def _apply_step(self, plan: _Plan, *, burst: int, now: float | None = None) -> None:
        """End a planned step at simulated time `now` (default: the present).
        `burst` > 1 only for zero-duration steps: a decode step then stands for
        up to `burst` consecutive ones."""
        if now is None:
            now = self.timing.now()
        if plan.prefill:
            self.steps_total["prefill"] += 1
            generated = 0
            for running, count in plan.entries:
                if running.state is not RUNNING:
                    continue  # aborted during the step
                running.prefill_done += count
                running.kv_private += count
                self._private_tokens += count
                self._pending_prefill -= count
                if running.prefill_done >= running.prefill_needed:
                    generated += self._prefill_complete(running, now)
            self._count_generated(now, generated)
            return
        if burst > 1 and plan.duration_s == 0:
            if self._waiting and len(self._running) < self.config.max_running_requests:
                burst = 1  # a prefill may run next: keep step granularity
            else:  # no more steps than the KV has tokens for
                burst = max(1, min(burst, self._unclaimed() // max(1, len(plan.entries))))
        else:
            burst = 1
        self.steps_total["decode"] += burst
        if not plan.retracted:
            self.new_token_ratio.decay_steps(burst)
        self._decode_steps_since_retraction += burst
        if self._decode_steps_since_retraction >= DECODE_LOG_INTERVAL:
            self.last_retracted = 0
        generated = 0
        for running in plan.entries:
            if running.state is RUNNING:
                generated += self._emit_tokens(running, now, burst)
        self._fit_cache()
        self._count_generated(now, generated)

    def _prefill_complete(self, running: RunningRequest, now: float) -> int:
        """The prompt is prefilled: cache it, sample the first token. Returns tokens generated."""
        # The prompt's KV now lives in the cache (after a retraction, with the output so far).
        fill_ids = running.fill_ids()
        cache = self.cache
        # With pages of P tokens, the last partial page stays the request's own.
        moved = running.prefill_needed - len(fill_ids) % cache.page_size
        running.kv_private -= moved
        self._private_tokens -= moved
        self._fit_cache()
        request = running.request
        match = cache.insert_and_lock(fill_ids, namespace=running.namespace,
                                      priority=request.priority or 0)
        previous = running.locked_node
        running.locked_node = match.node
        if previous is not None:
            cache.unlock(previous)
        if running.token_limit == 0:
            self._finish(running, "", None, {"type": "length", "length": 0}, now)
            return 0
        self._decoding[running] = None
        generated = self._emit_tokens(running, now, 1)  # the prefill forward samples the (next) token
        self._fit_cache()
        return generated

    def _emit_tokens(self, running: RunningRequest, now: float, count: int) -> int:
        """Generate up to `count` tokens for `running` at simulated time `now`
        (the end of the step); stop at its finish. Returns tokens generated."""
        request = running.request
        output_ids = running.output_ids
        pending = running.pending
        next_token = running.text_source.next_token
        stop_strings = request.stop
        stop_regex = request.stop_regex
        stop_token_ids = request.stop_token_ids
        token_limit = running.token_limit
        stops_naturally = running.stops_naturally
        crash_after = running.crash_after
        text = running.text
        produced = 0
        finish = None  # (delta, token_id, finish_reason)
        crashed = False
        if running.first_token_at is None:
            running.first_token_at = now
            self.stats.streaming(running.request.stream, running.metric_priority).ttft.observe(
                now - running.admitted_at)
            gap = None
        else:
            gap = now - running.last_token_at
        while produced < count:
            if crash_after is not None and len(output_ids) >= crash_after:
                crashed = True
                break
            if stops_naturally and len(output_ids) + 1 == token_limit:
                token_id, piece = EOS_TOKEN_ID, ""  # a special token: not in the decoded text
            else:
                token_id, piece = next_token()
            output_ids.append(token_id)
            produced += 1
            previous_length = len(text)
            text += piece
            delta = piece
            finish_reason = None
            if stop_strings:
                for stop in stop_strings:
                    found_at = text.find(stop, max(0, previous_length - len(stop) + 1))
                    if found_at != -1:
                        # SGLang trims the matched stop string from the output
                        # (no_stop_trim: what follows it in the token).
                        text = text[:found_at + len(stop)] if request.no_stop_trim else text[:found_at]
                        delta = text[previous_length:]
                        finish_reason = {"type": "stop", "matched": stop}
                        break
            if finish_reason is None and stop_regex:
                for pattern in stop_regex:
                    if pattern.search(text) is not None:
                        # SGLang trims `matched` as if it were a stop string: the
                        # pattern's own text, so only a literal pattern is cut.
                        found_at = text.find(pattern.pattern)
                        if found_at != -1:
                            text = text[:found_at + len(pattern.pattern)] if request.no_stop_trim else text[:found_at]
                            delta = text[previous_length:]
                        finish_reason = {"type": "stop", "matched": pattern.pattern}
                        break
            if finish_reason is None and stop_token_ids and token_id in stop_token_ids \
                    and len(output_ids) > request.min_new_tokens:
                finish_reason = {"type": "stop", "matched": token_id}
                if not request.no_stop_trim:
                    # SGLang drops the stop token from the text it decodes.
                    text = text[:previous_length]
                    delta = ""
            if finish_reason is None and len(output_ids) >= token_limit:
                if running.stops_naturally:
                    finish_reason = {"type": "stop", "matched": EOS_TOKEN_ID}
                else:
                    finish_reason = {"type": "length", "length": token_limit}
            if finish_reason is not None:
                finish = (delta, token_id, finish_reason)
                break
            pending.append(Step(delta, token_id, None, None, False, len(output_ids), len(text)))
        running.text = text
        running.kv_private += produced
        self._private_tokens += produced
        if produced:
            # Inter-token gaps: the first since the previous step; the rest of a
            # burst share this step's end time (gap 0).
            itl = self.stats.priority(running.metric_priority).itl
            if gap is not None:
                itl.observe(gap)
                itl.observe_many(0.0, produced - 1)
            else:
                itl.observe_many(0.0, produced - 1)
            running.last_token_at = now
        if finish is not None:
            self._finish(running, finish[0], finish[1], finish[2], now)
        elif crashed:
            self._crash(running, now)
        elif produced:
            self._to_wake.append(running)
        return produced

    def _finish(self, running: RunningRequest, delta: str, token_id: int | None, finish_reason: dict,
                now: float) -> Step:
        running.finish_reason = finish_reason
        running.finished_at = now
        step = Step(delta, token_id, finish_reason, None, False, len(running.output_ids), len(running.text))
        running.pending.append(step)
        self._to_wake.append(running)
        self._retire(running)
        return step

    def _crash(self, running: RunningRequest, now: float) -> None:
        message = f"Simulated engine crash after {running.completion_tokens} tokens (crash_after_tokens fault)."
        self._fail(running, message, 500, "InternalServerError", now)

    def _fail(self, running: RunningRequest, message: str, status_code: int, err_type: str | None,
              now: float) -> None:
        """End `running` with an abort that carries an HTTP status (an error to the client)."""
        step = self._finish(running, "", None, {
            "type": "abort", "message": message, "status_code": status_code, "err_type": err_type}, now)
        step.error = {"message": message, "status_code": status_code}

    def _abort_step(self, running: RunningRequest) -> Step:
        # Same shape as SGLang's FINISH_ABORT().to_json() for /abort_request; one
        # popped from the waiting queue is answered by the tokenizer manager instead.
        running.finish_reason = {"type": "abort", "message": WAITING_ABORT_MESSAGE} if running.aborted_waiting \
            else {"type": "abort", "message": ABORT_MESSAGE, "status_code": None, "err_type": None}
        running.finished_at = self.timing.now()
        return Step("", None, running.finish_reason, None, False, len(running.output_ids), len(running.text))

    def _flush_wakeups(self) -> None:
        to_wake = self._to_wake
        if not to_wake:
            return
        for running in to_wake:
            waiter = running.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        to_wake.clear()

    def _count_generated(self, now: float, tokens: int) -> None:
        if not tokens:
            return
        bucket = now - now % THROUGHPUT_BUCKET_S
        buckets = self._throughput_buckets
        if buckets and buckets[-1][0] == bucket:
            buckets[-1][1] += tokens
        else:
            buckets.append([bucket, tokens])

    # ------------------------------------------------------------ release

    def _retire(self, running: RunningRequest) -> None:
        """Leave the queue or the batch; release KV; cache the sequence; unlock. Idempotent."""
        state = running.state
        if state is DONE:
            return
        running.state = DONE
        if state is WAITING:
            try:
                self._waiting.remove(running)
            except ValueError:
                pass
        if state is not RUNNING:
            return
        self._running.pop(running, None)
        self._decoding.pop(running, None)
        self._batch_full = False
        if self._chunked is running:
            self._chunked = None
        self._pending_prefill -= running.prefill_needed - running.prefill_done
        running.prefill_needed = running.prefill_done
        self._private_tokens -= running.kv_private
        running.kv_private = 0
        self._fit_cache()
        cache = self.cache
        if running.output_ids and not self.config.disable_radix_cache:
            # Finished (or partial) sequences stay cached, like RadixAttention;
            # as SGLang splits the prompt off the reply, the prompt gets the
            # request's priority + 1 (under `--radix-eviction-policy priority`
            # a reply goes before its prompt).
            prompt_ids = running.request.prompt_ids
            priority = running.request.priority or 0
            # The prompt went in when its prefill ended: its nodes have counted this request.
            cache.insert(prompt_ids + running.output_ids, namespace=running.namespace, priority=priority,
                         inserted=len(prompt_ids))
            cache.insert(prompt_ids, namespace=running.namespace, priority=priority + 1, inserted=len(prompt_ids))
        if running.locked_node is not None:
            cache.unlock(running.locked_node)
            running.locked_node = None
        if self.config.disable_radix_cache:
            cache.drop_namespace(running.namespace)
        if self._waiting and self._scheduler_task is not None:
            _resolve_future(self._scheduler_wakeup)  # room freed: a waiting request may fit

    def finalize(self, running: RunningRequest) -> None:
        """Release the request exactly once: queues, KV, cache, counters.

        `run` calls it when it ends; callers also call it after admission in
        a `finally`, for the case where `run` never started (idempotent).
        """
        if running.finalized:
            return
        running.finalized = True
        self._retire(running)
        self._active.discard(running)
        self._active_rids.discard(running.request.rid)
        if running.finished_at is None:
            running.finished_at = self.timing.now()

        stats = self.stats
        stats.prompt_tokens_total += running.prompt_tokens
        stats.completion_tokens_total += running.completion_tokens
        stats.cached_tokens_total += running.cached_tokens
        self.prompt_tokens_total += running.prompt_tokens
        self.cached_tokens_total += running.cached_tokens
        priority = running.metric_priority
        stats.priority(priority).cached_tokens += running.cached_tokens
        series = stats.streaming(running.request.stream, priority)
        series.prompt_tokens += running.prompt_tokens
        series.generation_tokens += running.completion_tokens
        series.requests += 1
        finish_reason = running.finish_reason
        if finish_reason is None and running.abort_cause is None:
            # The consumer went away without telling us (e.g. a failed write).
            running.abort_cause = "disconnect"
        if running.abort_cause is not None and (finish_reason is None or finish_reason["type"] == "abort"):
            stats.record_abort(running.rid, by_disconnect=running.abort_cause == "disconnect")
        elif finish_reason is not None and finish_reason.get("status_code"):
            stats.requests_failed += 1
        else:
            stats.requests_finished += 1
            series.e2e.observe(running.e2e_latency_s())

    # ------------------------------------------------------------ control

    def abort(self, *, rid: str, abort_all: bool, record: bool = True) -> int:
        """SGLang's abort_request: rid prefix match, or everything. Returns count
        hit. `record`: count the call (once per call, whatever the ranks)."""
        if record:
            self.stats.abort_requests_received += 1
            self.stats.abort_request_rids.append("*" if abort_all else rid)
        if not abort_all and not rid:
            return 0  # an empty rid would prefix-match everything; SGLang ignores it
        hit = 0
        for running in list(self._active):
            if running.finish_reason is None and running.abort_cause is None and (
                    abort_all or running.rid.startswith(rid)):
                running.aborted_waiting = running.state is WAITING
                self._interrupt(running, "request")
                hit += 1
        return hit

    def mark_disconnected(self, running: RunningRequest) -> None:
        """The client went away; the caller then closes the `run` generator."""
        if running.finish_reason is None and running.abort_cause is None:
            self._interrupt(running, "disconnect")

    def _interrupt(self, running: RunningRequest, cause: str) -> None:
        running.abort_cause = cause
        if running.state is not HELD:
            self._retire(running)
        _resolve_future(running.waiter)

    def release_hung_requests(self) -> int:
        """The `hang` fault was cleared: let hung requests proceed."""
        released = 0
        for running in self._active:
            if running.hung:
                _resolve_future(running.waiter)
                released += 1
        return released

    @property
    def has_active_requests(self) -> bool:
        return bool(self._active)

    @property
    def active_requests(self) -> int:
        return len(self._active)

    def flush_cache(self) -> bool:
        """Drop the prefix cache unless requests are running or waiting (as SGLang does)."""
        if self._active:
            return False
        self.cache.reset()
        return True

    async def _lora_load_delay(self) -> None:
        delay = self.config.lora_load_ms / 1e3
        if delay > 0:
            await asyncio.sleep(self.timing.wall_s(delay))

    # ------------------------------------------------------------ observation

    @property
    def num_running_requests(self) -> int:
        """Requests in the running batch (prefilling or decoding)."""
        return len(self._running)

    @property
    def num_waiting_requests(self) -> int:
        """Requests received and not yet in the batch: waiting queue, plus held by ttft_ms / hang."""
        return len(self._active) - len(self._running) - sum(
            1 for running in self._active if running.state is DONE)

    @property
    def num_queue_requests(self) -> int:
        return len(self._waiting)

    def active_rids(self) -> list[str]:
        return [running.rid for running in self._active]

    def find_active(self, rid: str) -> RunningRequest | None:
        """The request in flight (admitted, not finalized) with this rid."""
        return next((running for running in self._active if running.rid == rid), None)

    def running_tokens(self) -> int:
        """Tokens (prompt + generated) held by running requests."""
        return sum(running.prompt_tokens + running.completion_tokens for running in self._running)

    def waiting_uncached_tokens(self) -> int:
        return sum(running.prompt_tokens for running in self._waiting)

    def used_tokens(self) -> int:
        """KV tokens in use by running requests: their locked cache paths and unshared tokens."""
        return self.cache.protected_tokens + self._private_tokens

    def kv_token_counts(self) -> dict[str, int]:
        cache = self.cache
        used = self.used_tokens()
        return {"num_used": used, "kv_used": used, "kv_evictable": cache.evictable_tokens,
                "kv_available": max(0, self.capacity_tokens - used - cache.evictable_tokens)}

    def lora_slots_used(self) -> int:
        """Distinct adapters (the base model counts as one) in the running batch."""
        return len({running.adapter for running in self._running})

    def cache_hit_rate(self) -> float:
        prompt_total = self.prompt_tokens_total
        return self.cached_tokens_total / prompt_total if prompt_total else 0.0

    def token_usage(self) -> float:
        capacity = self.capacity_tokens
        return min(1.0, self.used_tokens() / capacity) if capacity else 0.0

    def gen_throughput(self) -> float:
        """Generated tokens per simulated second over the last THROUGHPUT_WINDOW_S."""
        now = self.timing.now()
        horizon = now - THROUGHPUT_WINDOW_S
        buckets = self._throughput_buckets
        while buckets and buckets[0][0] < horizon:
            buckets.popleft()
        return sum(tokens for _, tokens in buckets) / THROUGHPUT_WINDOW_S

    def stats_snapshot(self) -> dict:
        stats = self.stats
        cache = self.cache
        return {
            "requests_received": stats.requests_received,
            "requests_finished": stats.requests_finished,
            "requests_failed": stats.requests_failed,
            "requests_aborted": stats.requests_aborted,
            "requests_rejected": stats.requests_rejected,
            "streaming_requests": stats.streaming_requests,
            "active_requests": len(self._active),
            "active_rids": self.active_rids(),
            "aborted_rids": list(stats.aborted_rids),
            "aborted_by_request": list(stats.aborted_by_request),
            "disconnected": list(stats.disconnected),
            "abort_requests_received": stats.abort_requests_received,
            "abort_request_rids": list(stats.abort_request_rids),
            "prompt_tokens_total": stats.prompt_tokens_total,
            "completion_tokens_total": stats.completion_tokens_total,
            "cached_tokens_total": stats.cached_tokens_total,
            "cache": {
                "capacity_tokens": cache.capacity_tokens,
                "total_tokens": cache.total_tokens,
                "protected_tokens": cache.protected_tokens,
                "evictable_tokens": cache.evictable_tokens,
                "evicted_tokens_total": cache.evicted_tokens_total,
                "hit_rate": round(self.cache_hit_rate(), 4),
                **({"host_capacity_tokens": cache.host_capacity_tokens, "host_tokens": cache.host_tokens,
                    **cache.hicache_counters()} if cache.hierarchical else {}),
            },
            "engine": {
                "running_requests": len(self._running),
                "queued_requests": len(self._waiting),
                "waiting_requests": self.num_waiting_requests,
                "max_running_requests": self.config.max_running_requests,
                "max_total_tokens": self.capacity_tokens,
                "reserved_tokens": round(self._pending_prefill + self._output_offset()),
                "new_token_ratio": round(self.new_token_ratio.current, 4),
                "retracted_requests_total": stats.retracted_requests_total,
                "used_tokens": self.used_tokens(),
                "token_usage": round(self.token_usage(), 4),
                "chunked_rid": self._chunked.rid if self._chunked is not None else None,
                "prefill_steps": self.steps_total["prefill"],
                "decode_steps": self.steps_total["decode"],
                "schedule_lag_resets": self.schedule_lag_resets,
            },
            "lora": self.lora.snapshot(),
        }

    def reset_stats(self, stats: SimStats | None = None) -> None:
        """Start the counters again (`stats`: the new ones the ranks share)."""
        self.stats = stats if stats is not None else SimStats()
        self.prompt_tokens_total = self.cached_tokens_total = 0


def _resolve_future(future: asyncio.Future | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
