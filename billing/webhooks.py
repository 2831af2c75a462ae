"""Stripe webhook events: verified, stored once (StripeEvent.event_id is unique), handled.

`stripe_event_receive` runs in one transaction: insert the StripeEvent row (a replay of an
event id hits the unique constraint → already handled, answer 200), then the handler. If the
handler fails the transaction rolls back, the endpoint answers 500 and Stripe retries.
"""
import json
import logging

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from .accounts import billing_account_canceled, billing_account_paid, billing_account_past_due
from .models import BillingAccount, StripeEvent

logger = logging.getLogger(__name__)


class WebhookSignatureInvalid(Exception):
    pass


def stripe_event_construct(*, payload: bytes, signature_header: str) -> stripe.Event:
    """The event, if the Stripe-Signature header is valid for STRIPE_WEBHOOK_SECRET."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise WebhookSignatureInvalid("STRIPE_WEBHOOK_SECRET is not set")
    try:
        return stripe.Webhook.construct_event(payload.decode("utf-8"), signature_header,
                                              settings.STRIPE_WEBHOOK_SECRET)
    except (ValueError, UnicodeDecodeError, stripe.SignatureVerificationError) as error:
        raise WebhookSignatureInvalid(str(error)) from error


def _account_for_customer(customer_id: str | None) -> BillingAccount | None:
    if not customer_id:
        return None
    return (BillingAccount.objects.select_for_update().select_related("tenant", "plan")
            .filter(stripe_customer_id=customer_id).first())


def _invoice_paid(obj: dict) -> None:
    account = _account_for_customer(obj.get("customer"))
    if account is not None:
        billing_account_paid(account=account)


def _invoice_payment_failed(obj: dict) -> None:
    account = _account_for_customer(obj.get("customer"))
    if account is not None:
        billing_account_past_due(account=account, invoice_id=obj.get("id") or "")


def _subscription_deleted(obj: dict) -> None:
    account = _account_for_customer(obj.get("customer"))
    if account is not None:
        billing_account_canceled(account=account, subscription_id=obj.get("id") or "")


HANDLERS = {
    "invoice.paid": _invoice_paid,
    "invoice.payment_failed": _invoice_payment_failed,
    "customer.subscription.deleted": _subscription_deleted,
}


def stripe_event_receive(*, event: stripe.Event, raw_body: bytes) -> bool:
    """Handles a verified event once. Returns False for a replay (already handled). The raw
    body is what is stored (the parsed object holds Decimals, which JSON can't take)."""
    payload = json.loads(raw_body)
    try:
        with transaction.atomic():
            row = StripeEvent.objects.create(event_id=event.id, type=event.type, payload=payload)
            handler = HANDLERS.get(event.type)
            if handler is not None:
                handler(payload["data"]["object"])
            row.processed_at = timezone.now()
            row.save(update_fields=["processed_at"])
    except IntegrityError:
        if StripeEvent.objects.filter(event_id=event.id).exists():
            return False
        raise
    return True
