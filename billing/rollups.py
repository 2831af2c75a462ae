"""Hourly and daily usage rollups, rebuilt from the raw ledger, and raw-row retention.

Algorithm (`usage_rollup_run`, one pass, one transaction, passes serialised by a row lock):
1. Find work by the ingestion watermark: rows with `settled_id < id <= high`, where `high`
   is the largest id now (at most BILLING_ROLLUP_MAX_ROWS past the last pass's) and
   `settled_id` the largest id seen by a pass at least
   BILLING_ROLLUP_SETTLE_SECONDS ago (so a row whose transaction committed after a
   higher id was visible is still found; rescanning is harmless, see 2).
2. Their distinct (tenant, hour of `started_at`) are the dirty hours. Each dirty hour is
   rebuilt from ALL its raw rows (INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE SET
   totals = the new totals), never incremented: re-running any window gives the same
   totals, and a late event (old `started_at`, new id) lands in its own hour.
3. The days holding dirty hours are rebuilt from their hourly rows the same way.
4. The dirty tenant-months are recorded (UsageDirtyMonth) for the meter push planner.
5. The watermark moves, in the same transaction: a pass killed half way changes nothing.
"""
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from .models import RollupCursor, UsageRecord

logger = logging.getLogger(__name__)

CURSOR_NAME = "usage"
PURGE_BATCH_ROWS = 50_000


@dataclass(frozen=True, slots=True)
class RollupResult:
    scanned_from_id: int
    scanned_to_id: int
    dirty_hours: int
    hourly_rows: int
    daily_rows: int


def _settle(cursor_row: RollupCursor, *, now_epoch: float, high: int) -> None:
    history = [entry for entry in cursor_row.history if entry[1] > cursor_row.settled_id]
    history.append([now_epoch, high])
    horizon = now_epoch - settings.BILLING_ROLLUP_SETTLE_SECONDS
    settled = [entry[1] for entry in history if entry[0] <= horizon]
    if settled:
        cursor_row.settled_id = max(cursor_row.settled_id, max(settled))
    cursor_row.history = [entry for entry in history if entry[1] > cursor_row.settled_id][-1000:]
    cursor_row.last_id = max(cursor_row.last_id, high)


