"""Rate limits, concurrency limits and monthly budgets, enforced exactly across any
number of gateway processes: each request's check-and-reserve is one Lua script
in Redis (lua/admit.lua) over both of its scopes, the API key and the tenant.

Tokens are reserved at admission (an upper bound of the prompt plus max_tokens)
and settled to the backend's count when the request ends (lua/settle.lua).
A per-minute limit counts what was admitted in the last 60 s (one-second slots).

When Redis cannot be reached the gateway does not wait for it: rate limits fall
back to this process's own counters (fail-open: N processes admit up to N times
a limit), and a scope with a budget may spend only a small offline allowance per
process (fail-closed). Settlements made meanwhile are replayed when Redis returns."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


from tenants.selectors import ApiKeyPrincipal

from .errors import ApiError
from .redis_pipe import PipelinedRedis, RedisReplyError, RedisUnavailable, Script

# Either way the gateway falls back to this process's own counters.
REDIS_FAILURES = (RedisUnavailable, RedisReplyError)

logger = logging.getLogger(__name__)

LUA_DIR = Path(__file__).resolve().parent / "lua"
WINDOW_SECONDS = 60
KEY_SCOPE, TENANT_SCOPE = 1, 2
# Seconds a month's budget state lives in Redis (past the month's end).
BUDGET_TTL_SECONDS = 40 * 24 * 3600
# Settlements kept while Redis is away, to replay when it returns.
PENDING_SETTLEMENTS_MAX = 100_000


def month_period(now: datetime) -> str:
    return f"{now.year:04d}-{now.month:02d}"


def month_start(period: str) -> datetime:
    year, month = map(int, period.split("-"))
    return datetime(year, month, 1, tzinfo=timezone.utc)


def duration_text(ms: float) -> str:
    """A reset time as OpenAI writes it: 250ms, 12s, 1m0s."""
    ms = max(0, int(math.ceil(ms)))
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:g}s" if seconds == int(seconds) else f"{seconds:.1f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest}s"


@dataclass(slots=True)
class Admission:
    """A request let in: what it reserved, and the headers its response carries."""

    rid: str
    principal: ApiKeyPrincipal
    tokens: int
    cost_micros: int
    period: str
    # "redis", or "local" when admitted by this process's fallback counters.
    via: str
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False


def rate_limited(reason: str, retry_after_ms: int, scope: int, headers: dict[str, str]) -> ApiError:
    what = {"requests": "requests per minute", "tokens": "tokens per minute",
            "concurrency": "concurrent requests"}.get(reason, "tokens per minute")
    owner = "API key" if scope == KEY_SCOPE else "organization"
    if reason == "budget_reserved":
        return ApiError(
            429, f"The rest of your {owner}'s monthly budget is reserved by requests in flight. "
            "Please try again in 1s.", type="rate_limit_exceeded", code="rate_limit_exceeded",
            headers={**headers, "retry-after": "1", "retry-after-ms": "1000"},
        )
    if reason == "tokens_request_too_large":
        return ApiError(
            429, f"This request needs more tokens than your {owner}'s tokens-per-minute limit allows; "
            "lower max_tokens or the prompt.", type="rate_limit_exceeded", code="rate_limit_exceeded",
            headers={**headers, "x-should-retry": "false"},
        )
    retry_after_ms = max(1, int(retry_after_ms))
    return ApiError(
        429,
        f"Rate limit reached for {what} on your {owner}. Please try again in {duration_text(retry_after_ms)}.",
        type="rate_limit_exceeded",
        code="rate_limit_exceeded",
        headers={**headers, "retry-after": str(math.ceil(retry_after_ms / 1000)),
                 "retry-after-ms": str(retry_after_ms)},
    )


def insufficient_quota(budget: str, scope: int) -> ApiError:
    owner = "API key" if scope == KEY_SCOPE else "organization"
    what = "monthly spend budget" if budget == "spend" else "monthly token budget"
    return ApiError(
        429,
        f"You exceeded your {owner}'s {what}. Raise the budget in the portal or wait for the next month.",
        type="insufficient_quota",
        code="insufficient_quota",
        headers={"x-should-retry": "false"},
    )


def _headers(req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining, tok_reset_ms) -> dict[str, str]:
    headers = {}
    if req_limit > 0:
        headers["x-ratelimit-limit-requests"] = str(req_limit)
        headers["x-ratelimit-remaining-requests"] = str(req_remaining)
        headers["x-ratelimit-reset-requests"] = duration_text(req_reset_ms)
    if tok_limit > 0:
        headers["x-ratelimit-limit-tokens"] = str(tok_limit)
        headers["x-ratelimit-remaining-tokens"] = str(tok_remaining)
        headers["x-ratelimit-reset-tokens"] = duration_text(tok_reset_ms)
    return headers


def _keys(principal: ApiKeyPrincipal, period: str, namespace: str) -> list[str]:
    # One hash tag per tenant: both scopes of a request live on one cluster slot.
    # The namespace keeps deployments (databases) that share a Redis apart.
    tag = f"{{{namespace}:t{principal.tenant_id}}}"
    keys = []
    for scope in (f"k{principal.api_key_id}", "t"):
        base = f"lim:{tag}:{scope}"
        keys += [f"{base}:req", f"{base}:tok", f"{base}:inf", f"{base}:res", f"bud:{tag}:{scope}:{period}"]
    return keys


class _LocalWindow:
    """This process's own sliding window (one-second slots), for when Redis is away."""

    __slots__ = ("slots", "total")

    def __init__(self) -> None:
        self.slots: deque[list[int]] = deque()  # [slot, amount]
        self.total = 0

    def sum(self, slot: int) -> int:
        while self.slots and self.slots[0][0] <= slot - WINDOW_SECONDS:
            self.total -= self.slots.popleft()[1]
        return self.total

    def add(self, slot: int, amount: int) -> None:
        if self.slots and self.slots[-1][0] == slot:
            self.slots[-1][1] += amount
        else:
            self.slots.append([slot, amount])
        self.total += amount


