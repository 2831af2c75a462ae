"""Fixtures: the local Stripe server as a real subprocess on a free loopback port, a
stripe-python client pointed at it, and a small aiohttp webhook receiver.

Nothing here needs Django: run with `pytest -p no:django tests/billing/stripe_local`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import stripe
from aiohttp import web

from tests.billing.stripe_local.control import local_call

REPO_ROOT = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval_s)


@dataclass
class StripeServer:
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "sk_test_local", **kwargs) -> stripe.StripeClient:
        return stripe.StripeClient(key, base_addresses={"api": self.url, "meter_events": self.url}, **kwargs)

    def local(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """A /_local/ control call (plain JSON over HTTP, not Stripe's API)."""
        return local_call(self.url, method, path, body)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def server_start(tmp_dir: Path, *args: str) -> StripeServer:
    port = free_port()
    log_path = tmp_dir / f"stripe-local-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "billing.stripe_local", "--host", "127.0.0.1", "--port", str(port),
         "--webhook-backoff", "0.2", *args],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    server = StripeServer(port, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"stripe_local exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(server.url + "/_local/health", timeout=1)
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"stripe_local did not answer within {STARTUP_TIMEOUT_S}s")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    """Start servers with custom flags; all are stopped at session end."""
    started: list[StripeServer] = []
    tmp_dir = tmp_path_factory.mktemp("stripe_local")

    def factory(*args: str) -> StripeServer:
        server = server_start(tmp_dir, *args)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def shared_server(server_factory) -> StripeServer:
    return server_factory()


@pytest.fixture
def server(shared_server) -> StripeServer:
    """The shared server, emptied before each test."""
    status, _ = shared_server.local("POST", "/_local/reset")
    assert status == 200
    return shared_server


@pytest.fixture
def client(server) -> stripe.StripeClient:
    return server.client()


# --- webhook receiver ----------------------------------------------------------------------------

@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@dataclass
class WebhookReceiver:
    url: str
    received: list[Received] = field(default_factory=list)
    # Status codes to answer with, in order, before answering 200 for good.
    failures: list[int] = field(default_factory=list)

    def events(self) -> list[dict]:
        return [json.loads(r.body) for r in self.received if 200 <= r.headers.get("_status", 200) < 300]

    def wait_for_type(self, type: str, *, timeout_s: float = 10.0) -> Received:
        def found():
            for item in self.received:
                if json.loads(item.body)["type"] == type:
                    return item
            return None
        return wait_until(found, timeout_s=timeout_s)


@pytest.fixture
def webhook_receiver():
    """An aiohttp server on a free port (in a background thread) that records each POST."""
    port = free_port()
    receiver = WebhookReceiver(url=f"http://127.0.0.1:{port}/webhooks")
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        status = receiver.failures.pop(0) if receiver.failures else 200
        receiver.received.append(Received(body, {**request.headers, "_status": status}))
        return web.Response(status=status, text="ok")

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/webhooks", receive)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner_holder.append(loop.run_until_complete(serve()))
        ready.set()
        loop.run_forever()

    runner_holder: list[web.AppRunner] = []
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    yield receiver
    asyncio.run_coroutine_threadsafe(runner_holder[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
