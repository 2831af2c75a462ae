"""The gateway's per-process state: the upstream HTTP session, the registry
snapshot, the API key cache, the usage recorder and the completion service.
Started by the ASGI lifespan (or on first use), stopped at shutdown."""
import asyncio
import gc
import logging
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from config.redis import INVALIDATION_CHANNEL
from tenants.selectors import ApiKeyPrincipal, api_key_principal_get

from billing.selectors import usage_spend_since
from billing.services import budget_alert_record

from .admission import AdmissionGate
from .auth import ApiKeyAuthenticator
from .limits import Limiter
from .redis_pipe import PipelinedRedis
from .routing.homes import ConversationHomes
from .metering import UsageRecorder
from .models import ServedModel
from .pool_health import process_name, report_build, report_key
from .registry import BackendState, ModelRow, Prices, Registry
from .sglang import backend_capacity, backend_health, backend_loads, session_create
from .streaming import CompletionService

logger = logging.getLogger(__name__)

# Seconds between reconnection attempts of the invalidation listener.
LISTENER_RETRY_SECONDS = 1.0


def _principal_load(key_hash: str) -> ApiKeyPrincipal | None:
    close_old_connections()
    return api_key_principal_get(key_hash=key_hash)


def _budget_spend_load(tenant_id: int, api_key_id: int | None, since) -> tuple[int, int]:
    close_old_connections()
    return usage_spend_since(tenant_id=tenant_id, api_key_id=api_key_id, since=since)


def _budget_alert_save(tenant_id: int, api_key_id: int | None, period: str, kind: str, budget: str) -> None:
    close_old_connections()
    budget_alert_record(tenant_id=tenant_id, api_key_id=api_key_id, period=period, kind=kind, budget=budget)


def _registry_rows() -> list[ModelRow]:
    close_old_connections()
    rows = []
    for model in ServedModel.objects.filter(status=ServedModel.Status.ACTIVE).prefetch_related("backends"):
        rows.append(
            ModelRow(
                name=model.name,
                upstream_name=model.backend_model_name,
                context_length=model.context_length,
                owned_by=model.owned_by,
                created=int(model.created_at.timestamp()),
                prices=Prices(model.input_price_per_million, model.cached_input_price_per_million,
                              model.output_price_per_million),
                routing_policy=model.routing_policy,
                backends=tuple((b.url, b.api_key, b.status) for b in model.backends.all()),
                tier_priorities=dict(settings.GATEWAY_TIER_BACKEND_PRIORITY) if model.backend_priority else None,
            )
        )
    return rows


