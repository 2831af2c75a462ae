"""bench/limits' HTTP load: bursts spread round robin over several gateways, closed
loops that back off after a 429, and open-loop Poisson streams per tier, all over
`bench.common.Connection` (raw asyncio protocols, keep-alive HTTP/1.1, a
hand-written chunked/SSE parser; timestamps once per read).

Every request asks for `stream_options.include_usage`, so each admitted response
carries the backend's token counts (`Result.usage`) as a cross-check of the
usage rows in PostgreSQL."""
from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass

import orjson

from bench.common import HOST, Connection, ResponseError, Result

perf_counter = time.perf_counter

# Ten distinct words: every " word" is one token of the simulator's toy tokenizer.
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


@dataclass
class TimedResult(Result):
    """A Result that also keeps when the response's first byte (its head) arrived."""

    t_head: float = 0.0
    target: int = 0  # index of the gateway it went to
    error: str = ""  # connection-level failure, if any

    @property
    def code(self) -> str:
        """The OpenAI error code of a non-200 answer ('' if none)."""
        if self.status in (0, 200) or not self.body:
            return ""
        try:
            return str(orjson.loads(self.body).get("error", {}).get("code") or "")
        except (orjson.JSONDecodeError, AttributeError):
            return "?"

    @property
    def total_tokens(self) -> int:
        return int((self.usage or {}).get("total_tokens") or 0)


class TimedConnection(Connection):
    def data_received(self, data: bytes) -> None:
        result = self._result
        if result is not None and result.status == 0:
            now = perf_counter()
            super().data_received(data)
            if result.status and not result.t_head:
                result.t_head = now
            return
        super().data_received(data)


def prompt_words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


class Requests:
    """Encoded `POST /v1/chat/completions` streamed requests for one API key; the
    prompt carries a per-request counter (so no two prompts are alike)."""

    def __init__(self, *, model: str, api_key: str, max_tokens: int, prompt: str = "say something short",
                 tag: str = "") -> None:
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.tag = tag
        self._counter = itertools.count(1)

    def body(self) -> dict:
        # ignore_eos: every reply is max_tokens long, the capacity the figures assume.
        return {"model": self.model, "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"{self.tag} {next(self._counter):08d} {self.prompt}"}]}

    def encode(self, port: int) -> bytes:
        body = orjson.dumps(self.body())
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Authorization: Bearer {self.api_key}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        return head + body

    def reserved_tokens(self) -> int:
        """What the gateway reserves per request (inference/streaming.py: prompt bytes
        + PROMPT_TOKENS_FIXED + PROMPT_TOKENS_PER_MESSAGE + max_tokens; 8 + 8 as in
        tests/inference/test_limits.py)."""
        content = f"{self.tag} 00000000 {self.prompt}"
        return len(content.encode()) + 8 + 8 + self.max_tokens


class ModelsProbe:
    """`GET /v1/models` with a key: authentication and the registry, no Redis and no
    backend. Its latency under load is the gateway's event-loop lag."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def encode(self, port: int) -> bytes:
        return (f"GET /v1/models HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Authorization: Bearer {self.api_key}\r\n\r\n").encode()


async def _send(conns: dict, port: int, data: bytes, timeout: float) -> TimedResult:
    """One request on this worker's keep-alive connection to `port` (re-opened if
    it broke or the server closes it)."""
    conn = conns.get(port)
    if conn is None or conn.lost:
        conn = conns[port] = await TimedConnection.open(HOST, port)
    result = TimedResult()
    try:
        await conn.request(data, timeout=timeout, result=result)
    except (ConnectionError, ResponseError, OSError) as error:
        result.error = repr(error)
        conn.close()
        conns.pop(port, None)
        return result
    if conn.lost or conn.server_closes:
        conn.close()
        conns.pop(port, None)
    return result


async def burst(ports: list[int], requests: Requests, *, count: int | None = None, concurrency: int,
                duration_s: float | None = None, backoff_429_s: float = 0.0, timeout: float = 30.0
                ) -> tuple[list[TimedResult], float]:
    """`count` requests (or as many as fit in `duration_s`), `concurrency` at a
    time, request i to gateway i % len(ports). A worker that got a 429 waits
    `backoff_429_s` (jittered) before its next request. Returns the results and
    the burst's wall time."""
    counter = itertools.count()
    results: list[TimedResult] = []
    started = perf_counter()
    deadline = started + duration_s if duration_s else float("inf")
    rng = random.Random(7)

    async def worker() -> None:
        conns: dict[int, Connection] = {}
        try:
            while True:
                i = next(counter)
                if (count is not None and i >= count) or perf_counter() >= deadline:
                    return
                target = i % len(ports)
                result = await _send(conns, ports[target], requests.encode(ports[target]), timeout)
                result.target = target
                results.append(result)
                if result.status == 429 and backoff_429_s:
                    await asyncio.sleep(backoff_429_s * (0.5 + rng.random()))
        finally:
            for conn in conns.values():
                conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, perf_counter() - started


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant (an end at t closes
    before a start at t)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


async def open_loop(port: int, streams: dict[str, tuple[Requests, float]], *, duration_s: float, seed: int,
                    timeout: float = 30.0, on_window=None) -> dict[str, list[TimedResult]]:
    """Open-loop Poisson arrivals for `duration_s`, one stream per name at its rate
    (req/s), every request on an idle keep-alive connection of its stream (or a
    new one). Waits for every request sent to end."""
    loop = asyncio.get_running_loop()
    results: dict[str, list[TimedResult]] = {name: [] for name in streams}
    inflight: set[asyncio.Task] = set()
    t0 = perf_counter()

    async def one(name: str, requests: Requests, idle: list) -> None:
        conns = {port: idle.pop()} if idle else {}
        result = await _send(conns, port, requests.encode(port), timeout)
        results[name].append(result)
        if port in conns:
            idle.append(conns[port])

    pools: list[list[Connection]] = []

    async def arrivals(name: str, requests: Requests, rate: float, rng: random.Random) -> None:
        idle: list[Connection] = []
        pools.append(idle)
        at = t0 + rng.expovariate(rate)
        while at < t0 + duration_s:
            delay = at - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(one(name, requests, idle))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            at += rng.expovariate(rate)
        await asyncio.sleep(0)

    if on_window:
        on_window("start")
    await asyncio.gather(*(arrivals(name, requests, rate, random.Random(f"{seed}:{name}"))
                           for name, (requests, rate) in streams.items() if rate > 0))
    remaining = max(0.0, t0 + duration_s - perf_counter())
    await asyncio.sleep(remaining)
    if on_window:
        on_window("end")
    while inflight:
        await asyncio.gather(*list(inflight), return_exceptions=True)
    for idle in pools:
        for conn in idle:
            conn.close()
    return results
