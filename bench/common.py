"""Pieces shared by the benchmarks: process management (PDEATHSIG, core pinning,
stop by pid), free ports, CPU readers, the benchmark database (re-created and
migrated per run), statistics helpers, and the raw asyncio HTTP/1.1 + SSE client
connection the load generators are built on.

Each benchmark's run.py is started by bench/run.sh with PYTHONPATH = platform/ and
the project root, so `from bench.common import ...` works from any of them.
"""
from __future__ import annotations

import asyncio
import ctypes
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import orjson

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
perf_counter = time.perf_counter


# ---------------------------------------------------------------- processes --
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup(core: int | None):
    def setup() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # never outlive the benchmark
        if core is not None:
            os.sched_setaffinity(0, {core})
    return setup


class Processes:
    """The processes a benchmark started; each in its own session, stopped by pid.
    Each one's output goes to `logs/<name>.log`."""

    def __init__(self, cwd: Path, logs: Path) -> None:
        self.cwd = cwd
        self.logs = logs
        self.items: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], *, core: int | None, env: dict) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_child_setup(core))
        self.items.append((name, proc, log))
        return proc

    def check_alive(self) -> None:
        for name, proc, log in self.items:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}; log {log}:\n{tail}")

    def stop(self, procs: list[subprocess.Popen]) -> None:
        """Stops the given processes (started here) and forgets them."""
        pids = {p.pid for p in procs}
        chosen = [item for item in self.items if item[1].pid in pids]
        self._stop(chosen)
        self.items = [item for item in self.items if item[1].pid not in pids]

    def stop_all(self) -> None:
        self._stop(list(self.items))
        self.items.clear()

    @staticmethod
    def _stop(items: list) -> None:
        for name, proc, _ in reversed(items):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: pgid == pid
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8
        for name, proc, _ in reversed(items):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def cores_choose(*, server_core: int, client_core: int, no_pin: bool) -> tuple[bool, int | None, int | None, list[int]]:
    """(pinned, server core, client core, cores available): pinning only when asked
    for two distinct cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    pin = not no_pin and server_core in cores and client_core in cores and server_core != client_core
    return pin, (server_core if pin else None), (client_core if pin else None), cores


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of all the process's threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds (utime + stime) of a process's live children, e.g. the
    gateway's usage shipper; 0 when it has none (or has exited)."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = f.read().split()
        except FileNotFoundError:
            continue
        for child in children:
            try:
                total += proc_cpu_seconds(int(child))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return total


def named_cpu_seconds(names: tuple[str, ...]) -> dict[int, float]:
    """CPU seconds of every live process whose command name starts with one of
    `names` (e.g. the PostgreSQL and Redis servers the gateway writes to), by
    pid: subtract two of these with `cpu_seconds_delta`."""
    seconds = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = raw[raw.find(b"(") + 1:raw.rfind(b")")].decode(errors="replace")
        if name.startswith(names):
            fields = raw.rsplit(b")", 1)[1].split()
            seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return seconds


def cpu_seconds_delta(start: dict[int, float], end: dict[int, float]) -> float:
    """CPU seconds used between two `named_cpu_seconds` snapshots by the processes
    alive at the end (one that exited in between is left out, not negative)."""
    return sum(seconds - start.get(pid, 0.0) for pid, seconds in end.items())


def cores_busy_seconds(cores: list[int]) -> float:
    """Busy time (all processes) of the given cores, from /proc/stat."""
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cores:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
                busy += user + nice + system + irq + softirq + steal
    return busy / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def versions(dists=("uvicorn", "uvloop", "httptools", "aiohttp", "Django", "sglang-router")) -> dict:
    found = {"python": sys.version.split()[0]}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------- database --
def pg_connect(dbname: str):
    import psycopg

    return psycopg.connect(host=os.environ.get("POSTGRES_HOST", "127.0.0.1"),
                           port=int(os.environ.get("POSTGRES_PORT", "5432")),
                           user=os.environ.get("POSTGRES_USER", "postgres"),
                           password=os.environ.get("POSTGRES_PASSWORD", ""),
                           dbname=dbname, autocommit=True, connect_timeout=5)


def db_prepare(db: str, env: dict, backend_urls: list[str], *, tree: Path, recreate: bool, model: str,
               tenant: str) -> str:
    """Creates (by default re-creates: migrations are still edited in place during
    development, so an old schema can be stale) and migrates the benchmark's own
    database, points `model` at this run's backends only (`demo_setup`), raises the
    tenant's limits out of reach (HIGH_LIMITS) and returns a fresh API key."""
    with pg_connect("postgres") as conn:
        if recreate:
            conn.execute(f'drop database if exists "{db}" with (force)')
        if conn.execute("select 1 from pg_database where datname = %s", (db,)).fetchone() is None:
            conn.execute(f'create database "{db}"')
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with pg_connect(db) as conn:  # backends of earlier runs (other ports) must not be routed to
        conn.execute("delete from inference_backend where model_id in "
                     "(select id from inference_servedmodel where name = %s)", (model,))
    argv = [sys.executable, "manage.py", "demo_setup", "--tenant", tenant, "--model", model]
    for url in backend_urls:
        argv += ["--backend", url]
    out = subprocess.run(argv, cwd=tree, env=env, check=True, capture_output=True, text=True)
    with pg_connect(db) as conn:
        limits_raise(conn, tenant)
    key = out.stdout.strip().splitlines()[-1].strip()
    if not key.startswith("sk-"):
        raise RuntimeError(f"demo_setup printed no API key: {out.stdout!r} {out.stderr!r}")
    return key


