"""GET /v1/usage: a tenant's own usage from the rollups, by hour or day, per model and key."""
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import openai
import pytest

from billing.models import UsageRollup
from billing.rollups import usage_rollup_catch_up
from billing.services import usage_records_write
from tenants.services import api_key_create, api_key_revoke, tenant_suspend
from tests.billing.conftest import usage_event
from tests.conftest import usage_rows_wait

T0 = datetime(2026, 2, 10, 9, tzinfo=UTC)


def get_usage(gateway, secret: str | None, **params) -> tuple[int, dict]:
    headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
    request = urllib.request.Request(f"{gateway.url}/v1/usage?{urlencode(params, doseq=True)}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def tenant_with_usage(make_tenant, price_book, billing_settings):
    """Two keys; billing-llm ($0.15 / $0.075 / $0.60 per 1M) and test-llm ($2.50 / $1.25 / $10)."""
    tk = make_tenant()
    second, second_secret = api_key_create(tenant=tk.tenant, name="second")
    other_key = type(tk)(tk.tenant, second, second_secret)
    usage_records_write(events=[
        usage_event(tk, started_at=T0 + timedelta(minutes=1), prompt=1000, completion=100, cached=400),
        usage_event(tk, started_at=T0 + timedelta(minutes=2), prompt=2000, completion=200, model="test-llm"),
        usage_event(other_key, started_at=T0 + timedelta(hours=1, minutes=3), prompt=10_000, completion=1000),
        usage_event(tk, started_at=T0 + timedelta(days=1), prompt=5, completion=5),
    ])
    usage_rollup_catch_up()
    tk.second = other_key
    return tk


def test_hourly_buckets_grouped_by_model_and_key(billing_gateway, tenant_with_usage):
    tk = tenant_with_usage
    status, body = get_usage(billing_gateway, tk.secret, start_time=int(T0.timestamp()),
                             end_time=int((T0 + timedelta(hours=2)).timestamp()), bucket_width="1h",
                             group_by="model,api_key")
    assert status == 200, body
    assert body["object"] == "list" and body["has_more"] is False
    rows = [(b["start_time"] - int(T0.timestamp()), b["model"], b["api_key_id"], b["requests"], b["input_tokens"],
             b["cached_input_tokens"], b["output_tokens"], b["cost"]["amount_minor_exact"]) for b in body["data"]]
    assert rows == [
        # 600 × 0.000015 + 400 × 0.0000075 + 100 × 0.00006 cents = 0.009 + 0.003 + 0.006
        (0, "billing-llm", str(tk.api_key.public_id), 1, 1000, 400, 100, "0.018"),
        # 2000 × 0.00025 + 200 × 0.001 = 0.5 + 0.2
        (0, "test-llm", str(tk.api_key.public_id), 1, 2000, 0, 200, "0.7"),
        (3600, "billing-llm", str(tk.second.api_key.public_id), 1, 10_000, 0, 1000, "0.21"),
    ]
    assert body["data"][1]["cost"] == {"amount_minor": 1, "amount_minor_exact": "0.7", "currency": "usd"}
    assert body["data"][0]["end_time"] - body["data"][0]["start_time"] == 3600


def test_daily_buckets_agree_with_the_rollups(billing_gateway, tenant_with_usage):
    tk = tenant_with_usage
    status, body = get_usage(billing_gateway, tk.secret, start_time=int(T0.timestamp()),
                             end_time=int((T0 + timedelta(days=2)).timestamp()), bucket_width="1d")
    assert status == 200, body
    days = {b["start_time"]: (b["requests"], b["input_tokens"], b["output_tokens"]) for b in body["data"]}
    merged = {}
    for r in UsageRollup.objects.filter(tenant=tk.tenant, width="day"):
        start = int(r.bucket_start.timestamp())
        merged[start] = tuple(a + b for a, b in zip(merged.get(start, (0, 0, 0)),
                                                    (r.requests, r.prompt_tokens, r.completion_tokens)))
    assert days == merged == {int(datetime(2026, 2, 10, tzinfo=UTC).timestamp()): (3, 13_000, 1300),
                              int(datetime(2026, 2, 11, tzinfo=UTC).timestamp()): (1, 5, 5)}
    assert "model" not in body["data"][0] and "api_key_id" not in body["data"][0]


def test_usage_is_scoped_to_the_callers_tenant(billing_gateway, tenant_with_usage, make_tenant):
    stranger = make_tenant()
    status, body = get_usage(billing_gateway, stranger.secret, start_time=int(T0.timestamp()),
                             end_time=int((T0 + timedelta(days=2)).timestamp()))
    assert status == 200 and body["data"] == []


def test_usage_through_the_gateway_shows_up(billing_gateway, make_tenant, price_book, billing_settings):
    tk = make_tenant()
    client = openai.OpenAI(base_url=billing_gateway.base_url, api_key=tk.secret, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="test-llm", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    rows = usage_rows_wait(api_key=tk.api_key, count=3)
    usage_rollup_catch_up()
    start = min(r.started_at for r in rows)
    status, body = get_usage(billing_gateway, tk.secret, start_time=int(start.timestamp()), bucket_width="1h")
    assert status == 200
    assert sum(b["requests"] for b in body["data"]) == 3
    assert sum(b["input_tokens"] for b in body["data"]) == sum(r.prompt_tokens for r in rows)
    assert sum(b["output_tokens"] for b in body["data"]) == sum(r.completion_tokens for r in rows)


def assert_error(status: int, body: dict, *, expected_status: int, code: str, param=None, type=None):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["param"] == param
    if type:
        assert body["error"]["type"] == type


def test_authentication_errors(billing_gateway, make_tenant):
    start = int(T0.timestamp())
    assert_error(*get_usage(billing_gateway, None, start_time=start), expected_status=401, code="missing_api_key")
    assert_error(*get_usage(billing_gateway, "sk-nope", start_time=start), expected_status=401,
                 code="invalid_api_key")
    revoked = make_tenant()
    api_key_revoke(api_key=revoked.api_key)
    status, body = get_usage(billing_gateway, revoked.secret, start_time=start)
    assert_error(status, body, expected_status=401, code="invalid_api_key")
    assert "revoked" in body["error"]["message"]
    suspended = make_tenant()
    tenant_suspend(tenant=suspended.tenant, reason="Payment failed: in_x is unpaid")
    status, body = get_usage(billing_gateway, suspended.secret, start_time=start)
    assert_error(status, body, expected_status=403, code="account_suspended", type="permission_error")
    assert "Payment failed" in body["error"]["message"]


@pytest.mark.parametrize("params, param", [
    ({}, "start_time"),
    ({"start_time": "yesterday"}, "start_time"),
    ({"start_time": 1000, "bucket_width": "1m"}, "bucket_width"),
    ({"start_time": 1000, "group_by": "project"}, "group_by"),
    ({"start_time": 2000, "end_time": 1000}, "end_time"),
    ({"start_time": 0, "end_time": 3600 * 24 * 40, "bucket_width": "1h"}, "end_time"),
])
def test_bad_parameters_are_400_naming_the_parameter(billing_gateway, tenant_key, params, param):
    assert_error(*get_usage(billing_gateway, tenant_key.secret, **params), expected_status=400,
                 code="invalid_value", param=param, type="invalid_request_error")
