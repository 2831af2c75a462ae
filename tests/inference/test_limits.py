"""Rate limits, concurrency limits and budgets through the public APIs."""
import json
import threading
import time

import openai
import pytest
from websockets.sync.client import connect

from billing.models import BudgetAlert
from tests.conftest import usage_rows_wait
from tests.inference.sim_control import sim_faults

MESSAGES = [{"role": "user", "content": "Hello there"}]
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def client_for(gateway, secret: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=retries)


def chat_raw(client, **kwargs):
    return client.chat.completions.with_raw_response.create(
        model=kwargs.pop("model", "test-llm"), messages=kwargs.pop("messages", MESSAGES),
        max_tokens=kwargs.pop("max_tokens", 4), extra_body={"ignore_eos": True}, **kwargs)


def test_every_response_carries_rate_limit_headers(gateway, tenant_key):
    client = client_for(gateway, tenant_key.secret)
    first = chat_raw(client)
    second = chat_raw(client, stream=True)
    list(second.parse())
    for response in (first, second):
        assert all(name in response.headers for name in RATE_HEADERS), dict(response.headers)
    # The standard tier's defaults, and one request fewer remaining each time.
    assert first.headers["x-ratelimit-limit-requests"] == "600"
    assert int(second.headers["x-ratelimit-remaining-requests"]) == int(
        first.headers["x-ratelimit-remaining-requests"]) - 1
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")


def test_requests_per_minute_per_key(gateway, make_tenant):
    tk = make_tenant(key_limits={"rpm_limit": 3})
    client = client_for(gateway, tk.secret)
    for _ in range(3):
        chat_raw(client)
    with pytest.raises(openai.RateLimitError) as caught:
        chat_raw(client)
    error = caught.value
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_exceeded"
    assert "requests per minute" in error.message
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # The refusing scope's other figures come along, as on every response.
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert all(name in headers for name in RATE_HEADERS), dict(headers)
    assert headers["x-ratelimit-limit-tokens"] == "1000000"  # the standard tier's, for the key's tenant
    # A refused request is recorded, with no tokens to bill.
    rows = usage_rows_wait(api_key=tk.api_key, count=4)
    assert [(r.status, r.http_status) for r in rows] == [("ok", 200)] * 3 + [("error", 429)]
    assert rows[-1].prompt_tokens == rows[-1].completion_tokens == rows[-1].cost_micros == 0


def test_tenant_limit_is_shared_by_its_keys(gateway, live_db, make_tenant):
    from tenants.services import api_key_create

    tk = make_tenant(tenant_limits={"rpm_limit": 4})
    _, other_secret = api_key_create(tenant=tk.tenant, name="second")
    clients = [client_for(gateway, tk.secret), client_for(gateway, other_secret)]
    for i in range(4):
        chat_raw(clients[i % 2])
    for client in clients:
        with pytest.raises(openai.RateLimitError) as caught:
            chat_raw(client)
        assert "organization" in caught.value.message


def test_tokens_are_reserved_at_admission_and_settled_after(gateway, make_tenant):
    # The prompt is 500 bytes but far fewer tokens: the reservation (bytes are an
    # upper bound) is much larger than the settled use.
    messages = [{"role": "user", "content": "abcdefghi " * 50}]
    tk = make_tenant(key_limits={"tpm_limit": 1000})
    client = client_for(gateway, tk.secret)
    reserve = 500 + 8 + 8 + 10

    first = chat_raw(client, messages=messages, max_tokens=10)
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1000 - reserve
    used = first.parse().usage.total_tokens
    assert used < reserve / 2

    # Two reservations (1,052 tokens) would not fit; a settled first request does.
    deadline = time.monotonic() + 3
    while True:
        try:
            second = chat_raw(client, messages=messages, max_tokens=10)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the first request's reservation was never settled"
            time.sleep(0.05)
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1000 - used - reserve


def test_a_request_larger_than_the_token_limit_is_refused_without_retry(gateway, make_tenant):
    tk = make_tenant(key_limits={"tpm_limit": 100})
    with pytest.raises(openai.RateLimitError) as caught:
        chat_raw(client_for(gateway, tk.secret, retries=2), max_tokens=500)
    headers = caught.value.response.headers
    assert headers["x-should-retry"] == "false"
    # Nothing was used: the whole limit is left, and the requests figures come along.
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("100", "100")
    assert headers["x-ratelimit-limit-requests"] == "600"


