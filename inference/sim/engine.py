"""The simulated inference engine: admission, prefix cache, token generation.

Transport-independent: the HTTP layer turns a parsed request into a
`GenerationRequest`, calls `admit`, then iterates `run`, which yields one
`Step` per generated token (stream interval 1) and a last step carrying the
finish reason. Everything a real SGLang scheduler would decide lives here.

Today each request runs on its own timeline (see `timing.TimingModel`); a
continuous-batching model can replace `run`'s delays with batch steps
without changing the interface.

Output rules (deterministic):
- Text is pseudo-text from `tokenizer.PseudoTextSource`, seeded by the prompt
  ids, `--seed` and the request's `seed`; sampling parameters other than
  stop / max tokens do not change it.
- With a max-token limit, exactly that many tokens are generated (finish
  `length`) unless a stop string appears first (finish `stop`, matched = the
  string, which is trimmed from the text as SGLang does).
- Without a limit (chat with no max_tokens), the request ends at a natural
  EOS after `natural_length` tokens in [16, 64] (finish `stop`, matched =
  EOS_TOKEN_ID) or earlier at the context length (finish `length`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Hashable

from .config import RuntimeSettings, ServerConfig
from .metrics import SimStats
from .radix_cache import RadixCache, RadixNode
from .timing import TimingModel
from .tokenizer import EOS_TOKEN_ID, PseudoTextSource, generation_seed, natural_length

# Window over which gen_throughput is averaged, seconds.
THROUGHPUT_WINDOW_S = 10.0

# With no inter-token delay, yield to the event loop after this many tokens so
# one long request cannot starve the others.
TOKENS_PER_LOOP_YIELD = 32

ABORT_MESSAGE = "Aborted"


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
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    cache_namespace: Hashable = None  # from cache_salt / extra_key; None = shared
    stream: bool = False
    lora_path: str | None = None


@dataclass(slots=True)
class Step:
    """What one engine step produced for one request."""

    delta_text: str  # new visible text (may be "" after stop trimming or abort)
    token_id: int | None  # the token generated this step, if any
    finish_reason: dict | None  # SGLang's finish_reason object, on the last step only
    error: dict | None = None  # set on an injected mid-stream crash (last step)
    more_ready: bool = False  # the next step follows without delay (a write-coalescing hint)


@dataclass(slots=True, eq=False)
class RunningRequest:
    request: GenerationRequest
    prompt_tokens: int
    cached_tokens: int
    token_limit: int  # tokens this request will generate at most
    stops_naturally: bool  # reaching token_limit means EOS, not length
    admitted_at: float  # time.monotonic() seconds
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict | None = None
    abort_cause: str | None = None  # "request" or "disconnect"
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    locked_node: RadixNode | None = None  # holds one cache lock while running
    text_source: PseudoTextSource | None = None
    wakeup: asyncio.Future | None = None  # resolved early by abort during a wait
    hung: bool = False  # waiting in the `hang` fault
    finalized: bool = False

    @property
    def rid(self) -> str:
        return self.request.rid

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def e2e_latency_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.admitted_at


class SimEngine:
    def __init__(self, *, config: ServerConfig, settings: RuntimeSettings) -> None:
        self.config = config
        self.settings = settings
        self.timing = TimingModel(settings)
        self.cache = RadixCache(capacity_tokens=config.cache_capacity_tokens)
        self.stats = SimStats()
        self._active: set[RunningRequest] = set()
        # Drives error_rate; seeded so a run's fault pattern is reproducible.
        self._fault_rng = random.Random(config.seed)
        # (finish time in time.monotonic() seconds, completion tokens) of recent requests
        self._recent_completions: deque[tuple[float, int]] = deque()

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
                f"Requested token count exceeds the model's maximum context length "
                f"of {context_length} tokens. You requested a total of {total} "
                f"tokens: {prompt_tokens} tokens from the input messages and "
                f"{max_new_tokens} tokens for the completion. Please reduce the number "
                f"of tokens in the input messages or the completion to fit within the limit."
            )

    def admit(self, request: GenerationRequest) -> RunningRequest:
        """Validate, maybe inject a failure, match the prefix cache, start tracking.

        Raises RequestRejected (4xx) or InjectedFailure (500). After a
        successful return the caller must end the request through `run`
        and/or `finalize` (idempotent), or its cache lock is never released.
        """
        prompt_ids = request.prompt_ids
        if not prompt_ids:
            raise RequestRejected("The input is empty.")
        if request.max_new_tokens is not None and request.max_new_tokens < 0:
            raise RequestRejected(f"max_new_tokens must be at least 0, got {request.max_new_tokens}.")
        self.check_lengths(prompt_tokens=len(prompt_ids), max_new_tokens=request.max_new_tokens)
        self.stats.requests_received += 1
        if request.stream:
            self.stats.streaming_requests += 1
        if self.settings.error_rate > 0 and self._fault_rng.random() < self.settings.error_rate:
            self.stats.requests_failed += 1
            raise InjectedFailure("Injected failure (simulator error_rate)")

        room = self.config.context_length - len(prompt_ids)
        seed = generation_seed(prompt_ids=prompt_ids, server_seed=self.config.seed, request_seed=request.seed)
        if request.max_new_tokens is not None:
            token_limit, stops_naturally = request.max_new_tokens, False
        else:
            natural = natural_length(seed, self.config.natural_length_min, self.config.natural_length_max)
            token_limit, stops_naturally = min(natural, room), natural <= room
            if request.ignore_eos:
                token_limit, stops_naturally = room, False

        # SGLang always recomputes the last prompt token, so at most
        # len(prompt) - 1 tokens can come from the cache.
        match = self.cache.match_prefix(prompt_ids[:-1], namespace=request.cache_namespace)
        self.cache.lock(match.node)
        running = RunningRequest(
            request=request,
            prompt_tokens=len(prompt_ids),
            cached_tokens=match.length,
            token_limit=token_limit,
            stops_naturally=stops_naturally,
            admitted_at=time.monotonic(),
            locked_node=match.node,
            text_source=PseudoTextSource(seed),
        )
        self._active.add(running)
        return running

    # ------------------------------------------------------------ generation

    async def run(self, running: RunningRequest) -> AsyncIterator[Step]:
        """Generate `running`'s tokens; the last Step carries the finish reason.

        Use as `async with contextlib.aclosing(engine.run(r)) as steps:` so the
        request is finalized (cache insert, unlock, stats) even when the
        consumer stops early (client disconnect).
        """
        try:
            async for step in self._generate_steps(running):
                yield step
        finally:
            self.finalize(running)

    async def _generate_steps(self, running: RunningRequest) -> AsyncIterator[Step]:
        request = running.request
        if self.settings.hang:
            running.hung = True
            await self._wait(running, None)  # ends on abort, cancellation or release_hung_requests
            running.hung = False
        prefill_delay = self.timing.prefill_delay_s(
            uncached_prompt_tokens=running.prompt_tokens - running.cached_tokens)
        if prefill_delay > 0 and running.abort_cause is None:
            await self._wait(running, prefill_delay)
        if running.abort_cause is not None:
            yield self._abort_step(running)
            return
        # The prompt's KV now exists: make it shareable with concurrent requests.
        self._cache_prompt(running)

        if running.token_limit == 0:
            yield self._finish_step(running, "", None, {"type": "length", "length": 0})
            return

        source = running.text_source
        stop_strings = request.stop
        stop_token_ids = request.stop_token_ids
        crash_after = self.settings.crash_after_tokens  # fixed per request, read at its start
        itl_histogram = self.stats.itl
        produced = 0
        while True:
            if running.abort_cause is not None:
                yield self._abort_step(running)
                return
            if crash_after is not None and produced >= crash_after:
                yield self._crash_step(running)
                return
            token_id, piece = source.next_token()
            running.output_ids.append(token_id)
            produced += 1
            now = time.monotonic()
            if running.first_token_at is None:
                running.first_token_at = now
                self.stats.ttft.observe(now - running.admitted_at)
            else:
                itl_histogram.observe(now - running.last_token_at)
            running.last_token_at = now

            previous_length = len(running.text)
            running.text += piece
            delta = piece
            finish_reason = None
            if stop_strings:
                for stop in stop_strings:
                    found_at = running.text.find(stop, max(0, previous_length - len(stop) + 1))
                    if found_at != -1:
                        # SGLang trims the matched stop string from the output.
                        running.text = running.text[:found_at]
                        delta = running.text[previous_length:]
                        finish_reason = {"type": "stop", "matched": stop}
                        break
            if finish_reason is None and stop_token_ids and token_id in stop_token_ids:
                finish_reason = {"type": "stop", "matched": token_id}
            if finish_reason is None and produced >= running.token_limit:
                if running.stops_naturally:
                    finish_reason = {"type": "stop", "matched": EOS_TOKEN_ID}
                else:
                    finish_reason = {"type": "length", "length": running.token_limit}
            if finish_reason is not None:
                yield self._finish_step(running, delta, token_id, finish_reason)
                return

            decode_delay = self.timing.decode_delay_s()
            yield Step(delta, token_id, None, None, decode_delay <= 0)
            if decode_delay > 0:
                await self._wait(running, decode_delay)
            elif produced % TOKENS_PER_LOOP_YIELD == 0:
                await asyncio.sleep(0)

    def _finish_step(self, running: RunningRequest, delta: str, token_id: int | None, finish_reason: dict) -> Step:
        running.finish_reason = finish_reason
        running.finished_at = time.monotonic()
        return Step(delta, token_id, finish_reason)

    def _abort_step(self, running: RunningRequest) -> Step:
        # Same shape as SGLang's FINISH_ABORT().to_json() for /abort_request.
        return self._finish_step(running, "", None, {
            "type": "abort", "message": ABORT_MESSAGE, "status_code": None, "err_type": None})

    def _crash_step(self, running: RunningRequest) -> Step:
        message = f"Simulated engine crash after {running.completion_tokens} tokens (crash_after_tokens fault)."
        step = self._finish_step(running, "", None, {
            "type": "abort", "message": message, "status_code": 500, "err_type": "InternalServerError"})
        step.error = {"message": message, "status_code": 500}
        return step

    async def _wait(self, running: RunningRequest, delay_s: float | None) -> None:
        """Sleep `delay_s` seconds (forever if None), cut short by an abort."""
        loop = asyncio.get_running_loop()
        wakeup = loop.create_future()
        running.wakeup = wakeup
        timer = loop.call_later(delay_s, _resolve_future, wakeup) if delay_s is not None else None
        try:
            await wakeup
        finally:
            running.wakeup = None
            if timer is not None:
                timer.cancel()

    # ------------------------------------------------------------ cache bookkeeping

    def _cache_prompt(self, running: RunningRequest) -> None:
        request = running.request
        match = self.cache.insert_and_lock(request.prompt_ids, namespace=request.cache_namespace)
        previous = running.locked_node
        running.locked_node = match.node
        if previous is not None:
            self.cache.unlock(previous)

    def finalize(self, running: RunningRequest) -> None:
        """Release the request exactly once: cache insert + unlock, counters.

        `run` calls it when it ends; callers also call it after admission in
        a `finally`, for the case where `run` never started (idempotent).
        """
        if running.finalized:
            return
        running.finalized = True
        self._active.discard(running)
        if running.finished_at is None:
            running.finished_at = time.monotonic()
        request = running.request
        if running.output_ids:
            # Finished (or partial) sequences stay cached, like RadixAttention.
            self.cache.insert(request.prompt_ids + running.output_ids, namespace=request.cache_namespace)
        if running.locked_node is not None:
            self.cache.unlock(running.locked_node)
            running.locked_node = None

        stats = self.stats
        stats.prompt_tokens_total += running.prompt_tokens
        stats.completion_tokens_total += running.completion_tokens
        stats.cached_tokens_total += running.cached_tokens
        if running.completion_tokens:
            self._recent_completions.append((running.finished_at, running.completion_tokens))
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
            stats.e2e.observe(running.e2e_latency_s())

    # ------------------------------------------------------------ control

    def abort(self, *, rid: str, abort_all: bool) -> int:
        """SGLang's abort_request: rid prefix match, or everything. Returns count hit."""
        self.stats.abort_requests_received += 1
        self.stats.abort_request_rids.append("*" if abort_all else rid)
        if not abort_all and not rid:
            return 0  # an empty rid would prefix-match everything; SGLang ignores it
        hit = 0
        for running in list(self._active):
            if running.finish_reason is None and running.abort_cause is None and (
                    abort_all or running.rid.startswith(rid)):
                running.abort_cause = "request"
                _resolve_future(running.wakeup)
                hit += 1
        return hit

    def mark_disconnected(self, running: RunningRequest) -> None:
        """The client went away; the caller then closes the `run` generator."""
        if running.finish_reason is None and running.abort_cause is None:
            running.abort_cause = "disconnect"
            _resolve_future(running.wakeup)

    def release_hung_requests(self) -> int:
        """The `hang` fault was cleared: let hung requests proceed."""
        released = 0
        for running in self._active:
            if running.hung:
                _resolve_future(running.wakeup)
                released += 1
        return released

    def flush_cache(self) -> bool:
        """Drop the prefix cache unless requests are running (as SGLang does)."""
        if self._active:
            return False
        self.cache.reset()
        return True

    # ------------------------------------------------------------ observation

    @property
    def num_running_requests(self) -> int:
        return len(self._active)

    def active_rids(self) -> list[str]:
        return [running.rid for running in self._active]

    def running_tokens(self) -> int:
        """Tokens (prompt + generated) held by running requests."""
        return sum(running.prompt_tokens + running.completion_tokens for running in self._active)

    def cache_hit_rate(self) -> float:
        prompt_total = self.stats.prompt_tokens_total
        return self.stats.cached_tokens_total / prompt_total if prompt_total else 0.0

    def token_usage(self) -> float:
        capacity = self.config.cache_capacity_tokens
        return min(1.0, self.cache.protected_tokens / capacity) if capacity else 0.0

    def gen_throughput(self) -> float:
        """Generated tokens/s over the last THROUGHPUT_WINDOW_S (finished requests)."""
        horizon = time.monotonic() - THROUGHPUT_WINDOW_S
        recent = self._recent_completions
        while recent and recent[0][0] < horizon:
            recent.popleft()
        return sum(tokens for _, tokens in recent) / THROUGHPUT_WINDOW_S

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
            },
        }

    def reset_stats(self) -> None:
        self.stats = SimStats()


def _resolve_future(future: asyncio.Future | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
