"""What operators see of the pools: each gateway process's view of its backends
(health, circuit breaker, load, the last minute of traffic), published to Redis
and merged by `manage.py pool_status` and the admin's backend list."""
import io
import json
import re
import socket
import time
import urllib.request

import openai
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from config.redis import redis_sync

from inference.models import ServedModel
from inference.pool_health import (BUCKET_SECONDS, TTFT_BOUNDS_MS, WINDOW_SECONDS, TrafficWindow,
                                   pools_read, reports_merge, reports_read, ttft_percentile)
from tests.conftest import gateway_start, pool_running, process_stop
from tests.inference.sim_control import sim_faults

MODEL = "watched-llm"


def test_traffic_window_sums_the_last_minute_and_forgets_what_is_older():
    window = TrafficWindow()
    window.request_end(1000.0, ok=True, prompt_tokens=100, cached_tokens=60, completion_tokens=10, ttft_ms=30)
    window.request_end(1001.0, ok=False, prompt_tokens=50, cached_tokens=0, completion_tokens=5, ttft_ms=None)
    window.attempt_failed(1002.0)
    later = 1000.0 + WINDOW_SECONDS - BUCKET_SECONDS
    window.request_end(later, ok=True, prompt_tokens=10, cached_tokens=10, completion_tokens=1, ttft_ms=5000)
    totals = window.totals(later)
    assert {name: totals[name] for name in ("requests", "errors", "failed_attempts", "prompt_tokens",
                                            "cached_tokens", "completion_tokens")} == {
        "requests": 3, "errors": 1, "failed_attempts": 1, "prompt_tokens": 160, "cached_tokens": 70,
        "completion_tokens": 16}
    assert sum(totals["ttft_ms_buckets"]) == 2
    # A minute after the first requests only the last one is left.
    assert window.totals(1000.0 + WINDOW_SECONDS + BUCKET_SECONDS)["requests"] == 1
    assert window.totals(later + WINDOW_SECONDS + BUCKET_SECONDS)["requests"] == 0


def test_ttft_percentiles_are_the_bounds_of_the_histogram_buckets():
    buckets = [0] * (len(TTFT_BOUNDS_MS) + 1)
    assert ttft_percentile(buckets, 0.5) is None
    buckets[1], buckets[3] = 60, 40  # 60 under 50 ms, 40 under 200 ms
    assert ttft_percentile(buckets, 0.5) == 50
    assert ttft_percentile(buckets, 0.99) == 200
    buckets[-1] = 100
    assert ttft_percentile(buckets, 0.99) == float("inf")


def _entry(url, **fields):
    return {"model": "m", "url": url, "healthy": True, "circuit_open_seconds": 0, "in_flight": 0,
            "running": -1, "waiting": -1, "kv_usage": -1.0, **fields}


def test_reports_of_several_processes_merge_per_backend():
    old = {"at": 100.0, "backends": [
        _entry("http://a", in_flight=2, running=9, waiting=3, kv_usage=0.9, requests=5, prompt_tokens=100,
               cached_tokens=50),
        _entry("http://c@0", in_flight=1, running=2, kv_usage=0.2, requests=1, kv_tokens=1000),
        _entry("http://c@1", in_flight=3, running=4, kv_usage=0.4, requests=2, kv_tokens=1000,
               circuit_open_seconds=1.5)]}
    new = {"at": 101.0, "backends": [
        _entry("http://a", healthy=False, in_flight=1, running=4, waiting=0, kv_usage=0.5, requests=3,
               prompt_tokens=100, cached_tokens=30),
        _entry("http://c@0", running=1, kv_usage=0.1, kv_tokens=1000),
        _entry("http://c@1", running=1, kv_usage=0.3, kv_tokens=1000)]}
    configured = [("m", "http://a", "active"), ("m", "http://b", "draining"), ("m", "http://c", "active")]
    a, b, c0, c1 = reports_merge([old, new], configured)
    assert (a.url, a.health, a.processes, a.healthy_in, a.in_flight) == ("http://a", "unhealthy", 2, 1, 3)
    # The backend's own figures come from the freshest report; traffic adds up.
    assert (a.running, a.waiting, a.kv_usage) == (4, 0, 0.5)
    assert (a.requests, a.prompt_tokens, a.cached_tokens, a.hit_rate) == (8, 200, 80, 0.4)
    assert (b.url, b.health, b.processes) == ("http://b", "not reported", 0)
    assert (c0.url, c1.url, c1.health, c1.status) == ("http://c@0", "http://c@1", "circuit open", "active")
    # Folded by server: one row for c, a process counted once, its ranks added up.
    a, b, c = reports_merge([old, new], configured, ranks=False)
    assert (c.url, c.processes, c.circuit_open_in, c.health) == ("http://c", 2, 1, "circuit open")
    assert (c.in_flight, c.requests, c.running, c.kv_tokens, c.kv_usage) == (4, 3, 2, 2000, 0.3)


