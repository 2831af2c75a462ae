"""The one place model names resolve: a per-process snapshot of the served models
and their backend pools, reloaded from PostgreSQL periodically and on change."""
import math
import time
from dataclasses import dataclass, field
from decimal import Decimal

from . import errors
from .pool_health import TrafficWindow


@dataclass(slots=True)
class BackendState:
    """A backend as one gateway process sees it. Survives registry reloads, so
    in-flight counts, health and the circuit breaker are not reset by an
    unrelated change.

    A server that runs several data-parallel ranks (SGLang's `--dp-size`: one
    scheduler and radix cache each) is several backends, one per rank: `url`
    is then "<server URL>@<rank>", `base_url` the server's URL and `dp_rank`
    the rank its requests name (`data_parallel_rank`), so that routing keeps
    each prefix on the rank that caches it."""

    url: str
    api_key: str = ""
    base_url: str = ""  # the server's URL ("": `url`)
    dp_rank: int | None = None
    status: str = "active"
    # Sequences this process has in flight on the backend (a request with n
    # choices runs n), and the sum of their requests' key footprints
    # (routing.policies.key_footprint: what of the backend's KV cache they hold,
    # in characters as the cache-aware prefix tree counts).
    outstanding: int = 0
    outstanding_chars: int = 0
    # Monotonic time before which the backend takes no requests: its circuit
    # breaker is open (it refused a connection, or failed too often).
    cooldown_until: float = 0.0
    # From active health checks (GET /health); a failed check needs company.
    healthy: bool = True
    failed_checks: int = 0
    # Consecutive requests that failed before their first token.
    failures: int = 0
    # KV cache capacity in tokens (`max_total_num_tokens` of GET /server_info);
    # 0 until read. Cache-aware routing sizes its picture of the cache by it.
    kv_tokens: int = 0
    # What its prefix cache can serve from, in tokens: `kv_tokens`, or more with a
    # hierarchical cache's host tier (sglang.hicache_cache_tokens); 0 until read.
    cache_tokens: int = 0
    # False when GET /server_info said `disable_radix_cache`: it reuses no prefix,
    # so cache-aware routing has nothing to keep together there.
    prefix_cache: bool = True
    # Requests waiting in the backend's own queue (behind its running batch), as it
    # last reported them (GET /v1/loads); -1 until read, or when it could not say.
    waiting: int = -1
    # The share of its KV cache held by running requests, as it last reported it
    # (`token_usage` of GET /v1/loads); -1 until read, or when it could not say.
    kv_usage: float = -1.0
    # Requests running there as it last reported them (from every client: other
    # gateway processes too); -1 until read. `outstanding` at that moment.
    running: int = -1
    outstanding_at_report: int = 0
    # The last minute of what this process sent there, for the operators' view
    # (pool_health: GATEWAY_POOL_REPORT_SECONDS).
    traffic: TrafficWindow = field(default_factory=TrafficWindow)

    @property
    def host_tier(self) -> bool:
        """Its prefix cache has a host tier (SGLang's HiCache), as last read."""
        return 0 < self.kv_tokens < self.cache_tokens

    def capacity_forget(self) -> None:
        """What was read of its capacity is stale (it may have restarted): read it again."""
        self.kv_tokens = self.cache_tokens = 0

    def __post_init__(self) -> None:
        if not self.base_url:
            self.base_url = self.url

    @property
    def load(self) -> int:
        """Sequences in flight on the backend from every client, as well as this
        process can tell: what the backend last reported running and waiting,
        plus what this process sent (or saw end) since; never less than this
        process's own `outstanding`. Without a report, `outstanding`."""
        if self.running < 0 or self.waiting < 0:
            return self.outstanding
        return max(self.outstanding, self.running + self.waiting + self.outstanding - self.outstanding_at_report)

    def load_report(self, waiting: int, kv_usage: float, running: int) -> None:
        """What GET /v1/loads said (-1: could not say)."""
        self.waiting, self.kv_usage, self.running = waiting, kv_usage, running
        self.outstanding_at_report = self.outstanding

    def enter(self, chars: int, sequences: int = 1) -> None:
        """A request with a key footprint of `chars` and `sequences` choices was sent here."""
        self.outstanding += sequences
        self.outstanding_chars += chars

    def leave(self, chars: int, sequences: int = 1) -> None:
        """That request ended (or never reached the backend)."""
        self.outstanding -= sequences
        self.outstanding_chars -= chars

    def available(self, now: float) -> bool:
        return self.status == "active" and self.healthy and self.cooldown_until <= now

    def request_succeeded(self) -> None:
        self.failures = 0

    def request_failed(self, now: float, *, threshold: int, open_seconds: float, unreachable: bool) -> None:
        """A request failed before its first token. An unreachable backend, or one
        failing `threshold` times in a row, is skipped for `open_seconds`; once
        that passes, one request tries it again (half-open)."""
        self.failures += 1
        if unreachable or self.failures >= threshold:
            self.cooldown_until = now + open_seconds

    def check_result(self, ok: bool, *, failures_to_unhealthy: int) -> None:
        if ok:
            self.healthy, self.failed_checks = True, 0
        else:
            self.failed_checks += 1
            if self.failed_checks >= failures_to_unhealthy:
                self.healthy = False


