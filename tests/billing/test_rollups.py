"""Hourly and daily rollups: incremental, idempotent, late events in the right bucket."""
import random
from datetime import UTC, datetime, timedelta

from django.db.models import Sum

from billing.models import RollupCursor, UsageRecord, UsageRollup
from billing.rollups import usage_records_purge, usage_rollup_catch_up, usage_rollup_run
from billing.services import usage_records_write
from tests.billing.conftest import random_events, usage_event

T0 = datetime(2026, 3, 30, 22, tzinfo=UTC)  # two UTC days, and two months' edge


def rollup_totals(tenant, width: str) -> dict:
    rows = UsageRollup.objects.filter(tenant=tenant, width=width)
    return rows.aggregate(requests=Sum("requests"), prompt=Sum("prompt_tokens"), cached=Sum("cached_tokens"),
                          completion=Sum("completion_tokens"))


def raw_totals(tenant) -> dict:
    rows = UsageRecord.objects.filter(tenant=tenant)
    totals = rows.aggregate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    totals["requests"] = rows.count()
    totals["cached"] = sum(min(r.cached_tokens, r.prompt_tokens) for r in rows)
    return totals


def buckets(tenant, width: str) -> dict:
    return {(r.bucket_start, r.model, r.api_key_id): (r.requests, r.prompt_tokens, r.cached_tokens,
                                                       r.completion_tokens)
            for r in UsageRollup.objects.filter(tenant=tenant, width=width)}


def test_rollups_match_the_ledger_and_rerunning_changes_nothing(make_tenant, billing_settings):
    # given 500 events over 30 hours, across a day and a month boundary
    tk = make_tenant()
    usage_records_write(events=random_events(tk, 500, rng=random.Random(1), start=T0, hours=30))
    # when rolled up
    usage_rollup_catch_up()
    # then hourly and daily totals equal the raw totals
    assert rollup_totals(tk.tenant, "hour") == raw_totals(tk.tenant)
    assert rollup_totals(tk.tenant, "day") == raw_totals(tk.tenant)
    hours = buckets(tk.tenant, "hour")
    days = buckets(tk.tenant, "day")
    assert {b[0].date() for b in days} == {datetime(2026, 3, 30).date(), datetime(2026, 3, 31).date(),
                                           datetime(2026, 4, 1).date()}
    # when every window is rolled up again from scratch (watermark rewound)
    RollupCursor.objects.filter(name="usage").update(settled_id=0, last_id=0, history=[])
    usage_rollup_catch_up()
    # then the same totals, bucket for bucket
    assert buckets(tk.tenant, "hour") == hours and buckets(tk.tenant, "day") == days


def test_a_late_event_lands_in_its_own_hour(make_tenant, billing_settings):
    tk = make_tenant()
    usage_records_write(events=[usage_event(tk, started_at=T0 + timedelta(minutes=5), prompt=100, completion=10)])
    usage_rollup_run()
    # when an event that started two hours before arrives now (a gateway's spool replayed)
    usage_records_write(events=[usage_event(tk, started_at=T0 - timedelta(hours=2, minutes=-1), prompt=7,
                                            completion=3, cached=9)])
    usage_rollup_run()
    # then it is in the 20:00 bucket (cached clamped to the prompt), and 22:00 is unchanged
    hours = {start: values for (start, _, _), values in buckets(tk.tenant, "hour").items()}
    assert hours == {T0 - timedelta(hours=2): (1, 7, 7, 3), T0: (1, 100, 0, 10)}
    assert rollup_totals(tk.tenant, "day")["prompt"] == 107


def test_duplicate_events_count_once(make_tenant, billing_settings):
    tk = make_tenant()
    event = usage_event(tk, started_at=T0, prompt=10, completion=5)
    for _ in range(1000):
        usage_records_write(events=[event])
    usage_records_write(events=[event] * 50)
    usage_rollup_run()
    assert rollup_totals(tk.tenant, "hour") == {"requests": 1, "prompt": 10, "cached": 0, "completion": 5}


def test_a_pass_rescans_rows_a_slow_writer_committed_late(make_tenant, billing_settings):
    # given the settle window, and a pass that saw ids up to A (A's id moved ahead to leave room)
    billing_settings.BILLING_ROLLUP_SETTLE_SECONDS = 3600.0
    usage_rollup_run()
    before = RollupCursor.objects.values("settled_id", "last_id", "history").get(name="usage")
    tk = make_tenant()
    a = usage_event(tk, started_at=T0, prompt=1, completion=1)
    usage_records_write(events=[a])
    original_id = UsageRecord.objects.get(event_id=a.event_id).id
    UsageRecord.objects.filter(event_id=a.event_id).update(id=original_id + 1000)
    try:
        usage_rollup_run()
        # when a row with a lower id than that pass's high commits afterwards (a slow transaction)
        b = usage_event(tk, started_at=T0 + timedelta(hours=1), prompt=5, completion=5)
        usage_records_write(events=[b])
        assert UsageRecord.objects.get(event_id=b.event_id).id < original_id + 1000
        usage_rollup_run()
        # then the next pass still finds it
        assert rollup_totals(tk.tenant, "hour")["prompt"] == 6
    finally:
        UsageRecord.objects.filter(event_id=a.event_id).update(id=original_id)
        UsageRecord.objects.filter(tenant=tk.tenant).exclude(event_id=a.event_id).delete()
        RollupCursor.objects.filter(name="usage").update(**before)


def test_retention_deletes_old_raw_rows_and_keeps_rollups(make_tenant, billing_settings):
    tk = make_tenant()
    old = datetime(2020, 6, 1, 12, tzinfo=UTC)
    usage_records_write(events=[usage_event(tk, started_at=old, prompt=10, completion=1),
                                usage_event(tk, started_at=T0, prompt=20, completion=2)])
    usage_rollup_catch_up()
    billing_settings.BILLING_RAW_RETENTION_DAYS = 365
    usage_records_purge(now=datetime(2026, 4, 2, tzinfo=UTC))
    assert list(UsageRecord.objects.filter(tenant=tk.tenant).values_list("prompt_tokens", flat=True)) == [20]
    assert rollup_totals(tk.tenant, "hour")["prompt"] == 30
