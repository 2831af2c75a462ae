"""The public /v1/ HTTP API as a raw ASGI app: Django's request machinery costs
2-4x the CPU of this path and adds thread hops per request
(shared/async-streaming.md), so /v1/ bypasses it; admin, portal and DRF stay on
Django. Responses follow OpenAI's shapes; streams are Server-Sent Events."""
import asyncio
import contextlib

import orjson
from django.conf import settings

from . import errors
from .auth import bearer_token
from .errors import ApiError
from .runtime import GatewayRuntime, runtime_get
from .streaming import CHAT, COMPLETIONS, EMBEDDINGS, completion_request_build

JSON_CONTENT = (b"content-type", b"application/json")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
COMPLETION_PATHS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/embeddings": EMBEDDINGS}
DONE_EVENT = b"data: [DONE]\n\n"
# What a page's script may read of a response besides the safelisted headers.
CORS_EXPOSED = (b"x-request-id, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
                b"x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, "
                b"x-ratelimit-reset-tokens, retry-after, retry-after-ms, x-should-retry")
# How long a browser may keep a preflight's answer (Chromium keeps at most 2 h).
CORS_MAX_AGE = b"7200"


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _json_send(send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    response_headers = [JSON_CONTENT, (b"content-length", str(len(body)).encode())]
    if headers:
        response_headers.extend((k.encode(), v.encode()) for k, v in headers.items())
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})


async def _error_send(send, error: ApiError, request_id: str | None = None,
                      extra_headers: dict[str, str] | None = None) -> None:
    headers = {**(extra_headers or {}), **error.headers}
    if request_id:
        headers["x-request-id"] = request_id
    await _json_send(send, error.status, error.body(), headers)


async def _body_read(receive) -> bytes:
    limit = settings.GATEWAY_MAX_BODY_BYTES
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _sse_frame(payloads: list[bytes]) -> bytes:
    """One write for a batch of events."""
    if len(payloads) == 1:
        return b"data: " + payloads[0] + b"\n\n"
    return b"".join([b"data: " + payload + b"\n\n" for payload in payloads])


def _model_card(model) -> dict:
    """OpenAI's model object, with the context length as SGLang and vLLM name it
    (`max_model_len`): what clients size prompts and max_tokens by."""
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": model.owned_by,
            "max_model_len": model.context_length}


class _DisconnectWatch:
    """Cancels the request's task when the client goes away before the response is
    complete, so the stream (and its backend request) stops at once."""

    def __init__(self, receive) -> None:
        self.complete = False
        self.disconnected = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(receive())
        self._watcher.add_done_callback(self._on_message)

    def _on_message(self, future: asyncio.Future) -> None:
        if future.cancelled() or self.complete:
            return
        if future.exception() is None and future.result().get("type") == "http.disconnect":
            self.disconnected = True
            self._task.cancel()

    def close(self) -> None:
        self.complete = True
        self._watcher.cancel()


async def _completion_respond(runtime: GatewayRuntime, scope, receive, send, principal, endpoint: str) -> None:
    raw = await _body_read(receive)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.invalid_json() from None
    request = completion_request_build(principal=principal, endpoint=endpoint, body=body, transport="http")
    service = runtime.completions
    watch = _DisconnectWatch(receive)
    try:
        if not request.stream:
            try:
                result = await service.completion_create(request)
            except ApiError as error:
                watch.complete = True
                await _error_send(send, error, request.request_id, request.response_headers)
                return
            watch.complete = True
            await _json_send(send, 200, orjson.dumps(result),
                             {"x-request-id": request.request_id, **request.response_headers})
            return
        async with contextlib.aclosing(service.completion_stream(request)) as chunks:
            try:
                first = await anext(chunks)
            except ApiError as error:
                watch.complete = True
                await _error_send(send, error, request.request_id, request.response_headers)
                return
            except StopAsyncIteration:
                first = None
            await send({
                "type": "http.response.start",
                "status": 200,
                "headers": [*SSE_HEADERS, (b"x-request-id", request.request_id.encode()),
                            *((k.encode(), v.encode()) for k, v in request.response_headers.items())],
            })
            try:
                if first is not None:
                    await send({"type": "http.response.body", "body": _sse_frame(first), "more_body": True})
                    async for batch in chunks:
                        await send({"type": "http.response.body", "body": _sse_frame(batch), "more_body": True})
                tail = DONE_EVENT
            except ApiError as error:
                # Headers are gone: the error travels as an SSE event, as OpenAI sends it.
                tail = b"data: " + error.body() + b"\n\n"
            watch.complete = True
            await send({"type": "http.response.body", "body": tail})
    except asyncio.CancelledError:
        if watch.disconnected:
            asyncio.current_task().uncancel()
            return
        raise
    finally:
        watch.close()


