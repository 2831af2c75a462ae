"""Billing fixtures: the local Stripe-compatible server (a real subprocess), Django settings
pointed at it, a price book, a gateway process that also receives Stripe's webhooks, Celery
worker subprocesses and private redis-servers, and a helper writing ledger rows the way the
gateway does (billing.services.usage_records_write)."""
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.billing.stripe_local.control import local_call
from tests.conftest import ROOT, free_port, gateway_start, process_env, process_stop, wait_http

# Prices of the test run, per 1M tokens (USD): input, cached input, output.
TEST_PRICES = {
    "test-llm": (Decimal("2.5"), Decimal("1.25"), Decimal("10")),
    "billing-llm": (Decimal("0.15"), Decimal("0.075"), Decimal("0.6")),
}
PRICES_FROM = datetime(2020, 1, 1, tzinfo=UTC)
WEBHOOK_SECRET_PLACEHOLDER_URL = "http://127.0.0.1:9/billing/stripe/webhook"


@dataclass
class StripeLocal:
    url: str
    process: subprocess.Popen
    log: Path

    def local(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        return local_call(self.url, method, path, body)

    def meter_total(self, *, customer: str, event_name: str | None = None) -> Decimal:
        """Σ values Stripe accepted for a customer (and meter), canceled events excluded."""
        path = f"/_local/meter_events?customer={customer}" + (f"&event_name={event_name}" if event_name else "")
        _, body = self.local("GET", path)
        return sum((Decimal(e["value"]) for e in body["data"] if not e["canceled"]), Decimal(0))

    def meter_events(self, *, customer: str) -> list[dict]:
        return self.local("GET", f"/_local/meter_events?customer={customer}")[1]["data"]


@pytest.fixture(scope="session")
def stripe_local(live_tmp):
    port = free_port()
    log = live_tmp / f"stripe-local-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "billing.stripe_local", "--host", "127.0.0.1", "--port", str(port),
         "--webhook-backoff", "0.2"],
        cwd=ROOT, env=process_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = StripeLocal(f"http://127.0.0.1:{port}", process, log)
    wait_http(server.url + "/_local/health", process, log)
    yield server
    process_stop(process)


@pytest.fixture(scope="session")
def stripe_webhook_secret(stripe_local) -> tuple[str, str]:
    """(endpoint id, signing secret) of the webhook endpoint the live gateway serves."""
    import stripe

    client = stripe.StripeClient("sk_test_local", base_addresses={"api": stripe_local.url,
                                                                  "meter_events": stripe_local.url})
    endpoint = client.v1.webhook_endpoints.create(params={
        "url": WEBHOOK_SECRET_PLACEHOLDER_URL,
        "enabled_events": ["invoice.paid", "invoice.payment_failed", "customer.subscription.deleted"]})
    return endpoint.id, endpoint.secret


@pytest.fixture(scope="session")
def stripe_env(stripe_local, stripe_webhook_secret) -> dict[str, str]:
    """What every process of a billing test gets: Stripe reached only through configuration."""
    return {"STRIPE_API_KEY": "sk_test_local", "STRIPE_API_BASE": stripe_local.url,
            "STRIPE_METER_EVENTS_BASE": stripe_local.url, "STRIPE_WEBHOOK_SECRET": stripe_webhook_secret[1],
            "BILLING_ROLLUP_SETTLE_SECONDS": "0", "STRIPE_MAX_NETWORK_RETRIES": "0"}


@pytest.fixture
def billing_settings(settings, stripe_env):
    """This test process configured like the subprocesses (settings restored after the test)."""
    settings.STRIPE_API_KEY = stripe_env["STRIPE_API_KEY"]
    settings.STRIPE_API_BASE = stripe_env["STRIPE_API_BASE"]
    settings.STRIPE_METER_EVENTS_BASE = stripe_env["STRIPE_METER_EVENTS_BASE"]
    settings.STRIPE_WEBHOOK_SECRET = stripe_env["STRIPE_WEBHOOK_SECRET"]
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    settings.BILLING_ROLLUP_SETTLE_SECONDS = 0.0
    return settings


@pytest.fixture(scope="session")
def price_book(django_db_setup, django_db_blocker):
    """Committed prices for the test run's models, in force since 2020."""
    from billing.models import Price
    from billing.price_book import price_create

    with django_db_blocker.unblock():
        for model, (inp, cached, out) in TEST_PRICES.items():
            if not Price.objects.filter(model=model).exists():
                price_create(model=model, version="v1", input_per_million=inp, cached_input_per_million=cached,
                             output_per_million=out, effective_from=PRICES_FROM)
    return TEST_PRICES


