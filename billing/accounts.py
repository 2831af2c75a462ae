"""Billing accounts: a tenant's plan, its Stripe customer and subscription, the Stripe catalog
(meters and metered prices), and the past-due → suspended → paid → active cycle.

Every Stripe object is created with an Idempotency-Key derived from our ids, and its id is
stored as soon as it exists; a crash between the two is repaired by the retry (same key, same
object) or by the periodic `billing.accounts_sync`.
"""
import logging
from datetime import UTC, datetime, timedelta

import stripe
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tenants.models import Tenant

from .models import BillingAccount, Plan, Price, PriceLine, SubscriptionItem
from .pricing import unit_amount_minor
from .stripe_client import stripe_client

logger = logging.getLogger(__name__)

# A Stripe subscription holds at most 20 items (3 per price version: 6 live versions).
STRIPE_SUBSCRIPTION_MAX_ITEMS = 20


# The plans every installation starts with (also seeded by migration 0003), by tenant tier:
# (code, name, included tokens per month).
DEFAULT_PLANS = {
    "free": ("free", "Free", 1_000_000),
    "standard": ("payg", "Pay as you go", 0),
    "premium": ("premium", "Premium, pay as you go", 0),
}


def plan_for_tier(*, tier: str) -> Plan:
    plan = Plan.objects.filter(tier=tier).first()
    if plan is None:
        code, name, included = DEFAULT_PLANS.get(tier, (tier, tier.title(), 0))
        plan, _ = Plan.objects.get_or_create(tier=tier, defaults={"code": code, "name": name,
                                                                  "included_tokens_per_month": included})
    return plan


def billing_account_create(*, tenant: Tenant) -> BillingAccount:
    """The tenant's account on its tier's plan; its Stripe customer and subscription are created
    by a task after commit (and by the periodic sync if that enqueue is lost)."""
    account, _ = BillingAccount.objects.get_or_create(tenant=tenant,
                                                      defaults={"plan": plan_for_tier(tier=tenant.tier)})
    account_id = account.pk
    transaction.on_commit(lambda: _stripe_setup_enqueue(account_id))
    return account


def billing_plan_change(*, tenant: Tenant) -> BillingAccount:
    """Follows a tier change: the plan of the tier from now on (a month already billed keeps
    its frozen allowance, see MonthlyAllowance); a canceled subscription is created again."""
    plan = plan_for_tier(tier=tenant.tier)
    account, created = BillingAccount.objects.get_or_create(tenant=tenant, defaults={"plan": plan})
    if not created and account.plan_id != plan.pk:
        account.plan = plan
        account.save(update_fields=["plan", "updated_at"])
    account_id = account.pk
    transaction.on_commit(lambda: _stripe_setup_enqueue(account_id))
    return account


def _stripe_setup_enqueue(account_id: int) -> None:
    """Best effort: a broker outage must not fail tenant creation (accounts_sync catches up)."""
    from .tasks import billing_account_stripe_setup_task

    try:
        billing_account_stripe_setup_task.apply_async(args=[account_id], retry=False)
    except Exception:
        logger.warning("could not enqueue the Stripe setup of billing account %s", account_id, exc_info=True)


# --- Stripe catalog ------------------------------------------------------------------------------


def stripe_price_line_sync(*, line: PriceLine) -> PriceLine:
    """The line's Stripe meter (sum of `value` per `stripe_customer_id`) and metered monthly
    price (unit_amount_decimal = minor units per token, exact)."""
    client = stripe_client()
    if not line.stripe_meter_id:
        meter_params = {
            "display_name": f"{line.price.model} {line.get_token_class_display()} ({line.price.version})"[:250],
            "event_name": line.event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        }
        try:
            meter = client.v1.billing.meters.create(params=meter_params,
                                                    options={"idempotency_key": f"meter-{line.event_name}"})
        except stripe.InvalidRequestError:
            meter = next((m for m in client.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter()
                          if m.event_name == line.event_name), None)
            if meter is None:
                raise
        line.stripe_meter_id = meter.id
        line.save(update_fields=["stripe_meter_id", "updated_at"])
    if not line.stripe_price_id:
        price = line.price
        stripe_price = client.v1.prices.create(
            params={
                "currency": price.currency,
                "unit_amount_decimal": format(unit_amount_minor(per_million=price.per_million(line.token_class),
                                                                currency=price.currency), "f"),
                "product_data": {"name": f"{price.model} {line.get_token_class_display()} ({price.version})"},
                "recurring": {"interval": "month", "usage_type": "metered", "meter": line.stripe_meter_id},
                "lookup_key": line.event_name,
                "metadata": {"price_line": line.event_name, "model": price.model, "version": price.version},
            },
            options={"idempotency_key": f"price-{line.event_name}"},
        )
        line.stripe_price_id = stripe_price.id
        line.save(update_fields=["stripe_price_id", "updated_at"])
    return line


