"""Live-process fixtures: the tests talk to real processes over real sockets —
SGLang-protocol simulators, the ASGI gateway (uvicorn), a Celery worker — backed by
the real PostgreSQL test database and Redis."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.environment import TEST_REDIS_ENV
from tests.inference.sim.sim_process import HEALTH_ARGS, HEALTH_ENV

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def process_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT}", **extra}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def process_stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Sim:
    url: str
    model: str
    process: subprocess.Popen


def sim_start(tmp_dir: Path, model: str, *args: str) -> Sim:
    port = free_port()
    log = tmp_dir / f"sim-{model}-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "inference.sim", "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", model, "--enable-cache-report", *HEALTH_ARGS, *args],
        cwd=ROOT, env=process_env(**HEALTH_ENV), stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", process, log)
    return Sim(url, model, process)


def pool_start(tmp_dir: Path, django_db_blocker, model: str, policy: str, count: int, *args: str) -> list[Sim]:
    """`count` simulators serving `model` (with `args`), registered as its pool with
    routing `policy`, committed so gateway processes see them."""
    from inference.services import backend_add, served_model_upsert

    sims = [sim_start(tmp_dir, model, *args) for _ in range(count)]
    with django_db_blocker.unblock():
        served = served_model_upsert(name=model)
        served.routing_policy = policy
        served.save()
        for sim in sims:
            backend_add(model=served, url=sim.url)
    return sims


@contextlib.contextmanager
def pool_running(tmp_dir: Path, django_db_blocker, model: str, policy: str, count: int, *args: str):
    """`pool_start`, the simulators stopped on leaving."""
    sims = pool_start(tmp_dir, django_db_blocker, model, policy, count, *args)
    try:
        yield sims
    finally:
        for sim in sims:
            process_stop(sim.process)


@pytest.fixture(scope="session")
def live_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("live")


@pytest.fixture(scope="session")
def sims(live_tmp):
    """Simulators by role: 'fast' answers at once, 'slow' streams a token every
    30 ms (for cancel and disconnect tests), 'faulty' takes injected faults,
    'thinking' is a reasoning model (its replies open with a think block) that
    streams three tokens a chunk."""
    started = {
        "fast": sim_start(live_tmp, "test-llm", "--context-length", "4096", "--tool-call-parser", "qwen25"),
        "slow": sim_start(live_tmp, "slow-llm", "--itl-ms", "30"),
        "faulty": sim_start(live_tmp, "faulty-llm"),
        "thinking": sim_start(live_tmp, "think-llm", "--reasoning-parser", "qwen3", "--tool-call-parser", "qwen25",
                              "--enable-cache-report", "--stream-interval", "3"),
    }
    yield started
    for sim in started.values():
        process_stop(sim.process)


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/ws"


def gateway_start(live_tmp: Path, db_name: str, **env: str) -> Gateway:
    port = free_port()
    log = live_tmp / f"gateway-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--app-dir", "platform",
         "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
         "--lifespan", "on", "--no-access-log"],
        cwd=ROOT,
        env=process_env(**{"POSTGRES_DB": db_name, "GATEWAY_REGISTRY_REFRESH_SECONDS": "0.5",
                           "GATEWAY_USAGE_FLUSH_SECONDS": "0.02",
                           "GATEWAY_USAGE_SPOOL_DIR": str(live_tmp / "spool"), **env}),
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", process, log)
    return Gateway(url, process, log)


@contextlib.contextmanager
def gateway_running(live_tmp: Path, **env: str):
    """`gateway_start` on the test database, the gateway stopped on leaving."""
    from django.db import connection

    gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], **env)
    try:
        yield gateway
    finally:
        process_stop(gateway.process)


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment, django_db_blocker):
    """The test database, for every run: live-process tests reach it through
    `live_db`, which pytest-django's own setup does not count as database use."""
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    assert connection.settings_dict["NAME"].startswith("test_"), connection.settings_dict["NAME"]
    yield
    with django_db_blocker.unblock():
        teardown_databases(config, verbosity=0)


@pytest.fixture(scope="session", autouse=True)
def redis_flushed():
    """Redis state keyed by database ids must not outlive the test database."""
    import redis

    for name in TEST_REDIS_ENV:
        redis.Redis.from_url(os.environ[name]).flushdb()


@pytest.fixture(scope="session")
def registry(django_db_setup, django_db_blocker, sims):
    """The served models of the test run, committed so the gateway sees them."""
    from inference.services import backend_add, served_model_upsert

    with django_db_blocker.unblock():
        for sim in sims.values():
            model = served_model_upsert(name=sim.model, context_length=4096)
            backend_add(model=model, url=sim.url)
        # A model whose only backend refuses connections.
        backend_add(model=served_model_upsert(name="down-llm"), url=f"http://127.0.0.1:{free_port()}")
        # The fast simulator's model under another name, with prices (for budgets):
        # 100 currency units per million tokens = 100 micros per token.
        priced = served_model_upsert(name="priced-llm", upstream_name="test-llm", context_length=4096)
        priced.input_price_per_million = priced.output_price_per_million = 100
        priced.cached_input_price_per_million = 50
        priced.save()
        backend_add(model=priced, url=sims["fast"].url)
    return sims


@pytest.fixture(scope="session")
def gateway(registry, live_tmp, django_db_setup):
    from django.db import connection

    gw = gateway_start(live_tmp, connection.settings_dict["NAME"])
    yield gw
    process_stop(gw.process)


@pytest.fixture
def live_db(django_db_setup, django_db_blocker):
    """Database access outside a test transaction: rows are committed at once, so
    the live processes see them. Tests keep apart by creating their own tenants."""
    with django_db_blocker.unblock():
        yield


_counter = iter(range(1, 10**9))


@dataclass
class TenantKey:
    tenant: object
    api_key: object
    secret: str


@pytest.fixture
def make_tenant(live_db):
    from tenants.services import api_key_create, limits_set, tenant_create

    def make(tier: str = "standard", key_limits: dict | None = None, tenant_limits: dict | None = None,
             **key_fields) -> TenantKey:
        n = next(_counter)
        tenant = tenant_create(slug=f"t{os.getpid()}-{n}", name=f"Tenant {n}", tier=tier)
        api_key, secret = api_key_create(tenant=tenant, name="test", **key_fields)
        if key_limits:
            limits_set(target=api_key, **key_limits)
        if tenant_limits:
            limits_set(target=tenant, **tenant_limits)
        return TenantKey(tenant, api_key, secret)

    return make


@pytest.fixture
def tenant_key(make_tenant) -> TenantKey:
    return make_tenant()


def usage_rows_wait(*, api_key, count: int, timeout: float = 10.0) -> list:
    """The key's usage records, once `count` of them are in PostgreSQL."""
    from billing.models import UsageRecord

    deadline = time.monotonic() + timeout
    while True:
        rows = list(UsageRecord.objects.filter(api_key=api_key).order_by("started_at"))
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
