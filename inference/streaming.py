"""The transport-independent completion service: one request in, OpenAI-shaped
chunks (or one response) out, usage metered whatever happens. The SSE view and
the WebSocket consumer are thin adapters over `completion_stream` and
`completion_create`.

Path of a request: validate → resolve model → pick backend → stream from the
backend → meter. Upstream streams are always asked for usage on every chunk
(`continuous_usage_stats`), so a stream cut short still bills exactly what the
backend reported for the tokens delivered."""
from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import secrets
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import aiohttp
import orjson

from billing.services import UsageEvent
from tenants.selectors import ApiKeyPrincipal

from . import errors
from .admission import AdmissionGate
from .errors import ApiError
from .limits import Admission, Limiter
from .registry import BackendState, Prices, Resolution
from .routing import POLICY_NAMES, key_footprint, policy_for, routing_key_build
from .routing.homes import ConversationHomes
from .routing.retention import PrefixRetention
from .chunks import ChunkRewriter, error_message, error_status, sse_batches, usage_counts, usage_object
from .sglang import BackendUnreachable, backend_abort, backend_post

logger = logging.getLogger(__name__)

CHAT = "chat.completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
UPSTREAM_PATH = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions", EMBEDDINGS: "/v1/embeddings"}
ID_PREFIX = {CHAT: "chatcmpl-", COMPLETIONS: "cmpl-", EMBEDDINGS: "embd-"}
# OpenAI's limit on the inputs of one embeddings request.
EMBEDDING_INPUTS_MAX = 2048
# OpenAI's limit on `n`, the choices generated for each prompt.
CHOICES_PER_PROMPT_MAX = 128
# Fields a caller may not set: the gateway decides them (rid, adapter selection,
# the backend scheduling priority, which follows the tenant's tier).
# Fields of SGLang's request schema that callers may not set: the gateway owns
# them (request ids, adapters, priorities, and the data-parallel rank it routes
# to), or they reach past the caller's own request: server-side sessions
# another tenant could name, code run in the server's sampler
# (custom_logit_processor, where the server enables it), and the router's
# prefill-decode hand-off (bootstrap_*, a host for the server to connect to).
GATEWAY_OWNED_FIELDS = frozenset((
    "rid", "lora_path", "priority",
    "routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank",
    "session_id", "session_params", "custom_logit_processor", "custom_params",
    "bootstrap_host", "bootstrap_port", "bootstrap_room",
))
# Ids: 64 random bits per process and a counter. uuid4() per request would read
# os.urandom, which releases and then waits for the GIL on a busy event loop.
_ID_BASE = secrets.randbits(64)
_ID_TEXT = f"{_ID_BASE:016x}"
_id_counter = itertools.count(1)
# A backend answering these before the first token is busy, not broken (SGLang's
# 503 for a full queue, or a 429): another backend is tried, its breaker is left alone.
BUSY_STATUSES = (429, 503)
# Status stored for a request the client abandoned (nginx's convention).
CLIENT_CLOSED_STATUS = 499
# Message roles a chat request may use besides "user": OpenAI's, and the two
# more SGLang's protocol takes (for models whose templates have them). SGLang
# takes these in any case, "user" only as it is.
MESSAGE_ROLES = frozenset(("system", "assistant", "tool", "function", "developer", "latest_reminder", "root"))
# Chat-template tokens counted per message, and once per request, in the prompt bound.
PROMPT_TOKENS_PER_MESSAGE = 8
PROMPT_TOKENS_FIXED = 8


@dataclass(slots=True)
class CompletionRequest:
    principal: ApiKeyPrincipal
    endpoint: str  # CHAT or COMPLETIONS
    body: dict
    transport: str  # "http" or "websocket"
    request_id: str
    stream: bool
    include_usage: bool
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # Set by the service when the request starts; adapters read delivered usage and
    # the rate-limit headers from them.
    meter: "UsageMeter | None" = None
    admission: Admission | None = None
    # Length of the request's routing key (set when it is routed).
    routing_key_chars: int = 0
    # What of a backend's KV cache the request holds that others do not share
    # (routing.policies.key_footprint), counted while it is in flight there.
    kv_chars: int = 0
    # Choices per prompt (`n`), and prompts (a completions batch): the response
    # has n × prompts choices.
    n: int = 1
    prompts: int = 1
    # stream_options.continuous_usage_stats (SGLang's and vLLM's extension):
    # every chunk carries the usage so far.
    continuous_usage: bool = False

    @property
    def choices(self) -> int:
        return self.n * self.prompts

    @property
    def response_headers(self) -> dict[str, str]:
        return self.admission.headers if self.admission is not None else {}

    @property
    def model_name(self) -> str:
        return self.body["model"]


