"""Billing meters, meter events (v1 and v2), adjustments and event summaries."""

import datetime as dt
import random
import time
from decimal import Decimal

import pytest
import stripe


@pytest.fixture
def metered(client):
    """A customer and an active `sum` meter on event `llm_tokens`."""
    customer = client.v1.customers.create(params={"name": "Metered"})
    meter = client.v1.billing.meters.create(params={
        "display_name": "LLM tokens", "event_name": "llm_tokens", "default_aggregation": {"formula": "sum"}})
    return customer, meter


def minute_floor(epoch: float) -> int:
    return int(epoch) // 60 * 60


def summary_total(client, meter_id: str, customer_id: str) -> float:
    now = time.time()
    summaries = client.v1.billing.meters.event_summaries.list(meter_id, params={
        "customer": customer_id, "start_time": minute_floor(now - 3600), "end_time": minute_floor(now) + 120})
    assert [s.object for s in summaries.data] == ["billing.meter_event_summary"]
    return summaries.data[0].aggregated_value


def test_meter_shape_uniqueness_and_status(client, metered):
    _, meter = metered
    assert meter.id.startswith("mtr_") and meter.object == "billing.meter" and meter.status == "active"
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert meter.value_settings.event_payload_key == "value"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meters.create(params={"display_name": "again", "event_name": "llm_tokens",
                                                "default_aggregation": {"formula": "count"}})
    assert client.v1.billing.meters.deactivate(meter.id).status == "inactive"
    assert [m.id for m in client.v1.billing.meters.list(params={"status": "inactive"})] == [meter.id]
    assert client.v1.billing.meters.reactivate(meter.id).status == "active"


