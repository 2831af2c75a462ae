"""Celery tasks of billing: thin (ids in, re-fetch, call a service), bounded retries with
backoff, time limits. The periodic ones (CELERY_BEAT_SCHEDULE in settings) make billing
self-healing: a killed worker or a lost broker message only delays a rollup or a push, since
the next run starts again from the database (watermark, dirty months, pending pushes)."""
import logging

import stripe
from celery import shared_task
from django.db import OperationalError

from .models import BillingAccount

logger = logging.getLogger(__name__)

RETRYABLE_STRIPE = (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError)


@shared_task(name="billing.usage_rollup", acks_late=True, autoretry_for=(OperationalError,), max_retries=5,
             retry_backoff=2, retry_backoff_max=60, retry_jitter=True, time_limit=600, soft_time_limit=540)
def usage_rollup_task() -> dict:
    """Idempotent (rebuilds buckets from the ledger), so acks_late: a killed worker's pass reruns."""
    from .meter_push import meter_pushes_plan
    from .rollups import usage_rollup_catch_up

    results = usage_rollup_catch_up()
    planned = meter_pushes_plan()
    if planned:
        meter_push_task.apply_async()
    return {"passes": len(results), "dirty_hours": sum(r.dirty_hours for r in results), "pushes_planned": planned}


@shared_task(name="billing.meter_push", acks_late=True, autoretry_for=RETRYABLE_STRIPE + (OperationalError,),
             max_retries=8, retry_backoff=2, retry_backoff_max=300, retry_jitter=True, time_limit=600,
             soft_time_limit=540)
def meter_push_task() -> dict:
    """Idempotent (stored identifiers; Stripe dedups them), so acks_late."""
    from .meter_push import meter_pushes_plan, meter_pushes_send

    planned = meter_pushes_plan()
    sent = meter_pushes_send()
    return {"planned": planned, "sent": sent}


@shared_task(name="billing.account_stripe_setup", acks_late=True, autoretry_for=RETRYABLE_STRIPE,
             max_retries=8, retry_backoff=2, retry_backoff_max=300, retry_jitter=True, time_limit=120,
             soft_time_limit=100)
def billing_account_stripe_setup_task(account_id: int) -> None:
    """Idempotent (Idempotency-Keys derived from our ids; stored Stripe ids are reused)."""
    from .accounts import billing_account_stripe_setup

    account = BillingAccount.objects.select_related("tenant", "plan").filter(pk=account_id).first()
    if account is None:
        return
    billing_account_stripe_setup(account=account)


@shared_task(name="billing.accounts_sync", time_limit=600, soft_time_limit=540)
def accounts_sync_task() -> int:
    """Creates missing accounts and enqueues the Stripe setup of accounts that lack a customer or
    a live subscription (a setup task lost with its broker message is redone here)."""
    from .accounts import billing_accounts_missing_create

    billing_accounts_missing_create()
    pending = BillingAccount.objects.filter(stripe_subscription_id__isnull=True) | \
        BillingAccount.objects.filter(stripe_customer_id__isnull=True)
    ids = list(pending.values_list("id", flat=True))
    for account_id in ids:
        billing_account_stripe_setup_task.apply_async(args=[account_id])
    return len(ids)


@shared_task(name="billing.past_due_enforce", time_limit=300, soft_time_limit=240)
def past_due_enforce_task() -> list[int]:
    from .accounts import past_due_accounts_suspend

    return past_due_accounts_suspend()


@shared_task(name="billing.usage_records_purge", time_limit=3600, soft_time_limit=3500)
def usage_records_purge_task() -> int:
    from .rollups import usage_records_purge

    return usage_records_purge()