@pytest.fixture(scope="module")
def watched(live_tmp, django_db_blocker, django_db_setup):
    with pool_running(live_tmp, django_db_blocker, MODEL, ServedModel.RoutingPolicy.CACHE_AWARE, 2,
                      "--itl-ms", "5") as sims:
        gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_POOL_REPORT_SECONDS="0.2",
                                GATEWAY_HEALTH_CHECK_SECONDS="0.2", GATEWAY_REGISTRY_REFRESH_SECONDS="0.2")
        try:
            yield sims, gateway
        finally:
            process_stop(gateway.process)


def _rows_wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        out = io.StringIO()
        call_command("pool_status", MODEL, "--json", stdout=out)
        rows = json.loads(out.getvalue())
        if predicate(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _scrape(gateway, **headers):
    response = urllib.request.urlopen(urllib.request.Request(gateway.url + "/metrics", headers=headers), timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return list(text_string_to_metric_families(response.read().decode()))


def _sample(families, name, labels):
    """The value of the one sample of family `name` whose labels include `labels`."""
    family = next(f for f in families if f.name == name)
    values = [s.value for s in family.samples
              if s.name in (name, name + "_total") and labels.items() <= s.labels.items()]
    assert len(values) == 1, (name, labels, family.samples)
    return values[0]


def test_pool_status_shows_health_load_and_the_last_minute_of_traffic(watched, make_tenant, settings):
    sims, gateway = watched
    # Read what the gateway writes: its namespace is its database's name, the test database's.
    settings.GATEWAY_REDIS_NAMESPACE = connection.settings_dict["NAME"]
    tk = make_tenant(tier="premium")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    # A long shared prompt: cache-aware routing keeps it on one backend, whose
    # cache serves it from the second request on.
    messages = [{"role": "system", "content": "You answer questions about the fleet. " * 60},
                {"role": "user", "content": "How is it?"}]
    for _ in range(4):
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"

    # Once the gateways have polled the backends' loads (every second) since the requests ended.
    rows = _rows_wait(lambda rows: sum(r["requests"] for r in rows) == 4 and all(r["running"] == 0 for r in rows))
    assert [r["url"] for r in rows] == sorted(s.url for s in sims)
    # Every live gateway process of the test run routes this model and reports it.
    gateways = rows[0]["processes"]
    assert gateways >= 1
    assert all(r["health"] == "healthy" and r["processes"] == r["healthy_in"] == gateways for r in rows), rows
    served = max(rows, key=lambda r: r["requests"])
    assert served["requests"] == 4 and served["errors"] == 0
    assert served["completion_tokens"] == 4 * 8
    assert served["prompt_tokens"] > 4 * 400
    # Three of the four found the shared prompt in cache.
    assert served["cached_tokens"] >= 3 * 400
    assert served["hit_rate"] == pytest.approx(served["cached_tokens"] / served["prompt_tokens"])
    assert served["ttft_p50_ms"] is not None and sum(served["ttft_ms_buckets"]) == 4
    # The backend's own report, polled from GET /v1/loads.
    assert served["kv_tokens"] > 0 and served["running"] == 0 and served["waiting"] == 0

    # A backend failing one process's health checks is shown unhealthy, with how many agree.
    sick = next(r["url"] for r in rows if r is not served)
    sick_sim = next(s for s in sims if s.url == sick)
    with sim_faults(sick_sim, unhealthy=True):
        rows = _rows_wait(lambda rows: any(r["health"] == "unhealthy" for r in rows))
        assert {r["url"]: r["health"] for r in rows} == {sick: "unhealthy", served["url"]: "healthy"}
        sick_row = next(r for r in rows if r["url"] == sick)
        assert sick_row["healthy_in"] < sick_row["processes"] == gateways

        text = io.StringIO()
        call_command("pool_status", MODEL, stdout=text)
        lines = {line.split()[1]: line for line in text.getvalue().splitlines()[1:] if line.startswith(MODEL)}
        assert re.search(rf"\bunhealthy\s+\d+/{gateways}\b", lines[sick])
        assert re.search(rf"\bhealthy\s+{gateways}/{gateways}\s+0\s+0\s+0\b", lines[served["url"]])

        # The admin's backend list shows the same, read once for the page.
        user, _ = get_user_model().objects.get_or_create(
            username="pool-admin", defaults={"is_staff": True, "is_superuser": True})
        browser = Client()
        browser.force_login(user)
        page = browser.get("/admin/inference/backend/", {"model__id__exact": ServedModel.objects.get(name=MODEL).pk})
        assert page.status_code == 200
        html = page.content.decode()
        assert re.search(rf"\bunhealthy \(\d+/{gateways} gateways\)", html)
        assert f">healthy ({gateways}/{gateways} gateways)<" in html
        assert f"{served['hit_rate']:.1%}" in html

        # Prometheus reads the same, per gateway process: this one's checks failed.
        families = _scrape(gateway)
        assert _sample(families, "llm_gateway_processes_reporting", {}) >= gateways
        this = f"{socket.gethostname()}:{gateway.process.pid}"
        by_backend = {url: {"gateway": this, "model": MODEL, "backend": url} for url in (sick, served["url"])}
        assert _sample(families, "llm_gateway_backend_healthy", by_backend[sick]) == 0
        assert _sample(families, "llm_gateway_backend_healthy", by_backend[served["url"]]) == 1
        assert _sample(families, "llm_gateway_backend_requests", by_backend[served["url"]]) == 4
        assert _sample(families, "llm_gateway_backend_cached_tokens", by_backend[served["url"]]) == \
            served["cached_tokens"]
        # What the backend itself reported, once per backend.
        assert _sample(families, "llm_gateway_backend_kv_capacity_tokens",
                       {"model": MODEL, "backend": served["url"]}) == served["kv_tokens"]
        ttft = next(f for f in families if f.name == "llm_gateway_backend_time_to_first_token_seconds")
        assert ttft.type == "histogram"
        counts = [s.value for s in ttft.samples if s.name.endswith("_count")
                  and s.labels["backend"] == served["url"] and s.labels["gateway"] == this]
        assert counts == [4]

    # A stopped gateway's report is withdrawn at once: its view and traffic no longer count.
    process_stop(gateway.process)
    assert this not in {report["process"] for report in
                        reports_read(redis_sync(), settings.GATEWAY_REDIS_NAMESPACE)}
    rows = pools_read(MODEL)
    assert all(r.processes == gateways - 1 and r.requests == 0 for r in rows)
    if gateways == 1:
        assert {r.health for r in rows} == {"not reported"}


@pytest.mark.django_db
def test_metrics_are_for_operators_only(settings):
    client = Client()
    settings.GATEWAY_METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 200  # from this machine
    refused = client.get("/metrics", REMOTE_ADDR="203.0.113.5")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    # With a token, only the token (or a staff login) will do: behind a local
    # reverse proxy every request would look local.
    settings.GATEWAY_METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    scraped = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret", REMOTE_ADDR="203.0.113.5")
    assert scraped.status_code == 200
    assert "# TYPE llm_gateway_backend_requests_total counter" in scraped.content.decode()
    staff = get_user_model().objects.create(username="metrics-staff", is_staff=True)
    client.force_login(staff)
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.5").status_code == 200
