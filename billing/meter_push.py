"""Usage → Stripe Billing Meter events, exactly once.

Planning (`meter_pushes_plan`, in one transaction per dirty tenant-month):
  the billable tokens of each (price line, hour) of the month are computed from the hourly
  rollups (tokens × class, priced by the version in force at the hour, minus the plan's
  included tokens consumed in time order); every (line, hour) whose billable total differs
  from the total already planned gets a MeterPush row holding the delta, the new total and an
  identifier derived from the ledger:
      "{tenant public id hex}:{line id}:{hour epoch}:{n}:{total after}"
  (n = the n-th change of that bucket). The row is the record of what is pushed, written in
  the same transaction that reads the ledger, so a bucket is never planned twice.
Sending (`meter_pushes_send`, after commit): pending rows are locked (SKIP LOCKED, so
  workers share the work), sent with their stored identifier and marked sent. A worker killed
  mid-batch leaves them pending; the next run sends the same identifiers, Stripe answers
  "An event already exists with identifier …" for those it has, and that counts as sent.

Timestamps: the hour the tokens were used in, so Stripe attributes usage to the right period,
but not before the subscription started (usage of the hour a tenant was created in would
otherwise precede its first period and be on no invoice); if that is older than Stripe
accepts (35 days, with an hour's margin) the event is stamped now (it then counts in the
current period; reconciliation of the old month shows it).

Throughput: v1 `meter_events` (synchronous validation; 1,000 calls/s live, one concurrent
call per customer and meter). When more than BILLING_METER_STREAM_THRESHOLD events are
pending, a batch goes through the v2 stream: a meter event session (token valid 15 min,
cached per process, renewed on `temporary_session_expired`) and POST
/v2/billing/meter_event_stream with up to 100 events per call (10,000 calls/s). The stream
validates asynchronously: duplicates of an identifier are dropped by Stripe (still exactly
once); other rejections arrive only as `v1.billing.meter.error_report_triggered` events, so
reconciliation (billing_reconcile) is what proves the totals.
"""
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import stripe
from django.conf import settings
from django.db import transaction
from django.db.models import Max, Sum
from django.utils import timezone

from tenants.models import Tenant

from .accounts import stripe_subscription_ensure
from .models import BillingAccount, MeterPush, MonthlyAllowance, PriceLine, TokenClass, UsageDirtyMonth, UsageRollup
from .price_book import PriceBook, price_book_load
from .pricing import TokenCounts
from .stripe_client import stripe_client, stripe_error_is_duplicate_identifier, stripe_session_client

logger = logging.getLogger(__name__)

STRIPE_PAST_WINDOW = timedelta(days=35) - timedelta(hours=1)
STREAM_MAX_EVENTS = 100
TOKEN_CLASS_ORDER = (TokenClass.INPUT, TokenClass.CACHED_INPUT, TokenClass.OUTPUT)


def period_bounds(period: str) -> tuple[datetime, datetime]:
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def period_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


@dataclass
class MonthBillable:
    """A tenant-month's billable tokens per (line, hour), and what the price book could not price."""

    targets: dict[tuple[int, datetime], int]
    lines: dict[int, PriceLine]
    included_tokens: int
    covered_tokens: int
    unpriced_tokens: dict[str, int]


def month_billable(*, tenant_id: int, period: str, included_tokens: int, book: PriceBook | None = None) -> MonthBillable:
    """Billable tokens per (price line, hour) of one tenant-month, from the hourly rollups.
    The allowance is consumed hour by hour in time order, within an hour by model name and
    then input, cached input, output, so the split is a pure function of the ledger."""
    start, end = period_bounds(period)
    hours = (UsageRollup.objects.filter(tenant_id=tenant_id, width=UsageRollup.Width.HOUR,
                                        bucket_start__gte=start, bucket_start__lt=end)
             .values("bucket_start", "model")
             .annotate(prompt=Sum("prompt_tokens"), cached=Sum("cached_tokens"), completion=Sum("completion_tokens"))
             .order_by("bucket_start", "model"))
    rows = list(hours)
    book = book or price_book_load(models={row["model"] for row in rows})
    remaining = included_tokens
    targets: dict[tuple[int, datetime], int] = {}
    lines: dict[int, PriceLine] = {}
    unpriced: dict[str, int] = defaultdict(int)
    for row in rows:
        counts = TokenCounts(prompt=row["prompt"], cached=row["cached"], completion=row["completion"]).by_class()
        price = book.price_at(row["model"], row["bucket_start"])
        for token_class in TOKEN_CLASS_ORDER:
            tokens = counts[token_class]
            if price is None:
                unpriced[row["model"]] += tokens
                continue
            covered = min(remaining, tokens)
            remaining -= covered
            line = book.line(price, token_class)
            lines[line.pk] = line
            key = (line.pk, row["bucket_start"])
            targets[key] = targets.get(key, 0) + tokens - covered
    return MonthBillable(targets, lines, included_tokens, included_tokens - remaining, dict(unpriced))