def price_lines_billable(*, now=None) -> list[PriceLine]:
    """Lines that can still receive meter events: every model's current version, future ones,
    and versions superseded less than 35 days ago (Stripe's timestamp window)."""
    now = now or timezone.now()
    horizon = now - timedelta(days=35)
    result = []
    prices = list(Price.objects.filter(currency=settings.BILLING_CURRENCY.lower()).order_by("model",
                                                                                             "effective_from"))
    for index, price in enumerate(prices):
        following = prices[index + 1] if index + 1 < len(prices) and prices[index + 1].model == price.model else None
        if following is None or following.effective_from > horizon:
            result.extend(price.lines.all())
    return result


# --- customer and subscription ------------------------------------------------------------------


def stripe_customer_ensure(*, account: BillingAccount) -> str:
    if account.stripe_customer_id:
        return account.stripe_customer_id
    tenant = account.tenant
    customer = stripe_client().v1.customers.create(
        params={"name": tenant.name, "metadata": {"tenant_public_id": str(tenant.public_id),
                                                  "tenant_slug": tenant.slug}},
        options={"idempotency_key": f"customer-{tenant.public_id}"},
    )
    account.stripe_customer_id = customer.id
    account.save(update_fields=["stripe_customer_id", "updated_at"])
    return customer.id


def stripe_subscription_ensure(*, account: BillingAccount, lines: list[PriceLine] | None = None) -> str | None:
    """A live subscription holding an item for each billable line (and each line of `lines`).
    None while the price book is empty (Stripe needs at least one item)."""
    customer_id = stripe_customer_ensure(account=account)
    wanted = {line.pk: line for line in (price_lines_billable() + list(lines or []))}
    for line in wanted.values():
        if not (line.stripe_meter_id and line.stripe_price_id):
            stripe_price_line_sync(line=line)
    client = stripe_client()
    if not account.stripe_subscription_id or account.status == BillingAccount.Status.CANCELED:
        if not wanted:
            return None
        first = list(wanted.values())[:STRIPE_SUBSCRIPTION_MAX_ITEMS]
        generation = SubscriptionItem.objects.filter(account=account).values("stripe_subscription_id").distinct().count()
        subscription = client.v1.subscriptions.create(
            params={"customer": customer_id, "items": [{"price": line.stripe_price_id} for line in first],
                    "metadata": {"tenant_public_id": str(account.tenant.public_id), "plan": account.plan.code}},
            options={"idempotency_key": f"subscription-{account.tenant.public_id}-{generation}"},
        )
        with transaction.atomic():
            account.stripe_subscription_id = subscription.id
            account.stripe_subscription_started_at = datetime.fromtimestamp(subscription.start_date, UTC)
            account.status = BillingAccount.Status.ACTIVE
            account.save(update_fields=["stripe_subscription_id", "stripe_subscription_started_at", "status",
                                        "updated_at"])
            by_price = {line.stripe_price_id: line for line in first}
            for item in subscription["items"].data:
                price_id = item.price if isinstance(item.price, str) else item.price.id
                SubscriptionItem.objects.get_or_create(
                    stripe_item_id=item.id,
                    defaults={"account": account, "line": by_price[price_id],
                              "stripe_subscription_id": subscription.id})
    have = set(SubscriptionItem.objects.filter(account=account, stripe_subscription_id=account.stripe_subscription_id)
               .values_list("line_id", flat=True))
    missing = [line for line in wanted.values() if line.pk not in have]
    for line in missing:
        subscription = client.v1.subscriptions.update(
            account.stripe_subscription_id,
            params={"items": [{"price": line.stripe_price_id}]},
            options={"idempotency_key": f"subscription-item-{account.stripe_subscription_id}-{line.event_name}"},
        )
        item = next(i for i in subscription["items"].data
                    if (i.price if isinstance(i.price, str) else i.price.id) == line.stripe_price_id)
        SubscriptionItem.objects.get_or_create(
            stripe_item_id=item.id,
            defaults={"account": account, "line": line, "stripe_subscription_id": account.stripe_subscription_id})
    return account.stripe_subscription_id