@pytest.fixture(scope="session")
def billing_gateway(registry, live_tmp, django_db_setup, stripe_local, stripe_env, stripe_webhook_secret):
    """A gateway process configured for Stripe; the webhook endpoint points at it."""
    import stripe
    from django.db import connection

    gw = gateway_start(live_tmp, connection.settings_dict["NAME"], **stripe_env)
    client = stripe.StripeClient("sk_test_local", base_addresses={"api": stripe_local.url,
                                                                  "meter_events": stripe_local.url})
    client.v1.webhook_endpoints.update(stripe_webhook_secret[0],
                                       params={"url": gw.url + "/billing/stripe/webhook"})
    yield gw
    process_stop(gw.process)


@pytest.fixture
def billing_tenant(make_tenant, billing_settings, price_book):
    """A tenant with its Stripe customer and subscription set up (as the setup task does)."""
    from billing.accounts import billing_account_stripe_setup
    from billing.models import BillingAccount

    def make(tier: str = "standard"):
        tk = make_tenant(tier=tier)
        account = BillingAccount.objects.get(tenant=tk.tenant)
        billing_account_stripe_setup(account=account)
        account.refresh_from_db()
        tk.account = account
        return tk

    return make


def usage_event(tk, *, started_at: datetime, prompt: int, completion: int, cached: int = 0,
                model: str = "billing-llm", event_id: uuid.UUID | None = None):
    from billing.services import UsageEvent

    return UsageEvent(
        event_id=event_id or uuid.uuid4(), request_id=f"chatcmpl-{uuid.uuid4().hex[:12]}",
        tenant_id=tk.tenant.pk, api_key_id=tk.api_key.pk, model=model, backend="http://sim", endpoint="chat.completions",
        transport="http", stream=False, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
        cost_micros=0, status="ok", http_status=200, error_code="", ttft_ms=1.0, latency_ms=2.0,
        started_at=started_at, finished_at=started_at + timedelta(milliseconds=2))


def random_events(tk, count: int, *, rng: random.Random, start: datetime, hours: int) -> list:
    return [usage_event(tk, started_at=start + timedelta(seconds=rng.randrange(hours * 3600)),
                        prompt=rng.randrange(1, 2000), completion=rng.randrange(0, 800),
                        cached=rng.choice([0, 0, rng.randrange(0, 500)])) for _ in range(count)]


# --- Celery workers and private Redis ------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_start(tmp: Path, port: int | None = None) -> RedisServer:
    """A private redis-server with an append-only file, so a restart keeps queued messages."""
    port = port or free_port()
    data = tmp / f"redis-{port}"
    data.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=(data / "redis.log").open("a"), stderr=subprocess.STDOUT)
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            return RedisServer(port, process, data)
        except redis.RedisError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"redis-server on {port} did not start")
            time.sleep(0.05)


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = redis_start(tmp_path)
    yield server
    process_stop(server.process)


@dataclass
class Worker:
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


def worker_start(tmp: Path, *, broker_url: str, db_name: str, stripe_env: dict, **env: str) -> Worker:
    log = tmp / f"worker-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "--loglevel", "INFO",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=process_env(POSTGRES_DB=db_name, CELERY_BROKER_URL=broker_url,
                                  CELERY_RESULT_BACKEND=broker_url, **stripe_env, **env),
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "ready." not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process_stop(process)
            raise RuntimeError(f"celery worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return Worker(process, log)


class TaskSender:
    """Sends tasks by name to one broker (CELERY_BROKER_URL in the environment would override
    a Celery app's own broker setting, so the connection is given per call)."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        self.broker_url = broker_url
        self.app = Celery("billing-tests")
        self.app.conf.update(task_serializer="json", accept_content=["json"])

    def send_task(self, name: str) -> None:
        with self.app.connection_for_write(self.broker_url) as connection:
            self.app.send_task(name, connection=connection, ignore_result=True)


def celery_app_for(broker_url: str) -> TaskSender:
    return TaskSender(broker_url)


def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def stripe_tokens_by_class_for(stripe_local, account, model: str = "billing-llm") -> dict[str, int]:
    """Tokens Stripe accepted per token class of one model's price lines."""
    from billing.models import PriceLine

    return {line.token_class: int(stripe_local.meter_total(customer=account.stripe_customer_id,
                                                           event_name=line.event_name))
            for line in PriceLine.objects.filter(price__model=model)}
