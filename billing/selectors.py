"""Reads on the usage ledger and its rollups."""
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Sum
from django.db.models.functions import Coalesce

from .models import BillingAccount, UsageRecord, UsageRollup
from .price_book import PriceBook, price_book_load
from .pricing import TokenCounts, exact_cost_minor, minor_units_round


def usage_spend_since(*, tenant_id: int, api_key_id: int | None, since: datetime) -> tuple[int, int]:
    """(cost in micros, tokens) recorded for a tenant, or one of its keys, since a time."""
    rows = UsageRecord.objects.filter(tenant_id=tenant_id, started_at__gte=since)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    totals = rows.aggregate(
        micros=Coalesce(Sum("cost_micros"), 0),
        prompt=Coalesce(Sum("prompt_tokens"), 0),
        completion=Coalesce(Sum("completion_tokens"), 0),
    )
    return totals["micros"], totals["prompt"] + totals["completion"]


# --- usage API (GET /v1/usage) ------------------------------------------------------------------

BUCKET_SECONDS = {"1h": 3600, "1d": 86400}


@dataclass
class UsageBucket:
    start_time: int
    end_time: int
    model: str | None
    api_key_id: str | None
    requests: int = 0
    input_tokens: int = 0  # prompt tokens, cached ones included
    cached_input_tokens: int = 0
    output_tokens: int = 0
    exact_cost_minor: Decimal = field(default_factory=Decimal)
    currency: str = ""

    @property
    def cost_minor(self) -> int:
        return minor_units_round(self.exact_cost_minor)


def _exact_cost(book: PriceBook, model: str, at: datetime, prompt: int, cached: int, completion: int
                ) -> tuple[Decimal, str]:
    price = book.price_at(model, at)
    if price is None:
        return Decimal(0), ""
    counts = TokenCounts(prompt=prompt, cached=cached, completion=completion).by_class()
    return sum((exact_cost_minor(tokens=tokens, per_million=price.per_million(token_class), currency=price.currency)
                for token_class, tokens in counts.items()), Decimal(0)), price.currency


def usage_buckets(*, tenant_id: int, start: datetime, end: datetime, bucket_width: str,
                  group_by: Iterable[str] = ()) -> list[UsageBucket]:
    """A tenant's usage per bucket (`1h` from the hourly rollups, `1d` from the daily ones) in
    [start, end) (both on bucket boundaries), optionally per model and/or API key. Costs are
    exact sums of each hour's tokens × the price version in force at that hour; a day whose
    model changed price mid-day is priced from its hourly rows."""
    width = UsageRollup.Width.HOUR if bucket_width == "1h" else UsageRollup.Width.DAY
    seconds = BUCKET_SECONDS[bucket_width]
    by_model = "model" in group_by
    by_key = "api_key" in group_by
    rows = (UsageRollup.objects.filter(tenant_id=tenant_id, width=width, bucket_start__gte=start,
                                       bucket_start__lt=end)
            .values("bucket_start", "model", "api_key__public_id")
            .annotate(requests_sum=Sum("requests"), prompt=Sum("prompt_tokens"), cached=Sum("cached_tokens"),
                      completion=Sum("completion_tokens")))
    rows = list(rows)
    book = price_book_load(models={row["model"] for row in rows})
    buckets: dict[tuple, UsageBucket] = {}
    for row in rows:
        bucket_start = row["bucket_start"]
        model = row["model"] if by_model else None
        api_key_id = str(row["api_key__public_id"]) if by_key else None
        key = (bucket_start, model, api_key_id)
        bucket = buckets.get(key)
        if bucket is None:
            epoch = int(bucket_start.timestamp())
            bucket = buckets[key] = UsageBucket(epoch, epoch + seconds, model, api_key_id)
        bucket.requests += row["requests_sum"]
        bucket.input_tokens += row["prompt"]
        bucket.cached_input_tokens += row["cached"]
        bucket.output_tokens += row["completion"]
        day_end = bucket_start + timedelta(seconds=seconds - 1)
        if width == UsageRollup.Width.HOUR or book.price_at(row["model"], bucket_start) is \
                book.price_at(row["model"], day_end):
            cost, currency = _exact_cost(book, row["model"], bucket_start, row["prompt"], row["cached"],
                                         row["completion"])
        else:
            cost, currency = Decimal(0), ""
            hours = (UsageRollup.objects.filter(tenant_id=tenant_id, width=UsageRollup.Width.HOUR,
                                                model=row["model"], api_key__public_id=row["api_key__public_id"],
                                                bucket_start__gte=bucket_start,
                                                bucket_start__lt=bucket_start + timedelta(days=1)))
            for hour in hours:
                part, currency = _exact_cost(book, hour.model, hour.bucket_start, hour.prompt_tokens,
                                             hour.cached_tokens, hour.completion_tokens)
                cost += part
        bucket.exact_cost_minor += cost
        bucket.currency = bucket.currency or currency
    return sorted(buckets.values(), key=lambda b: (b.start_time, b.model or "", b.api_key_id or ""))


def tenant_invoices_list(*, tenant_id: int, limit: int = 24) -> list:
    """The tenant's invoices, newest first, from Stripe (no local copy)."""
    from .stripe_client import stripe_client

    account = BillingAccount.objects.filter(tenant_id=tenant_id).first()
    if account is None or not account.stripe_customer_id:
        return []
    page = stripe_client().v1.invoices.list(params={"customer": account.stripe_customer_id, "limit": limit})
    return list(page.data)