def test_meter_event_shape(client, metered):
    customer, _ = metered
    event = client.v1.billing.meter_events.create(params={
        "event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "12"},
        "identifier": "req-1"})
    assert event.object == "billing.meter_event" and event.identifier == "req-1"
    assert event.payload.to_dict() == {"stripe_customer_id": customer.id, "value": "12"}
    generated = client.v1.billing.meter_events.create(params={
        "event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "1"}})
    assert generated.identifier and generated.identifier != "req-1"


def test_duplicate_identifier_is_rejected_and_counted_once(client, metered):
    customer, meter = metered
    params = {"event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "100"},
              "identifier": "usage-1"}
    client.v1.billing.meter_events.create(params=params)
    # when the same identifier is sent again (another Idempotency-Key: a new request)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meter_events.create(params=params)
    # then Stripe's error, marked not worth retrying
    assert "already exists" in caught.value.user_message
    assert caught.value.headers["Stripe-Should-Retry"] == "false"
    # and the summary counts it once
    assert summary_total(client, meter.id, customer.id) == 100.0


def test_a_retry_with_the_same_idempotency_key_replays_the_acceptance(client, metered):
    customer, meter = metered
    params = {"event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "5"},
              "identifier": "usage-retry"}
    client.v1.billing.meter_events.create(params=params, options={"idempotency_key": "k-usage-retry"})
    again = client.v1.billing.meter_events.create(params=params, options={"idempotency_key": "k-usage-retry"})
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert summary_total(client, meter.id, customer.id) == 5.0


def test_thousand_events_with_random_duplicates_sum_exactly(server, client, metered):
    customer, meter = metered
    rng = random.Random(7)
    sent: dict[str, Decimal] = {}
    duplicates = 0
    for n in range(1000):
        if sent and rng.random() < 0.2:
            identifier = rng.choice(list(sent))
            duplicates += 1
            value = str(rng.randint(1, 999))  # a different value must not count either
        else:
            identifier = f"evt-{n}"
            value = f"{rng.randint(0, 5000)}.{rng.randint(0, 99):02d}"
            sent[identifier] = Decimal(value)
        try:
            client.v1.billing.meter_events.create(params={
                "event_name": "llm_tokens", "identifier": identifier,
                "payload": {"stripe_customer_id": customer.id, "value": value}})
        except stripe.InvalidRequestError as error:
            assert "already exists" in error.user_message
    assert duplicates > 100
    expected = sum(sent.values())
    assert summary_total(client, meter.id, customer.id) == pytest.approx(float(expected), abs=1e-6)
    status, raw = server.local("GET", f"/_local/meter_events?customer={customer.id}&event_name=llm_tokens")
    assert status == 200
    assert {e["identifier"] for e in raw["data"]} == set(sent)
    assert sum(Decimal(e["value"]) for e in raw["data"]) == expected


@pytest.mark.parametrize("offset_s, fragment", [(-36 * 86400, "past 35 days"), (10 * 60, "in the future")])
def test_timestamps_out_of_range_are_rejected(client, metered, offset_s, fragment):
    customer, _ = metered
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meter_events.create(params={
            "event_name": "llm_tokens", "timestamp": int(time.time()) + offset_s,
            "payload": {"stripe_customer_id": customer.id, "value": "1"}})
    assert caught.value.http_status == 400 and caught.value.param == "timestamp"
    assert fragment in caught.value.user_message


def test_unknown_event_name_customer_or_bad_value_is_rejected(client, metered):
    customer, _ = metered
    cases = [({"event_name": "nope", "payload": {"stripe_customer_id": customer.id, "value": "1"}}, "event_name"),
             ({"event_name": "llm_tokens", "payload": {"stripe_customer_id": "cus_nope", "value": "1"}},
              "payload[stripe_customer_id]"),
             ({"event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "ten"}},
              "payload[value]"),
             ({"event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id,
                                                       "value": "1234567890.1234567"}}, "payload[value]")]
    for params, param in cases:
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.billing.meter_events.create(params=params)
        assert caught.value.http_status == 400 and caught.value.param == param


def test_summaries_group_by_hour_and_need_aligned_times(client, metered):
    customer, meter = metered
    hour = int(time.time()) // 3600 * 3600
    for ts, value in ((hour - 3600 + 5, "2"), (hour + 1, "3"), (hour + 2, "4")):
        client.v1.billing.meter_events.create(params={
            "event_name": "llm_tokens", "timestamp": ts, "payload": {"stripe_customer_id": customer.id,
                                                                     "value": value}})
    grouped = client.v1.billing.meters.event_summaries.list(meter.id, params={
        "customer": customer.id, "start_time": hour - 3600, "end_time": hour + 3600,
        "value_grouping_window": "hour"})
    assert [(s.start_time, s.aggregated_value) for s in grouped.data] == [(hour, 7.0), (hour - 3600, 2.0)]
    assert all(s.id.startswith("mtrusg_") and s.meter == meter.id for s in grouped.data)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meters.event_summaries.list(meter.id, params={
            "customer": customer.id, "start_time": hour + 7, "end_time": hour + 3600})
    assert caught.value.param == "start_time"


def test_cancel_adjustment_removes_an_event_from_the_summary(client, metered):
    customer, meter = metered
    for identifier, value in (("keep", "10"), ("drop", "90")):
        client.v1.billing.meter_events.create(params={
            "event_name": "llm_tokens", "identifier": identifier,
            "payload": {"stripe_customer_id": customer.id, "value": value}})
    adjustment = client.v1.billing.meter_event_adjustments.create(params={
        "event_name": "llm_tokens", "type": "cancel", "cancel": {"identifier": "drop"}})
    assert adjustment.object == "billing.meter_event_adjustment"
    assert summary_total(client, meter.id, customer.id) == 10.0


def test_v2_session_and_stream(server, client, metered):
    customer, meter = metered
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    expires = dt.datetime.fromisoformat(session.expires_at.replace("Z", "+00:00"))
    assert 14 * 60 < (expires - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 15 * 60
    stream = server.client(session.authentication_token)
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    stream.v2.billing.meter_event_stream.create(params={"events": [
        {"event_name": "llm_tokens", "identifier": f"s-{n}", "timestamp": now,
         "payload": {"stripe_customer_id": customer.id, "value": "3"}} for n in range(100)]})
    # a bad event is dropped (Stripe validates the stream asynchronously) and logged locally
    stream.v2.billing.meter_event_stream.create(params={"events": [
        {"event_name": "llm_tokens", "payload": {"stripe_customer_id": "cus_nope", "value": "3"}},
        {"event_name": "llm_tokens", "identifier": "s-0", "payload": {"stripe_customer_id": customer.id,
                                                                      "value": "3"}}]})
    assert summary_total(client, meter.id, customer.id) == 300.0
    _, errors = server.local("GET", "/_local/meter_event_errors")
    assert [e["code"] for e in errors["data"]] == ["meter_event_customer_not_found",
                                                   "meter_event_duplicate_identifier"]
    # more than 100 events per request is refused at once
    with pytest.raises(stripe.InvalidRequestError):
        stream.v2.billing.meter_event_stream.create(params={"events": [
            {"event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "1"}}] * 101})


def test_v2_stream_with_an_expired_session(server, client, metered):
    customer, _ = metered
    session = client.v2.billing.meter_event_session.create()
    status, _ = server.local("POST", "/_local/meter_event_sessions/expire",
                             {"authentication_token": session.authentication_token})
    assert status == 200
    with pytest.raises(stripe.TemporarySessionExpiredError) as caught:
        server.client(session.authentication_token).v2.billing.meter_event_stream.create(params={"events": [
            {"event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "1"}}]})
    assert caught.value.code == "billing_meter_event_session_expired"
    # an API key is not a session token
    with pytest.raises(stripe.AuthenticationError):
        client.v2.billing.meter_event_stream.create(params={"events": [
            {"event_name": "llm_tokens", "payload": {"stripe_customer_id": customer.id, "value": "1"}}]})


def test_v2_meter_event_is_validated_synchronously(client, metered):
    customer, meter = metered
    event = client.v2.billing.meter_events.create(params={
        "event_name": "llm_tokens", "identifier": "v2-1", "payload": {"stripe_customer_id": customer.id,
                                                                      "value": "8"}})
    assert event.object == "v2.billing.meter_event" and event.timestamp.endswith("Z")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v2.billing.meter_events.create(params={
            "event_name": "llm_tokens", "identifier": "v2-1", "payload": {"stripe_customer_id": customer.id,
                                                                          "value": "8"}})
    assert "already exists" in caught.value.user_message
    assert summary_total(client, meter.id, customer.id) == 8.0
