"""The WebSocket API (/v1/ws): a thin adapter over the streaming service.

Frames are JSON objects. The client authenticates with an `Authorization: Bearer`
header at the handshake or with a first frame {"type": "auth", "api_key": "sk-…"}
(never the query string). Then, any number of times, multiplexed by a
client-chosen id:

  → {"type": "request", "id": "r1", "endpoint": "chat.completions" | "completions", "body": {…}}
  ← {"type": "delta", "id": "r1", "index": 0, "content": "Hel"}              (per token)
     a delta carries what the backend's chunk had: "content", "reasoning_content",
     and "tool_calls" (OpenAI's tool-call deltas: id and name first, then arguments)
  ← {"type": "usage", "id": "r1", "request_id": "chatcmpl-…",
     "finish_reason": "stop" | "length" | "tool_calls" | "cancelled", "usage": {…},
     "headers": {"x-ratelimit-limit-requests": "600", …}}                     (last frame of a request)
     with several choices (`n`, a batch of prompts), "finish_reason" is the first
     choice's and "finish_reasons" lists every choice's, by index
  ← {"type": "error", "id": "r1" | null, "status": 400, "error": {message, type, param, code},
     "headers": {"retry-after": "2", "retry-after-ms": "1500", …}}
  `headers` are those the HTTP API would send with the response: the x-ratelimit-*
  figures, and with an error retry-after, retry-after-ms, x-should-retry ("false":
  do not retry, e.g. an exhausted budget); left out when there are none.
  → {"type": "cancel", "id": "r1"}    stops that request; a disconnect stops them all.
An "embeddings" request gets one frame instead of deltas and usage:
  ← {"type": "result", "id": "r2", "request_id": "embd-…", "result": {"object": "list", "data": […],
     "model", "usage"}, "headers": {…}}
"""
import asyncio
import contextlib
import time

import orjson
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from . import errors
from .auth import bearer_token
from .errors import ApiError
from .runtime import runtime_get
from .streaming import CHAT, COMPLETIONS, EMBEDDINGS, completion_request_build

# Requests one socket may have in flight.
MAX_INFLIGHT_PER_SOCKET = 64
# Close codes (4000-4999 are the application's): authentication failed, or timed out.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
MAX_ID_LENGTH = 128


def _error_frame(error: ApiError, request_id: object = None) -> dict:
    frame = {"type": "error", "id": request_id, "status": error.status, **error.payload()}
    if error.headers:
        frame["headers"] = error.headers
    return frame


def _usage_frame(request_id: str, request, finishes: dict[int, str] | str, usage: dict | None) -> dict:
    """The request's last frame; `finishes` maps choice indexes to their finish
    reasons, or is one reason for every choice ("cancelled")."""
    if isinstance(finishes, str):
        finishes = dict.fromkeys(range(request.choices), finishes)
    frame = {"type": "usage", "id": request_id, "request_id": request.request_id,
             "finish_reason": finishes.get(0), "usage": usage}
    if request.choices > 1:
        frame["finish_reasons"] = [finishes.get(index) for index in range(request.choices)]
    if request.response_headers:
        frame["headers"] = request.response_headers
    return frame