@dataclass(slots=True)
class _LocalScope:
    requests: _LocalWindow = field(default_factory=_LocalWindow)
    tokens: _LocalWindow = field(default_factory=_LocalWindow)
    inflight: int = 0
    # Budget spent and reserved while Redis was away (micros, tokens).
    offline_micros: int = 0
    offline_tokens: int = 0


class Limiter:
    def __init__(
        self,
        client: PipelinedRedis,
        *,
        lease_seconds: float,
        retry_seconds: float,
        offline_allowance_micros: int,
        offline_allowance_tokens: int,
        budget_load,
        alert_record,
        namespace: str = "",
    ) -> None:
        self._redis = client
        self._namespace = namespace
        self._admit = Script((LUA_DIR / "admit.lua").read_text())
        self._settle = Script((LUA_DIR / "settle.lua").read_text())
        self._budget_init = Script((LUA_DIR / "budget_init.lua").read_text())
        self._lease_ms = int(lease_seconds * 1000)
        self._retry_seconds = retry_seconds
        self._offline_micros = offline_allowance_micros
        self._offline_tokens = offline_allowance_tokens
        # async (tenant_id, api_key_id | None, since) -> (micros, tokens)
        self._budget_load = budget_load
        # async (tenant_id, api_key_id | None, period, kind, budget) -> None
        self._alert_record = alert_record
        self._redis_down_until = 0.0
        self._local: dict[tuple[int, int], _LocalScope] = {}
        self._pending: deque[tuple[Admission, int, int]] = deque(maxlen=PENDING_SETTLEMENTS_MAX)
        self._alerted: set[tuple] = set()
        self._background: set[asyncio.Task] = set()
        self._settle_queue: list[tuple[Admission, int, int]] = []
        # principal -> (period, keys, limit arguments)
        self._inputs: dict[ApiKeyPrincipal, tuple[str, list[str], list[int]]] = {}
        self._settle_scheduled = False

    @property
    def redis_available(self) -> bool:
        return time.monotonic() >= self._redis_down_until

    def _redis_failed(self, error: Exception) -> None:
        if isinstance(error, RedisReplyError):
            # Redis answered, but a script failed: a defect, not an outage.
            logger.error("limit script failed: %s", error)
        elif self.redis_available:
            logger.warning("Redis unavailable (%s); limits fall back to this process for %.1fs",
                           error, self._retry_seconds)
        self._redis_down_until = time.monotonic() + self._retry_seconds

    async def admit(self, *, principal: ApiKeyPrincipal, rid: str, tokens: int, cost_micros: int) -> Admission:
        """Reserves the request's share of every limit, or raises the 429 to send."""
        now = datetime.now(timezone.utc)
        period = month_period(now)
        admission = Admission(rid, principal, tokens, cost_micros, period, "redis")
        if self.redis_available:
            try:
                await self._admit_redis(admission, now)
                if self._pending:
                    self._spawn(self._pending_replay())
                return admission
            except REDIS_FAILURES as error:  # includes timeouts and refused connections
                self._redis_failed(error)
        admission.via = "local"
        self._admit_local(admission)
        return admission

    async def _admit_redis(self, admission: Admission, now: datetime) -> None:
        principal = admission.principal
        keys, limit_args = self._script_inputs(principal, admission.period)
        args = [int(now.timestamp() * 1000), admission.rid, self._lease_ms, admission.tokens,
                admission.cost_micros, WINDOW_SECONDS, *limit_args]
        for _ in range(3):
            result = await self._redis.evalsha(self._admit, keys, args)
            status = result[0]
            if status == 0:
                admission.headers = _headers(*result[1:7])
                return
            if status == 3:
                await self._budget_load_into_redis(principal, admission.period, scope=result[1], key=keys[
                    4 if result[1] == KEY_SCOPE else 9])
                continue
            scope = result[-1]
            if status == 1:
                reason, retry_ms = result[1].decode(), int(result[2])
                raise rate_limited(reason, retry_ms, scope, _headers(*result[3:9]))
            budget = result[1].decode()
            self._alert(principal, scope, admission.period, "hard", budget)
            raise insufficient_quota(budget, scope)
        raise RedisUnavailable("budget state could not be loaded")

    def _script_inputs(self, principal: ApiKeyPrincipal, period: str) -> tuple[list[str], list[int]]:
        """The scripts' keys and limit arguments for a principal, built once per
        principal (a new one comes with every change of limits) and month."""
        cached = self._inputs.get(principal)
        if cached is not None and cached[0] == period:
            return cached[1], cached[2]
        limit_args = []
        for limits in (principal.key_limits, principal.tenant_limits):
            limit_args += [limits.rpm, limits.tpm, limits.concurrency, limits.budget_micros, limits.budget_tokens,
                           limits.alert_percent]
        keys = _keys(principal, period, self._namespace)
        if len(self._inputs) >= 100_000:
            self._inputs.clear()
        self._inputs[principal] = (period, keys, limit_args)
        return keys, limit_args

    async def _budget_load_into_redis(self, principal: ApiKeyPrincipal, period: str, *, scope: int, key: str) -> None:
        api_key_id = principal.api_key_id if scope == KEY_SCOPE else None
        micros, tokens = await self._budget_load(principal.tenant_id, api_key_id, month_start(period))
        await self._redis.evalsha(self._budget_init, [key], [micros, tokens, BUDGET_TTL_SECONDS])

    def _local_scopes(self, principal: ApiKeyPrincipal):
        for scope, scope_id, limits in ((KEY_SCOPE, principal.api_key_id, principal.key_limits),
                                        (TENANT_SCOPE, -principal.tenant_id, principal.tenant_limits)):
            state = self._local.get((scope, scope_id))
            if state is None:
                state = self._local[(scope, scope_id)] = _LocalScope()
            yield scope, limits, state

    def _admit_local(self, admission: Admission) -> None:
        slot = int(time.time())
        scopes = list(self._local_scopes(admission.principal))
        for scope, limits, state in scopes:
            if limits.rpm and state.requests.sum(slot) + 1 > limits.rpm:
                raise rate_limited("requests", 1000, scope, {})
            if limits.tpm and state.tokens.sum(slot) + admission.tokens > limits.tpm:
                raise rate_limited("tokens", 1000, scope, {})
            if limits.concurrency and state.inflight + 1 > limits.concurrency:
                raise rate_limited("concurrency", 1000, scope, {})
            if limits.budget_micros and state.offline_micros + admission.cost_micros > self._offline_micros:
                raise insufficient_quota("spend", scope)
            if limits.budget_tokens and state.offline_tokens + admission.tokens > self._offline_tokens:
                raise insufficient_quota("tokens", scope)
        for _, limits, state in scopes:
            state.requests.add(slot, 1)
            state.tokens.add(slot, admission.tokens)
            state.inflight += 1
            if limits.has_budget:
                state.offline_micros += admission.cost_micros
                state.offline_tokens += admission.tokens

    def settle(self, admission: Admission, *, tokens: int, cost_micros: int) -> None:
        """Replaces the reservation with actual use, in the background (never blocks)."""
        if admission.settled:
            return
        admission.settled = True
        if admission.via == "local":
            for _, limits, state in self._local_scopes(admission.principal):
                state.inflight -= 1
                state.tokens.add(int(time.time()), tokens - admission.tokens)
                if limits.has_budget:
                    state.offline_micros += cost_micros - admission.cost_micros
                    state.offline_tokens += tokens - admission.tokens
            # Spend made while Redis was away is replayed into Redis later.
            self._pending.append((admission, tokens, cost_micros))
            return
        # Settlements of one event-loop iteration go to Redis in one write.
        self._settle_queue.append((admission, tokens, cost_micros))
        if not self._settle_scheduled:
            self._settle_scheduled = True
            self._spawn(self._settle_flush())

    def _settle_command(self, admission: Admission, tokens: int, cost_micros: int) -> tuple:
        principal = admission.principal
        keys, limit_args = self._script_inputs(principal, admission.period)
        # Per scope, settle.lua takes the budget arguments: the last three of its six.
        return ("EVALSHA", self._settle.sha, len(keys), *keys, int(time.time() * 1000), admission.rid, tokens,
                cost_micros, WINDOW_SECONDS, *limit_args[3:6], *limit_args[9:12])

    async def _settle_flush(self) -> None:
        await asyncio.sleep(0)
        batch, self._settle_queue = self._settle_queue, []
        self._settle_scheduled = False
        if not self.redis_available:
            self._pending.extend(batch)
            return
        try:
            replies = await self._redis.execute_many([self._settle_command(*item) for item in batch])
        except REDIS_FAILURES as error:
            self._redis_failed(error)
            self._pending.extend(batch)
            return
        for item, reply in zip(batch, replies):
            if isinstance(reply, RedisReplyError) and str(reply).startswith("NOSCRIPT"):
                await self._settle_redis(*item)  # loads the script
            elif isinstance(reply, Exception):
                self._redis_failed(reply)
                self._pending.append(item)
            else:
                self._alerts_record(item[0], reply)

    async def _settle_redis(self, admission: Admission, tokens: int, cost_micros: int) -> None:
        if not self.redis_available:
            self._pending.append((admission, tokens, cost_micros))
            return
        command = self._settle_command(admission, tokens, cost_micros)
        try:
            alerts = await self._redis.evalsha(self._settle, list(command[3:3 + command[2]]),
                                               list(command[3 + command[2]:]))
        except REDIS_FAILURES as error:
            self._redis_failed(error)
            self._pending.append((admission, tokens, cost_micros))
            return
        self._alerts_record(admission, alerts)

    def _alerts_record(self, admission: Admission, alerts: list) -> None:
        for i in range(0, len(alerts), 3):
            self._alert(admission.principal, int(alerts[i]), admission.period, alerts[i + 1].decode(),
                        alerts[i + 2].decode())

    async def _pending_replay(self) -> None:
        while self._pending and self.redis_available:
            admission, tokens, cost_micros = self._pending.popleft()
            await self._settle_redis(admission, tokens, cost_micros)
        if not self._pending:
            for state in self._local.values():
                state.offline_micros = state.offline_tokens = 0

    def _alert(self, principal: ApiKeyPrincipal, scope: int, period: str, kind: str, budget: str) -> None:
        api_key_id = principal.api_key_id if scope == KEY_SCOPE else None
        marker = (principal.tenant_id, api_key_id, period, kind, budget)
        if marker in self._alerted:
            return
        self._alerted.add(marker)
        self._spawn(self._alert_record(*marker))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Waits for background settlements (at shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
