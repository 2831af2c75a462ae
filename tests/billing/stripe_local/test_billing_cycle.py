"""Subscriptions, invoices, the /_local/ billing-cycle controls and signed webhooks."""

import json
import time

import pytest
import stripe


@pytest.fixture
def plan(client):
    """A customer subscribed to a metered price (0.25 cents per token via meter `tokens`)
    plus a licensed seat price (1,000 cents × 2 seats), monthly, in USD."""
    customer = client.v1.customers.create(params={"email": "billing@example.com"})
    meter = client.v1.billing.meters.create(params={
        "display_name": "Tokens", "event_name": "tokens", "default_aggregation": {"formula": "sum"}})
    product = client.v1.products.create(params={"name": "LLM API"})
    metered = client.v1.prices.create(params={
        "currency": "usd", "product": product.id, "unit_amount_decimal": "0.25",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id}})
    seats = client.v1.prices.create(params={"currency": "usd", "product": product.id, "unit_amount": 1000,
                                            "recurring": {"interval": "month"}})
    subscription = client.v1.subscriptions.create(params={
        "customer": customer.id, "items": [{"price": metered.id}, {"price": seats.id, "quantity": 2}],
        "metadata": {"tenant": "t1"}})
    return customer, meter, subscription


def usage_record(client, customer_id: str, value: str, identifier: str) -> None:
    client.v1.billing.meter_events.create(params={
        "event_name": "tokens", "identifier": identifier, "payload": {"stripe_customer_id": customer_id,
                                                                      "value": value}})


def test_subscription_shape_and_first_invoice(client, plan):
    customer, _, subscription = plan
    assert subscription.id.startswith("sub_") and subscription.status == "active"
    assert subscription.currency == "usd" and subscription.customer == customer.id
    items = subscription["items"].data
    assert [i.id[:3] for i in items] == ["si_", "si_"]
    assert all(i.current_period_end > i.current_period_start for i in items)
    assert items[0].price.recurring.usage_type == "metered" and "quantity" not in items[0]
    assert items[1].quantity == 2
    # the first invoice bills the seats in advance and waits for payment
    first = client.v1.invoices.retrieve(subscription.latest_invoice)
    assert first.billing_reason == "subscription_create" and first.status == "open"
    assert first.amount_due == 2000 and first.parent.subscription_details.subscription == subscription.id


def test_close_period_bills_usage_then_failed_and_successful_payment(server, client, plan, webhook_receiver):
    customer, _, subscription = plan
    endpoint = client.v1.webhook_endpoints.create(params={"url": webhook_receiver.url, "enabled_events": ["*"]})
    assert endpoint.secret.startswith("whsec_")
    period_start = subscription["items"].data[0].current_period_start
    # given 1,001 tokens of usage this period
    usage_record(client, customer.id, "1000", "u1")
    usage_record(client, customer.id, "1", "u2")
    # when the period is closed
    status, invoice = server.local("POST", f"/_local/subscriptions/{subscription.id}/close_period")
    assert status == 200, invoice
    # then an open invoice: 1,001 × 0.25 = 250.25 → 250 cents of usage, plus 2 × 1,000 for next month's seats
    assert invoice["object"] == "invoice" and invoice["status"] == "open"
    assert invoice["billing_reason"] == "subscription_cycle"
    assert invoice["period_start"] == period_start and invoice["amount_due"] == 2250
    lines = client.v1.invoices.line_items.list(invoice["id"]).data
    usage_line = next(line for line in lines if line.pricing.price_details.price == subscription["items"].data[0].price.id)
    assert (usage_line.amount, usage_line.quantity) == (250, 1001)
    assert usage_line.period.start == period_start
    # and the subscription moved to the next period
    moved = client.v1.subscriptions.retrieve(subscription.id)
    assert moved["items"].data[0].current_period_start == invoice["period_end"]
    # when the charge fails
    status, failed = server.local("POST", f"/_local/invoices/{invoice['id']}/payment", {"outcome": "failed"})
    assert status == 200 and failed["status"] == "open" and failed["attempt_count"] == 1
    # then invoice.payment_failed arrives, signed, and the subscription is past_due
    delivery = webhook_receiver.wait_for_type("invoice.payment_failed")
    event = stripe.Webhook.construct_event(delivery.body.decode(), delivery.headers["Stripe-Signature"],
                                           endpoint.secret)
    assert event.data.object.id == invoice["id"] and event.request.id is None
    assert client.v1.subscriptions.retrieve(subscription.id).status == "past_due"
    # when it is then paid through Stripe's own API
    paid = client.v1.invoices.pay(invoice["id"])
    assert paid.status == "paid" and paid.amount_paid == 2250 and paid.amount_remaining == 0
    assert client.v1.subscriptions.retrieve(subscription.id).status == "active"
    webhook_receiver.wait_for_type("invoice.payment_succeeded")
    types = [json.loads(r.body)["type"] for r in webhook_receiver.received]
    for expected in ("invoice.created", "invoice.finalized", "invoice.payment_failed", "invoice.paid",
                     "customer.subscription.updated"):
        assert expected in types


def test_close_period_usage_after_the_period_goes_to_the_next_invoice(server, client, plan):
    customer, _, subscription = plan
    usage_record(client, customer.id, "40", "a")
    _, first = server.local("POST", f"/_local/subscriptions/{subscription.id}/close_period")
    time.sleep(1.1)  # the next period starts at the end of the current second
    usage_record(client, customer.id, "8", "b")
    _, second = server.local("POST", f"/_local/subscriptions/{subscription.id}/close_period")
    assert (first["amount_due"], second["amount_due"]) == (10 + 2000, 2 + 2000)
    assert second["period_start"] == first["period_end"]
    invoices = client.v1.invoices.list(params={"customer": customer.id})
    assert [i.id for i in invoices.data][:2] == [second["id"], first["id"]]
    assert len(invoices.data) == 3  # and the subscription_create one
    open_ones = client.v1.invoices.list(params={"subscription": subscription.id, "status": "open"}).data
    assert {i.id for i in open_ones} == {first["id"], second["id"], subscription.latest_invoice}