class CompletionStreamConsumer(AsyncJsonWebsocketConsumer):
    # No channel layer: this consumer never joins groups, so it needs no layer
    # channel (which would cost a Redis receive per connection).
    channel_layer_alias = "__none__"

    async def connect(self) -> None:
        self.runtime = await runtime_get()
        self.principal = None
        self.inflight: dict[str, asyncio.Task] = {}
        await self.accept()
        authorization = dict(self.scope["headers"]).get(b"authorization")
        if authorization is not None:
            await self._authenticate(bearer_token(authorization.decode("latin-1")))
        else:
            self.auth_deadline = asyncio.get_running_loop().call_later(
                settings.GATEWAY_WS_AUTH_TIMEOUT_SECONDS, self._auth_expired)

    def _auth_expired(self) -> None:
        if self.principal is None:
            # Held, so the task cannot be collected before it has closed the socket.
            self.auth_rejection = asyncio.ensure_future(self._reject(errors.ApiError(
                401, f"Authenticate within {settings.GATEWAY_WS_AUTH_TIMEOUT_SECONDS:g} s of connecting.",
                code="auth_timeout")))

    async def _reject(self, error: ApiError) -> None:
        await self.send_json(_error_frame(error))
        await self.close(code=CLOSE_FORBIDDEN if error.status == 403 else CLOSE_UNAUTHENTICATED)

    async def _authenticate(self, raw_key: str | None) -> None:
        try:
            self.principal = await self.runtime.auth.authenticate(raw_key)
        except ApiError as error:
            await self._reject(error)
            return
        await self.send_json({"type": "auth.ok", "tenant": self.principal.tenant_slug})

    async def dispatch(self, message) -> None:
        # Channels' dispatch makes a thread hop to close stale DB connections before
        # every frame; this consumer touches the database only through the runtime.
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        try:
            content = await self.decode_json(text_data if text_data is not None else bytes_data)
        except (orjson.JSONDecodeError, TypeError):
            await self.send_json(_error_frame(errors.invalid_json()))
            return
        await self.receive_json(content)

    async def receive_json(self, content, **kwargs) -> None:
        if not isinstance(content, dict):
            await self.send_json(_error_frame(errors.invalid_parameter("type", "Frames must be JSON objects.")))
            return
        kind = content.get("type")
        if self.principal is None:
            if kind == "auth":
                await self._authenticate(content.get("api_key"))
            else:
                await self._reject(errors.missing_api_key())
            return
        if kind == "request":
            await self._request_start(content)
        elif kind == "cancel":
            task = self.inflight.get(str(content.get("id")))
            if task is not None:
                task.cancel()
        elif kind == "auth":
            await self.send_json({"type": "auth.ok", "tenant": self.principal.tenant_slug})
        else:
            await self.send_json(_error_frame(
                errors.invalid_parameter("type", "Frame type must be 'request', 'cancel' or 'auth'."),
                content.get("id"),
            ))

    async def _request_start(self, content: dict) -> None:
        request_id = content.get("id")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_LENGTH:
            await self.send_json(_error_frame(errors.invalid_parameter(
                "id", f"'id' must be a string of 1 to {MAX_ID_LENGTH} characters."), request_id))
            return
        if request_id in self.inflight:
            await self.send_json(_error_frame(errors.invalid_parameter(
                "id", f"A request with id '{request_id}' is already in flight on this socket."), request_id))
            return
        if len(self.inflight) >= MAX_INFLIGHT_PER_SOCKET:
            await self.send_json(_error_frame(errors.ApiError(
                429, f"At most {MAX_INFLIGHT_PER_SOCKET} requests may be in flight on one socket.",
                type="rate_limit_exceeded", code="too_many_inflight"), request_id))
            return
        endpoint = content.get("endpoint", CHAT)
        if endpoint not in (CHAT, COMPLETIONS, EMBEDDINGS):
            await self.send_json(_error_frame(errors.invalid_parameter(
                "endpoint", "'endpoint' must be 'chat.completions', 'completions' or 'embeddings'."), request_id))
            return
        started = time.perf_counter()
        body = content.get("body")
        if isinstance(body, dict) and endpoint != EMBEDDINGS:
            # Always streamed, usage at the end; the usage so far on every delta
            # too when the body asks for it as over HTTP (continuous_usage_stats).
            asked = body.get("stream_options")
            continuous = isinstance(asked, dict) and bool(asked.get("continuous_usage_stats"))
            body = {**body, "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": continuous}}
        try:
            request = completion_request_build(
                principal=self.principal, endpoint=endpoint, body=body, transport="websocket", started=started
            )
        except ApiError as error:
            await self.send_json(_error_frame(error, request_id))
            return
        task = asyncio.get_running_loop().create_task(self._request_run(request_id, request))
        self.inflight[request_id] = task
        task.add_done_callback(lambda _: self.inflight.pop(request_id, None))

    async def _request_run(self, request_id: str, request) -> None:
        """Runs a request and sends its last frame: usage after the deltas, the
        result of an embeddings request, or an error; "cancelled" usage when
        the client cancelled it."""
        work = self._result_get if request.endpoint == EMBEDDINGS else self._deltas_relay
        try:
            frame = await work(request_id, request)
        except ApiError as error:
            await self.send_json(_error_frame(error, request_id))
            return
        except asyncio.CancelledError:
            if self.principal is not None and not self.closed:
                await self.send_json(_usage_frame(request_id, request, "cancelled", request.meter.openai_usage()))
            raise
        await self.send_json(frame)

    async def _deltas_relay(self, request_id: str, request) -> dict:
        """Sends a streamed request's deltas; returns its usage frame."""
        finishes: dict[int, str] = {}
        usage = None
        stream = self.runtime.completions.completion_stream(request)
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                for payload in batch:
                    usage = await self._deltas_send(request_id, orjson.loads(payload), finishes, usage,
                                                    continuous=request.continuous_usage)
        return _usage_frame(request_id, request, finishes, usage)

    async def _result_get(self, request_id: str, request) -> dict:
        """A request answered whole (embeddings): its result frame."""
        result = await self.runtime.completions.completion_create(request)
        frame = {"type": "result", "id": request_id, "request_id": request.request_id, "result": result}
        if request.response_headers:
            frame["headers"] = request.response_headers
        return frame

    async def _deltas_send(self, request_id: str, chunk: dict, finishes: dict[int, str], usage, *,
                           continuous: bool = False):
        """Sends a chunk's deltas (with `continuous`, each with the chunk's usage
        so far); notes each choice's finish reason in `finishes`; returns the
        newest usage."""
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            # A chat delta's fields, or a completion's text (as "content").
            fields = {"content": delta.get("content") or choice.get("text"),
                      "reasoning_content": delta.get("reasoning_content"), "tool_calls": delta.get("tool_calls")}
            relayed = {name: value for name, value in fields.items() if value}
            if relayed and continuous and chunk.get("usage"):
                relayed["usage"] = chunk["usage"]
            if relayed:
                await self.send_json({"type": "delta", "id": request_id, "index": index, **relayed})
            if choice.get("finish_reason") is not None:
                finishes[index] = choice["finish_reason"]
        return usage

    async def disconnect(self, code) -> None:
        self.closed = True
        deadline = getattr(self, "auth_deadline", None)
        if deadline is not None:
            deadline.cancel()
        tasks = list(getattr(self, "inflight", {}).values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    closed = False

    @classmethod
    async def decode_json(cls, text_data):
        return orjson.loads(text_data)

    @classmethod
    async def encode_json(cls, content):
        return orjson.dumps(content).decode()
