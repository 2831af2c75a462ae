"""A client that goes away mid-stream stops the backend request and is billed for
what was delivered."""
import http.client
import json
import socket
from urllib.parse import urlsplit

from tests.conftest import usage_rows_wait
from tests.inference.test_websocket import assert_backend_aborted


def test_sse_client_disconnect_sends_abort_request(gateway, registry, tenant_key):
    received = 0
    conn = post(gateway, tenant_key, {"model": "slow-llm", "stream": True, "max_tokens": 500, "ignore_eos": True,
                                      "messages": [{"role": "user", "content": "Tell me a long story."}]})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    request_id = response.getheader("x-request-id")
    while received < 4:
        line = response.readline()
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                received += 1
    conn.close()  # mid-stream
    assert_backend_aborted(registry["slow"], request_id)

    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert (row.request_id, row.status, row.http_status) == (request_id, "aborted", 499)
    assert received <= row.completion_tokens < 500
    assert row.prompt_tokens > 0


def test_non_streaming_client_disconnect_aborts_too(gateway, registry, tenant_key):
    conn = post(gateway, tenant_key, {"model": "slow-llm", "max_tokens": 400, "ignore_eos": True,
                                      "messages": [{"role": "user", "content": "Write an essay."}]}, timeout=0.5)
    try:
        conn.getresponse()
        raise AssertionError("a 400-token answer at 30 ms a token cannot arrive within 0.5 s")
    except socket.timeout:
        pass
    conn.close()
    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert row.status == "aborted"
    assert_backend_aborted(registry["slow"], row.request_id)


def post(gateway, tenant_key, body: dict, timeout: float = 10) -> http.client.HTTPConnection:
    address = urlsplit(gateway.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {tenant_key.secret}", "Content-Type": "application/json"})
    return conn