def monthly_allowance_get(*, tenant_id: int, period: str, plan_included: int) -> int:
    allowance, _ = MonthlyAllowance.objects.get_or_create(tenant_id=tenant_id, period=period,
                                                          defaults={"included_tokens": plan_included})
    return allowance.included_tokens


def meter_push_identifier(*, tenant: Tenant, line_id: int, bucket_start: datetime, sequence: int,
                          cumulative: int) -> str:
    return f"{tenant.public_id.hex}:{line_id}:{int(bucket_start.timestamp())}:{sequence}:{cumulative}"


def meter_pushes_plan_month(*, dirty: UsageDirtyMonth) -> int:
    """Plans the pushes of one locked dirty tenant-month and deletes it (caller's transaction)."""
    tenant = Tenant.objects.get(pk=dirty.tenant_id)
    account = BillingAccount.objects.select_related("plan").filter(tenant=tenant).first()
    if account is None:
        return 0  # stays dirty until accounts_sync creates the account
    included = monthly_allowance_get(tenant_id=tenant.pk, period=dirty.period,
                                     plan_included=account.plan.included_tokens_per_month)
    billable = month_billable(tenant_id=tenant.pk, period=dirty.period, included_tokens=included)
    start, end = period_bounds(dirty.period)
    pushed: dict[tuple[int, datetime], tuple[int, int]] = {}
    planned = (MeterPush.objects.filter(tenant=tenant, bucket_start__gte=start, bucket_start__lt=end)
               .values("line_id", "bucket_start").annotate(sequence=Max("sequence"), total=Sum("quantity")))
    for row in planned:
        pushed[(row["line_id"], row["bucket_start"])] = (row["sequence"], row["total"])
    new = []
    for key in sorted(set(billable.targets) | set(pushed), key=lambda k: (k[1], k[0])):
        target = billable.targets.get(key, 0)
        sequence, total = pushed.get(key, (0, 0))
        if target == total:
            continue
        line_id, bucket_start = key
        new.append(MeterPush(
            tenant=tenant, line_id=line_id, bucket_start=bucket_start, sequence=sequence + 1,
            quantity=target - total, cumulative_quantity=target,
            identifier=meter_push_identifier(tenant=tenant, line_id=line_id, bucket_start=bucket_start,
                                             sequence=sequence + 1, cumulative=target)))
    MeterPush.objects.bulk_create(new)
    dirty.delete()
    return len(new)


def meter_pushes_plan(*, limit: int = 1000) -> int:
    """Plans every dirty tenant-month (one transaction each; SKIP LOCKED lets workers share)."""
    planned = 0
    for _ in range(limit):
        with transaction.atomic():
            dirty = UsageDirtyMonth.objects.select_for_update(skip_locked=True).order_by("id").first()
            if dirty is None:
                break
            planned += meter_pushes_plan_month(dirty=dirty)
    return planned


# --- sending ---------------------------------------------------------------------------------------


def meter_event_timestamp(*, bucket_start: datetime, now: datetime, not_before: datetime | None = None) -> int:
    """The hour's start, but never before the subscription started (usage stamped before a
    subscription's first period would be on no invoice), never in the future, and `now` when
    the hour is older than Stripe accepts."""
    moment = max(bucket_start, not_before) if not_before else bucket_start
    if moment >= now - STRIPE_PAST_WINDOW:
        return int(min(moment, now).timestamp())
    return int(now.timestamp())


class _StreamSession:
    """The v2 meter event session of this process (renewed a minute before it expires)."""

    token: str | None = None
    expires_at: float = 0.0

    @classmethod
    def get(cls, *, renew: bool = False) -> str:
        if renew or cls.token is None or cls.expires_at - 60 <= time.time():
            session = stripe_client().v2.billing.meter_event_session.create()
            cls.token = session.authentication_token
            expires = session.expires_at
            cls.expires_at = expires.timestamp() if isinstance(expires, datetime) else \
                datetime.fromisoformat(str(expires).replace("Z", "+00:00")).timestamp()
        return cls.token


