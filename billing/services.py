"""Writes on the usage ledger."""
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from uuid import UUID

from django.db import transaction

from tenants.models import ApiKey

from .models import BudgetAlert, UsageRecord


@dataclass(slots=True)
class UsageEvent:
    """One finished request, as the gateway saw it. Plain data, so it can cross
    threads and queues; `usage_records_write` turns it into a row."""

    event_id: UUID
    request_id: str
    tenant_id: int
    api_key_id: int
    model: str
    backend: str
    endpoint: str
    transport: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_micros: int
    status: str
    http_status: int
    error_code: str
    ttft_ms: float | None
    latency_ms: float
    started_at: datetime
    finished_at: datetime


def usage_records_write(*, events: Iterable[UsageEvent]) -> int:
    """Stores events not stored yet (by event_id) and marks their keys used.
    Returns how many events were given."""
    rows = [UsageRecord(**asdict(event)) for event in events]
    if not rows:
        return 0
    last_used: dict[int, datetime] = {}
    for row in rows:
        last_used[row.api_key_id] = max(row.finished_at, last_used.get(row.api_key_id, row.finished_at))
    with transaction.atomic():
        UsageRecord.objects.bulk_create(rows, ignore_conflicts=True)
        for api_key_id, at in last_used.items():
            ApiKey.objects.filter(pk=api_key_id).update(last_used_at=at)
    return len(rows)


def budget_alert_record(*, tenant_id: int, api_key_id: int | None, period: str, kind: str, budget: str) -> bool:
    """Records a budget alert; returns False when this one was recorded before."""
    _, created = BudgetAlert.objects.get_or_create(
        tenant_id=tenant_id, api_key_id=api_key_id, period=period, kind=kind, budget=budget
    )
    return created
