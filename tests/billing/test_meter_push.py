"""Usage reaches Stripe's meters exactly once: duplicates, retries, lost acknowledgements,
late events and the free allowance; reconciliation agrees; Stripe's invoice is our cost."""
import io
import random
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

from django.core.management import call_command
from django.utils import timezone

from billing.meter_push import meter_pushes_plan, meter_pushes_send
from billing.models import MeterPush, PriceLine, UsageRecord
from billing.rollups import usage_rollup_catch_up
from billing.services import usage_records_write
from tests.billing.conftest import TEST_PRICES, random_events, usage_event


def billing_cycle() -> None:
    usage_rollup_catch_up()
    meter_pushes_plan()
    meter_pushes_send()


def ledger_tokens_by_class(tenant) -> dict[str, int]:
    totals = defaultdict(int)
    for row in UsageRecord.objects.filter(tenant=tenant):
        cached = min(row.cached_tokens, row.prompt_tokens)
        totals["input"] += row.prompt_tokens - cached
        totals["cached_input"] += cached
        totals["output"] += row.completion_tokens
    return dict(totals)


def stripe_tokens_by_class(stripe_local, account, model: str = "billing-llm") -> dict[str, int]:
    totals = {}
    for line in PriceLine.objects.filter(price__model=model):
        total = stripe_local.meter_total(customer=account.stripe_customer_id, event_name=line.event_name)
        totals[line.token_class] = int(total)
    return totals


def reconcile(period: str, tenant) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("billing_reconcile", period=period, tenant=tenant.slug, stdout=out)
        return 0, out.getvalue()
    except SystemExit as exit:
        return exit.code, out.getvalue()


def periods_of(tenant) -> set[str]:
    return {r.started_at.strftime("%Y-%m") for r in UsageRecord.objects.filter(tenant=tenant)}