def completion_request_build(
    *, principal: ApiKeyPrincipal, endpoint: str, body: object, transport: str, started: float | None = None
) -> CompletionRequest:
    """Checks what the gateway itself relies on; the backend validates the rest
    and its 400s reach the caller in OpenAI's shape."""
    if not isinstance(body, dict):
        raise errors.invalid_json()
    model = body.get("model")
    if model is None or model == "":
        raise errors.missing_parameter("model")
    if not isinstance(model, str):
        raise errors.invalid_parameter("model", "'model' must be a string.")
    n = prompts = 1
    continuous_usage = False
    if endpoint == EMBEDDINGS:
        _embedding_input_check(body)
        stream = include_usage = False
    else:
        stream, include_usage, n, prompts = _generation_check(endpoint, body)
        continuous_usage = stream and bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
    return CompletionRequest(
        principal=principal,
        endpoint=endpoint,
        body=body,
        transport=transport,
        request_id=f"{ID_PREFIX[endpoint]}{_ID_TEXT}{next(_id_counter):08x}",
        stream=stream,
        include_usage=include_usage,
        n=n,
        prompts=prompts,
        continuous_usage=continuous_usage,
        **({"started": started} if started is not None else {}),
    )


def _generation_check(endpoint: str, body: dict) -> tuple[bool, bool, int, int]:
    """A chat or completion request's own fields; returns (stream, include_usage,
    n, prompts): the choices per prompt and the prompts of a completions batch
    (a list of strings or of token-id lists)."""
    prompts = 1
    if endpoint == CHAT:
        messages = body.get("messages")
        if messages is None:
            raise errors.missing_parameter("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.invalid_parameter("messages", "'messages' must be a non-empty array.")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise errors.invalid_parameter(
                    f"messages[{index}]", f"messages[{index}] must be an object with a 'role'."
                )
            role = message["role"]
            if role != "user" and role.lower() not in MESSAGE_ROLES:
                raise errors.invalid_parameter(
                    f"messages[{index}].role",
                    f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', 'function', "
                    "'tool', and 'developer'.")
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise errors.missing_parameter("prompt")
        if not isinstance(prompt, (str, list)):
            raise errors.invalid_parameter("prompt", "'prompt' must be a string or an array.")
        if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
            if not (all(isinstance(item, str) for item in prompt) or all(isinstance(item, list) for item in prompt)):
                raise errors.invalid_parameter(
                    "prompt", "'prompt' must be a string, an array of strings, of token ids, or of token-id arrays.")
            prompts = len(prompt)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise errors.invalid_parameter("stream", "'stream' must be a boolean.")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise errors.invalid_parameter(
                "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            )
        if not isinstance(stream_options, dict):
            raise errors.invalid_parameter("stream_options", "'stream_options' must be an object.")
        include_usage = bool(stream_options.get("include_usage"))
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise errors.invalid_parameter(name, f"'{name}' must be an integer of at least 1.")
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("frequency_penalty", -2, 2),
                            ("presence_penalty", -2, 2)):
        value = body.get(name)
        if value is not None and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high
        ):
            raise errors.invalid_parameter(name, f"'{name}' must be a number from {low} to {high}.")
    n = body.get("n")
    if n is None:
        n = 1
    elif not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= CHOICES_PER_PROMPT_MAX:
        raise errors.invalid_parameter("n", f"'n' must be an integer from 1 to {CHOICES_PER_PROMPT_MAX}.")
    return stream, include_usage, n, prompts


def _embedding_input_check(body: dict) -> None:
    """An embeddings request's fields: `input` is a non-empty string, or a
    non-empty array (at most EMBEDDING_INPUTS_MAX) of non-empty strings, of token
    ids, or of non-empty token-id arrays. Embeddings are never streamed."""
    value = body.get("input")
    if value is None:
        raise errors.missing_parameter("input")
    shape = ("'input' must be a non-empty string, or a non-empty array of non-empty strings, "
             "of token ids, or of non-empty arrays of token ids.")

    def is_token(item: object) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and item >= 0

    if isinstance(value, str):
        if not value:
            raise errors.invalid_parameter("input", shape)
    elif isinstance(value, list) and value:
        if len(value) > EMBEDDING_INPUTS_MAX:
            raise errors.invalid_parameter("input", f"'input' may hold at most {EMBEDDING_INPUTS_MAX} items.")
        if not (all(isinstance(item, str) and item for item in value)
                or all(is_token(item) for item in value)
                or all(isinstance(item, list) and item and all(is_token(t) for t in item) for item in value)):
            raise errors.invalid_parameter("input", shape)
    else:
        raise errors.invalid_parameter("input", shape)
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise errors.invalid_parameter("encoding_format", "'encoding_format' must be 'float' or 'base64'.")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        raise errors.invalid_parameter("dimensions", "'dimensions' must be an integer of at least 1.")