def test_webhook_retries_until_the_endpoint_answers_2xx(client, webhook_receiver):
    webhook_receiver.failures = [500, 503]
    endpoint = client.v1.webhook_endpoints.create(params={"url": webhook_receiver.url,
                                                          "enabled_events": ["customer.created"]})
    customer = client.v1.customers.create(params={"name": "R"})
    client.v1.products.create(params={"name": "not subscribed"})

    def delivered():
        return [r for r in webhook_receiver.received if r.headers["_status"] == 200]

    [ok] = _wait(delivered)
    assert len(webhook_receiver.received) == 3  # two failures, then the success
    event = stripe.Webhook.construct_event(ok.body, ok.headers["Stripe-Signature"], endpoint.secret)
    assert event.type == "customer.created" and event.data.object.id == customer.id
    assert event.api_version and event.livemode is False
    assert _wait(lambda: client.v1.events.retrieve(event.id).pending_webhooks == 0)
    bodies = {r.body for r in webhook_receiver.received}
    assert len(bodies) == 1  # every attempt carries the same event


def test_webhook_signature_fails_with_the_wrong_secret(client, webhook_receiver):
    client.v1.webhook_endpoints.create(params={"url": webhook_receiver.url, "enabled_events": ["*"]})
    client.v1.customers.create(params={"name": "S"})
    delivery = webhook_receiver.wait_for_type("customer.created")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(delivery.body, delivery.headers["Stripe-Signature"], "whsec_wrong")


def test_webhook_endpoint_secret_is_shown_only_at_creation(client):
    endpoint = client.v1.webhook_endpoints.create(params={"url": "http://127.0.0.1:9/x", "enabled_events": ["*"]})
    fetched = client.v1.webhook_endpoints.retrieve(endpoint.id)
    assert endpoint.secret.startswith("whsec_") and "secret" not in fetched
    assert [e.id for e in client.v1.webhook_endpoints.list()] == [endpoint.id]
    assert client.v1.webhook_endpoints.delete(endpoint.id).deleted is True


def test_cancel_emits_subscription_deleted(client, plan):
    _, _, subscription = plan
    canceled = client.v1.subscriptions.cancel(subscription.id)
    assert canceled.status == "canceled" and canceled.canceled_at
    [event] = client.v1.events.list(params={"type": "customer.subscription.deleted"}).data
    assert event.data.object.id == subscription.id
    assert client.v1.subscriptions.list(params={"customer": subscription.customer}).data == []
    assert [s.id for s in client.v1.subscriptions.list(params={"status": "canceled"})] == [subscription.id]


def test_invoice_state_transitions(server, client, plan):
    _, _, subscription = plan
    _, draft = server.local("POST", f"/_local/subscriptions/{subscription.id}/close_period", {"finalize": False})
    assert draft["status"] == "draft"
    assert client.v1.invoices.finalize_invoice(draft["id"]).status == "open"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.finalize_invoice(draft["id"])
    assert client.v1.invoices.mark_uncollectible(draft["id"]).status == "uncollectible"
    assert client.v1.invoices.void_invoice(draft["id"]).status == "void"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.pay(draft["id"])
    events = [e.type for e in client.v1.events.list(params={"types": ["invoice.voided",
                                                                      "invoice.marked_uncollectible"]})]
    assert events == ["invoice.voided", "invoice.marked_uncollectible"]


def test_zero_usage_metered_only_invoices_are_paid_at_once(server, client):
    customer = client.v1.customers.create(params={})
    meter = client.v1.billing.meters.create(params={"display_name": "T", "event_name": "t",
                                                    "default_aggregation": {"formula": "count"}})
    price = client.v1.prices.create(params={"currency": "eur", "unit_amount": 3, "product_data": {"name": "T"},
                                            "recurring": {"interval": "day", "usage_type": "metered",
                                                          "meter": meter.id}})
    subscription = client.v1.subscriptions.create(params={"customer": customer.id, "items": [{"price": price.id}]})
    assert client.v1.invoices.retrieve(subscription.latest_invoice).status == "paid"
    _, invoice = server.local("POST", f"/_local/subscriptions/{subscription.id}/close_period")
    assert (invoice["amount_due"], invoice["status"], invoice["currency"]) == (0, "paid", "eur")


def test_create_preview_shows_usage_so_far(client, plan):
    customer, _, subscription = plan
    usage_record(client, customer.id, "400", "p1")
    preview = client.v1.invoices.create_preview(params={"subscription": subscription.id})
    assert preview.amount_due == 100 + 2000 and preview.id.startswith("upcoming_in_")
    assert preview.id not in [i.id for i in client.v1.invoices.list(params={"customer": customer.id})]


def test_local_control_errors_use_stripe_error_shape(server):
    status, body = server.local("POST", "/_local/subscriptions/sub_missing/close_period")
    assert status == 404 and body["error"]["code"] == "resource_missing"
    status, body = server.local("POST", "/_local/invoices/in_missing/payment", {"outcome": "maybe"})
    assert status == 400 and body["error"]["param"] == "outcome"


def _wait(predicate, timeout_s: float = 10.0):
    from .conftest import wait_until
    return wait_until(predicate, timeout_s=timeout_s)