def billing_account_stripe_setup(*, account: BillingAccount) -> None:
    stripe_customer_ensure(account=account)
    stripe_subscription_ensure(account=account)


def billing_accounts_missing_create() -> int:
    """Accounts for tenants that have none (created before billing existed)."""
    created = 0
    for tenant in Tenant.objects.filter(billing_account__isnull=True):
        BillingAccount.objects.get_or_create(tenant=tenant, defaults={"plan": plan_for_tier(tier=tenant.tier)})
        created += 1
    return created


# --- payment state -------------------------------------------------------------------------------


def billing_account_past_due(*, account: BillingAccount, invoice_id: str) -> BillingAccount:
    if account.status != BillingAccount.Status.PAST_DUE:
        account.status = BillingAccount.Status.PAST_DUE
        account.past_due_since = timezone.now()
    account.past_due_invoice_id = invoice_id
    account.save(update_fields=["status", "past_due_since", "past_due_invoice_id", "updated_at"])
    return account


def billing_account_paid(*, account: BillingAccount) -> BillingAccount:
    """An invoice was paid: past due → active, and a suspension for non-payment is lifted."""
    from tenants.services import tenant_activate

    if account.status == BillingAccount.Status.PAST_DUE:
        account.status = BillingAccount.Status.ACTIVE
    account.past_due_since = None
    account.past_due_invoice_id = ""
    lift = account.suspension == BillingAccount.Suspension.NONPAYMENT
    account.suspension = BillingAccount.Suspension.NONE
    account.save(update_fields=["status", "past_due_since", "past_due_invoice_id", "suspension", "updated_at"])
    tenant = account.tenant
    if lift and tenant.status == Tenant.Status.SUSPENDED:
        tenant_activate(tenant=tenant)
    return account


def billing_account_canceled(*, account: BillingAccount, subscription_id: str) -> BillingAccount:
    """The subscription ended: usage can no longer be invoiced until a new one exists
    (tenant_set_tier, or the next accounts_sync, creates it)."""
    if account.stripe_subscription_id == subscription_id:
        account.status = BillingAccount.Status.CANCELED
        account.save(update_fields=["status", "updated_at"])
    return account


def past_due_accounts_suspend(*, now=None) -> list[int]:
    """Suspends tenants past due for longer than BILLING_PAST_DUE_GRACE_SECONDS; returns their ids.
    The reason is what the tenant's API callers see in the 403."""
    from tenants.services import tenant_suspend

    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.BILLING_PAST_DUE_GRACE_SECONDS)
    suspended = []
    candidates = BillingAccount.objects.filter(status=BillingAccount.Status.PAST_DUE, past_due_since__lte=cutoff,
                                               suspension=BillingAccount.Suspension.NONE)
    for account_id in candidates.values_list("id", flat=True):
        with transaction.atomic():
            account = BillingAccount.objects.select_for_update().select_related("tenant").get(pk=account_id)
            if (account.status != BillingAccount.Status.PAST_DUE or account.suspension
                    or account.past_due_since is None or account.past_due_since > cutoff):
                continue
            tenant = account.tenant
            if tenant.status == Tenant.Status.ACTIVE:
                invoice = account.past_due_invoice_id or "an invoice"
                tenant_suspend(tenant=tenant, reason=f"Payment failed: {invoice} is unpaid. Pay it to restore "
                                                     "access to the API.")
                account.suspension = BillingAccount.Suspension.NONPAYMENT
                account.save(update_fields=["suspension", "updated_at"])
                suspended.append(tenant.pk)
    return suspended
