"""`--state-file`: a restarted server keeps its objects, meter events and idempotency keys;
and module-level stripe-python configuration (`stripe.api_base`) works as well as StripeClient."""

import json
import time

import pytest
import stripe


def test_state_survives_a_restart(server_factory, tmp_path):
    state_file = tmp_path / "stripe.json"
    first = server_factory("--state-file", str(state_file))
    client = first.client()
    customer = client.v1.customers.create(params={"name": "Kept"}, options={"idempotency_key": "create-kept"})
    meter = client.v1.billing.meters.create(params={"display_name": "T", "event_name": "kept_tokens",
                                                    "default_aggregation": {"formula": "sum"}})
    client.v1.billing.meter_events.create(params={"event_name": "kept_tokens", "identifier": "once",
                                                  "payload": {"stripe_customer_id": customer.id, "value": "7"}})
    first.stop()
    assert json.loads(state_file.read_text())["objects"]["customers"][customer.id]["name"] == "Kept"

    second = server_factory("--state-file", str(state_file))
    client = second.client()
    assert client.v1.customers.retrieve(customer.id).name == "Kept"
    replay = client.v1.customers.create(params={"name": "Kept"}, options={"idempotency_key": "create-kept"})
    assert replay.id == customer.id and replay.last_response.headers["Idempotent-Replayed"] == "true"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meter_events.create(params={
            "event_name": "kept_tokens", "identifier": "once",
            "payload": {"stripe_customer_id": customer.id, "value": "7"}})
    now = int(time.time()) // 60 * 60
    [summary] = client.v1.billing.meters.event_summaries.list(meter.id, params={
        "customer": customer.id, "start_time": now - 3600, "end_time": now + 120}).data
    assert summary.aggregated_value == 7.0


@pytest.fixture
def module_level_stripe(server):
    saved = (stripe.api_key, stripe.api_base, stripe.meter_events_api_base)
    stripe.api_key, stripe.api_base, stripe.meter_events_api_base = "sk_test_module", server.url, server.url
    yield stripe
    stripe.api_key, stripe.api_base, stripe.meter_events_api_base = saved


def test_module_level_configuration(module_level_stripe):
    customer = stripe.Customer.create(email="module@example.com")
    assert stripe.Customer.retrieve(customer.id).email == "module@example.com"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        stripe.Customer.retrieve("cus_absent")
    assert caught.value.code == "resource_missing"
