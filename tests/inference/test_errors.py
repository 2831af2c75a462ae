"""Every error a caller can hit on /v1/, with its status and OpenAI-shaped body."""
import json
import time
import urllib.error
import urllib.request
from datetime import timedelta

import openai
import pytest
from django.utils import timezone

from tenants.services import api_key_revoke, tenant_activate, tenant_suspend
from tests.conftest import usage_rows_wait
from tests.inference.sim_control import sim_faults

MESSAGES = [{"role": "user", "content": "Hello"}]


def raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def assert_error_shape(body: dict, *, type: str, code: str | None) -> dict:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == type and error["code"] == code
    return error


def client_for(gateway, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)


def test_missing_key_is_401(gateway):
    status, body = raw_post(gateway.base_url + "/chat/completions", b"{}", {"Content-Type": "application/json"})
    assert status == 401
    assert_error_shape(body, type="invalid_request_error", code="missing_api_key")


def test_invalid_key_is_401(gateway):
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(gateway, "sk-not-a-real-key").chat.completions.create(model="test-llm", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_revoked_key_is_401_at_once(gateway, tenant_key):
    client = client_for(gateway, tenant_key.secret)
    client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=2)  # now cached by the gateway

    api_key_revoke(api_key=tenant_key.api_key)
    # The revocation is pushed to the gateway; allow the message a moment to arrive.
    deadline = time.monotonic() + 3
    while True:
        try:
            client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=2)
        except openai.AuthenticationError as error:
            assert "revoked" in error.message
            break
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.05)


def test_expired_key_is_401(gateway, make_tenant):
    expired = make_tenant(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(gateway, expired.secret).chat.completions.create(model="test-llm", messages=MESSAGES)
    assert "expired" in caught.value.message


def test_suspended_tenant_is_403_and_reactivation_restores_access(gateway, tenant_key):
    client = client_for(gateway, tenant_key.secret)
    client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=2)

    tenant_suspend(tenant=tenant_key.tenant, reason="Payment overdue.")
    deadline = time.monotonic() + 3
    while True:
        try:
            client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=2)
        except openai.PermissionDeniedError as error:
            assert error.status_code == 403 and "Payment overdue." in error.message
            assert error.code == "account_suspended"
            break
        assert time.monotonic() < deadline, "suspended tenant still served"
        time.sleep(0.05)

    tenant_activate(tenant=tenant_key.tenant)
    deadline = time.monotonic() + 3
    while True:
        try:
            client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=2)
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline, "reactivated tenant still refused"
            time.sleep(0.05)


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400(gateway, tenant_key, body):
    status, response = raw_post(
        gateway.base_url + "/chat/completions", body,
        {"Authorization": f"Bearer {tenant_key.secret}", "Content-Type": "application/json"},
    )
    assert status == 400
    assert_error_shape(response, type="invalid_request_error", code="invalid_json")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "test-llm"}, "messages", "missing_required_parameter"),
        ({"messages": MESSAGES}, "model", "missing_required_parameter"),
        ({"model": "test-llm", "messages": []}, "messages", "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "temperature": 7}, "temperature", "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "frequency_penalty": 3}, "frequency_penalty", "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "presence_penalty": -2.5}, "presence_penalty", "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "presence_penalty": "high"}, "presence_penalty",
         "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"model": "test-llm", "messages": [{"role": "wizard", "content": "Hello"}]}, "messages[0].role",
         "invalid_value"),
        ({"model": "test-llm", "messages": [{"role": "User", "content": "Hello"}]}, "messages[0].role",
         "invalid_value"),
        # test-llm has a 4096-token context: no request can generate more.
        ({"model": "test-llm", "messages": MESSAGES, "max_tokens": 4097}, "max_tokens", "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "max_completion_tokens": 10**7}, "max_completion_tokens",
         "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "stream": "yes"}, "stream", "invalid_value"),
        ({"model": "test-llm", "messages": MESSAGES, "stream_options": {"include_usage": True}},
         "stream_options", "invalid_value"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(gateway, tenant_key, body, param, code):
    status, response = raw_post(
        gateway.base_url + "/chat/completions", json.dumps(body).encode(),
        {"Authorization": f"Bearer {tenant_key.secret}", "Content-Type": "application/json"},
    )
    assert status == 400
    assert assert_error_shape(response, type="invalid_request_error", code=code)["param"] == param


def test_max_tokens_past_the_context_is_400_before_any_limit(gateway, make_tenant):
    """A request that can never run is refused as such, not with a 429 that
    suggests waiting, on both generation routes and whether streamed or not."""
    tenant = make_tenant(key_limits={"tpm_limit": 1000})
    client = client_for(gateway, tenant.secret)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=100_000, stream=stream)
        assert caught.value.param == "max_tokens"
        assert caught.value.body["message"] == ("max_tokens is too large: 100000. This model supports at most 4096 "
                                        "completion tokens, whereas you provided 100000.")
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="test-llm", prompt="Hello", max_tokens=5000, stream=stream)
        assert caught.value.param == "max_tokens"
    # Within the context and the key's limit, the same key is served; a system
    # role in another case is taken, as SGLang takes it.
    reply = client.chat.completions.create(model="test-llm", max_tokens=4,
                                           messages=[{"role": "System", "content": "Be brief."}, *MESSAGES])
    assert reply.choices[0].message.content


