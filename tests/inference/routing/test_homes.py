"""Conversation homes: where each conversation lives, shared by the gateway
processes through Redis, so consecutive turns passing through different
processes reach the backend that holds the conversation's history."""
import asyncio
import os
import threading
import time

import openai
import pytest
from django.db import connection

from inference.models import ServedModel
from inference.redis_pipe import PipelinedRedis
from inference.routing.homes import ConversationHomes
from tests.conftest import free_port, gateway_start, pool_start, process_stop, sim_start, usage_rows_wait

MODEL = "homes-llm"
SYSTEM = "You are the travel assistant of a small agency. Answer briefly. " + "Policy text. " * 120


# ------------------------------------------------------------- the Redis map

def homes_run(coroutine_fn, url: str | None = None, **options):
    async def main():
        redis = PipelinedRedis(url or os.environ["REDIS_URL"], timeout=0.25)
        homes = ConversationHomes(redis, namespace=f"test-homes-{os.getpid()}", **options)
        try:
            return await coroutine_fn(homes, redis)
        finally:
            await homes.drain()
            await redis.aclose()

    return asyncio.run(main())


def test_homes_round_trip_with_ttl():
    async def body(homes, redis):
        assert await homes.get("m", "conv-1") is None
        homes.put("m", "conv-1", "http://a")
        homes.put("m", "conv-2", "http://b")
        homes.put("other-model", "conv-1", "http://c")
        await homes.drain()
        ttl = await redis.execute("TTL", f"test-homes-{os.getpid()}:home:m:conv-1")
        return [await homes.get("m", "conv-1"), await homes.get("m", "conv-2"),
                await homes.get("other-model", "conv-1")], ttl

    found, ttl = homes_run(body, ttl_seconds=120)
    assert found == ["http://a", "http://b", "http://c"]
    assert 0 < ttl <= 120


def test_homes_without_redis_answer_none_at_once():
    # given Redis unreachable (nothing listens on the port)
    async def body(homes, redis):
        started = time.monotonic()
        first = await homes.get("m", "conv")
        homes.put("m", "conv", "http://a")
        await homes.drain()
        second = await homes.get("m", "conv")  # within retry_seconds: not even tried
        return first, second, time.monotonic() - started, homes.lookups

    first, second, elapsed, lookups = homes_run(body, url=f"redis://127.0.0.1:{free_port()}/0", retry_seconds=30)
    # then routing goes on without homes, and nobody waits
    assert (first, second) == (None, None)
    assert lookups == 1
    assert elapsed < 0.25


# ------------------------------------------------- through gateway processes

@pytest.fixture(scope="module")
def homes_pool(live_tmp, django_db_blocker, django_db_setup):
    """homes-llm on three simulators of its own (40 ms per token), routed cache-aware."""
    sims = pool_start(live_tmp, django_db_blocker, MODEL, ServedModel.RoutingPolicy.CACHE_AWARE, 3,
                      "--itl-ms", "40", "--max-total-tokens", "50000")
    yield sims
    for sim in sims:
        process_stop(sim.process)


@pytest.fixture(scope="module")
def gateways(homes_pool, live_tmp, django_db_setup):
    """Two gateway processes sharing homes, and one that keeps its routing to itself."""
    name = connection.settings_dict["NAME"]
    started = {
        "first": gateway_start(live_tmp, name),
        "second": gateway_start(live_tmp, name),
        "alone": gateway_start(live_tmp, name, GATEWAY_ROUTING_SHARED_HOMES="0"),
    }
    yield started
    for gateway in started.values():
        process_stop(gateway.process)


def conversation(index: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Trip {index}: which train reaches the coast first on Sunday?"}]


def first_turns(gateway, secret: str, count: int) -> list[tuple[list[dict], str]]:
    """Starts `count` conversations at once through `gateway` (so they overlap and
    load spreads them), returning each one's history after its reply and its
    request id."""
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    results: list = [None] * count

    def run(index: int) -> None:
        messages = conversation(index)
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30)
        results[index] = (messages + [{"role": "assistant", "content": reply.choices[0].message.content}],
                          reply.id)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def next_turn(gateway, secret: str, history: list[dict]) -> str:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    messages = history + [{"role": "user", "content": "And the way back?"}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4).id


def backends_by_request(api_key, count: int) -> dict[str, str]:
    rows = usage_rows_wait(api_key=api_key, count=count)
    assert len(rows) == count
    return {row.request_id: row.backend for row in rows}


