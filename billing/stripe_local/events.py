"""Events (`evt_…`), webhook endpoints (`we_…`) and the webhook signature.

Every object change calls `event_emit`; the event is stored (for `GET /v1/events`) and
handed to the dispatcher (`delivery.py`), which POSTs it to each matching endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from .call import Call, created_filter, list_page, metadata_apply, params_allow
from .errors import invalid_request, parameter_missing, resource_missing
from .render import render
from .wire import API_VERSION, object_id_new, param_bool, param_list, param_str


def event_emit(call: Call, type: str, obj: dict, previous_attributes: dict | None = None) -> dict:
    state = call.state
    data: dict[str, Any] = {"object": render(state, obj)}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    event = {
        "id": object_id_new("evt_"), "object": "event", "api_version": API_VERSION, "created": call.now,
        "data": data, "livemode": False,
        "pending_webhooks": sum(1 for e in state.objects["webhook_endpoints"].values() if endpoint_wants(e, type)),
        "request": {"id": None if call.automatic else call.request_id,
                    "idempotency_key": None if call.automatic else call.idempotency_key},
        "type": type,
    }
    state.put("events", event)
    if state.on_event is not None:
        state.on_event(event)
    return event


def attributes_changed(before: dict, after: dict) -> dict:
    """`data.previous_attributes` of an `*.updated` event: the old values of the changed
    top-level fields; for `metadata`, only the changed keys (null when a key was added)."""
    changed: dict[str, Any] = {}
    for key, old in before.items():
        new = after.get(key)
        if old == new:
            continue
        if key == "metadata" and isinstance(old, dict) and isinstance(new, dict):
            changed[key] = {k: old.get(k) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        else:
            changed[key] = old
    return changed


def endpoint_wants(endpoint: dict, type: str) -> bool:
    if endpoint.get("status") != "enabled":
        return False
    events = endpoint["enabled_events"]
    return "*" in events or type in events


def signature_header(payload: bytes, secret: str, timestamp: int) -> str:
    """`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<payload>" keyed with the whole secret>`."""
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# --- /v1/events -----------------------------------------------------------------------------------

def event_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before", "created", "type", "types",
                               "delivery_success"))
    items = call.state.newest_first("events")
    type = param_str(call.params, "type")
    types = param_list(call.params, "types")
    if type and types:
        raise invalid_request("You may only specify one of these parameters: type, types.", param="types")
    if type:
        items = [e for e in items if _type_matches(type, e["type"])]
    if types:
        if len(types) > 20:
            raise invalid_request("Invalid types: at most 20 types", param="types")
        items = [e for e in items if any(_type_matches(t, e["type"]) for t in types)]
    delivered = param_bool(call.params, "delivery_success")
    if delivered is not None:
        items = [e for e in items if (e["pending_webhooks"] == 0) == delivered]
    return list_page(call, created_filter(call.params, items), "/v1/events")


def _type_matches(pattern: str, type: str) -> bool:
    if pattern.endswith("*"):
        return type.startswith(pattern[:-1])
    return pattern == type


def event_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    event = call.state.get("events", call.args["id"])
    if event is None:
        raise resource_missing("event", call.args["id"])
    return call.out(event)


# --- /v1/webhook_endpoints ------------------------------------------------------------------------

def _url_check(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise invalid_request(f"Invalid URL: {url}", param="url", code="url_invalid")


def _enabled_events(raw: Any) -> list[str]:
    if raw is None or raw == "":
        raise parameter_missing("enabled_events")
    events = [raw] if isinstance(raw, str) else raw
    if not isinstance(events, list) or not events or not all(isinstance(e, str) and e for e in events):
        raise invalid_request("Invalid array", param="enabled_events")
    return list(dict.fromkeys(events))


def _webhook_endpoint_get(call: Call) -> dict:
    endpoint = call.state.get("webhook_endpoints", call.args["id"])
    if endpoint is None:
        raise resource_missing("webhook endpoint", call.args["id"])
    return endpoint


def webhook_endpoint_create(call: Call) -> dict:
    params_allow(call.params, ("url", "enabled_events", "description", "metadata", "api_version", "connect"))
    url = param_str(call.params, "url")
    if not url:
        raise parameter_missing("url")
    _url_check(url)
    endpoint = {
        "id": object_id_new("we_"), "object": "webhook_endpoint",
        "api_version": param_str(call.params, "api_version") or None, "application": None,
        "created": call.now, "description": param_str(call.params, "description") or None,
        "enabled_events": _enabled_events(call.params.get("enabled_events")), "livemode": False,
        "metadata": metadata_apply({}, call.params.get("metadata")),
        "secret": "whsec_" + secrets.token_hex(16), "status": "enabled", "url": url,
    }
    call.state.put("webhook_endpoints", endpoint)
    body = call.out(endpoint)
    body["secret"] = endpoint["secret"]
    return body


def webhook_endpoint_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    return call.out(_webhook_endpoint_get(call))


def webhook_endpoint_update(call: Call) -> dict:
    params_allow(call.params, ("url", "enabled_events", "description", "metadata", "disabled"))
    endpoint = _webhook_endpoint_get(call)
    url = param_str(call.params, "url")
    if url:
        _url_check(url)
        endpoint["url"] = url
    if "enabled_events" in call.params:
        endpoint["enabled_events"] = _enabled_events(call.params["enabled_events"])
    if "description" in call.params:
        endpoint["description"] = param_str(call.params, "description") or None
    endpoint["metadata"] = metadata_apply(endpoint["metadata"], call.params.get("metadata"))
    disabled = param_bool(call.params, "disabled")
    if disabled is not None:
        endpoint["status"] = "disabled" if disabled else "enabled"
    call.state.put("webhook_endpoints", endpoint)
    return call.out(endpoint)


def webhook_endpoint_delete(call: Call) -> dict:
    params_allow(call.params, ())
    endpoint = _webhook_endpoint_get(call)
    call.state.drop("webhook_endpoints", endpoint["id"])
    return {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}


def webhook_endpoint_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before"))
    return list_page(call, call.state.newest_first("webhook_endpoints"), "/v1/webhook_endpoints")