def _send_v1(push: MeterPush, customer_id: str, timestamp: int) -> None:
    try:
        stripe_client().v1.billing.meter_events.create(
            params={"event_name": push.line.event_name, "identifier": push.identifier, "timestamp": timestamp,
                    "payload": {"stripe_customer_id": customer_id, "value": str(push.quantity)}},
            options={"idempotency_key": f"meter-event-{push.identifier}"},
        )
    except stripe.InvalidRequestError as error:
        if not stripe_error_is_duplicate_identifier(error):
            raise


def _send_stream(batch: list[tuple[MeterPush, str, int]]) -> None:
    events = [{"event_name": push.line.event_name, "identifier": push.identifier,
               "timestamp": datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z"),
               "payload": {"stripe_customer_id": customer_id, "value": str(push.quantity)}}
              for push, customer_id, timestamp in batch]
    for attempt in range(2):
        try:
            stripe_session_client(_StreamSession.get(renew=attempt > 0)).v2.billing.meter_event_stream.create(
                params={"events": events})
            return
        except stripe.TemporarySessionExpiredError:
            continue
    raise RuntimeError("meter event session expired twice in a row")


def meter_pushes_send(*, batch_size: int | None = None, max_batches: int = 50) -> int:
    """Sends pending pushes, a locked batch per transaction. Returns how many were sent.
    Raises on errors worth a task retry (rate limit, connection); a push Stripe rejects for
    good stays pending with `last_error` (reconciliation reports it)."""
    batch_size = batch_size or settings.BILLING_PUSH_BATCH
    sent_total = 0
    skipped: set[int] = set()
    for _ in range(max_batches):
        with transaction.atomic():
            batch = list(MeterPush.objects.select_for_update(skip_locked=True, of=("self",))
                         .select_related("line", "line__price", "tenant")
                         .filter(status=MeterPush.Status.PENDING).exclude(id__in=skipped)
                         .order_by("id")[:batch_size])
            if not batch:
                break
            stream = MeterPush.objects.filter(status=MeterPush.Status.PENDING).count() > \
                settings.BILLING_METER_STREAM_THRESHOLD
            now = timezone.now()
            ready: list[tuple[MeterPush, str, int]] = []
            accounts = {a.tenant_id: a for a in BillingAccount.objects.select_related("tenant", "plan")
                        .filter(tenant_id__in={p.tenant_id for p in batch})}
            lines_by_account: dict[int, list[PriceLine]] = defaultdict(list)
            for push in batch:
                account = accounts.get(push.tenant_id)
                if account is None:
                    skipped.add(push.pk)
                    continue
                lines_by_account[account.pk].append(push.line)
            for account in accounts.values():
                if account.pk in lines_by_account:
                    try:
                        stripe_subscription_ensure(account=account, lines=lines_by_account[account.pk])
                    except stripe.StripeError:
                        logger.warning("Stripe setup of %s failed; its pushes wait", account, exc_info=True)
                        lines_by_account.pop(account.pk)
            for push in batch:
                account = accounts.get(push.tenant_id)
                if account is None or account.pk not in lines_by_account:
                    skipped.add(push.pk)
                    continue
                ready.append((push, account.stripe_customer_id,
                              meter_event_timestamp(bucket_start=push.bucket_start, now=now,
                                                    not_before=account.stripe_subscription_started_at)))
            delivered: list[tuple[MeterPush, int]] = []
            if stream:
                for start in range(0, len(ready), STREAM_MAX_EVENTS):
                    chunk = ready[start:start + STREAM_MAX_EVENTS]
                    _send_stream(chunk)
                    delivered.extend((push, timestamp) for push, _, timestamp in chunk)
            else:
                for push, customer_id, timestamp in ready:
                    try:
                        _send_v1(push, customer_id, timestamp)
                    except (stripe.InvalidRequestError, stripe.PermissionError, stripe.AuthenticationError) as error:
                        push.attempts += 1
                        push.last_error = str(error)[:500]
                        push.save(update_fields=["attempts", "last_error"])
                        skipped.add(push.pk)
                        logger.error("meter event %s rejected: %s", push.identifier, error)
                        continue
                    delivered.append((push, timestamp))
            if settings.BILLING_TEST_TASK_DELAY_SECONDS:
                # Kill tests: Stripe has the batch, the database doesn't know yet.
                time.sleep(settings.BILLING_TEST_TASK_DELAY_SECONDS)
            sent_at = timezone.now()
            for push, timestamp in delivered:
                push.status = MeterPush.Status.SENT
                push.sent_at = sent_at
                push.sent_timestamp = timestamp
                push.attempts += 1
            MeterPush.objects.bulk_update([push for push, _ in delivered],
                                          ["status", "sent_at", "sent_timestamp", "attempts"])
            sent_total += len(delivered)
    return sent_total