def test_concurrency_limit_and_its_release_after_ok_failed_and_aborted(gateway, registry, make_tenant):
    tk = make_tenant(key_limits={"concurrency_limit": 1})
    client = client_for(gateway, tk.secret)

    stream = client.chat.completions.create(model="slow-llm", messages=MESSAGES, max_tokens=40, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as caught:
        chat_raw(client)
    assert "concurrent requests" in caught.value.message
    stream.close()  # aborted mid-stream: the slot must come back

    def eventually_ok(**kwargs):
        deadline = time.monotonic() + 3
        while True:
            try:
                return chat_raw(client, **kwargs)
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "concurrency slot was never released"
                time.sleep(0.05)

    eventually_ok()  # after an aborted stream
    with sim_faults(registry["faulty"], error_rate=1.0):
        with pytest.raises(openai.InternalServerError):
            chat_raw(client, model="faulty-llm")
    eventually_ok()  # after a failed request
    rows = [r for r in usage_rows_wait(api_key=tk.api_key, count=5) if r.http_status != 429]
    assert [r.status for r in rows] == ["aborted", "ok", "error", "ok"]


def test_token_budget_stops_admission_and_the_sdk_does_not_retry(gateway, make_tenant):
    tk = make_tenant(tenant_limits={"monthly_token_budget": 400})
    client = client_for(gateway, tk.secret, retries=3)
    admitted = 0
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(20):
            chat_raw(client, max_tokens=20)
            admitted += 1
    error = caught.value
    assert error.code == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert admitted >= 3
    rows = usage_rows_wait(api_key=tk.api_key, count=admitted + 1)
    # One refused request: the SDK did not retry it.
    assert [r.http_status for r in rows] == [200] * admitted + [429]
    assert sum(r.prompt_tokens + r.completion_tokens for r in rows) <= 400
    assert budget_alerts(tk.tenant) == {("soft", "tokens", None), ("hard", "tokens", None)}


def test_spend_budget_uses_model_prices_and_alerts_once(gateway, make_tenant):
    # 2 cents = 20,000 micros; priced-llm costs 100 micros a token.
    tk = make_tenant(key_limits={"monthly_budget_minor": 2, "budget_alert_percent": 50})
    client = client_for(gateway, tk.secret)
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(50):
            chat_raw(client, model="priced-llm", max_tokens=16)
    assert caught.value.code == "insufficient_quota"
    assert "API key" in caught.value.message
    rows = usage_rows_wait(api_key=tk.api_key, count=1)
    assert sum(r.cost_micros for r in rows) <= 20_000
    assert all(r.cost_micros == 100 * (r.prompt_tokens + r.completion_tokens) - 50 * r.cached_tokens for r in rows)
    assert budget_alerts(tk.tenant) == {("hard", "spend", tk.api_key.id), ("soft", "spend", tk.api_key.id)}
    # Once per month: more refused requests record nothing new.
    with pytest.raises(openai.RateLimitError):
        chat_raw(client, model="priced-llm", max_tokens=16)
    time.sleep(0.2)
    assert BudgetAlert.objects.filter(tenant=tk.tenant).count() == 2


def test_concurrent_burst_cannot_overshoot_a_budget(gateway, make_tenant):
    tk = make_tenant(tenant_limits={"monthly_token_budget": 1000})
    client = client_for(gateway, tk.secret)
    outcomes = []

    def one():
        try:
            chat_raw(client, max_tokens=50)
            outcomes.append("ok")
        except openai.RateLimitError as error:
            outcomes.append(error.code)

    threads = [threading.Thread(target=one) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    admitted = outcomes.count("ok")
    # Refused: exhausted, or held by reservations of requests still in flight (retry).
    assert admitted and outcomes.count("insufficient_quota") + outcomes.count("rate_limit_exceeded") == 30 - admitted
    rows = usage_rows_wait(api_key=tk.api_key, count=30)
    assert sum(r.status == "ok" for r in rows) == admitted
    assert sum(r.prompt_tokens + r.completion_tokens for r in rows) <= 1000


def test_websocket_gets_limit_errors_as_frames(gateway, make_tenant):
    tk = make_tenant(key_limits={"rpm_limit": 1})
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tk.secret}"}) as ws:
        ws.recv(timeout=5)
        for request_id in ("a", "b"):
            ws.send(json.dumps({"type": "request", "id": request_id, "body": {
                "model": "test-llm", "max_tokens": 3, "messages": MESSAGES}}))
        frames = []
        while not any(f.get("id") == "b" for f in frames) or not any(
                f.get("id") == "a" and f["type"] == "usage" for f in frames):
            frames.append(json.loads(ws.recv(timeout=5)))
    [refused] = [f for f in frames if f.get("id") == "b"]
    assert refused["type"] == "error" and refused["status"] == 429
    assert refused["error"]["code"] == "rate_limit_exceeded"


def ws_request(ws, request_id: str, model: str = "test-llm", max_tokens: int = 3) -> None:
    ws.send(json.dumps({"type": "request", "id": request_id, "body": {
        "model": model, "max_tokens": max_tokens, "messages": MESSAGES}}))


def ws_last_frame(ws, request_id: str) -> dict:
    """The request's usage or error frame (its deltas skipped)."""
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame.get("id") == request_id and frame["type"] in ("usage", "error"):
            return frame


@pytest.mark.parametrize("case", [
    # (limits, model, max_tokens, error code, words of the message, headers the 429 carries)
    ({"tenant_limits": {"rpm_limit": 2}}, "test-llm", 3, "rate_limit_exceeded",
     ("requests per minute", "organization"), ("retry-after", "retry-after-ms", "x-ratelimit-limit-requests")),
    ({"key_limits": {"tpm_limit": 100}}, "test-llm", 30, "rate_limit_exceeded",
     ("tokens per minute", "API key"), ("retry-after", "retry-after-ms", "x-ratelimit-limit-tokens")),
    ({"key_limits": {"monthly_budget_minor": 1}}, "priced-llm", 16, "insufficient_quota",
     ("monthly spend budget", "API key"), ("x-should-retry",)),
    ({"tenant_limits": {"monthly_token_budget": 60}}, "test-llm", 8, "insufficient_quota",
     ("monthly token budget", "organization"), ("x-should-retry",)),
], ids=["tenant-rpm", "key-tpm", "key-spend-budget", "tenant-token-budget"])
def test_websocket_each_limit_refuses_with_the_http_error_and_headers(gateway, make_tenant, case):
    limits, model, max_tokens, code, words, headers = case
    tk = make_tenant(**limits)
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tk.secret}"}) as ws:
        ws.recv(timeout=5)
        for n in range(40):
            ws_request(ws, f"r{n}", model, max_tokens)
            frame = ws_last_frame(ws, f"r{n}")
            if frame["type"] == "error" and "in flight" in frame["error"]["message"]:
                # The previous request's reservation is not settled yet: retry shortly.
                time.sleep(0.05)
                continue
            if frame["type"] == "error":
                break
            assert frame["finish_reason"] in ("stop", "length")
            # An admitted request's frame carries the figures of the rate-limit headers.
            assert "x-ratelimit-remaining-requests" in frame["headers"]
        else:
            pytest.fail("never refused")
    assert n >= 1, "the first request must be admitted"
    assert (frame["status"], frame["error"]["code"]) == (429, code)
    assert all(word in frame["error"]["message"] for word in words), frame["error"]["message"]
    assert all(name in frame["headers"] for name in headers), frame["headers"]
    if code == "insufficient_quota":
        assert frame["headers"]["x-should-retry"] == "false"
    else:
        assert int(frame["headers"]["retry-after-ms"]) > 0


