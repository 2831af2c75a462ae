"""Reconciliation of one calendar month (UTC): per tenant, raw-event tokens, rollup tokens,
the billable tokens per price line against the quantities planned, sent and accepted by
Stripe (meter event summaries), and the cost. Any difference is a mismatch."""
from dataclasses import dataclass, field
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.db.models.functions import Least

from tenants.models import Tenant

from .meter_push import month_billable, period_bounds
from .models import BillingAccount, MeterPush, MonthlyAllowance, PriceLine, UsageRecord, UsageRollup
from .pricing import minor_units_round, exact_cost_minor
from .stripe_client import stripe_client


@dataclass
class LineReport:
    event_name: str
    billable: int
    planned: int
    sent: int
    stripe: Decimal | None
    cost_minor: int


@dataclass
class TenantReport:
    slug: str
    raw: dict
    hourly: dict
    daily: dict
    lines: list[LineReport] = field(default_factory=list)
    unpriced: dict = field(default_factory=dict)
    cost_minor: int = 0
    currency: str = ""
    problems: list[str] = field(default_factory=list)


def _token_sums(queryset, *, prompt: str, cached: str, completion: str, requests: str | None) -> dict:
    totals = queryset.aggregate(prompt=Sum(prompt), cached=Sum(cached), completion=Sum(completion),
                                **({"requests": Sum(requests)} if requests else {"requests": Count("id")}))
    return {name: int(value or 0) for name, value in totals.items()}


def reconcile_period(*, period: str, with_stripe: bool = True, tenant_slug: str | None = None) -> list[TenantReport]:
    start, end = period_bounds(period)
    tenant_ids = set(UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end)
                     .values_list("tenant_id", flat=True).distinct())
    tenant_ids |= set(UsageRollup.objects.filter(bucket_start__gte=start, bucket_start__lt=end)
                      .values_list("tenant_id", flat=True).distinct())
    tenant_ids |= set(MeterPush.objects.filter(bucket_start__gte=start, bucket_start__lt=end)
                      .values_list("tenant_id", flat=True).distinct())
    reports = []
    client = stripe_client() if with_stripe else None
    tenants = Tenant.objects.filter(pk__in=tenant_ids).order_by("slug")
    if tenant_slug is not None:
        tenants = tenants.filter(slug=tenant_slug)
    for tenant in tenants:
        raw_rows = UsageRecord.objects.filter(tenant=tenant, started_at__gte=start, started_at__lt=end)
        # Rollups clamp cached to prompt tokens; the raw side does the same for comparison.
        raw = _token_sums(raw_rows, prompt="prompt_tokens", cached=Least("cached_tokens", "prompt_tokens"),
                          completion="completion_tokens", requests=None)
        rollups = UsageRollup.objects.filter(tenant=tenant, bucket_start__gte=start, bucket_start__lt=end)
        hourly = _token_sums(rollups.filter(width="hour"), prompt="prompt_tokens", cached="cached_tokens",
                             completion="completion_tokens", requests="requests")
        daily = _token_sums(rollups.filter(width="day"), prompt="prompt_tokens", cached="cached_tokens",
                            completion="completion_tokens", requests="requests")
        report = TenantReport(tenant.slug, raw, hourly, daily)
        if raw != hourly:
            report.problems.append("raw events ≠ hourly rollups (rollup pending, or raw rows purged)")
        if hourly != daily:
            report.problems.append("hourly ≠ daily rollups")
        account = BillingAccount.objects.filter(tenant=tenant).first()
        allowance = MonthlyAllowance.objects.filter(tenant=tenant, period=period).first()
        included = allowance.included_tokens if allowance else (account.plan.included_tokens_per_month
                                                                if account else 0)
        billable = month_billable(tenant_id=tenant.pk, period=period, included_tokens=included)
        report.unpriced = billable.unpriced_tokens
        pushes = (MeterPush.objects.filter(tenant=tenant, bucket_start__gte=start, bucket_start__lt=end)
                  .values("line_id").annotate(planned=Sum("quantity"),
                                              sent=Sum("quantity", filter=Q(status=MeterPush.Status.SENT))))
        pushed = {row["line_id"]: (int(row["planned"] or 0), int(row["sent"] or 0)) for row in pushes}
        per_line: dict[int, int] = {}
        for (line_id, _), tokens in billable.targets.items():
            per_line[line_id] = per_line.get(line_id, 0) + tokens
        lines = {line.pk: line for line in PriceLine.objects.select_related("price")
                 .filter(pk__in=set(per_line) | set(pushed))}
        for line_id in sorted(lines, key=lambda i: lines[i].event_name):
            line = lines[line_id]
            tokens = per_line.get(line_id, 0)
            planned, sent = pushed.get(line_id, (0, 0))
            stripe_total = None
            if client is not None and account is not None and account.stripe_customer_id and line.stripe_meter_id:
                summaries = client.v1.billing.meters.event_summaries.list(
                    line.stripe_meter_id,
                    params={"customer": account.stripe_customer_id, "start_time": int(start.timestamp()),
                            "end_time": int(end.timestamp())})
                stripe_total = sum((Decimal(str(s.aggregated_value)) for s in summaries.data), Decimal(0))
            cost = minor_units_round(exact_cost_minor(tokens=tokens, per_million=line.price.per_million(
                line.token_class), currency=line.price.currency))
            report.currency = line.price.currency
            report.cost_minor += cost
            report.lines.append(LineReport(line.event_name, tokens, planned, sent, stripe_total, cost))
            if planned != tokens:
                report.problems.append(f"{line.event_name}: billable {tokens} ≠ planned {planned}")
            if sent != planned:
                report.problems.append(f"{line.event_name}: {planned - sent} planned tokens not sent yet")
            if with_stripe and (stripe_total is None or stripe_total != sent):
                report.problems.append(f"{line.event_name}: sent {sent} ≠ accepted by Stripe {stripe_total}")
        reports.append(report)
    return reports
