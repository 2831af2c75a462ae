"""Reads on the usage ledger."""
from datetime import datetime

from django.db.models import Sum
from django.db.models.functions import Coalesce

from .models import UsageRecord


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