def test_unknown_model_is_404_streaming_or_not(gateway, tenant_key):
    client = client_for(gateway, tenant_key.secret)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=stream)
        assert caught.value.code == "model_not_found"
        assert caught.value.param == "model"


def test_context_too_long_is_400(gateway, tenant_key):
    client = client_for(gateway, tenant_key.secret)
    huge = "word " * 6000  # test-llm has a 4096-token context
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="test-llm", messages=[{"role": "user", "content": huge}],
                                           stream=stream)
        assert caught.value.code == "context_length_exceeded"
    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert [(r.status, r.http_status, r.completion_tokens) for r in rows] == [("error", 400, 0)] * 2


def test_no_healthy_backend_is_503(gateway, tenant_key):
    with pytest.raises(openai.InternalServerError) as caught:
        client_for(gateway, tenant_key.secret).chat.completions.create(model="down-llm", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.code == "no_healthy_backend"
    assert caught.value.response.headers["retry-after"] == "1"
    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert (row.status, row.http_status, row.error_code) == ("error", 503, "no_healthy_backend")


def test_backend_failure_is_502(gateway, registry, tenant_key):
    with sim_faults(registry["faulty"], error_rate=1.0):
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as caught:
                client_for(gateway, tenant_key.secret).chat.completions.create(
                    model="faulty-llm", messages=MESSAGES, stream=stream)
            assert caught.value.status_code == 502
            assert caught.value.code == "backend_error"


def test_backend_failure_mid_stream_ends_with_error_event_and_bills_delivered(gateway, registry, tenant_key):
    client = client_for(gateway, tenant_key.secret)
    received = []
    with sim_faults(registry["faulty"], crash_after_tokens=3):
        stream = client.chat.completions.create(model="faulty-llm", messages=MESSAGES, max_tokens=20, stream=True,
                                                extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
    assert "mid-stream" in caught.value.message
    assert len(received) == 3
    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert (row.status, row.http_status, row.completion_tokens) == ("error", 502, 3)
    assert row.prompt_tokens > 0


def test_unknown_path_and_wrong_method(gateway, tenant_key):
    headers = {"Authorization": f"Bearer {tenant_key.secret}"}
    status, body = raw_post(gateway.base_url + "/nothing-here", b"{}", headers)
    assert status == 404
    assert_error_shape(body, type="invalid_request_error", code="unknown_url")
    request = urllib.request.Request(gateway.base_url + "/chat/completions", headers=headers, method="GET")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 405