@dataclass(frozen=True, slots=True)
class Prices:
    """Currency units per million tokens, which is also micros per token."""

    input: Decimal = Decimal(0)
    cached_input: Decimal = Decimal(0)
    output: Decimal = Decimal(0)

    def cost_micros(self, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """Millionths of the currency unit, rounded up to a whole micro."""
        cached = min(cached_tokens, prompt_tokens)
        exact = (prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output
        return math.ceil(exact)


@dataclass(slots=True)
class ModelEntry:
    name: str
    upstream_name: str
    context_length: int
    owned_by: str
    created: int  # epoch seconds
    prices: Prices = Prices()
    # Name of the routing policy of this model's pool (inference.routing.POLICY_NAMES).
    routing_policy: str = "cache_aware"
    backends: list[BackendState] = field(default_factory=list)
    # Tier → the `priority` requests carry to backends that schedule by it; None: none sent.
    tier_priorities: dict[str, int] | None = None
    # Rotates the tie-break between equally loaded backends.
    next_index: int = 0


@dataclass(frozen=True, slots=True)
class Resolution:
    model: ModelEntry
    # The LoRA adapter asked for with "base:adapter"; adapters arrive in a later release.
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class ModelRow:
    """What a reload reads from the database for one model."""

    name: str
    upstream_name: str
    context_length: int
    owned_by: str
    created: int
    prices: Prices
    routing_policy: str
    backends: tuple[tuple[str, str, str], ...]  # (url, api_key, status)
    tier_priorities: dict[str, int] | None = None


class Registry:
    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}
        self._backends: dict[str, BackendState] = {}
        self._rows: list[ModelRow] = []
        # Server URL → its data-parallel ranks, as its /server_info said (`dp_size`).
        self._dp_sizes: dict[str, int] = {}
        self.loaded_at = 0.0

    def replace(self, rows: list[ModelRow]) -> bool:
        """Load `rows`. True when a backend new to this registry came with them."""
        models: dict[str, ModelEntry] = {}
        added = False
        backends: dict[str, BackendState] = {}
        for row in rows:
            entry = ModelEntry(row.name, row.upstream_name, row.context_length, row.owned_by, row.created,
                               row.prices, row.routing_policy, tier_priorities=row.tier_priorities)
            for url, api_key, status in row.backends:
                size = self._dp_sizes.get(url, 1)
                for state_url, rank in ([(url, None)] if size <= 1 else
                                        [(f"{url}@{rank}", rank) for rank in range(size)]):
                    state = self._backends.get(state_url) or backends.get(state_url)
                    if state is None:
                        state, added = BackendState(state_url, base_url=url, dp_rank=rank), True
                    state.api_key, state.status = api_key, status
                    backends[state_url] = state
                    entry.backends.append(state)
            previous = self._models.get(row.name)
            entry.next_index = previous.next_index if previous else 0
            models[row.name] = entry
        self._models, self._backends, self._rows = models, backends, rows
        self.loaded_at = time.monotonic()
        return added

    def dp_size_set(self, base_url: str, size: int) -> bool:
        """The server at `base_url` runs `size` data-parallel ranks: its
        backends become one per rank (or one again). True when that changed
        the pools."""
        size = max(1, size)
        if self._dp_sizes.get(base_url, 1) == size:
            return False
        if size == 1:
            self._dp_sizes.pop(base_url, None)
        else:
            self._dp_sizes[base_url] = size
        self.replace(self._rows)
        return True

    def resolve(self, name: object) -> Resolution:
        if name is None or name == "":
            raise errors.missing_parameter("model")
        if not isinstance(name, str):
            raise errors.invalid_parameter("model", "'model' must be a string.")
        entry = self._models.get(name)
        if entry is not None:
            return Resolution(entry)
        raise errors.model_not_found(name)

    def current(self, entry: ModelEntry) -> ModelEntry:
        """The entry now loaded for `entry`'s model: `entry` itself unless a
        reload has replaced it (or `entry` when the model is gone)."""
        return self._models.get(entry.name, entry)

    def models(self) -> list[ModelEntry]:
        return list(self._models.values())

    def server_backends(self, backend: BackendState) -> list[BackendState]:
        """`backend` and the other data-parallel ranks of its server."""
        if backend.dp_rank is None:
            return [backend]
        return [b for b in self._backends.values() if b.base_url == backend.base_url] or [backend]

    def backends(self) -> list[BackendState]:
        """Every backend of every pool, once."""
        return list(self._backends.values())
