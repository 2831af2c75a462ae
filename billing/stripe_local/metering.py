"""Billing meters, meter events (v1 and the v2 session/stream API), adjustments and summaries.

A meter event is accepted against the one active meter with its `event_name`; its customer
is the payload key the meter maps (`stripe_customer_id` by default), its value the payload
key of `value_settings` (`value`), a string holding an integer or decimal. Identifiers are
unique for the life of the server (Stripe: a rolling window of at least 24 h).
Summaries aggregate at once over `[start_time, end_time)`; canceled events don't count.
"""

from __future__ import annotations

import hashlib
import uuid
from decimal import Decimal
from typing import Any

from .call import Call, list_page, nested_allow, params_allow
from .customers import customer_live
from .errors import StripeError, invalid_request, parameter_missing, resource_missing
from .events import attributes_changed, event_emit
from .wire import (decimal_parse, epoch_from_iso, iso_from_epoch, object_id_new, param_dict, param_enum,
                   param_int, param_str)

FORMULAS = ("sum", "count", "last")
FUTURE_LIMIT_S = 5 * 60
PAST_LIMIT_S = 35 * 24 * 3600
SESSION_TTL_S = 15 * 60
STREAM_MAX_EVENTS = 100
ADJUSTMENT_WINDOW_S = 24 * 3600
SIGNIFICANT_DIGITS_MAX = 15
SUMMARY_WINDOWS_MAX = 10_000