def prompt_tokens_upper_bound(request: CompletionRequest) -> int:
    """An upper bound of the prompt's tokens without a tokenizer: every token of a
    byte-level BPE covers at least one byte, and a chat template adds a few tokens
    per message (PROMPT_TOKENS_PER_MESSAGE). Settlement corrects it afterwards."""
    body = request.body
    if request.endpoint == CHAT:
        total = PROMPT_TOKENS_FIXED
        for message in body["messages"]:
            total += PROMPT_TOKENS_PER_MESSAGE
            content = message.get("content")
            if isinstance(content, str):
                total += len(content.encode())
            elif isinstance(content, list):
                total += len(orjson.dumps(content))
            if message.get("tool_calls"):
                total += len(orjson.dumps(message["tool_calls"]))
        if body.get("tools"):
            total += len(orjson.dumps(body["tools"]))
        return total
    if request.endpoint == EMBEDDINGS:
        value = body["input"]
        items = [value] if isinstance(value, str) or isinstance(value[0], int) else value
        return sum(len(item) if isinstance(item, list) else len(item.encode()) + PROMPT_TOKENS_FIXED
                   for item in items)
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return len(prompt.encode()) + PROMPT_TOKENS_FIXED
    if prompt and all(isinstance(item, int) for item in prompt):
        return len(prompt)
    return len(orjson.dumps(prompt)) + PROMPT_TOKENS_FIXED


def completion_tokens_cap(request: CompletionRequest, default_max_tokens: int, *, context_length: int,
                          prompt_bound: int) -> tuple[str | None, int]:
    """(field, value) bounding the completion: the caller's max_tokens or
    max_completion_tokens, else the gateway's default, which is then also sent to
    the backend so that what was reserved bounds what is generated. The default
    leaves room for the prompt in the model's context: SGLang refuses a request
    whose prompt plus max_tokens exceeds it, while one without max_tokens may
    use all of it. `prompt_bound` over-counts the prompt's tokens (a token per
    byte), so when it alone fills the context, a quarter of it is taken instead
    (about the tokens of English text). Embeddings generate nothing: (None, 0)."""
    if request.endpoint == EMBEDDINGS:
        return None, 0
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.body.get(name)
        if value is not None:
            return name, value
    room = context_length - prompt_bound
    if room < 1:
        room = context_length - prompt_bound // 4
    return "max_tokens", max(1, min(default_max_tokens, room))


def upstream_cache_salt(request: CompletionRequest) -> str | None:
    """The `cache_salt` a generation request carries upstream: an isolated
    tenant's id (with the caller's salt, if any); a caller's own salt kept apart
    from the rest, since it can never name an isolated tenant's namespace (its
    id, with or without a salt); None: no salt."""
    salt = request.body.get("cache_salt")
    if request.principal.cache_isolation:
        tenant = request.principal.tenant_public_id
        return f"{tenant}:{salt}" if isinstance(salt, str) and salt else tenant
    if isinstance(salt, str) and salt:
        return f"shared:{salt}"
    return None


def _upstream_body(request: CompletionRequest, resolution: Resolution, *, stream: bool,
                   cap: tuple[str | None, int]) -> bytes:
    body = {k: v for k, v in request.body.items() if k not in GATEWAY_OWNED_FIELDS}
    body["model"] = resolution.model.upstream_name
    priorities = resolution.model.tier_priorities
    if priorities is not None:
        body["priority"] = priorities.get(request.principal.tenant_tier, 0)
    if request.endpoint == EMBEDDINGS:
        body.pop("stream", None)
        body.pop("stream_options", None)
        # Vectors come back as floats; the gateway encodes them as the caller asked.
        body["encoding_format"] = "float"
        body["rid"] = request.request_id
        return orjson.dumps(body)
    body[cap[0]] = cap[1]
    salt = upstream_cache_salt(request)
    if salt is not None:
        body["cache_salt"] = salt
    # SGLang takes one rid per prompt for a batch or parallel sampling (a single
    # string is refused there by older releases); `<rid>_<i>` keeps the
    # request id a prefix of each, for /abort_request.
    body["rid"] = request.request_id if request.choices == 1 else [
        f"{request.request_id}_{index}" for index in range(request.prompts)]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    else:
        body["stream"] = False
        body.pop("stream_options", None)
    return orjson.dumps(body)


