"""gateway_overhead's load generator: closed loops of pre-encoded 16-token streamed
chat completions over `bench.common.Connection` (raw asyncio protocols on uvloop,
persistent keep-alive HTTP/1.1 connections, a hand-written chunked-transfer and SSE
parser; no HTTP client library: an httpx client saturates its own core at a few
hundred streams/s, shared/async-streaming.md).

One connection carries one request at a time and is reused for every request of
its stream. Timestamps are taken once per read (see bench/common.py).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson

from bench.common import REQUEST_TIMEOUT_S, Connection, ResponseError, Result, reopen as _reopen

perf_counter = time.perf_counter

EXPECTED_TOKENS = 16


def _result() -> Result:
    """A response is ok only with exactly EXPECTED_TOKENS content tokens."""
    return Result(expected_tokens=EXPECTED_TOKENS)


class RequestFactory:
    """Pre-encoded `POST /v1/chat/completions` requests; each differs from the last
    only in an 8-digit counter inside the prompt (so Content-Length is fixed)."""

    def __init__(self, *, host: str, port: int, model: str, api_key: str | None, tag: str,
                 max_tokens: int = EXPECTED_TOKENS) -> None:
        body = orjson.dumps({
            "model": model,
            "messages": [{"role": "user", "content": f"bench {tag} request 00000000: say something short"}],
            "max_tokens": max_tokens,
            "ignore_eos": True,  # every reply EXPECTED_TOKENS long
            "stream": True,
        })
        marker = b"00000000"
        at = body.index(marker)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n"
            + (f"Authorization: Bearer {api_key}\r\n" if api_key else "")
            + "\r\n"
        ).encode()
        self._prefix = head + body[:at]
        self._suffix = body[at + len(marker):]
        self._counter = 0

    def next(self) -> bytes:
        self._counter += 1
        return b"%s%08d%s" % (self._prefix, self._counter % 100_000_000, self._suffix)


@dataclass
class ScenarioStats:
    ttft: list = field(default_factory=list)  # seconds, requests started in the window
    total: list = field(default_factory=list)  # write -> end of response
    gaps: list = field(default_factory=list)
    completed_in_window: int = 0  # ok responses that ended inside the window
    errors: int = 0
    error_samples: list = field(default_factory=list)
    requests_sent: int = 0  # all requests sent to the target (any phase)
    responses: int = 0  # all responses received (any phase, ok or not)


async def run_closed_loop(*, host: str, port: int, factory: RequestFactory, concurrency: int,
                          warmup_s: float, duration_s: float, on_window=None) -> tuple[ScenarioStats, float, float]:
    """`concurrency` connections, each sending its next request as soon as the
    previous response ended. Requests *started* inside the measurement window
    give the latencies; responses *ended* inside it give the rate. `on_window`
    is called at the window's start and end (CPU snapshots)."""
    stats = ScenarioStats()
    loop = asyncio.get_running_loop()
    connections = [await Connection.open(host, port) for _ in range(concurrency)]
    window = [float("inf"), float("inf")]
    stop = False

    async def worker(index: int) -> None:
        conn = connections[index]
        while not stop:
            data = factory.next()
            stats.requests_sent += 1
            try:
                result = await conn.request(data, result=_result())
            except (ConnectionError, ResponseError, OSError) as error:
                stats.errors += 1  # counted whatever the phase: a failure is never warm-up noise
                if len(stats.error_samples) < 5:
                    stats.error_samples.append(repr(error))
                conn.close()
                await asyncio.sleep(0.01)
                conn = connections[index] = await _reopen(host, port)
                continue
            stats.responses += 1
            started_in = window[0] <= result.t_write < window[1]
            if result.ok:
                if window[0] <= result.t_end < window[1]:
                    stats.completed_in_window += 1
                if started_in:
                    stats.ttft.append(result.t_first - result.t_write)
                    stats.total.append(result.t_end - result.t_write)
                    stats.gaps.extend(result.gaps)
            else:
                stats.errors += 1
                if len(stats.error_samples) < 5:
                    stats.error_samples.append(result.describe())
            if conn.lost or conn.server_closes:
                conn.close()
                conn = connections[index] = await _reopen(host, port)

    tasks = [loop.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        window[0] = perf_counter()
        if on_window:
            on_window("start")
        await asyncio.sleep(duration_s)
        window[1] = perf_counter()
        if on_window:
            on_window("end")
        stop = True
        # Workers finish their current request (each bounded by REQUEST_TIMEOUT_S).
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5)
    finally:
        stop = True
        for task in tasks:
            task.cancel()
        for conn in connections:
            conn.close()
    return stats, window[0], window[1]


async def sequential(*, host: str, port: int, factory: RequestFactory, count: int, reuse: bool,
                     warmup: int = 3) -> dict:
    """`count` requests one after another, on one reused keep-alive connection or
    on a fresh connection each (closed by us after the response)."""
    ttft, total, connect, errors = [], [], [], 0
    conn = await Connection.open(host, port) if reuse else None
    try:
        for i in range(warmup + count):
            if not reuse:
                t0 = perf_counter()
                conn = await Connection.open(host, port)
                t_conn = perf_counter() - t0
            try:
                result = await conn.request(factory.next(), result=_result())
            except (ConnectionError, ResponseError, OSError):
                errors += i >= warmup
                conn.close()
                conn = await Connection.open(host, port) if reuse else None
                continue
            if i >= warmup:
                if result.ok:
                    ttft.append(result.t_first - result.t_write)
                    total.append(result.t_end - result.t_write)
                    if not reuse:
                        connect.append(t_conn)
                else:
                    errors += 1
            if not reuse:
                conn.close()
            elif conn.lost or conn.server_closes:
                conn.close()
                conn = await Connection.open(host, port)
    finally:
        if conn is not None:
            conn.close()
    return {"ttft": ttft, "total": total, "connect": connect, "errors": errors}


async def one_request(host: str, port: int, factory: RequestFactory) -> Result:
    conn = await Connection.open(host, port)
    try:
        return await asyncio.wait_for(conn.request(factory.next(), result=_result()), timeout=10)
    finally:
        conn.close()
