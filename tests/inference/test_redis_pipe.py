"""The gateway's pipelined Redis client on a real Redis, under uvloop as the
gateway runs it."""
import asyncio
import socket
import time

import uvloop
from django.conf import settings

from inference.redis_pipe import PipelinedRedis, RedisUnavailable


def run(coroutine_factory):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine_factory())


def test_a_reply_that_came_while_the_loop_was_stalled_is_not_a_timeout():
    # uvloop runs due timers before it polls for I/O: a loop stalled past the
    # timeout inside an I/O callback must still read the reply waiting in the
    # socket before it calls Redis unavailable.
    async def main():
        loop = asyncio.get_running_loop()
        client = PipelinedRedis(settings.REDIS_URL, timeout=0.05)
        assert await client.execute("PING") == b"PONG"  # connected

        class Stall(asyncio.Protocol):
            def data_received(self, data):
                time.sleep(0.3)

        ours, theirs = socket.socketpair()
        await loop.create_connection(Stall, sock=ours)
        # The command is written; the loop stalls in its next poll, before Redis
        # has answered (the script takes a few ms), and the answer arrives during
        # the stall.
        pending = asyncio.ensure_future(client.execute(
            "EVAL", "local n = 0 for i = 1, 300000 do n = n + i end return ARGV[1]", 0, "late but there"))
        await asyncio.sleep(0)
        theirs.send(b"stall")
        try:
            return await pending
        finally:
            theirs.close()
            await client.aclose()

    assert run(main) == b"late but there"


def test_no_reply_within_the_timeout_is_redis_unavailable():
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
        port = listener.getsockname()[1]
        client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=0.05)
        started = time.monotonic()
        try:
            await client.execute("PING")
        except RedisUnavailable as error:
            return str(error), time.monotonic() - started
        finally:
            listener.close()
            await client.aclose()

    message, elapsed = run(main)
    assert "no reply within" in message
    assert elapsed < 1.0


def _other_db(url: str) -> tuple[str, int]:
    """The test Redis URL with another database number (never 0), and that number."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    db = int(parsed.path.lstrip("/") or 0)
    other = 7 if db != 7 else 8
    return parsed._replace(path=f"/{other}").geturl(), other


def test_commands_sent_while_connecting_reach_the_selected_database():
    # Many callers at once on a new client (a gateway's first burst): every
    # command must run in the database of the URL, none before its SELECT.
    import redis

    url, db = _other_db(settings.REDIS_URL)
    check = redis.Redis.from_url(url)
    default = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/0")
    keys = [f"pipe-select-test:{i}" for i in range(50)]
    check.delete(*keys)
    default.delete(*keys)

    async def main():
        client = PipelinedRedis(url, timeout=1.0)
        try:
            # Requests keep arriving while the connection is being made: a new
            # caller at every turn of the loop.
            calls = []
            for key in keys:
                calls.append(asyncio.ensure_future(client.execute("SET", key, "x", "EX", 60)))
                await asyncio.sleep(0)
            await asyncio.gather(*calls)
        finally:
            await client.aclose()

    try:
        run(main)
        assert default.exists(*keys) == 0, "commands ran in database 0"
        assert check.exists(*keys) == len(keys)
    finally:
        check.delete(*keys)
        default.delete(*keys)


def test_a_server_that_accepts_but_never_answers_the_handshake_is_unavailable():
    # A connection that needs a SELECT: no caller waits past the timeout for it.
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        client = PipelinedRedis(f"redis://127.0.0.1:{port}/3", timeout=0.05)
        started = time.monotonic()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(client.execute("PING") for _ in range(5)), return_exceptions=True), 2.0)
        finally:
            listener.close()
            await client.aclose()
        return results, time.monotonic() - started

    results, elapsed = run(main)
    assert all(isinstance(r, RedisUnavailable) for r in results), results
    assert elapsed < 1.0