# Once rate limits exist, a bench tenant gets limits far above what a run can reach:
# they are checked on every request (that cost is what is measured) but never hit.
HIGH_LIMITS = {"rpm_limit": 1_000_000_000, "tpm_limit": 2_000_000_000, "concurrency_limit": 1_000_000,
               "monthly_budget_minor": 10**15, "monthly_token_budget": 10**15}


def limits_raise(conn, tenant: str) -> list[str]:
    """Sets HIGH_LIMITS on the tenant for the limit columns its table has."""
    columns = {row[0] for row in conn.execute(
        "select column_name from information_schema.columns where table_name = 'tenants_tenant'")}
    present = [name for name in HIGH_LIMITS if name in columns]
    if present:
        assignments = ", ".join(f"{name} = %s" for name in present)
        conn.execute(f"update tenants_tenant set {assignments} where slug = %s",
                     [HIGH_LIMITS[name] for name in present] + [tenant])
    return present


def usage_rows(db: str, tenant: str) -> int:
    with pg_connect(db) as conn:
        row = conn.execute("select count(*) from billing_usagerecord u join tenants_tenant t "
                           "on t.id = u.tenant_id where t.slug = %s", (tenant,)).fetchone()
    return int(row[0])


# ---------------------------------------------------------------- statistics --
def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------ HTTP/SSE client --
# A client cheaper than the servers it measures: raw asyncio protocols (on uvloop)
# speaking HTTP/1.1 on persistent keep-alive connections, with a hand-written
# chunked-transfer and SSE parser. No HTTP client library: an httpx client
# saturates its own core at a few hundred streams/s (shared/async-streaming.md).
#
# One `Connection` carries one request at a time and is reused for every request
# of its stream. Timestamps are taken once per `data_received` call, i.e. when the
# bytes reach this process: events that arrive in one read share one timestamp.

# A response not complete after this long counts as an error (its connection is replaced).
REQUEST_TIMEOUT_S = 10.0


class ResponseError(Exception):
    pass


@dataclass(slots=True)
class Result:
    t_write: float = 0.0
    t_first: float = 0.0  # first content token
    t_end: float = 0.0
    status: int = 0
    tokens: int = 0  # SSE events with non-empty delta.content
    done: bool = False  # saw `data: [DONE]`
    stream_error: bool = False  # an SSE error event
    gaps: list = field(default_factory=list)  # seconds between consecutive content tokens
    body: bytes = b""  # non-SSE answers (errors), for diagnostics
    expected_tokens: int | None = None  # ok only with exactly this many content events, if set
    collect_text: bool = False  # keep the content deltas in `text`
    text: list = field(default_factory=list)
    usage: dict | None = None  # the last `usage` object seen in a chunk

    @property
    def ok(self) -> bool:
        return (self.status == 200 and self.done and not self.stream_error
                and (self.expected_tokens is None or self.tokens == self.expected_tokens))

    def describe(self) -> str:
        if self.status != 200:
            return f"HTTP {self.status}: {self.body[:200]!r}"
        return f"tokens={self.tokens} done={self.done} stream_error={self.stream_error}"


