"""The HTTP layer: routing, authentication, parameter decoding, idempotency, responses.

Every request is handled synchronously against the in-memory state once its body is read,
so each API call is atomic. Every response has a JSON body and a `Request-Id: req_…` header.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from aiohttp import web

from . import catalog, customers, events, invoicing, metering, subscriptions
from .call import Call
from .delivery import WebhookDispatcher
from .errors import StripeError, api_key_invalid, idempotency_mismatch, invalid_request, url_unrecognized
from .state import State, StateFile
from .wire import API_VERSION, form_decode, request_id_new

log = logging.getLogger(__name__)

STREAM_PATH = "/v2/billing/meter_event_stream"
IDEMPOTENCY_KEY_MAX = 255
IDEMPOTENCY_PRUNE_EVERY_S = 600.0
BODY_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[[Call], dict]


def _routes(table: list[tuple[str, str, Callable[[Call], dict]]]) -> list[Route]:
    compiled = []
    for method, template, handler in table:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        compiled.append(Route(method, re.compile(f"^{regex}$"), handler))
    return compiled


def _local_health(call: Call) -> dict:
    state = call.state
    return {"object": "local.health", "status": "ok",
            "counts": {name: len(items) for name, items in state.objects.items()}
            | {"meter_events": len(state.meter_events)}}


def _local_sessions_expire(call: Call) -> dict:
    """POST /_local/meter_event_sessions/expire, JSON `{"authentication_token": "…"}` (optional:
    without it every session expires). Lets tests reach `temporary_session_expired`."""
    token = call.params.get("authentication_token")
    expired = 0
    for key, session in call.state.sessions.items():
        if token is None or key == token:
            session["expires_at"] = call.now - 1
            expired += 1
    if token is not None and not expired:
        raise invalid_request(f"No such meter event session token: '{token}'", param="authentication_token",
                              code="resource_missing")
    call.state.dirty = True
    return {"object": "local.sessions_expired", "expired": expired}


API_ROUTES = _routes([
    ("POST", "/v1/customers", customers.customer_create),
    ("GET", "/v1/customers", customers.customer_list),
    ("GET", "/v1/customers/search", customers.customer_search),
    ("GET", "/v1/customers/{id}", customers.customer_retrieve),
    ("POST", "/v1/customers/{id}", customers.customer_update),
    ("DELETE", "/v1/customers/{id}", customers.customer_delete),
    ("POST", "/v1/products", catalog.product_create),
    ("GET", "/v1/products", catalog.product_list),
    ("GET", "/v1/products/search", catalog.product_search),
    ("GET", "/v1/products/{id}", catalog.product_retrieve),
    ("POST", "/v1/products/{id}", catalog.product_update),
    ("DELETE", "/v1/products/{id}", catalog.product_delete),
    ("POST", "/v1/prices", catalog.price_create),
    ("GET", "/v1/prices", catalog.price_list),
    ("GET", "/v1/prices/search", catalog.price_search),
    ("GET", "/v1/prices/{id}", catalog.price_retrieve),
    ("POST", "/v1/prices/{id}", catalog.price_update),
    ("POST", "/v1/subscriptions", subscriptions.subscription_create),
    ("GET", "/v1/subscriptions", subscriptions.subscription_list),
    ("GET", "/v1/subscriptions/search", subscriptions.subscription_search),
    ("GET", "/v1/subscriptions/{id}", subscriptions.subscription_retrieve),
    ("POST", "/v1/subscriptions/{id}", subscriptions.subscription_update),
    ("DELETE", "/v1/subscriptions/{id}", subscriptions.subscription_cancel_api),
    ("POST", "/v1/billing/meters", metering.meter_create),
    ("GET", "/v1/billing/meters", metering.meter_list),
    ("GET", "/v1/billing/meters/{id}", metering.meter_retrieve),
    ("POST", "/v1/billing/meters/{id}", metering.meter_update),
    ("POST", "/v1/billing/meters/{id}/deactivate", metering.meter_deactivate),
    ("POST", "/v1/billing/meters/{id}/reactivate", metering.meter_reactivate),
    ("GET", "/v1/billing/meters/{id}/event_summaries", metering.meter_event_summaries),
    ("POST", "/v1/billing/meter_events", metering.meter_event_create),
    ("POST", "/v1/billing/meter_event_adjustments", metering.meter_event_adjustment_create),
    ("POST", "/v2/billing/meter_event_session", metering.meter_event_session_create),
    ("POST", STREAM_PATH, metering.meter_event_stream),
    ("POST", "/v2/billing/meter_events", metering.meter_event_v2_create),
    ("POST", "/v2/billing/meter_event_adjustments", metering.meter_event_adjustment_v2_create),
    ("GET", "/v1/invoices", invoicing.invoice_list),
    ("POST", "/v1/invoices/create_preview", invoicing.invoice_create_preview),
    ("GET", "/v1/invoices/{id}", invoicing.invoice_retrieve),
    ("GET", "/v1/invoices/{id}/lines", invoicing.invoice_lines),
    ("POST", "/v1/invoices/{id}/finalize", invoicing.invoice_finalize_api),
    ("POST", "/v1/invoices/{id}/pay", invoicing.invoice_pay_api),
    ("POST", "/v1/invoices/{id}/void", invoicing.invoice_void_api),
    ("POST", "/v1/invoices/{id}/mark_uncollectible", invoicing.invoice_mark_uncollectible_api),
    ("POST", "/v1/webhook_endpoints", events.webhook_endpoint_create),
    ("GET", "/v1/webhook_endpoints", events.webhook_endpoint_list),
    ("GET", "/v1/webhook_endpoints/{id}", events.webhook_endpoint_retrieve),
    ("POST", "/v1/webhook_endpoints/{id}", events.webhook_endpoint_update),
    ("DELETE", "/v1/webhook_endpoints/{id}", events.webhook_endpoint_delete),
    ("GET", "/v1/events", events.event_list),
    ("GET", "/v1/events/{id}", events.event_retrieve),
])



def route_match(routes: list[Route], method: str, path: str) -> tuple[Route, dict[str, str]]:
    for route in routes:
        if route.method == method:
            match = route.pattern.match(path)
            if match:
                return route, match.groupdict()
    raise url_unrecognized(method, path)


class StripeLocalServer:
    def __init__(self, *, api_key: str | None = None, state_file: StateFile | None = None,
                 dispatcher: WebhookDispatcher | None = None, state: State | None = None) -> None:
        self.state = state or (state_file.state if state_file else State())
        self.api_key = api_key
        self.state_file = state_file
        self.dispatcher = dispatcher or WebhookDispatcher(self.state)
        self.state.on_event = self.dispatcher.event_enqueue
        self._tasks: list[asyncio.Task] = []
        # Not Stripe's API: test and demo control, JSON in and out, no authentication.
        self.local_routes = _routes([
            ("GET", "/_local/health", _local_health),
            ("POST", "/_local/reset", self._local_reset),
            ("POST", "/_local/subscriptions/{id}/close_period", subscriptions.subscription_period_close),
            ("POST", "/_local/invoices/{id}/payment", invoicing.invoice_payment_local),
            ("GET", "/_local/meter_events", metering.meter_events_raw),
            ("GET", "/_local/meter_event_errors", metering.meter_event_errors),
            ("POST", "/_local/meter_event_sessions/expire", _local_sessions_expire),
            ("GET", "/_local/webhook_deliveries", self._local_webhook_deliveries),
        ])

    # --- aiohttp wiring ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=BODY_MAX_BYTES)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        await self.dispatcher.start()
        self.state.idempotency_prune()
        self._tasks.append(asyncio.create_task(self._prune_forever()))
        if self.state_file is not None:
            self._tasks.append(asyncio.create_task(self.state_file.run()))

    async def _cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.dispatcher.stop()
        if self.state_file is not None:
            self.state_file.flush()

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(IDEMPOTENCY_PRUNE_EVERY_S)
            self.state.idempotency_prune()

    # --- one request ---------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        request_id = request_id_new()
        headers = {"Request-Id": request_id, "Stripe-Version": request.headers.get("Stripe-Version", API_VERSION)}
        path = request.path
        local = path.startswith("/_local/")
        idempotency_key: str | None = None
        store: tuple[str, str] | None = None
        try:
            raw_body = await request.read()
            if local:
                route, args = route_match(self.local_routes, request.method, path)
                params = self._local_params(request, raw_body)
                bearer = None
            else:
                bearer = self._authenticate(request, path)
                route, args = route_match(API_ROUTES, request.method, path)
                params = self._api_params(request, raw_body, path)
            if request.method == "POST" and not local:
                idempotency_key = request.headers.get("Idempotency-Key") or None
            if idempotency_key is not None:
                headers["Idempotency-Key"] = idempotency_key
                if len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
                    raise invalid_request(f"Idempotency-Key must be at most {IDEMPOTENCY_KEY_MAX} characters.",
                                          param="Idempotency-Key")
                fingerprint = _fingerprint(request.method, path, params)
                record = self.state.idempotency.get(idempotency_key)
                if record is not None:
                    if record["fingerprint"] != fingerprint:
                        raise idempotency_mismatch(idempotency_key)
                    return self._replay(record, headers)
                store = (idempotency_key, fingerprint)
            call = Call(state=self.state, method=request.method, path=path, params=params, args=args,
                        request_id=request_id, idempotency_key=idempotency_key, bearer=bearer,
                        response_headers=headers, automatic=local)
            body = route.handler(call)
            status = 200
        except StripeError as error:
            status, body = error.status, error.body(request_id)
            headers.update(error.headers)
        except Exception:
            log.exception("%s %s failed", request.method, path)
            status = 500
            body = StripeError(500, "An unknown error occurred in the local Stripe server.",
                               type="api_error").body(request_id)
        if request.method != "GET":
            self.state.dirty = True
        payload = orjson.dumps(body)
        # Stripe stores the outcome once the operation has run; 4xx answers are validation
        # failures here (nothing changed), so they aren't stored and a retry runs afresh.
        if store is not None and not 400 <= status < 500:
            self.state.idempotency[store[0]] = {
                "fingerprint": store[1], "status": status, "body": payload.decode(),
                "headers": {k: v for k, v in headers.items() if k == "Stripe-Should-Retry"},
                "created": time.time(), "request_id": request_id}
        return web.Response(status=status, body=payload, headers=headers, content_type="application/json")

    def _replay(self, record: dict, headers: dict[str, str]) -> web.Response:
        headers = {**headers, **record["headers"], "Idempotent-Replayed": "true",
                   "Original-Request": record["request_id"]}
        return web.Response(status=record["status"], body=record["body"].encode(), headers=headers,
                            content_type="application/json")

    def _local_reset(self, call: Call) -> dict:
        """POST /_local/reset: forget every object, event, meter event, key and queued delivery."""
        self.state.reset()
        self.dispatcher.reset()
        return {"object": "local.reset", "reset": True}

    def _local_webhook_deliveries(self, call: Call) -> dict:
        """GET /_local/webhook_deliveries: recent delivery attempts, oldest first."""
        return {"object": "list", "data": list(self.dispatcher.log), "has_more": False,
                "url": "/_local/webhook_deliveries"}

    # --- authentication and parameters -----------------------------------------------------------

    def _authenticate(self, request: web.Request, path: str) -> str:
        key = _credential(request.headers.get("Authorization", ""))
        if path == STREAM_PATH:
            session = self.state.sessions.get(key or "")
            if session is None:
                raise StripeError(401, "This endpoint authenticates with a meter event session's "
                                       "authentication_token (POST /v2/billing/meter_event_session).")
            if session["expires_at"] <= time.time():
                raise StripeError(400, "The meter event session has expired; create a new session.",
                                  type="temporary_session_expired", code="billing_meter_event_session_expired")
            return key
        if not key or (key != self.api_key if self.api_key else not key.startswith("sk_test_")):
            raise api_key_invalid(key)
        return key

    @staticmethod
    def _api_params(request: web.Request, raw_body: bytes, path: str) -> dict[str, Any]:
        if request.method in ("GET", "DELETE") or not raw_body:
            params = form_decode(request.query_string)
        elif path.startswith("/v2/"):
            params = _json_object(raw_body)
        else:
            params = form_decode(raw_body.decode("utf-8", errors="replace"))
        return params

    @staticmethod
    def _local_params(request: web.Request, raw_body: bytes) -> dict[str, Any]:
        params = form_decode(request.query_string)
        if raw_body.strip():
            params.update(_json_object(raw_body))
        return params


def _json_object(raw_body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        raise invalid_request("Invalid JSON in the request body.") from None
    if not isinstance(parsed, dict):
        raise invalid_request("The request body must be a JSON object.")
    return parsed


def _credential(header: str) -> str | None:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":  # curl -u sk_test_…:
        try:
            return base64.b64decode(value.strip()).decode().partition(":")[0] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def _fingerprint(method: str, path: str, params: dict) -> str:
    canonical = orjson.dumps({"method": method, "path": path, "params": params}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()