class _BackendFailed(Exception):
    """A backend failed a request before its first token: try another one."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def _namespace(request: CompletionRequest) -> str:
    """Prefix-cache namespace: the tenant, when its prompts must not share a cache."""
    return request.principal.tenant_public_id if request.principal.cache_isolation else ""


class UsageMeter:
    """Counts one request's tokens as the backend reports them and hands a usage
    event to the recorder exactly once, when the request ends in any way.

    It does not hold its request (the request holds it): a cycle between them
    would leave every request's objects to the garbage collector, whose passes
    stall the event loop under load."""

    __slots__ = ("_record", "_settle", "prices", "backend", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "reasoning_tokens", "usage_reported", "content_chunks", "status", "http_status",
                 "error_code", "first_token_at", "_finished")

    def __init__(self, record, settle) -> None:
        self._record = record
        self._settle = settle
        self.prices = Prices()
        self.backend = ""
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = self.reasoning_tokens = 0
        self.usage_reported = False
        self.content_chunks = 0
        self.status = "ok"
        self.http_status = 200
        self.error_code = ""
        self.first_token_at: float | None = None
        self._finished = False

    def observe(self, usage: dict) -> None:
        """Takes a backend usage object (cumulative counts so far)."""
        self.usage_reported = True
        self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.reasoning_tokens = usage_counts(usage)

    @property
    def billed_completion_tokens(self) -> int:
        if self.usage_reported:
            return self.completion_tokens
        # The backend reported nothing (it failed first): what was delivered is one
        # token per content chunk (SGLang streams one token per chunk by default).
        return self.content_chunks

    def openai_usage(self) -> dict:
        return usage_object(prompt_tokens=self.prompt_tokens, completion_tokens=self.billed_completion_tokens,
                            cached_tokens=self.cached_tokens, reasoning_tokens=self.reasoning_tokens)

    def fail(self, error: ApiError) -> None:
        self.status, self.http_status, self.error_code = "error", error.status, error.usage_code

    def abort(self) -> None:
        self.status, self.http_status, self.error_code = "aborted", CLIENT_CLOSED_STATUS, "client_closed"

    def finish(self, request: CompletionRequest) -> None:
        if self._finished:
            return
        self._finished = True
        now = time.perf_counter()
        completion_tokens = self.billed_completion_tokens
        cost_micros = self.prices.cost_micros(
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens, completion_tokens=completion_tokens
        )
        if request.admission is not None:
            self._settle(request.admission, tokens=self.prompt_tokens + completion_tokens, cost_micros=cost_micros)
        self._record(
            UsageEvent(
                event_id=uuid.UUID(int=(_ID_BASE << 64) | next(_id_counter)),
                request_id=request.request_id,
                tenant_id=request.principal.tenant_id,
                api_key_id=request.principal.api_key_id,
                model=request.body.get("model") if isinstance(request.body.get("model"), str) else "",
                backend=self.backend,
                endpoint=request.endpoint,
                transport=request.transport,
                stream=request.stream,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=self.cached_tokens,
                cost_micros=cost_micros,
                status=self.status,
                http_status=self.http_status,
                error_code=self.error_code,
                ttft_ms=None if self.first_token_at is None else (self.first_token_at - request.started) * 1000,
                latency_ms=(now - request.started) * 1000,
                started_at=request.started_at,
                finished_at=datetime.now(timezone.utc),
            )
        )


def _upstream_error(status: int, raw: bytes) -> ApiError:
    """Maps a backend's non-200 answer to what the caller sees."""
    message = ""
    try:
        parsed = orjson.loads(raw)
        if isinstance(parsed, dict):
            inner = parsed.get("error", parsed)
            message = inner.get("message", "") if isinstance(inner, dict) else str(inner)
    except orjson.JSONDecodeError:
        message = raw[:500].decode(errors="replace")
    return _backend_error(status, message)


def _backend_error(status: int, message: str) -> ApiError:
    """What the caller sees of a backend's error with that status and message:
    a 400 is the request's fault (too long for the context, or for the
    backend's KV pool: SGLang's "maximum allowed length"), a 503 or 429 a busy
    backend, anything else a failed one."""
    if status == 400:
        lowered = message.lower()
        if any(phrase in lowered for phrase in ("context length", "context window", "maximum context",
                                                "maximum allowed length")):
            return errors.context_length_exceeded(message)
        return ApiError(400, message or "The backend rejected the request.")
    if status in BUSY_STATUSES:
        return errors.backend_busy(message or f"answered {status}")
    return errors.backend_failure(f"The model backend answered {status}" + (f": {message}" if message else "."))