def usage_rollup_run(*, max_rows: int | None = None) -> RollupResult:
    """One rollup pass (see the module docstring). Safe to run at any time, concurrently or
    after a crash: passes queue on the cursor's row lock and rebuild rather than add."""
    max_rows = max_rows or settings.BILLING_ROLLUP_MAX_ROWS
    with transaction.atomic():
        RollupCursor.objects.get_or_create(name=CURSOR_NAME)
        cursor_row = RollupCursor.objects.select_for_update().get(name=CURSOR_NAME)
        low = cursor_row.settled_id
        with connection.cursor() as cursor:
            cursor.execute("SELECT coalesce(max(id), 0) FROM billing_usagerecord")
            # Rows in (settled_id, last_id] are rescanned; at most max_rows new ones are added.
            high = min(cursor.fetchone()[0], max(cursor_row.last_id, low) + max_rows)
            if high <= low:
                _settle(cursor_row, now_epoch=time.time(), high=high)
                cursor_row.save()
                return RollupResult(low, high, 0, 0, 0)
            # Dirty hours: (tenant, hour) of every row ingested in the window.
            cursor.execute(
                """
                CREATE TEMP TABLE billing_dirty_hour ON COMMIT DROP AS
                SELECT DISTINCT tenant_id, date_trunc('hour', started_at, 'UTC') AS hour
                FROM billing_usagerecord WHERE id > %s AND id <= %s
                """,
                [low, high],
            )
            cursor.execute("SELECT count(*) FROM billing_dirty_hour")
            dirty_hours = cursor.fetchone()[0]
            if settings.BILLING_TEST_TASK_DELAY_SECONDS:
                time.sleep(settings.BILLING_TEST_TASK_DELAY_SECONDS)
            cursor.execute(
                """
                INSERT INTO billing_usagerollup
                    (tenant_id, api_key_id, model, adapter, width, bucket_start, requests,
                     prompt_tokens, cached_tokens, completion_tokens, updated_at)
                SELECT r.tenant_id, r.api_key_id, r.model, NULL, 'hour', d.hour, count(*),
                       sum(r.prompt_tokens), sum(least(r.cached_tokens, r.prompt_tokens)),
                       sum(r.completion_tokens), now()
                FROM billing_dirty_hour d
                JOIN billing_usagerecord r
                  ON r.tenant_id = d.tenant_id
                 AND r.started_at >= d.hour AND r.started_at < d.hour + interval '1 hour'
                GROUP BY r.tenant_id, r.api_key_id, r.model, d.hour
                ON CONFLICT ON CONSTRAINT usage_rollup_unique_bucket DO UPDATE SET
                    requests = EXCLUDED.requests, prompt_tokens = EXCLUDED.prompt_tokens,
                    cached_tokens = EXCLUDED.cached_tokens, completion_tokens = EXCLUDED.completion_tokens,
                    updated_at = EXCLUDED.updated_at
                """
            )
            hourly_rows = cursor.rowcount
            cursor.execute(
                """
                INSERT INTO billing_usagerollup
                    (tenant_id, api_key_id, model, adapter, width, bucket_start, requests,
                     prompt_tokens, cached_tokens, completion_tokens, updated_at)
                SELECT h.tenant_id, h.api_key_id, h.model, h.adapter, 'day', dd.day, sum(h.requests),
                       sum(h.prompt_tokens), sum(h.cached_tokens), sum(h.completion_tokens), now()
                FROM (SELECT DISTINCT tenant_id, date_trunc('day', hour, 'UTC') AS day FROM billing_dirty_hour) dd
                JOIN billing_usagerollup h
                  ON h.tenant_id = dd.tenant_id AND h.width = 'hour'
                 AND h.bucket_start >= dd.day AND h.bucket_start < dd.day + interval '1 day'
                GROUP BY h.tenant_id, h.api_key_id, h.model, h.adapter, dd.day
                ON CONFLICT ON CONSTRAINT usage_rollup_unique_bucket DO UPDATE SET
                    requests = EXCLUDED.requests, prompt_tokens = EXCLUDED.prompt_tokens,
                    cached_tokens = EXCLUDED.cached_tokens, completion_tokens = EXCLUDED.completion_tokens,
                    updated_at = EXCLUDED.updated_at
                """
            )
            daily_rows = cursor.rowcount
            # DO UPDATE (not DO NOTHING) so this waits for a planner holding the row: the
            # planner then deletes it and this insert re-creates it (see meter_push).
            cursor.execute(
                """
                INSERT INTO billing_usagedirtymonth (tenant_id, period)
                SELECT DISTINCT tenant_id, to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM') FROM billing_dirty_hour
                ON CONFLICT ON CONSTRAINT usage_dirty_month_unique DO UPDATE SET period = EXCLUDED.period
                """
            )
        _settle(cursor_row, now_epoch=time.time(), high=high)
        cursor_row.save()
    return RollupResult(low, high, dirty_hours, hourly_rows, daily_rows)


def usage_rollup_catch_up(*, max_passes: int = 100) -> list[RollupResult]:
    """Passes until the watermark reaches the newest row (a backlog larger than one pass)."""
    results = []
    for _ in range(max_passes):
        result = usage_rollup_run()
        results.append(result)
        with connection.cursor() as cursor:
            cursor.execute("SELECT coalesce(max(id), 0) FROM billing_usagerecord")
            if result.scanned_to_id >= cursor.fetchone()[0]:
                break
    return results


def usage_records_purge(*, now=None) -> int:
    """Deletes raw rows older than BILLING_RAW_RETENTION_DAYS that a rollup pass has settled
    (so they are in the rollups); rollups are kept for good. Returns rows deleted."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.BILLING_RAW_RETENTION_DAYS)
    cursor_row = RollupCursor.objects.filter(name=CURSOR_NAME).first()
    if cursor_row is None:
        return 0
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(UsageRecord.objects.filter(started_at__lt=cutoff, id__lte=cursor_row.settled_id)
                       .values_list("id", flat=True)[:PURGE_BATCH_ROWS])
            if not ids:
                return deleted
            deleted += UsageRecord.objects.filter(id__in=ids).delete()[0]