# parser states
_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _LENGTH_BODY = range(6)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; `request()` sends pre-encoded bytes and returns
    the parsed streamed response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.server_closes = False  # the response said Connection: close
        self._buf = bytearray()
        self._sse = bytearray()
        self._waiter: asyncio.Future | None = None
        self._result: Result | None = None
        self._state = _HEAD
        self._remaining = 0
        self._last_token = 0.0

    @classmethod
    async def open(cls, host: str, port: int) -> "Connection":
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.lost = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def request(self, data: bytes, timeout: float = REQUEST_TIMEOUT_S, result: Result | None = None) -> Result:
        """Sends `data`; `result` (default a fresh `Result()`) receives the response."""
        if self.lost:
            raise ConnectionError("connection already closed")
        result = self._result = result if result is not None else Result()
        self._state = _HEAD
        self._buf.clear()
        self._sse.clear()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._on_timeout, timeout)
        result.t_write = perf_counter()
        self.transport.write(data)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._result = None

    def _on_timeout(self, timeout: float) -> None:
        waiter, result = self._waiter, self._result
        if waiter is not None and not waiter.done():
            detail = (f"no complete response within {timeout:.0f}s (parser state {self._state}, "
                      f"status {result.status}, tokens {result.tokens}, [DONE] {result.done}, "
                      f"{len(self._buf)} bytes unparsed: {bytes(self._buf[-80:])!r})")
            waiter.set_exception(ResponseError(detail))
        self.transport.close()  # the connection's state is unknown now

    # ---- parsing -------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        result = self._result
        if result is None:
            return  # bytes after a response (none expected): ignore
        buf = self._buf
        buf += data
        pos = 0
        try:
            while True:
                state = self._state
                if state == _CHUNK_DATA:
                    take = min(len(buf) - pos, self._remaining)
                    if take == 0:
                        break
                    self._sse_feed(buf[pos:pos + take], now, result)
                    pos += take
                    self._remaining -= take
                    if self._remaining == 0:
                        self._state = _CHUNK_CRLF
                elif state == _CHUNK_SIZE:
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        break
                    size = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                    pos = end + 2
                    if size == 0:
                        self._state = _TRAILER
                    else:
                        self._remaining = size
                        self._state = _CHUNK_DATA
                elif state == _CHUNK_CRLF:
                    if len(buf) - pos < 2:
                        break
                    pos += 2
                    self._state = _CHUNK_SIZE
                elif state == _TRAILER:
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        break
                    if end == pos:  # the empty line ending the message
                        pos = end + 2
                        self._finish(now, result)
                        break
                    pos = end + 2  # a trailer field: ignore
                elif state == _HEAD:
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        break
                    self._head_parse(bytes(buf[pos:end]), result)
                    pos = end + 4
                    if self._state == _LENGTH_BODY and self._remaining == 0:
                        self._finish(now, result)
                        break
                else:  # _LENGTH_BODY
                    take = min(len(buf) - pos, self._remaining)
                    if take == 0:
                        break
                    piece = bytes(buf[pos:pos + take])
                    pos += take
                    self._remaining -= take
                    if result.status == 200:
                        self._sse_feed(piece, now, result)
                    else:
                        result.body += piece
                    if self._remaining == 0:
                        self._finish(now, result)
                        break
        except Exception as error:  # a malformed response: fail this request and the connection
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(ResponseError(f"unparsable response: {error!r}"))
            self.transport.close()
            return
        del buf[:pos]

    def _head_parse(self, head: bytes, result: Result) -> None:
        lines = head.split(b"\r\n")
        result.status = int(lines[0].split(b" ", 2)[1])
        chunked = False
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                length = int(value.strip())
            elif name == b"connection":
                self.server_closes = b"close" in value.lower()
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state = _LENGTH_BODY
            self._remaining = length
        else:
            raise ResponseError("response without length or chunked encoding")

    def _sse_feed(self, piece, now: float, result: Result) -> None:
        sse = self._sse
        sse += piece
        start = 0
        while True:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            event = bytes(sse[start:end])
            start = end + 2
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    result.done = True
                    continue
                chunk = orjson.loads(payload)
                choices = chunk.get("choices")
                if choices:
                    delta = choices[0].get("delta")
                    if delta:
                        content = delta.get("content")
                        if content:
                            if result.tokens == 0:
                                result.t_first = now
                            else:
                                result.gaps.append(now - self._last_token)
                            self._last_token = now
                            result.tokens += 1
                            if result.collect_text:
                                result.text.append(content)
                elif "error" in chunk:
                    result.stream_error = True
                usage = chunk.get("usage")
                if usage:
                    result.usage = usage
        if start:
            del sse[:start]

    def _finish(self, now: float, result: Result) -> None:
        result.t_end = now
        self._state = _HEAD
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(result)


async def reopen(host: str, port: int, attempts: int = 50) -> Connection:
    for attempt in range(attempts):
        try:
            return await Connection.open(host, port)
        except OSError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.1)