def stored_homes() -> list[bytes]:
    """The homes-llm conversation homes in Redis (the gateways' namespace is the
    database name)."""
    import redis

    namespace = connection.settings_dict["NAME"]
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        return list(client.scan_iter(match=f"{namespace}:home:{MODEL}:*", count=1000))
    finally:
        client.close()


def turns_through(first, second, tk) -> tuple[list[str], list[str]]:
    """9 conversations sharing a system prompt, started at once through `first`
    (so load spreads them over the three backends), each one's second turn
    through `second`, which routed none of them; the backend of each first turn
    and of each second turn, from the usage records."""
    started = first_turns(first, tk.secret, 9)
    if first is not second:
        # the first process has said where each conversation lives (by the time a
        # reply is back, its placement has long been written)
        assert len(stored_homes()) >= 9
    seconds = [next_turn(second, tk.secret, history) for history, _ in started]
    backend = backends_by_request(tk.api_key, 18)
    placed = [backend[request_id] for _, request_id in started]
    assert len(set(placed)) > 1, "the first turns were meant to spread over several backends"
    return placed, [backend[request_id] for request_id in seconds]


def test_later_turns_find_their_conversation_through_another_process(gateways, homes_pool, make_tenant):
    placed, seconds = turns_through(gateways["first"], gateways["second"], make_tenant(tier="premium"))
    # every second turn reaches the backend its first turn went to
    assert seconds == placed


def test_without_homes_a_process_routes_on_what_it_saw_alone(gateways, homes_pool, make_tenant):
    placed, seconds = turns_through(gateways["first"], gateways["alone"], make_tenant(tier="premium"))
    # a process that does not share homes sends them all to the first backend of
    # the system prompt's rendezvous order, so those that load had placed
    # elsewhere lose their history there: what the shared homes are for
    assert len(set(seconds)) == 1
    assert seconds != placed


def test_backend_kv_capacity_is_read_from_server_info(homes_pool, live_tmp):
    import aiohttp

    from inference.registry import BackendState
    from inference.sglang import backend_capacity

    async def read(url: str) -> tuple[int, int, bool]:
        async with aiohttp.ClientSession() as session:
            return await backend_capacity(session, BackendState(url), timeout=2.0)

    # its KV tokens, one data-parallel rank, a prefix cache, serving from its KV
    assert asyncio.run(read(homes_pool[0].url)) == (50_000, 1, True, 50_000)
    # nothing listening: 0 (unknown), at once
    assert asyncio.run(read(f"http://127.0.0.1:{free_port()}")) == (0, 0, True, 0)
    uncached = sim_start(live_tmp, "homes-llm", "--disable-radix-cache", "--dp-size", "2")
    # a hierarchical cache (HiCache) serves prefixes from its host pool too
    tiered = sim_start(live_tmp, "homes-llm", "--max-total-tokens", "20000", "--enable-hierarchical-cache",
                       "--hicache-ratio", "3")
    try:
        assert asyncio.run(read(uncached.url))[1:3] == (2, False)
        assert asyncio.run(read(tiered.url)) == (20_000, 1, True, 60_000)
    finally:
        process_stop(uncached.process)
        process_stop(tiered.process)


def test_what_a_hierarchical_cache_serves_from_is_read_from_its_write_policy():
    from inference.sglang import hicache_cache_tokens

    assert hicache_cache_tokens({"enable_hierarchical_cache": False, "hicache_ratio": 2.0}, 1_000) == 1_000
    # write-through copies the device's KV to the host too: the host pool bounds it
    assert hicache_cache_tokens({"enable_hierarchical_cache": True, "hicache_ratio": 2.5,
                                 "hicache_write_policy": "write_through"}, 1_000) == 2_500
    assert hicache_cache_tokens({"enable_hierarchical_cache": True, "hicache_ratio": 0.5}, 1_000) == 1_000
    # write-back keeps on the host only what left the device: the pools add up
    assert hicache_cache_tokens({"enable_hierarchical_cache": True, "hicache_ratio": 2.0,
                                 "hicache_write_policy": "write_back"}, 1_000) == 3_000
    # a ratio missing or malformed: SGLang's default, 2
    assert hicache_cache_tokens({"enable_hierarchical_cache": True, "hicache_ratio": "x"}, 1_000) == 2_000
