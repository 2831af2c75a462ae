"""The WebSocket API with a real client (the `websockets` library) against the live
gateway: authentication, multiplexing, cancel, disconnect, errors as frames."""
import json
import time

import pytest
from websockets.sync.client import connect

from django.db import connection
from websockets.exceptions import ConnectionClosed

from tests.conftest import gateway_start, process_stop, usage_rows_wait
from tests.inference.sim_control import sim_call


def frames_until(ws, predicate, timeout: float = 15.0) -> list[dict]:
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        frames.append(frame)
        if predicate(frame, frames):
            return frames


def request_frame(request_id: str, model: str = "test-llm", max_tokens: int = 8, content: str = "Hi") -> str:
    return json.dumps({"type": "request", "id": request_id, "body": {
        "model": model, "max_tokens": max_tokens, "ignore_eos": True, "messages": [{"role": "user", "content": content}]}})


def test_auth_by_header_and_a_streamed_request(gateway, tenant_key):
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        assert json.loads(ws.recv(timeout=5)) == {"type": "auth.ok", "tenant": tenant_key.tenant.slug}
        ws.send(request_frame("r1", max_tokens=8))
        frames = frames_until(ws, lambda f, _: f["type"] in ("usage", "error"))

    deltas = [f for f in frames if f["type"] == "delta"]
    final = frames[-1]
    assert final["type"] == "usage" and final["id"] == "r1"
    assert final["request_id"].startswith("chatcmpl-")
    assert final["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] == len(deltas) > 0
    [row] = usage_rows_wait(api_key=tenant_key.api_key, count=1)
    assert row.transport == "websocket" and row.status == "ok"
    assert row.completion_tokens == len(deltas) and row.request_id == final["request_id"]


def test_auth_by_first_message(gateway, tenant_key):
    with connect(gateway.ws_url) as ws:
        ws.send(json.dumps({"type": "auth", "api_key": tenant_key.secret}))
        assert json.loads(ws.recv(timeout=5))["type"] == "auth.ok"
        ws.send(request_frame("a"))
        assert frames_until(ws, lambda f, _: f["type"] in ("usage", "error"))[-1]["type"] == "usage"


def test_bad_key_gets_error_frame_and_close(gateway):
    with connect(gateway.ws_url) as ws:
        ws.send(json.dumps({"type": "auth", "api_key": "sk-wrong"}))
        frame = json.loads(ws.recv(timeout=5))
        assert frame["type"] == "error" and frame["status"] == 401
        assert frame["error"]["code"] == "invalid_api_key"
        with pytest.raises(Exception):
            ws.recv(timeout=5)
        assert ws.close_code == 4401


@pytest.fixture(scope="module")
def impatient_gateway(registry, live_tmp, django_db_setup):
    """A gateway that gives a socket one second to authenticate."""
    gateway = gateway_start(live_tmp, connection.settings_dict["NAME"], GATEWAY_WS_AUTH_TIMEOUT_SECONDS="1")
    yield gateway
    process_stop(gateway.process)


def test_unauthenticated_socket_is_closed_after_the_timeout(impatient_gateway):
    started = time.monotonic()
    with connect(impatient_gateway.ws_url) as ws:
        frame = json.loads(ws.recv(timeout=5))
        waited = time.monotonic() - started
        assert frame["type"] == "error" and frame["status"] == 401 and frame["error"]["code"] == "auth_timeout"
        assert frame["error"]["message"] == "Authenticate within 1 s of connecting."
        assert 0.9 < waited < 4
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd.code == 4401


def test_request_before_auth_is_refused(gateway):
    with connect(gateway.ws_url) as ws:
        ws.send(request_frame("r1"))
        frame = json.loads(ws.recv(timeout=5))
        assert frame["status"] == 401 and frame["error"]["code"] == "missing_api_key"


def test_query_string_key_is_ignored(gateway, tenant_key):
    with connect(gateway.ws_url + f"?api_key={tenant_key.secret}") as ws:
        ws.send(request_frame("r1"))
        assert json.loads(ws.recv(timeout=5))["status"] == 401


def test_multiplexed_requests_on_one_socket(gateway, tenant_key):
    ids = [f"req-{i}" for i in range(6)]
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        ws.recv(timeout=5)
        for i, request_id in enumerate(ids):
            ws.send(request_frame(request_id, model="slow-llm", max_tokens=5, content=f"question {i}"))
        frames = frames_until(ws, lambda f, fs: sum(x["type"] == "usage" for x in fs) == len(ids), timeout=30)

    by_id = {request_id: [f for f in frames if f.get("id") == request_id] for request_id in ids}
    for request_id, own in by_id.items():
        assert own[-1]["type"] == "usage"
        assert own[-1]["usage"]["completion_tokens"] == sum(f["type"] == "delta" for f in own)
    # Interleaved: the first request had not finished when others' deltas arrived.
    order = [f["id"] for f in frames if f["type"] == "delta"]
    assert order.index(ids[-1]) < max(i for i, x in enumerate(order) if x == ids[0])
    assert len({f["request_id"] for f in frames if f["type"] == "usage"}) == len(ids)
    assert len(usage_rows_wait(api_key=tenant_key.api_key, count=len(ids))) == len(ids)


def test_cancel_stops_one_request_and_aborts_it_on_the_backend(gateway, registry, tenant_key):
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        ws.recv(timeout=5)
        ws.send(request_frame("keep", model="slow-llm", max_tokens=6))
        ws.send(request_frame("stop", model="slow-llm", max_tokens=200))
        frames_until(ws, lambda f, fs: sum(x.get("id") == "stop" and x["type"] == "delta" for x in fs) >= 3)
        ws.send(json.dumps({"type": "cancel", "id": "stop"}))
        frames = frames_until(ws, lambda f, fs: f["type"] == "usage" and f["id"] == "stop")
        cancelled = frames[-1]
        assert cancelled["finish_reason"] == "cancelled"
        assert 3 <= cancelled["usage"]["completion_tokens"] < 200
        rest = frames_until(ws, lambda f, fs: f["type"] == "usage" and f["id"] == "keep")
        assert rest[-1]["finish_reason"] in ("stop", "length")

    rows = {r.request_id: r for r in usage_rows_wait(api_key=tenant_key.api_key, count=2)}
    aborted = rows[cancelled["request_id"]]
    assert aborted.status == "aborted" and aborted.completion_tokens == cancelled["usage"]["completion_tokens"]
    assert_backend_aborted(registry["slow"], cancelled["request_id"])


def test_disconnect_aborts_all_inflight_requests(gateway, registry, tenant_key):
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        ws.recv(timeout=5)
        ws.send(request_frame("a", model="slow-llm", max_tokens=300))
        ws.send(request_frame("b", model="slow-llm", max_tokens=300, content="other"))
        frames_until(ws, lambda f, fs: {"a", "b"} <= {x.get("id") for x in fs if x["type"] == "delta"})
    # The socket is closed with both requests mid-stream.

    rows = usage_rows_wait(api_key=tenant_key.api_key, count=2)
    assert [r.status for r in rows] == ["aborted", "aborted"]
    assert all(0 < r.completion_tokens < 300 for r in rows)
    for row in rows:
        assert_backend_aborted(registry["slow"], row.request_id)


def test_errors_arrive_as_frames_and_the_socket_stays_usable(gateway, tenant_key):
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        ws.recv(timeout=5)
        ws.send("{not json")
        assert json.loads(ws.recv(timeout=5))["error"]["code"] == "invalid_json"
        ws.send(request_frame("x", model="no-such-model"))
        frame = json.loads(ws.recv(timeout=5))
        assert (frame["id"], frame["status"], frame["error"]["code"]) == ("x", 404, "model_not_found")
        ws.send(request_frame("y"))
        ws.send(request_frame("y"))
        frames = frames_until(ws, lambda f, fs: f["type"] == "usage")
        assert any(f["type"] == "error" and f["id"] == "y" and f["error"]["param"] == "id" for f in frames)


def assert_backend_aborted(sim, rid: str, timeout: float = 5.0) -> None:
    """The gateway sent SGLang's /abort_request for `rid`."""
    deadline = time.monotonic() + timeout
    while True:
        stats = sim_call(sim, "/sim/stats")
        if rid in stats["abort_request_rids"]:
            return
        assert time.monotonic() < deadline, f"{rid} was not aborted on the backend: {stats}"
        time.sleep(0.05)


def test_tool_call_deltas_reach_the_socket(gateway, tenant_key):
    """Tool-call deltas are relayed as they come (the test simulator parses
    calls as SGLang's qwen25 parser does), and the usage frame says tool_calls."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"term": {"type": "string"}}, "required": ["term"]}}}]
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "auth.ok"
        ws.send(json.dumps({"type": "request", "id": "t", "body": {
            "model": "test-llm", "tools": tools, "messages": [{"role": "user", "content": "Use lookup."}]}}))
        frames = frames_until(ws, lambda f, _: f["type"] in ("usage", "error"))
    deltas = [frame for frame in frames if frame["type"] == "delta"]
    calls = [call for frame in deltas for call in frame["tool_calls"]]
    assert deltas and all("content" not in frame for frame in deltas)
    assert calls[0]["function"]["name"] == "lookup" and calls[0]["id"].startswith("call_")
    arguments = json.loads("".join(call["function"]["arguments"] for call in calls))
    assert set(arguments) == {"term"}
    final = frames[-1]
    assert final["type"] == "usage" and final["finish_reason"] == "tool_calls" and "finish_reasons" not in final
    assert final["usage"]["completion_tokens"] > len(calls)


def test_reasoning_deltas_reach_the_socket(gateway, tenant_key):
    """A reasoning model's think block arrives in delta frames' reasoning_content,
    before the answer's content."""
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "auth.ok"
        ws.send(json.dumps({"type": "request", "id": "r", "body": {
            "model": "think-llm", "max_tokens": 200, "messages": [{"role": "user", "content": "Think first."}]}}))
        frames = frames_until(ws, lambda f, _: f["type"] in ("usage", "error"))
    deltas = [frame for frame in frames if frame["type"] == "delta"]
    reasoning = [i for i, frame in enumerate(deltas) if frame.get("reasoning_content")]
    content = [i for i, frame in enumerate(deltas) if frame.get("content")]
    assert reasoning and content and max(reasoning) < min(content)
    final = frames[-1]
    assert final["type"] == "usage" and final["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens_details"]["reasoning_tokens"] >= len(reasoning)


def test_deltas_carry_the_usage_so_far_when_asked(gateway, tenant_key):
    """`stream_options.continuous_usage_stats` in the body, as over HTTP: each
    delta frame carries the usage so far; without it, none does."""
    with connect(gateway.ws_url, additional_headers={"Authorization": f"Bearer {tenant_key.secret}"}) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "auth.ok"
        for request_id, options in (("plain", None), ("counted", {"continuous_usage_stats": True})):
            frame = json.loads(request_frame(request_id, max_tokens=6))
            if options:
                frame["body"]["stream_options"] = options
            ws.send(json.dumps(frame))
            frames = frames_until(ws, lambda f, _: f["type"] in ("usage", "error"))
            deltas = [f for f in frames if f["type"] == "delta"]
            assert frames[-1]["type"] == "usage" and len(deltas) == 6
            if not options:
                assert not any("usage" in delta for delta in deltas)
                continue
            counts = [delta["usage"]["completion_tokens"] for delta in deltas]
            assert counts == sorted(counts) and counts[-1] == frames[-1]["usage"]["completion_tokens"] == 6
            assert all(delta["usage"]["prompt_tokens"] == frames[-1]["usage"]["prompt_tokens"] for delta in deltas)