class MeterEventRejected(StripeError):
    """A meter event that failed validation; `reason` is the code Stripe's asynchronous error
    reports use for it (`no_meter`, `meter_event_customer_not_found`, ...)."""

    def __init__(self, message: str, *, reason: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(400, message, param=param, code=code, headers=headers)
        self.reason = reason


# --- meters ---------------------------------------------------------------------------------------

def meter_get(call: Call) -> dict:
    meter = call.state.get("meters", call.args["id"])
    if meter is None:
        raise resource_missing("billing meter", call.args["id"])
    return meter


def meter_active_for(call: Call, event_name: str) -> dict | None:
    for meter in call.state.objects["meters"].values():
        if meter["event_name"] == event_name and meter["status"] == "active":
            return meter
    return None


def meter_create(call: Call) -> dict:
    params = call.params
    params_allow(params, ("display_name", "event_name", "default_aggregation", "customer_mapping",
                          "value_settings", "event_time_window"))
    display_name = param_str(params, "display_name", max_length=250)
    if not display_name:
        raise parameter_missing("display_name")
    event_name = param_str(params, "event_name", max_length=100)
    if not event_name:
        raise parameter_missing("event_name")
    aggregation = param_dict(params, "default_aggregation")
    if not aggregation:
        raise parameter_missing("default_aggregation")
    nested_allow(params, "default_aggregation", ("formula",))
    formula = param_enum(aggregation, "formula", FORMULAS, label="default_aggregation[formula]")
    if formula is None:
        raise parameter_missing("default_aggregation[formula]")
    mapping = param_dict(params, "customer_mapping") or {}
    nested_allow(params, "customer_mapping", ("event_payload_key", "type"))
    if mapping and not mapping.get("event_payload_key"):
        raise parameter_missing("customer_mapping[event_payload_key]")
    if mapping and param_enum(mapping, "type", ("by_id",), label="customer_mapping[type]") is None:
        raise parameter_missing("customer_mapping[type]")
    value_settings = param_dict(params, "value_settings") or {}
    nested_allow(params, "value_settings", ("event_payload_key",))
    if any(m["event_name"] == event_name for m in call.state.objects["meters"].values()):
        raise invalid_request(f"A meter with event_name `{event_name}` already exists.", param="event_name")
    meter = {
        "id": object_id_new("mtr_test_61", 16), "object": "billing.meter", "created": call.now,
        "customer_mapping": {"event_payload_key": mapping.get("event_payload_key") or "stripe_customer_id",
                             "type": "by_id"},
        "default_aggregation": {"formula": formula}, "display_name": display_name, "event_name": event_name,
        "event_time_window": param_enum(params, "event_time_window", ("hour", "day")), "livemode": False,
        "status": "active", "status_transitions": {"deactivated_at": None}, "updated": call.now,
        "value_settings": {"event_payload_key": value_settings.get("event_payload_key") or "value"},
    }
    call.state.put("meters", meter)
    event_emit(call, "billing.meter.created", meter)
    return call.out(meter)


def meter_retrieve(call: Call) -> dict:
    params_allow(call.params, ())
    return call.out(meter_get(call))


def meter_update(call: Call) -> dict:
    """Only `display_name` can change after creation."""
    params_allow(call.params, ("display_name",))
    meter = meter_get(call)
    before = call.out(meter)
    display_name = param_str(call.params, "display_name", max_length=250)
    if display_name:
        meter["display_name"] = display_name
    changed = attributes_changed(before, meter)
    if changed:
        changed["updated"] = meter["updated"]
        meter["updated"] = call.now
        event_emit(call, "billing.meter.updated", meter, changed)
    call.state.put("meters", meter)
    return call.out(meter)


def _meter_status_set(call: Call, status: str) -> dict:
    params_allow(call.params, ())
    meter = meter_get(call)
    if meter["status"] != status:
        if status == "active" and meter_active_for(call, meter["event_name"]) is not None:
            raise invalid_request(f"An active meter with event_name `{meter['event_name']}` already exists.")
        meter["status"] = status
        meter["status_transitions"]["deactivated_at"] = call.now if status == "inactive" else None
        meter["updated"] = call.now
        call.state.put("meters", meter)
        event_emit(call, "billing.meter.deactivated" if status == "inactive" else "billing.meter.reactivated",
                   meter)
    return call.out(meter)


def meter_deactivate(call: Call) -> dict:
    return _meter_status_set(call, "inactive")


def meter_reactivate(call: Call) -> dict:
    return _meter_status_set(call, "active")


def meter_list(call: Call) -> dict:
    params_allow(call.params, ("limit", "starting_after", "ending_before", "status"))
    items = call.state.newest_first("meters")
    status = param_enum(call.params, "status", ("active", "inactive"))
    if status:
        items = [m for m in items if m["status"] == status]
    return list_page(call, items, "/v1/billing/meters")


# --- meter events -------------------------------------------------------------------------------

def meter_event_accept(call: Call, *, event_name: Any, payload: Any, identifier: Any, timestamp: int | None,
                       source: str) -> dict:
    """Validate one meter event and store it; MeterEventRejected when it can't be accepted."""
    if not isinstance(event_name, str) or not event_name:
        raise parameter_missing("event_name")
    if len(event_name) > 100:
        raise MeterEventRejected("Invalid event_name: must be at most 100 characters", reason="no_meter",
                                 param="event_name")
    if not isinstance(payload, dict) or not payload:
        raise parameter_missing("payload")
    if not all(isinstance(v, str) for v in payload.values()):
        raise MeterEventRejected("Invalid payload: values must be strings", reason="meter_event_invalid_value",
                                 param="payload")
    if identifier is None or identifier == "":
        identifier = str(uuid.uuid4())
    if not isinstance(identifier, str) or len(identifier) > 100:
        raise MeterEventRejected("Invalid identifier: must be a string of at most 100 characters",
                                 reason="meter_event_invalid_identifier", param="identifier")
    meter = meter_active_for(call, event_name)
    if meter is None:
        inactive = any(m["event_name"] == event_name for m in call.state.objects["meters"].values())
        raise MeterEventRejected(
            f"No active meter was found for event_name `{event_name}`" + (" (the meter is deactivated)."
                                                                           if inactive else "."),
            reason="archived_meter" if inactive else "no_meter", param="event_name")
    customer_key = meter["customer_mapping"]["event_payload_key"]
    customer_id = payload.get(customer_key)
    if not customer_id:
        raise MeterEventRejected(f"Missing required param: payload[{customer_key}].",
                                 reason="meter_event_no_customer_defined", param=f"payload[{customer_key}]",
                                 code="parameter_missing")
    try:
        customer_live(call, customer_id, param=f"payload[{customer_key}]")
    except StripeError as error:
        raise MeterEventRejected(error.message, reason="meter_event_customer_not_found", param=error.param,
                                 code="resource_missing") from None
    value_key = meter["value_settings"]["event_payload_key"]
    raw_value = payload.get(value_key)
    if raw_value is None:
        if meter["default_aggregation"]["formula"] != "count":
            raise MeterEventRejected(f"Missing required param: payload[{value_key}].",
                                     reason="meter_event_value_not_found", param=f"payload[{value_key}]",
                                     code="parameter_missing")
    else:
        value = decimal_parse(raw_value)
        if value is None:
            raise MeterEventRejected(f"Invalid payload[{value_key}]: `{raw_value[:40]}` is not a number.",
                                     reason="meter_event_invalid_value", param=f"payload[{value_key}]")
        if len(value.normalize().as_tuple().digits) > SIGNIFICANT_DIGITS_MAX:
            raise MeterEventRejected(f"Invalid payload[{value_key}]: at most {SIGNIFICANT_DIGITS_MAX} significant "
                                     "digits are supported.", reason="meter_event_invalid_value",
                                     param=f"payload[{value_key}]")
    moment = call.now if timestamp is None else timestamp
    if moment > call.now + FUTURE_LIMIT_S:
        raise MeterEventRejected("Timestamp must not be more than 5 minutes in the future.",
                                 reason="timestamp_in_future", param="timestamp")
    if moment < call.now - PAST_LIMIT_S:
        raise MeterEventRejected("Timestamp must be within the past 35 days.",
                                 reason="timestamp_too_far_in_past", param="timestamp")
    if identifier in call.state.meter_event_identifiers:
        raise MeterEventRejected(f"An event already exists with identifier {identifier}.",
                                 reason="meter_event_duplicate_identifier", param="identifier",
                                 headers={"Stripe-Should-Retry": "false"})
    event = {"identifier": identifier, "event_name": event_name, "customer": customer_id,
             "value": None if raw_value is None else raw_value.strip(), "timestamp": moment, "created": call.now,
             "payload": dict(payload), "source": source, "canceled": False}
    call.state.meter_event_add(event)
    return event


def meter_event_create(call: Call) -> dict:
    """POST /v1/billing/meter_events."""
    params_allow(call.params, ("event_name", "payload", "identifier", "timestamp"))
    event = meter_event_accept(call, event_name=param_str(call.params, "event_name"),
                               payload=call.params.get("payload"),
                               identifier=param_str(call.params, "identifier"),
                               timestamp=param_int(call.params, "timestamp"), source="v1")
    return {"object": "billing.meter_event", "created": event["created"], "event_name": event["event_name"],
            "identifier": event["identifier"], "livemode": False, "payload": event["payload"],
            "timestamp": event["timestamp"]}


def meter_event_v2_create(call: Call) -> dict:
    """POST /v2/billing/meter_events: one event, validated synchronously."""
    params_allow(call.params, ("event_name", "payload", "identifier", "timestamp"))
    timestamp = call.params.get("timestamp")
    event = meter_event_accept(call, event_name=call.params.get("event_name"), payload=call.params.get("payload"),
                               identifier=call.params.get("identifier"),
                               timestamp=None if timestamp is None else epoch_from_iso(timestamp, param="timestamp"),
                               source="v2")
    return _v2_meter_event(event)


def _v2_meter_event(event: dict) -> dict:
    return {"object": "v2.billing.meter_event", "created": iso_from_epoch(event["created"]),
            "event_name": event["event_name"], "identifier": event["identifier"], "livemode": False,
            "payload": event["payload"], "timestamp": iso_from_epoch(event["timestamp"])}


def meter_event_session_create(call: Call) -> dict:
    """POST /v2/billing/meter_event_session: a token for the stream, valid 15 minutes."""
    params_allow(call.params, ())
    for token in [t for t, s in call.state.sessions.items() if s["expires_at"] < call.now - SESSION_TTL_S]:
        del call.state.sessions[token]
    session = {"id": object_id_new("mes_"), "expires_at": call.now + SESSION_TTL_S, "created": call.now}
    token = object_id_new("mes_tok_", 40)
    call.state.sessions[token] = session
    call.state.dirty = True
    return {"id": session["id"], "object": "v2.billing.meter_event_session", "authentication_token": token,
            "created": iso_from_epoch(session["created"]), "expires_at": iso_from_epoch(session["expires_at"]),
            "livemode": False}


def meter_event_stream(call: Call) -> dict:
    """POST /v2/billing/meter_event_stream (authenticated by the session token, checked by
    the server before this runs). The batch's shape is checked at once; each event's
    content is checked "asynchronously": a bad event is dropped and logged in
    `state.meter_event_errors` (see `GET /_local/meter_event_errors`), the response is `{}`."""
    params_allow(call.params, ("events",))
    events = call.params.get("events")
    if not isinstance(events, list) or not events:
        raise parameter_missing("events")
    if len(events) > STREAM_MAX_EVENTS:
        raise invalid_request(f"Invalid events: at most {STREAM_MAX_EVENTS} events per request.", param="events")
    parsed = []
    for index, raw in enumerate(events):
        label = f"events[{index}]"
        if not isinstance(raw, dict):
            raise invalid_request("Invalid object", param=label)
        for key in raw:
            if key not in ("event_name", "payload", "identifier", "timestamp"):
                raise invalid_request(f"Received unknown parameter: {label}.{key}", param=f"{label}.{key}",
                                      code="parameter_unknown")
        if not isinstance(raw.get("event_name"), str) or not raw["event_name"]:
            raise parameter_missing(f"{label}.event_name")
        if not isinstance(raw.get("payload"), dict):
            raise parameter_missing(f"{label}.payload")
        timestamp = raw.get("timestamp")
        parsed.append((raw, None if timestamp is None else epoch_from_iso(timestamp, param=f"{label}.timestamp")))
    for raw, timestamp in parsed:
        try:
            meter_event_accept(call, event_name=raw["event_name"], payload=raw["payload"],
                               identifier=raw.get("identifier"), timestamp=timestamp, source="v2_stream")
        except StripeError as error:
            call.state.meter_event_errors.append({
                "event": raw, "code": getattr(error, "reason", error.code or "invalid_request"),
                "message": error.message, "created": call.now})
            call.state.dirty = True
    return {}


def _event_for_adjustment(call: Call, event_name: Any, identifier: Any, *, param: str) -> dict:
    if not isinstance(event_name, str) or not event_name:
        raise parameter_missing("event_name")
    if not isinstance(identifier, str) or not identifier:
        raise parameter_missing(param)
    for event in call.state.meter_events:
        if event["identifier"] == identifier and event["event_name"] == event_name:
            if event["created"] < call.now - ADJUSTMENT_WINDOW_S:
                raise invalid_request("Meter events can only be canceled within 24 hours of being received.",
                                      param=param)
            return event
    raise invalid_request(f"No meter event found with identifier {identifier} for event_name `{event_name}`.",
                          param=param, code="resource_missing")


def meter_event_adjustment_create(call: Call) -> dict:
    """POST /v1/billing/meter_event_adjustments (type=cancel): the event stops counting."""
    params_allow(call.params, ("event_name", "type", "cancel"))
    if param_enum(call.params, "type", ("cancel",)) is None:
        raise parameter_missing("type")
    cancel = param_dict(call.params, "cancel") or {}
    nested_allow(call.params, "cancel", ("identifier",))
    event = _event_for_adjustment(call, call.params.get("event_name"), cancel.get("identifier"),
                                  param="cancel[identifier]")
    event["canceled"] = True
    call.state.dirty = True
    return {"object": "billing.meter_event_adjustment", "cancel": {"identifier": event["identifier"]},
            "event_name": event["event_name"], "livemode": False, "status": "pending", "type": "cancel"}


def meter_event_adjustment_v2_create(call: Call) -> dict:
    params_allow(call.params, ("event_name", "type", "cancel"))
    if call.params.get("type") != "cancel":
        raise parameter_missing("type")
    cancel = call.params.get("cancel") if isinstance(call.params.get("cancel"), dict) else {}
    event = _event_for_adjustment(call, call.params.get("event_name"), cancel.get("identifier"),
                                  param="cancel.identifier")
    event["canceled"] = True
    call.state.dirty = True
    return {"id": object_id_new("mea_"), "object": "v2.billing.meter_event_adjustment",
            "cancel": {"identifier": event["identifier"]}, "created": iso_from_epoch(call.now),
            "event_name": event["event_name"], "livemode": False, "status": "pending", "type": "cancel"}


# --- aggregation and summaries -----------------------------------------------------------------------

def usage_aggregate(events: list[dict], formula: str, start: int, end: int) -> Decimal:
    """The meter's aggregate of `events` with `start <= timestamp < end` (canceled ones excluded).
    `last` takes the value with the latest timestamp, ties going to the later arrival."""
    selected = [e for e in events if not e["canceled"] and start <= e["timestamp"] < end]
    if formula == "count":
        return Decimal(len(selected))
    if formula == "last":
        latest = None
        for event in selected:
            if latest is None or event["timestamp"] >= latest["timestamp"]:
                latest = event
        return Decimal(latest["value"]) if latest and latest["value"] is not None else Decimal(0)
    return sum((Decimal(e["value"]) for e in selected if e["value"] is not None), Decimal(0))


def meter_event_summaries(call: Call) -> dict:
    """GET /v1/billing/meters/{id}/event_summaries. Times must fall on whole minutes (whole
    hours / UTC days with `value_grouping_window`), as Stripe requires; one summary for the
    whole range, or one per window (latest window first)."""
    params_allow(call.params, ("customer", "start_time", "end_time", "value_grouping_window", "limit",
                               "starting_after", "ending_before"))
    meter = meter_get(call)
    customer = param_str(call.params, "customer")
    if not customer:
        raise parameter_missing("customer")
    start = param_int(call.params, "start_time")
    if start is None:
        raise parameter_missing("start_time")
    end = param_int(call.params, "end_time")
    if end is None:
        raise parameter_missing("end_time")
    window = param_enum(call.params, "value_grouping_window", ("hour", "day"))
    step = {"hour": 3600, "day": 86400}.get(window or "", 60)
    for name, moment in (("start_time", start), ("end_time", end)):
        if moment % step:
            unit = {3600: "hour", 86400: "day (UTC)"}.get(step, "minute")
            raise invalid_request(f"Invalid {name}: must be aligned to a whole {unit} boundary.", param=name)
    if end <= start:
        raise invalid_request("end_time must be after start_time.", param="end_time")
    events = call.state.meter_events_for(meter["event_name"], customer)
    formula = meter["default_aggregation"]["formula"]
    if window is None:
        bounds = [(start, end)]
    else:
        if (end - start) // step > SUMMARY_WINDOWS_MAX:
            raise invalid_request("The time range has too many grouping windows.", param="end_time")
        bounds = [(s, s + step) for s in range(start, end, step)][::-1]
    summaries = [_summary(meter, customer, events, formula, s, e) for s, e in bounds]
    url = f"/v1/billing/meters/{meter['id']}/event_summaries"
    return list_page(call, summaries, url)


def _summary(meter: dict, customer: str, events: list[dict], formula: str, start: int, end: int) -> dict:
    # Ids are deterministic so `starting_after` cursors survive between pages.
    digest = hashlib.sha256(f"{meter['id']}|{customer}|{start}|{end}".encode()).hexdigest()[:24]
    return {"id": f"mtrusg_{digest}", "object": "billing.meter_event_summary",
            "aggregated_value": float(usage_aggregate(events, formula, start, end)), "end_time": end,
            "livemode": False, "meter": meter["id"], "start_time": start}


def meter_events_raw(call: Call) -> dict:
    """GET /_local/meter_events?customer=&event_name=: every accepted event, oldest first."""
    events = call.state.meter_events
    for name in ("customer", "event_name"):
        value = param_str(call.params, name)
        if value:
            events = [e for e in events if e[name] == value]
    return {"object": "list", "data": events, "has_more": False, "url": "/_local/meter_events"}


def meter_event_errors(call: Call) -> dict:
    """GET /_local/meter_event_errors: events the v2 stream dropped, oldest first."""
    return {"object": "list", "data": call.state.meter_event_errors, "has_more": False,
            "url": "/_local/meter_event_errors"}

