"""The Stripe webhook endpoint: signature checked, each event id handled once."""
import json
import time
import uuid

import pytest
import stripe

from billing.models import BillingAccount, StripeEvent

SECRET = "whsec_test_webhooks"


def signed(event: dict, secret: str = SECRET) -> tuple[str, str]:
    payload = json.dumps(event)
    return payload, stripe.WebhookSignature.generate_signature_header(payload, secret, int(time.time()))


def invoice_event(type: str, customer: str, invoice: str = "in_test1") -> dict:
    return {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2026-10-28.endive",
            "created": int(time.time()), "livemode": False, "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None}, "type": type,
            "data": {"object": {"id": invoice, "object": "invoice", "customer": customer, "status": "open"}}}


@pytest.fixture
def webhook_settings(settings):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    return settings


@pytest.fixture
def account(make_tenant):
    tk = make_tenant()
    account = BillingAccount.objects.get(tenant=tk.tenant)
    account.stripe_customer_id = f"cus_{uuid.uuid4().hex[:14]}"
    account.save()
    return account


def post(client, payload: str, signature: str | None):
    headers = {} if signature is None else {"HTTP_STRIPE_SIGNATURE": signature}
    return client.post("/billing/stripe/webhook", data=payload, content_type="application/json", **headers)


@pytest.mark.parametrize("tamper", ["wrong_secret", "body_changed", "no_header", "stale"])
def test_a_bad_signature_is_rejected_with_400(client, webhook_settings, account, tamper):
    event = invoice_event("invoice.payment_failed", account.stripe_customer_id)
    payload, signature = signed(event, "whsec_other" if tamper == "wrong_secret" else SECRET)
    if tamper == "body_changed":
        payload = payload.replace("invoice.payment_failed", "invoice.paid")
    if tamper == "no_header":
        signature = None
    if tamper == "stale":  # older than stripe-python's 300 s tolerance
        signature = stripe.WebhookSignature.generate_signature_header(payload, SECRET, int(time.time()) - 600)
    response = post(client, payload, signature)
    assert response.status_code == 400
    assert not StripeEvent.objects.filter(event_id=event["id"]).exists()
    account.refresh_from_db()
    assert account.status == "active"


def test_a_replayed_event_is_processed_once(client, webhook_settings, account):
    event = invoice_event("invoice.payment_failed", account.stripe_customer_id)
    payload, signature = signed(event)
    first = post(client, payload, signature)
    account.refresh_from_db()
    first_since = account.past_due_since
    assert first.status_code == 200 and first.json() == {"received": True, "replay": False}
    assert account.status == "past_due" and first_since is not None
    # when Stripe delivers it again (fresh signature, same event id)
    for _ in range(3):
        again = post(client, *signed(event))
        assert again.status_code == 200 and again.json() == {"received": True, "replay": True}
    assert StripeEvent.objects.filter(event_id=event["id"]).count() == 1
    account.refresh_from_db()
    assert account.past_due_since == first_since


def test_paid_and_subscription_deleted(client, webhook_settings, account):
    post(client, *signed(invoice_event("invoice.payment_failed", account.stripe_customer_id)))
    post(client, *signed(invoice_event("invoice.paid", account.stripe_customer_id)))
    account.refresh_from_db()
    assert (account.status, account.past_due_since) == ("active", None)
    account.stripe_subscription_id = f"sub_{uuid.uuid4().hex[:14]}"
    account.save()
    deleted = invoice_event("customer.subscription.deleted", account.stripe_customer_id,
                            invoice=account.stripe_subscription_id)
    post(client, *signed(deleted))
    account.refresh_from_db()
    assert account.status == "canceled"


def test_unknown_types_and_customers_are_acknowledged(client, webhook_settings, account):
    for event in (invoice_event("invoice.finalized", account.stripe_customer_id),
                  invoice_event("invoice.paid", "cus_unknown")):
        assert post(client, *signed(event)).status_code == 200
        assert StripeEvent.objects.get(event_id=event["id"]).processed_at is not None
