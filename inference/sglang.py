"""Async client for SGLang servers (OpenAI-compatible and native endpoints), on one
aiohttp session per process. Facts of the protocol: shared/sglang-protocol.md."""
import asyncio
import logging
from typing import NamedTuple

import aiohttp
import orjson

from .registry import BackendState

logger = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}


class BackendUnreachable(Exception):
    """No connection could be made; nothing was sent, so another backend may be tried."""


def session_create(*, max_connections: int, connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        keepalive_timeout=60,  # seconds an idle upstream connection is kept
        enable_cleanup_closed=True,
    )
    # No total timeout: a stream may run for minutes. sock_read bounds the gap
    # between two chunks, sock_connect the TCP handshake.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, json_serialize=lambda o: orjson.dumps(o).decode(),
        auto_decompress=False, skip_auto_headers=("User-Agent",),
    )


def _headers(backend: BackendState) -> dict[str, str]:
    if backend.api_key:
        return {**JSON_HEADERS, "Authorization": f"Bearer {backend.api_key}"}
    return JSON_HEADERS


def _with_dp_rank(body: bytes, rank: int) -> bytes:
    """A JSON object body with `data_parallel_rank` added: the field every SGLang
    release with data-parallel routing reads (0.5.23 maps it onto
    `routed_dp_rank`), as sglang-router's dp-aware mode sends it."""
    end = body.rstrip().rfind(b"}")
    if end < 0:
        return body
    separator = b"," if body[:end].rstrip()[-1:] not in (b"{", b"") else b""
    return body[:end] + separator + b'"data_parallel_rank":' + str(rank).encode() + body[end:]


async def backend_post(
    session: aiohttp.ClientSession, backend: BackendState, path: str, body: bytes
) -> aiohttp.ClientResponse:
    """Sends a request and returns the response once its headers arrived; the caller
    reads and releases it. A data-parallel rank's backend names its rank in the
    body. Raises BackendUnreachable when no connection was made."""
    if backend.dp_rank is not None:
        body = _with_dp_rank(body, backend.dp_rank)
    try:
        return await session.post(backend.base_url + path, data=body, headers=_headers(backend))
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as error:
        raise BackendUnreachable(f"{backend.url}: {error}") from error
    except asyncio.TimeoutError as error:
        raise BackendUnreachable(f"{backend.url}: timed out") from error


async def backend_abort(session: aiohttp.ClientSession, backend: BackendState, rid: str) -> None:
    """Asks the backend to stop generating for `rid` (SGLang `/abort_request`)."""
    try:
        async with session.post(
            backend.base_url + "/abort_request",
            data=orjson.dumps({"rid": rid}),
            headers=_headers(backend),
            timeout=aiohttp.ClientTimeout(total=5),
        ) as response:
            await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        logger.warning("abort_request for %s on %s failed: %s", rid, backend.url, error)