def test_random_retries_and_duplicates_bill_exactly_the_ledger(billing_tenant, stripe_local, monkeypatch):
    rng = random.Random(7)
    tk = billing_tenant()
    now = timezone.now()
    # The last 5 hours of this month (stamped at the subscription's start in Stripe, this month too).
    start = max(now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=5),
                now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    hours = max(1, int((now - start).total_seconds() // 3600))
    events = random_events(tk, 1000, rng=rng, start=start, hours=hours)
    crash_budget = {"n": 3}
    real_bulk_update = MeterPush.objects.bulk_update

    def bulk_update_sometimes_lost(objs, fields, **kwargs):
        # The worker "dies" after Stripe accepted the events but before they are marked sent.
        if crash_budget["n"] > 0 and rng.random() < 0.5:
            crash_budget["n"] -= 1
            raise ConnectionError("worker died before marking the batch sent")
        return real_bulk_update(objs, fields, **kwargs)

    monkeypatch.setattr(MeterPush.objects, "bulk_update", bulk_update_sometimes_lost)
    # when events arrive in random batches, each batch possibly written again (a retried
    # gateway write), some events repeated across batches, with billing cycles in between
    written = 0
    while written < len(events):
        size = rng.randrange(1, 120)
        batch = events[written:written + size]
        batch += rng.sample(events[:written + size], k=min(5, written + size))  # duplicates
        for _ in range(rng.choice([1, 1, 2, 3])):
            usage_records_write(events=batch)
        written += size
        if rng.random() < 0.3:
            try:
                billing_cycle()
            except ConnectionError:
                pass
    for _ in range(6):
        try:
            billing_cycle()
        except ConnectionError:
            continue
    # and some pushes Stripe already has are resent (an acknowledgement lost)
    MeterPush.objects.filter(tenant=tk.tenant, pk__in=list(
        MeterPush.objects.filter(tenant=tk.tenant).values_list("pk", flat=True)[:10])).update(status="pending")
    billing_cycle()
    # then every push is sent, and Stripe's meter totals equal the ledger exactly
    assert UsageRecord.objects.filter(tenant=tk.tenant).count() == len(events)
    assert not MeterPush.objects.filter(tenant=tk.tenant, status="pending").exists()
    assert stripe_tokens_by_class(stripe_local, tk.account) == ledger_tokens_by_class(tk.tenant)
    # and each identifier reached Stripe once
    identifiers = [e["identifier"] for e in stripe_local.meter_events(customer=tk.account.stripe_customer_id)]
    assert len(identifiers) == len(set(identifiers)) == MeterPush.objects.filter(tenant=tk.tenant).count()
    for period in periods_of(tk.tenant):
        code, output = reconcile(period, tk.tenant)
        assert code == 0, output


def test_a_thousand_copies_of_one_event_bill_once(billing_tenant, stripe_local):
    tk = billing_tenant()
    event = usage_event(tk, started_at=timezone.now() - timedelta(seconds=1), prompt=1234, completion=56, cached=34)
    for _ in range(10):
        usage_records_write(events=[event] * 100)
        billing_cycle()
    assert stripe_tokens_by_class(stripe_local, tk.account) == {"input": 1200, "cached_input": 34, "output": 56}
    assert MeterPush.objects.filter(tenant=tk.tenant).count() == 3


def test_a_late_event_is_pushed_as_a_new_delta(billing_tenant, stripe_local):
    tk = billing_tenant()
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    usage_records_write(events=[usage_event(tk, started_at=timezone.now(), prompt=100, completion=10)])
    billing_cycle()
    # when an event of the same hour arrives after that hour was pushed
    usage_records_write(events=[usage_event(tk, started_at=hour, prompt=50, completion=5)])
    billing_cycle()
    # then a second push with the next sequence and the new total; Stripe has the sum
    pushes = MeterPush.objects.filter(tenant=tk.tenant, line__token_class="input").order_by("sequence")
    assert [(p.sequence, p.quantity, p.cumulative_quantity) for p in pushes] == [(1, 100, 100), (2, 50, 150)]
    assert pushes[1].identifier.endswith(":2:150")
    assert stripe_tokens_by_class(stripe_local, tk.account) == {"input": 150, "cached_input": 0, "output": 15}


def test_free_plan_bills_only_beyond_its_included_tokens(billing_tenant, stripe_local):
    from billing.models import MonthlyAllowance
    from tenants.services import tenant_set_tier

    tk = billing_tenant(tier="free")  # 1,000,000 included tokens a month
    now = timezone.now()
    usage_records_write(events=[usage_event(tk, started_at=now, prompt=600_000, completion=0),
                                usage_event(tk, started_at=now, prompt=0, completion=500_000)])
    billing_cycle()
    # input is consumed first within the hour: 600,000 input + 400,000 output are included
    assert stripe_tokens_by_class(stripe_local, tk.account) == {"input": 0, "cached_input": 0, "output": 100_000}
    # an upgrade mid-month keeps this month's allowance (frozen when the month was first billed)
    tenant_set_tier(tenant=tk.tenant, tier="standard")
    usage_records_write(events=[usage_event(tk, started_at=timezone.now(), prompt=0, completion=1)])
    billing_cycle()
    assert MonthlyAllowance.objects.get(tenant=tk.tenant, period=now.strftime("%Y-%m")).included_tokens == 1_000_000
    assert stripe_tokens_by_class(stripe_local, tk.account)["output"] == 100_001


def test_reconcile_reports_a_mismatch_and_exits_non_zero(billing_tenant, stripe_local):
    tk = billing_tenant()
    usage_records_write(events=[usage_event(tk, started_at=timezone.now(), prompt=10, completion=1)])
    billing_cycle()
    period = timezone.now().strftime("%Y-%m")
    code, output = reconcile(period, tk.tenant)
    assert code == 0, output
    assert "billable=10 planned=10 sent=10 stripe=10" in output
    # when an event is in the ledger but not rolled up or pushed yet
    usage_records_write(events=[usage_event(tk, started_at=timezone.now(), prompt=5, completion=0)])
    code, output = reconcile(period, tk.tenant)
    assert code == 1 and "MISMATCH raw events ≠ hourly rollups" in output


def test_the_stripe_invoice_equals_our_cost(billing_tenant, stripe_local):
    """Stripe's invoice line = quantity × unit_amount_decimal rounded once, as our rule says."""
    from billing.reconcile import reconcile_period

    tk = billing_tenant()
    # 1,000,001 output tokens at $0.60/1M = 60.00006 cents → 60; 3,333 input at $0.15/1M = 0.049995 → 0
    usage_records_write(events=[usage_event(tk, started_at=timezone.now(), prompt=3333, completion=1_000_001)])
    billing_cycle()
    [report] = reconcile_period(period=timezone.now().strftime("%Y-%m"), tenant_slug=tk.tenant.slug)
    assert report.cost_minor == 60 and not report.problems
    status, invoice = stripe_local.local("POST", f"/_local/subscriptions/{tk.account.stripe_subscription_id}/close_period")
    assert status == 200, invoice
    assert invoice["amount_due"] == report.cost_minor
    assert TEST_PRICES["billing-llm"][2] == Decimal("0.6")