def test_websocket_concurrency_limit_frame_and_release(gateway, make_tenant):
    tk = make_tenant(tenant_limits={"concurrency_limit": 1})
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tk.secret}"}) as ws:
        ws.recv(timeout=5)
        ws_request(ws, "slow", "slow-llm", 40)
        while json.loads(ws.recv(timeout=10))["type"] != "delta":
            pass
        ws_request(ws, "refused")
        refused = ws_last_frame(ws, "refused")
        assert (refused["status"], refused["error"]["code"]) == (429, "rate_limit_exceeded")
        assert "concurrent requests" in refused["error"]["message"]
        ws.send(json.dumps({"type": "cancel", "id": "slow"}))
        assert ws_last_frame(ws, "slow")["finish_reason"] == "cancelled"
        # The cancelled request's slot comes back.
        deadline = time.monotonic() + 3
        for n in range(100):
            ws_request(ws, f"after{n}")
            if ws_last_frame(ws, f"after{n}")["type"] == "usage":
                break
            assert time.monotonic() < deadline, "the slot was never released"
            time.sleep(0.05)


def test_websocket_budget_exhaustion_frame(gateway, make_tenant):
    tk = make_tenant(key_limits={"monthly_token_budget": 1})
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tk.secret}"}) as ws:
        ws.recv(timeout=5)
        ws.send(json.dumps({"type": "request", "id": "a", "body": {
            "model": "test-llm", "max_tokens": 3, "messages": MESSAGES}}))
        frame = json.loads(ws.recv(timeout=5))
    assert (frame["status"], frame["error"]["code"]) == (429, "insufficient_quota")


def budget_alerts(tenant, count: int = 2) -> set[tuple[str, str, int | None]]:
    """(kind, budget, api key id) of the tenant's alerts, once `count` are recorded."""
    deadline = time.monotonic() + 3
    while True:
        alerts = set(BudgetAlert.objects.filter(tenant=tenant).values_list("kind", "budget", "api_key_id"))
        if len(alerts) >= count or time.monotonic() > deadline:
            return alerts
        time.sleep(0.05)


def test_budget_held_by_requests_in_flight_is_a_retryable_429(gateway, make_tenant):
    # Two slow streams each reserve about 430 tokens of a 1,000-token budget and have used few.
    tk = make_tenant(tenant_limits={"monthly_token_budget": 1000})
    client = client_for(gateway, tk.secret)
    holders = [client.chat.completions.create(model="slow-llm", messages=MESSAGES, max_tokens=400, stream=True,
                                              extra_body={"ignore_eos": True})
               for _ in range(2)]
    for holder in holders:
        next(iter(holder))
    with pytest.raises(openai.RateLimitError) as caught:
        chat_raw(client, model="slow-llm", max_tokens=400)
    assert caught.value.code == "rate_limit_exceeded" and "in flight" in caught.value.message
    assert caught.value.response.headers["retry-after"] == "1"
    for holder in holders:
        holder.close()