async def backend_health(session: aiohttp.ClientSession, backend: BackendState, *, timeout: float) -> bool:
    """SGLang's GET /health: 200 when the server can generate."""
    try:
        async with session.get(backend.base_url + "/health", headers=_headers(backend),
                               timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
            return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def _get_json_first(session: aiohttp.ClientSession, backend: BackendState, paths: tuple[str, ...], *,
                          timeout: float) -> object:
    """The JSON body of the first of `paths` the backend has (a 404 moves on to the
    next: SGLang renamed some endpoints between releases); None when none answers
    200 with JSON."""
    for path in paths:
        try:
            async with session.get(backend.base_url + path, headers=_headers(backend),
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status == 404:
                    continue
                if response.status != 200:
                    return None
                return orjson.loads(await response.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError):
            return None
    return None


class ServerCapacity(NamedTuple):
    kv_tokens: int  # 0: unknown
    dp_size: int  # 0: unknown
    prefix_cache: bool
    # What its prefix cache can serve from, in tokens: `kv_tokens`, or with a
    # hierarchical cache (HiCache) what its host tier adds (0: unknown).
    cache_tokens: int = 0


def hicache_cache_tokens(info: dict, kv_tokens: int) -> int:
    """The tokens of prefix a server with `kv_tokens` of KV can serve from
    cache, from its /server_info: with `enable_hierarchical_cache`, its host
    pool too, sized as `hicache_ratio` × the device pool (a `hicache_size` in
    GB cannot be turned into tokens without the model's KV size, and SGLang
    reports the ratio either way). Write-through copies what is on the device
    to the host as well, so the host pool bounds the whole; write-back copies
    only what leaves the device, so the pools add up."""
    if info.get("enable_hierarchical_cache") is not True:
        return kv_tokens
    ratio = info.get("hicache_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        ratio = 2.0  # SGLang's default
    host = int(kv_tokens * ratio)
    if info.get("hicache_write_policy") == "write_back":
        return kv_tokens + host
    return max(kv_tokens, host)


async def backend_capacity(session: aiohttp.ClientSession, backend: BackendState, *,
                           timeout: float) -> ServerCapacity:
    """The server's KV cache capacity in tokens (each data-parallel rank's), its
    data-parallel ranks and whether it caches prefixes, from SGLang's GET
    /server_info (`/get_server_info` on releases before it):
    `max_total_num_tokens`, at the top level (older releases) or in
    `internal_states[0]`; `dp_size`; `disable_radix_cache`; and the tokens its
    prefix cache can serve from (`hicache_cache_tokens`). (0, 0, True, 0) when
    it cannot be read; a `dp_size` absent or not a positive integer counts as 1."""
    info = await _get_json_first(session, backend, ("/server_info", "/get_server_info"), timeout=timeout)
    if not isinstance(info, dict):
        return ServerCapacity(0, 0, True)
    value = info.get("max_total_num_tokens")
    states = info.get("internal_states")
    if value is None and isinstance(states, list) and states and isinstance(states[0], dict):
        value = states[0].get("max_total_num_tokens")
    dp_size = info.get("dp_size")
    dp_size = dp_size if isinstance(dp_size, int) and not isinstance(dp_size, bool) and dp_size > 0 else 1
    tokens = value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
    return ServerCapacity(tokens, dp_size, info.get("disable_radix_cache") is not True,
                          hicache_cache_tokens(info, tokens))



async def backend_loads(session: aiohttp.ClientSession, backend: BackendState, *,
                        timeout: float) -> dict[int | None, tuple[int, float, int]]:
    """The server's queue, KV use and running requests from SGLang's GET
    /v1/loads (`/get_load` on releases before 0.5.23, which have no /v1/loads),
    under None: requests waiting (`num_waiting_reqs` summed over data-parallel
    ranks), the share of KV held by running requests (`token_usage`, the
    fullest rank's), and requests running (`num_running_reqs`, or
    `/get_load`'s `num_reqs` less the waiting ones, summed); and each rank's
    own under its `dp_rank`. -1 for what it cannot say."""
    body = await _get_json_first(session, backend, LOAD_PATHS, timeout=timeout)
    try:
        ranks = load_ranks(body)
    except (AttributeError, TypeError, ValueError):
        return {None: (-1, -1.0, -1)}
    loads = {None: _load_of(ranks)}
    for rank in ranks:
        if isinstance(rank, dict) and isinstance(rank.get("dp_rank"), int):
            loads[rank["dp_rank"]] = _load_of([rank])
    return loads


def _load_of(ranks: list) -> tuple[int, float, int]:
    """Waiting, KV use and running of the rank load dicts `ranks`, together."""
    try:
        waiting = sum(int(rank.get("num_waiting_reqs", 0)) for rank in ranks)
    except (AttributeError, TypeError, ValueError):
        return -1, -1.0, -1
    usages = [rank.get("token_usage") for rank in ranks]
    usage = (max(float(u) for u in usages)
             if usages and all(isinstance(u, (int, float)) and not isinstance(u, bool) for u in usages) else -1.0)
    try:
        running = sum(int(rank["num_running_reqs"]) if "num_running_reqs" in rank
                      else int(rank["num_reqs"]) - int(rank.get("num_waiting_reqs", 0)) for rank in ranks)
    except (KeyError, TypeError, ValueError):
        running = -1
    return waiting, usage, running


# Where SGLang reports its load: /v1/loads since 0.5.23, /get_load before.
LOAD_PATHS = ("/v1/loads?include=core", "/get_load")


def load_ranks(body: object) -> list:
    """The per-rank load dicts of a /v1/loads body ({"loads": [...]}) or of a
    /get_load one (the list itself)."""
    ranks = body.get("loads") if isinstance(body, dict) else body
    if not isinstance(ranks, list):
        raise TypeError("not a load report")
    return ranks