class CompletionService:
    """Runs completions for one gateway process (see inference.runtime)."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        registry,
        record_usage,
        limiter: Limiter,
        gate: AdmissionGate,
        cooldown_seconds: float,
        default_max_tokens: int,
        breaker_failures: int = 5,
        failover_attempts: int = 3,
        failover_backoff_seconds: float = 0.05,
        first_chunk_timeout_seconds: float = 60.0,
        homes: ConversationHomes | None = None,
        prefix_retention_seconds: float = 0.0,
    ) -> None:
        self._session = session
        self._registry = registry
        self._record_usage = record_usage
        self._limiter = limiter
        self._gate = gate
        self._cooldown = cooldown_seconds
        self._default_max_tokens = default_max_tokens
        self._breaker_failures = breaker_failures
        self._failover_attempts = failover_attempts
        self._failover_backoff = failover_backoff_seconds
        self._first_chunk_timeout = first_chunk_timeout_seconds
        self._homes = homes
        # One instance per policy: the cache-aware one keeps a prefix tree per model.
        self._policies = {name: policy_for(name) for name in POLICY_NAMES}
        # Shared prefixes kept in the backends' caches (routing.retention).
        self._retention = PrefixRetention(self._policies["cache_aware"], retention_seconds=prefix_retention_seconds) \
            if prefix_retention_seconds > 0 else None
        self._background: set[asyncio.Task] = set()

    def backend_forget(self, url: str) -> None:
        """A backend left its pool, or restarted with an empty cache."""
        for policy in self._policies.values():
            policy.forget_backend(url)

    def _meter(self, request: CompletionRequest) -> "UsageMeter":
        meter = request.meter = UsageMeter(self._record_usage, self._limiter.settle)
        return meter

    async def _begin(self, request: CompletionRequest, meter: "UsageMeter", *, stream: bool) -> tuple[Resolution, bytes]:
        """Resolves the model, waits for a backend slot and reserves the request's
        share of the caller's limits. Returns the model and the upstream body."""
        resolution = self._registry.resolve(request.body.get("model"))
        meter.prices = resolution.model.prices
        prompt_bound = prompt_tokens_upper_bound(request)
        context_length = resolution.model.context_length
        cap = completion_tokens_cap(request, self._default_max_tokens,
                                    context_length=context_length, prompt_bound=prompt_bound)
        if cap[0] is not None and cap[1] > context_length:
            # No request can generate past the context: refused before it takes a
            # share of the caller's limits (a 429 would suggest waiting).
            raise errors.invalid_parameter(
                cap[0], f"{cap[0]} is too large: {cap[1]}. This model supports at most {context_length} "
                        f"completion tokens, whereas you provided {cap[1]}.")
        # Every choice may generate up to the cap.
        completion_bound = cap[1] * request.choices
        reserve_tokens = prompt_bound + completion_bound
        reserve_cost = resolution.model.prices.cost_micros(
            prompt_tokens=prompt_bound, cached_tokens=0, completion_tokens=completion_bound
        )
        # The local queue first: a request waiting for a backend slot holds no
        # rate-limit reservation, and one shed by the queue costs no Redis call.
        await self._gate.enter(resolution.model, request.principal.tenant_tier)
        try:
            request.admission = await self._limiter.admit(
                principal=request.principal, rid=request.request_id, tokens=reserve_tokens,
                cost_micros=reserve_cost,
            )
        except BaseException:
            self._gate.leave(resolution.model)
            raise
        return resolution, _upstream_body(request, resolution, stream=stream, cap=cap)

    async def _upstream_start(
        self, request: CompletionRequest, resolution: Resolution, body: bytes, *, stream: bool
    ) -> tuple[aiohttp.ClientResponse, BackendState, list[bytes] | None, AsyncIterator[list[bytes]] | None]:
        """Sends the request to the pool's chosen backend and, for a stream, waits for
        its first chunk. A backend that cannot be reached, answers 5xx, fails or
        stays silent (GATEWAY_FIRST_CHUNK_TIMEOUT_SECONDS) before that is left for
        another one, at most GATEWAY_FAILOVER_ATTEMPTS backends, with backoff.
        Returns the response, its backend, and for a stream the first batch of
        payloads and the iterator over the rest."""
        model = resolution.model
        policy = self._policies.get(model.routing_policy) or self._policies["least_outstanding"]
        # Embeddings share no prefix cache worth routing for: the least loaded backend.
        key = "" if request.endpoint == EMBEDDINGS else routing_key_build(
            endpoint=request.endpoint, body=request.body, namespace=_namespace(request))
        request.routing_key_chars = len(key)
        request.kv_chars = key_footprint(key)
        # A later turn of a conversation this process has not routed: where
        # another gateway process placed it.
        home = None
        if self._homes is not None:
            conversation = policy.home_lookup(model, key)
            if conversation is not None:
                home = await self._homes.get(model.name, conversation)
        tried: set[str] = set()
        last_error: ApiError | None = None
        path = UPSTREAM_PATH[request.endpoint]
        loop = asyncio.get_running_loop()
        for attempt in range(self._failover_attempts):
            if attempt:
                await asyncio.sleep(min(self._failover_backoff * 2 ** (attempt - 1), 1.0))
            # The registry's current entry: a reload while this request waited
            # (admission, backoff) replaced it, and the policies' rotation state
            # (`next_index`) lives on it; advancing the replaced one would make
            # the next request repeat this pick.
            model = self._registry.current(model)
            backend = policy.pick(model, key, exclude=tried, home=home)
            if backend is None:
                break
            tried.add(backend.url)
            placed = policy.observe(model, backend, key)
            if placed is not None and self._homes is not None and backend.url != home:
                self._homes.put(model.name, placed, backend.url)
            if not attempt and self._retention is not None and policy is self._retention.policy \
                    and request.endpoint == CHAT:
                self._retention.observe(model, key, lambda: self._touch_fields(request, model))
            backend.enter(request.kv_chars, request.choices)
            response: aiohttp.ClientResponse | None = None
            # Whether the backend may be generating for this request right now.
            maybe_running = True
            # One deadline for the headers and the first chunk, on the current
            # task (asyncio.wait_for would run each await in a task of its own).
            deadline = loop.time() + self._first_chunk_timeout
            try:
                if stream:
                    async with asyncio.timeout_at(deadline):
                        response = await backend_post(self._session, backend, path, body)
                else:
                    response = await backend_post(self._session, backend, path, body)
                if response.status != 200:
                    raw = await response.read()
                    response.release()
                    maybe_running = False
                    error = _upstream_error(response.status, raw)
                    if 400 <= error.status < 500:
                        backend.leave(request.kv_chars, request.choices)
                        raise error
                    raise _BackendFailed(error)
                if not stream:
                    backend.request_succeeded()
                    return response, backend, None, None
                batches = sse_batches(response).__aiter__()
                async with asyncio.timeout_at(deadline):
                    first = await batches.__anext__()
                if first[0].startswith(b'{"error"'):
                    # Refused after the headers (SGLang's scheduler: a prompt too
                    # long for the KV pool, a full queue): a 4xx other than 429 is
                    # the request's fault, answered as such; the rest fail over.
                    maybe_running = False
                    detail, status = error_message(first[0]), error_status(first[0])
                    if status is not None and 400 <= status < 500 and status not in BUSY_STATUSES:
                        backend.leave(request.kv_chars, request.choices)
                        response.close()
                        raise _backend_error(status, detail)
                    raise _BackendFailed(errors.backend_busy(detail) if status in BUSY_STATUSES
                                         else errors.backend_failure(f"The model backend failed: {detail}"))
                backend.request_succeeded()
                return response, backend, first, batches
            except asyncio.CancelledError:
                # The request may already be running there (a non-streamed one
                # sends its headers only when done): stop it.
                backend.leave(request.kv_chars, request.choices)
                if response is not None:
                    response.close()
                self._abort_on_backend(backend, request.request_id)
                raise
            except ApiError:
                raise
            except (BackendUnreachable, _BackendFailed, aiohttp.ClientError, asyncio.TimeoutError,
                    StopAsyncIteration) as failure:
                backend.leave(request.kv_chars, request.choices)
                backend.traffic.attempt_failed(time.monotonic())
                if response is not None:
                    response.close()
                if maybe_running and not isinstance(failure, BackendUnreachable):
                    self._abort_on_backend(backend, request.request_id)
                busy = isinstance(failure, _BackendFailed) and failure.error.code == "overloaded"
                unreachable = isinstance(failure, BackendUnreachable)
                if not busy:
                    # A server that cannot be reached is down for each of its data-parallel ranks.
                    for failed in (self._registry.server_backends(backend) if unreachable else (backend,)):
                        failed.request_failed(time.monotonic(), threshold=self._breaker_failures,
                                              open_seconds=self._cooldown, unreachable=unreachable)
                if isinstance(failure, _BackendFailed):
                    last_error = failure.error
                elif isinstance(failure, asyncio.TimeoutError):
                    last_error = errors.backend_failure("The model backend sent nothing in time.")
                elif not isinstance(failure, BackendUnreachable):
                    last_error = errors.backend_failure(
                        f"The model backend failed before answering: {type(failure).__name__}.")
                logger.warning("backend %s failed before the first token (attempt %d): %r",
                               backend.url, attempt + 1, failure)
        raise last_error or errors.no_healthy_backend(request.model_name)

    @staticmethod
    def _touch_fields(request: CompletionRequest, model) -> dict:
        """What of the request's upstream body decides which cached prefixes it matches."""
        fields = {name: request.body[name] for name in ("messages", "tools", "extra_key", "chat_template_kwargs")
                  if name in request.body}
        fields["model"] = model.upstream_name
        salt = upstream_cache_salt(request)
        if salt is not None:
            fields["cache_salt"] = salt
        if model.tier_priorities is not None:  # the lowest: a touch never goes before a customer
            fields["priority"] = min(model.tier_priorities.values(), default=0)
        return fields

    @property
    def retention(self) -> PrefixRetention | None:
        return self._retention

    async def retention_loop(self, interval: float) -> None:
        """Touches the shared prefixes due for it (routing.retention) every `interval` seconds."""
        retention = self._retention
        if retention is None:
            return
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for model in self._registry.models():
                if model.routing_policy != retention.policy.name:
                    continue
                for backend, head in retention.due(model, now):
                    head.touching.add(backend.url)
                    task = asyncio.get_running_loop().create_task(self._touch(model, backend, head))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    async def _touch(self, model, backend: BackendState, head) -> None:
        try:
            response = await backend_post(self._session, backend, "/v1/chat/completions",
                                          self._retention.body(head))
            try:
                raw = await response.read()
            finally:
                response.release()
            if response.status != 200:
                logger.debug("prefix touch on %s: HTTP %s", backend.url, response.status)
                return
            prompt, _, cached, _ = usage_counts(orjson.loads(raw).get("usage") or {})
            self._retention.touched(model, backend, head, prompt_tokens=prompt, cached_tokens=cached)
        except Exception as error:  # a touch is best effort: the next tick may try again
            logger.debug("prefix touch on %s failed: %r", backend.url, error)
        finally:
            head.touching.discard(backend.url)

    def _abort_on_backend(self, backend: BackendState, rid: str) -> None:
        task = asyncio.get_running_loop().create_task(backend_abort(self._session, backend, rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[list[bytes]]:
        """Yields batches of OpenAI chunk payloads (JSON bytes, one batch per backend
        read). Raises ApiError: before the first batch for a request that could not
        start, after it for a stream that broke."""
        meter = self._meter(request)
        response: aiohttp.ClientResponse | None = None
        backend: BackendState | None = None
        resolution: Resolution | None = None
        finished = False
        try:
            resolution, body = await self._begin(request, meter, stream=True)
            response, backend, first, batches = await self._upstream_start(request, resolution, body, stream=True)
            meter.backend = backend.url
            rewriter = ChunkRewriter(request_id=request.request_id, client_model=request.model_name,
                                     upstream_model=resolution.model.upstream_name,
                                     include_usage=request.include_usage, chat=request.endpoint == CHAT,
                                     n=request.n, choices=request.choices,
                                     continuous_usage=request.continuous_usage)
            # Several choices' chunks carry their own ids and usage: the slow path.
            fast = request.choices == 1 and rewriter.fast_path_fits(first[0])
            rewrite = rewriter.rewrite if fast else rewriter.rewrite_slow
            batch = first
            while True:
                out = []
                failure = None
                for payload in batch:
                    try:
                        chunk, has_content = rewrite(payload)
                    except ValueError:
                        # What came before the error in this read is still delivered.
                        failure = errors.backend_failure(
                            f"The model backend failed mid-stream: {error_message(payload)}")
                        break
                    if chunk is not None:
                        out.append(chunk)
                        if has_content and meter.first_token_at is None:
                            meter.first_token_at = time.perf_counter()
                usage = rewriter.take_usage()
                if out:
                    yield out
                # Counted once handed on: a client gone during the hand-over is not
                # billed for what it did not get.
                if usage is not None:
                    meter.observe(usage)
                meter.content_chunks = rewriter.content_chunks
                if failure is not None:
                    raise failure
                try:
                    batch = await batches.__anext__()
                except StopAsyncIteration:
                    break
            finished = rewriter.finished
            if not finished:
                raise errors.backend_failure("The model backend closed the stream before it finished.")
            if request.include_usage and rewriter.usage_template is not None:
                yield [rewriter.usage_chunk(rewriter.usage_template, meter.openai_usage())]
        except (asyncio.CancelledError, GeneratorExit):
            meter.abort()
            if backend is not None and not finished:
                self._abort_on_backend(backend, request.request_id)
            raise
        except ApiError as error:
            meter.fail(error)
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as error:
            failure = errors.backend_failure(f"The model backend failed mid-stream: {type(error).__name__}.")
            meter.fail(failure)
            if backend is not None:
                self._abort_on_backend(backend, request.request_id)
            raise failure from error
        finally:
            if response is not None:
                if finished:
                    response.release()
                else:
                    response.close()
            self._request_end(request, backend, resolution, meter)

    async def completion_create(self, request: CompletionRequest) -> dict:
        """A whole (non-streamed) completion in OpenAI's shape."""
        meter = self._meter(request)
        backend: BackendState | None = None
        resolution: Resolution | None = None
        done = False
        try:
            resolution, body = await self._begin(request, meter, stream=False)
            response, backend, _, _ = await self._upstream_start(request, resolution, body, stream=False)
            meter.backend = backend.url
            try:
                raw = await response.read()
            finally:
                response.release()
            done = True
            result = orjson.loads(raw)
            if request.endpoint == EMBEDDINGS:
                return self._embeddings_result(request, meter, result)
            if not isinstance(result, dict) or "choices" not in result:
                raise errors.backend_failure("The model backend sent an answer that is not a completion.")
            usage = result.get("usage")
            if usage:
                meter.observe(usage)
            meter.first_token_at = time.perf_counter()
            result["id"], result["model"] = request.request_id, request.model_name
            result["usage"] = meter.openai_usage()
            return result
        except asyncio.CancelledError:
            meter.abort()
            if backend is not None and not done:
                self._abort_on_backend(backend, request.request_id)
            raise
        except ApiError as error:
            meter.fail(error)
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as error:
            failure = errors.backend_failure(f"The model backend failed: {type(error).__name__}.")
            meter.fail(failure)
            raise failure from error
        finally:
            self._request_end(request, backend, resolution, meter)

    @staticmethod
    def _embeddings_result(request: CompletionRequest, meter: "UsageMeter", result: object) -> dict:
        """OpenAI's embeddings list from the backend's: the caller's model name,
        vectors as base64 (little-endian float32) when asked, and usage."""
        data = result.get("data") if isinstance(result, dict) else None
        if not isinstance(data, list) or not all(isinstance(item, dict) and isinstance(item.get("embedding"), list)
                                                 for item in data):
            raise errors.backend_failure("The model backend sent an answer that is not a list of embeddings.")
        usage = result.get("usage")
        if usage:
            meter.observe(usage)
        meter.first_token_at = time.perf_counter()
        base64_wanted = request.body.get("encoding_format") == "base64"
        items = []
        for index, item in enumerate(data):
            vector = item["embedding"]
            if base64_wanted:
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            items.append({"object": "embedding", "index": item.get("index", index), "embedding": vector})
        return {"object": "list", "data": items, "model": request.model_name,
                "usage": {"prompt_tokens": meter.prompt_tokens, "total_tokens": meter.prompt_tokens}}

    def _request_end(self, request: CompletionRequest, backend: BackendState | None,
                     resolution: Resolution | None, meter: "UsageMeter") -> None:
        """What every request gives back, however it ended: its place on the backend,
        its slot in the admission queue; and its usage is recorded and settled."""
        if backend is not None:
            backend.leave(request.kv_chars, request.choices)
            backend.traffic.request_end(
                time.monotonic(), ok=meter.status != "error", prompt_tokens=meter.prompt_tokens,
                cached_tokens=meter.cached_tokens, completion_tokens=meter.billed_completion_tokens,
                ttft_ms=(meter.first_token_at - request.started) * 1000
                if request.stream and meter.first_token_at is not None else None)
        if resolution is not None:
            self._gate.leave(resolution.model)
            if meter.prompt_tokens:
                policy = self._policies.get(resolution.model.routing_policy)
                if policy is not None:
                    policy.usage_observe(resolution.model.name, request.routing_key_chars, meter.prompt_tokens)
        meter.finish(request)