def _cors_origin(scope: dict) -> bytes | None:
    """The Access-Control-Allow-Origin a response to this request carries: "*"
    when any origin may call (GATEWAY_CORS_ORIGINS), the request's Origin when
    it is one of those listed; None without an Origin or for another one."""
    origin = _header(scope, b"origin")
    if origin is None:
        return None
    allowed = settings.GATEWAY_CORS_ORIGINS
    if "*" in allowed:
        return b"*"
    return origin.encode("latin-1") if origin in allowed else None


def _cors_send(send, origin: bytes):
    """`send` with the CORS response headers added to the response's start."""
    headers = [(b"access-control-allow-origin", origin), (b"access-control-expose-headers", CORS_EXPOSED)]
    if origin != b"*":
        headers.append((b"vary", b"origin"))

    async def cors_send(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return cors_send


async def _preflight_send(scope: dict, send, origin: bytes | None) -> None:
    """The answer to OPTIONS: what a browser's preflight asks before a page's
    cross-origin POST with an Authorization header. Any request headers the
    page asks for are allowed (SDKs add their own); none of it without an
    allowed origin, so the browser refuses the call."""
    headers = [(b"allow", b"GET, POST, OPTIONS"), (b"content-length", b"0")]
    if origin is not None:
        asked = _header(scope, b"access-control-request-headers")
        headers += [(b"access-control-allow-origin", origin),
                    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-max-age", CORS_MAX_AGE)]
        if asked:
            headers.append((b"access-control-allow-headers", asked.encode("latin-1")))
        if origin != b"*":
            headers.append((b"vary", b"origin"))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def api_app(scope, receive, send) -> None:
    """ASGI entry for http requests whose path starts with /v1/."""
    path = scope["path"]
    method = scope["method"]
    endpoint = COMPLETION_PATHS.get(path)
    is_models = path == "/v1/models" or path.startswith("/v1/models/")
    origin = _cors_origin(scope)
    if method == "OPTIONS" and (endpoint is not None or is_models):
        await _preflight_send(scope, send, origin)
        return
    if origin is not None:
        send = _cors_send(send, origin)
    runtime = await runtime_get()
    try:
        if endpoint is None and not is_models:
            raise errors.not_found(path)
        if endpoint is not None and method != "POST":
            raise errors.method_not_allowed(method, path)
        if is_models and method != "GET":
            raise errors.method_not_allowed(method, path)
        principal = await runtime.auth.authenticate(bearer_token(_header(scope, b"authorization")))
        if endpoint is not None:
            await _completion_respond(runtime, scope, receive, send, principal, endpoint)
        elif path == "/v1/models":
            cards = [_model_card(m) for m in runtime.registry.models()]
            await _json_send(send, 200, orjson.dumps({"object": "list", "data": cards}))
        else:
            resolution = runtime.registry.resolve(path[len("/v1/models/"):])
            await _json_send(send, 200, orjson.dumps(_model_card(resolution.model)))
    except ApiError as error:
        await _error_send(send, error)
    except ClientGone:
        pass