class GatewayRuntime:
    def __init__(self) -> None:
        self.session = session_create(
            max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
            connect_timeout=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=settings.GATEWAY_UPSTREAM_READ_TIMEOUT,
        )
        self.registry = Registry()
        self.auth = ApiKeyAuthenticator(
            load=sync_to_async(_principal_load, thread_sensitive=True),
            ttl_seconds=settings.GATEWAY_API_KEY_CACHE_SECONDS,
        )
        self.usage = UsageRecorder(
            flush_seconds=settings.GATEWAY_USAGE_FLUSH_SECONDS,
            # One folder per database: a spool is only ever shipped into its own.
            spool_dir=Path(settings.GATEWAY_USAGE_SPOOL_DIR) / settings.DATABASES["default"]["NAME"],
            spool_fsync=settings.GATEWAY_USAGE_SPOOL_FSYNC,
            shipper=settings.GATEWAY_USAGE_SHIPPER == "embedded",
        )
        self.redis = PipelinedRedis(settings.REDIS_URL, timeout=settings.GATEWAY_REDIS_TIMEOUT_SECONDS)
        self.limiter = Limiter(
            self.redis,
            lease_seconds=settings.GATEWAY_REQUEST_LEASE_SECONDS,
            retry_seconds=settings.GATEWAY_REDIS_RETRY_SECONDS,
            offline_allowance_micros=settings.GATEWAY_BUDGET_OFFLINE_ALLOWANCE_MICROS,
            offline_allowance_tokens=settings.GATEWAY_BUDGET_OFFLINE_ALLOWANCE_TOKENS,
            budget_load=sync_to_async(_budget_spend_load, thread_sensitive=True),
            alert_record=sync_to_async(_budget_alert_save, thread_sensitive=True),
            namespace=settings.GATEWAY_REDIS_NAMESPACE,
        )
        # The backends' queues are polled, and judged, only with both settings on.
        self._backend_load_polled = (settings.GATEWAY_BACKEND_QUEUE_THRESHOLD >= 0
                                     and settings.GATEWAY_BACKEND_LOAD_POLL_SECONDS > 0)
        self.gate = AdmissionGate(
            max_outstanding_per_backend=settings.GATEWAY_BACKEND_MAX_OUTSTANDING,
            queue_max=settings.GATEWAY_QUEUE_MAX,
            timeouts={"premium": settings.GATEWAY_QUEUE_TIMEOUT_PREMIUM_SECONDS,
                      "standard": settings.GATEWAY_QUEUE_TIMEOUT_STANDARD_SECONDS,
                      "free": settings.GATEWAY_QUEUE_TIMEOUT_FREE_SECONDS},
            shares=settings.GATEWAY_TIER_CAPACITY_SHARE,
            backend_queue_threshold=(settings.GATEWAY_BACKEND_QUEUE_THRESHOLD
                                     if self._backend_load_polled else None),
        )
        self.homes = ConversationHomes(
            self.redis, namespace=settings.GATEWAY_REDIS_NAMESPACE,
            ttl_seconds=settings.GATEWAY_ROUTING_HOME_TTL_SECONDS,
            retry_seconds=settings.GATEWAY_REDIS_RETRY_SECONDS,
        ) if settings.GATEWAY_ROUTING_SHARED_HOMES else None
        self.completions = CompletionService(
            session=self.session,
            registry=self.registry,
            record_usage=self.usage.record,
            limiter=self.limiter,
            gate=self.gate,
            cooldown_seconds=settings.GATEWAY_BREAKER_OPEN_SECONDS,
            default_max_tokens=settings.GATEWAY_DEFAULT_MAX_TOKENS,
            breaker_failures=settings.GATEWAY_BREAKER_FAILURES,
            failover_attempts=settings.GATEWAY_FAILOVER_ATTEMPTS,
            failover_backoff_seconds=settings.GATEWAY_FAILOVER_BACKOFF_SECONDS,
            first_chunk_timeout_seconds=settings.GATEWAY_FIRST_CHUNK_TIMEOUT_SECONDS,
            homes=self.homes,
            prefix_retention_seconds=settings.GATEWAY_PREFIX_RETENTION_SECONDS,
        )
        self._tasks: list[asyncio.Task] = []
        self._inspections: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.registry_reload()
        # What each backend server runs (its KV capacity, its data-parallel
        # ranks) before the first request is routed; at most the health
        # timeout when one cannot be reached (the health loop asks again).
        await self.servers_inspect()
        # Everything loaded so far (Django, the apps) lives as long as the process:
        # keep it out of every later collection, and collect the young generation
        # less often. GC pauses were the main source of TTFT tails under load
        # (bench/limits, part 3).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 10)
        await self.usage.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._registry_refresh_loop(), name="registry-refresh"),
            loop.create_task(self._invalidation_listen_loop(), name="invalidation-listener"),
            loop.create_task(self._health_check_loop(), name="backend-health"),
            loop.create_task(self._backend_load_loop(), name="backend-load"),
            loop.create_task(self._pool_report_loop(), name="pool-report"),
            loop.create_task(self.completions.retention_loop(settings.GATEWAY_PREFIX_RETENTION_TICK_SECONDS),
                             name="prefix-retention"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.limiter.drain()
        if self.homes is not None:
            await self.homes.drain()
        await self.usage.stop()
        await self.session.close()
        await self.redis.aclose()

    async def registry_reload(self) -> None:
        rows = await sync_to_async(_registry_rows, thread_sensitive=True)()
        if self.registry.replace(rows) and self._tasks:
            # A server added at run time: what it runs, without waiting for the health loop.
            task = asyncio.get_running_loop().create_task(self.servers_inspect())
            self._inspections.add(task)
            task.add_done_callback(self._inspections.discard)

    async def _registry_refresh_loop(self) -> None:
        interval = settings.GATEWAY_REGISTRY_REFRESH_SECONDS
        while True:
            await asyncio.sleep(interval)
            try:
                await self.registry_reload()
            except Exception:
                logger.exception("registry reload failed; keeping the previous snapshot")

    async def _backend_load_loop(self) -> None:
        """The backends' queues and KV use (GET /v1/loads) every
        GATEWAY_BACKEND_LOAD_POLL_SECONDS, for priority admission and cache-aware
        routing; requests held back while every backend of a model was saturated
        go as soon as one is not."""
        if not self._backend_load_polled:
            return
        interval = settings.GATEWAY_BACKEND_LOAD_POLL_SECONDS
        while True:
            await asyncio.sleep(interval)
            try:
                # One poll per server: a data-parallel server's ranks each take their own entry.
                servers = _by_server(b for b in self.registry.backends() if b.status == "active" and b.healthy)
                loads = await asyncio.gather(*(
                    backend_loads(self.session, ranks[0], timeout=min(interval, settings.GATEWAY_HEALTH_TIMEOUT_SECONDS))
                    for ranks in servers.values()
                ))
                for ranks, report in zip(servers.values(), loads):
                    for backend in ranks:
                        backend.load_report(*report.get(backend.dp_rank, (-1, -1.0, -1)))
                for model in self.registry.models():
                    self.gate.pump(model)
            except Exception:
                logger.exception("backend load poll failed")

    async def _pool_report_loop(self) -> None:
        """This process's view of the pools, to Redis every
        GATEWAY_POOL_REPORT_SECONDS (pool_health); it expires a few intervals
        after the process stops reporting, and is deleted when it stops."""
        interval = settings.GATEWAY_POOL_REPORT_SECONDS
        if interval <= 0:
            return
        process = process_name()
        key = report_key(settings.GATEWAY_REDIS_NAMESPACE, process)
        ttl = max(10, int(interval * 5))
        try:
            while True:
                retention = self.completions.retention
                report = report_build(self.registry.models(), time.monotonic(), process=process,
                                      interval=interval,
                                      prefix_touches=retention.touches if retention else 0,
                                      prefix_touch_misses=retention.touch_misses if retention else 0)
                try:
                    await self.redis.execute("SET", key, report, "EX", ttl)
                except Exception as error:
                    logger.debug("pool report not published: %r", error)
                await asyncio.sleep(interval)
        except asyncio.CancelledError:
            try:
                await self.redis.execute("DEL", key)
            except Exception:
                pass
            raise

    async def servers_inspect(self) -> None:
        """GET /server_info of each server whose KV capacity is not yet known:
        its capacity, and its data-parallel ranks (a server running several
        becomes one backend per rank, each keeping the prefixes it served)."""
        servers = _by_server(b for b in self.registry.backends() if b.status != "disabled" and not b.kv_tokens)
        if not servers:
            return
        infos = await asyncio.gather(*(
            backend_capacity(self.session, ranks[0], timeout=settings.GATEWAY_HEALTH_TIMEOUT_SECONDS)
            for ranks in servers.values()
        ))
        for (base_url, before), (tokens, dp_size, prefix_cache, cache_tokens) in zip(servers.items(), infos):
            if not tokens:
                continue
            size = dp_size if settings.GATEWAY_DATA_PARALLEL_RANKS else 1
            if self.registry.dp_size_set(base_url, size):
                logger.warning("backend %s: routed to %s", base_url,
                               f"each of its {size} data-parallel ranks" if size > 1 else "as one backend")
                for backend in before:  # what the policies knew of it went with those backends
                    self.completions.backend_forget(backend.url)
            for backend in self.registry.backends():
                if backend.base_url == base_url:
                    backend.kv_tokens, backend.prefix_cache = tokens, prefix_cache
                    backend.cache_tokens = cache_tokens if settings.GATEWAY_HIERARCHICAL_CACHE else tokens

    async def _health_check_loop(self) -> None:
        """Active checks: GET /health of every server, every GATEWAY_HEALTH_CHECK_SECONDS
        (its data-parallel ranks share the answer); and what each server not yet
        inspected runs (`servers_inspect`)."""
        while True:
            await self.servers_inspect()
            await asyncio.sleep(settings.GATEWAY_HEALTH_CHECK_SECONDS)
            servers = _by_server(b for b in self.registry.backends() if b.status != "disabled")
            results = await asyncio.gather(*(
                backend_health(self.session, ranks[0], timeout=settings.GATEWAY_HEALTH_TIMEOUT_SECONDS)
                for ranks in servers.values()
            ))
            for ranks, ok in zip(servers.values(), results):
                for backend in ranks:
                    was_healthy = backend.healthy
                    backend.check_result(ok, failures_to_unhealthy=settings.GATEWAY_HEALTH_FAILURES)
                    if was_healthy != backend.healthy:
                        logger.warning("backend %s is now %s", backend.url, "healthy" if ok else "unhealthy")
                        if backend.healthy:
                            # It may have restarted: its prefix cache is empty, its capacity
                            # (and data-parallel ranks) new.
                            self.completions.backend_forget(backend.url)
                            backend.capacity_forget()

    async def _invalidation_listen_loop(self) -> None:
        while True:
            client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(INVALIDATION_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._invalidation_apply(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("invalidation listener: %s; reconnecting", error)
            finally:
                await client.aclose()
            await asyncio.sleep(LISTENER_RETRY_SECONDS)

    async def _invalidation_apply(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        kind = message.get("kind")
        if kind == "api_key":
            self.auth.forget_key(str(message.get("key_hash")))
        elif kind == "tenant":
            self.auth.forget_tenant(int(message.get("tenant_id", 0)))
        elif kind == "all_keys":
            self.auth.forget_all()
        elif kind == "registry":
            try:
                await self.registry_reload()
            except Exception:
                logger.exception("registry reload on change failed")


def _by_server(backends) -> dict[str, list[BackendState]]:
    """Backends grouped by server (a data-parallel server's ranks together)."""
    servers: dict[str, list[BackendState]] = {}
    for backend in backends:
        servers.setdefault(backend.base_url, []).append(backend)
    return servers


_runtime: GatewayRuntime | None = None
_runtime_lock: asyncio.Lock | None = None


async def runtime_get() -> GatewayRuntime:
    """The process's runtime, started on first use."""
    global _runtime, _runtime_lock
    if _runtime is not None:
        return _runtime
    if _runtime_lock is None:
        _runtime_lock = asyncio.Lock()
    async with _runtime_lock:
        if _runtime is None:
            runtime = GatewayRuntime()
            await runtime.start()
            _runtime = runtime
    return _runtime


async def runtime_stop() -> None:
    global _runtime
    if _runtime is not None:
        runtime, _runtime = _runtime, None
        await runtime.stop()


