"""The usage ledger (one UsageRecord per request served through the gateway), its rollups,
the price book and plans, and the Stripe side of billing. See billing/README.md."""
import uuid
from decimal import Decimal

from django.db import models

from tenants.models import ApiKey, Tenant, TimeStampedModel


class UsageRecord(models.Model):
    class Status(models.TextChoices):
        OK = "ok", "Completed"
        ERROR = "error", "Failed"
        ABORTED = "aborted", "Aborted"

    # Idempotency: a record written twice (a retried batch) is stored once.
    event_id = models.UUIDField(unique=True)
    # The response id the client saw (chatcmpl-…, cmpl-…).
    request_id = models.CharField(max_length=64)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="usage_records")
    api_key = models.ForeignKey(ApiKey, on_delete=models.PROTECT, related_name="usage_records")
    # As the client named it.
    model = models.CharField(max_length=200)
    backend = models.CharField(max_length=300, blank=True, default="")
    endpoint = models.CharField(max_length=32)  # chat.completions | completions | embeddings
    transport = models.CharField(max_length=16)  # http | websocket
    stream = models.BooleanField(default=False)
    # Token counts as the backend reported them; for failed and aborted streams,
    # what was delivered to the client.
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    # Millionths of the model's currency unit at the model's budget price, rounded up.
    cost_micros = models.PositiveBigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices)
    http_status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True, default="")
    # Milliseconds from the request's arrival to the first content token; null if none.
    ttft_ms = models.FloatField(null=True, blank=True)
    # Milliseconds from the request's arrival to its end.
    latency_ms = models.FloatField()
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "started_at"], name="usage_tenant_started_idx"),
            models.Index(fields=["api_key", "started_at"], name="usage_key_started_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.status}"


class BudgetAlert(models.Model):
    """A tenant or key crossed a budget threshold; recorded once per month and kind."""

    class Kind(models.TextChoices):
        SOFT = "soft", "Soft threshold reached"
        HARD = "hard", "Budget exhausted"

    class Budget(models.TextChoices):
        SPEND = "spend", "Spend"
        TOKENS = "tokens", "Tokens"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budget_alerts")
    # Null for the tenant's own budget.
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=7)  # YYYY-MM, UTC
    kind = models.CharField(max_length=8, choices=Kind.choices)
    budget = models.CharField(max_length=8, choices=Budget.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "api_key", "period", "kind", "budget"],
                nulls_distinct=False,
                name="budget_alert_once_per_period",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.period} {self.budget} {self.kind}"


# --- Price book and plans -----------------------------------------------------------------------


class TokenClass(models.TextChoices):
    """The three billed quantities of a request. `input` is prompt tokens not served from the
    prefix cache (prompt − cached), `cached_input` the cached ones, `output` completion tokens."""

    INPUT = "input", "Input tokens"
    CACHED_INPUT = "cached_input", "Cached input tokens"
    OUTPUT = "output", "Output tokens"


class Price(TimeStampedModel):
    """One version of a model's prices, in force from `effective_from` until the next version's
    `effective_from`. Rows are never edited once in force: a change is a new version, so the
    cost of past usage never changes. `effective_from` falls on a whole UTC hour, so an hourly
    rollup bucket is priced by exactly one version."""

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # As clients name it in `model` (UsageRecord.model, inference.ServedModel.name).
    model = models.CharField(max_length=200)
    version = models.CharField(max_length=64)
    # ISO 4217, lower case; every price is in BILLING_CURRENCY (one Stripe subscription each).
    currency = models.CharField(max_length=3)
    # Currency units (dollars, not cents) per 1,000,000 tokens.
    input_per_million = models.DecimalField(max_digits=16, decimal_places=8)
    cached_input_per_million = models.DecimalField(max_digits=16, decimal_places=8)
    output_per_million = models.DecimalField(max_digits=16, decimal_places=8)
    effective_from = models.DateTimeField()

    class Meta:
        ordering = ["model", "effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="price_unique_model_effective_from"),
            models.UniqueConstraint(fields=["model", "version"], name="price_unique_model_version"),
        ]

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"

    def per_million(self, token_class: str) -> Decimal:
        return {
            TokenClass.INPUT: self.input_per_million,
            TokenClass.CACHED_INPUT: self.cached_input_per_million,
            TokenClass.OUTPUT: self.output_per_million,
        }[token_class]


class PriceLine(TimeStampedModel):
    """A price version × token class: what one Stripe meter counts and one Stripe metered price
    bills (tokens × unit_amount_decimal, rounded once per invoice line). The Stripe ids are
    filled by `stripe_catalog_sync`."""

    price = models.ForeignKey(Price, on_delete=models.PROTECT, related_name="lines")
    token_class = models.CharField(max_length=16, choices=TokenClass.choices)
    # The Stripe meter's event_name (≤ 100 characters, one meter per name).
    event_name = models.CharField(max_length=100, unique=True)
    stripe_meter_id = models.CharField(max_length=100, blank=True, default="")
    stripe_price_id = models.CharField(max_length=100, blank=True, default="")

    class Meta:
        ordering = ["price_id", "token_class"]
        constraints = [
            models.UniqueConstraint(fields=["price", "token_class"], name="price_line_unique_class"),
        ]

    def __str__(self) -> str:
        return self.event_name


class Plan(TimeStampedModel):
    """What a tenant of a tier pays: the price book's prices for every token beyond
    `included_tokens_per_month` (all classes together, consumed in time order)."""

    code = models.SlugField(max_length=32, unique=True)
    name = models.CharField(max_length=100)
    # The tenant tier (tenants.Tenant.Tier) this plan serves.
    tier = models.CharField(max_length=16, unique=True)
    included_tokens_per_month = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return self.code


class BillingAccount(TimeStampedModel):
    """A tenant's billing state and its Stripe customer and subscription."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        PAST_DUE = "past_due", "Past due"
        CANCELED = "canceled", "Canceled"

    class Suspension(models.TextChoices):
        NONE = "", "Not suspended by billing"
        NONPAYMENT = "nonpayment", "Suspended for non-payment"

    tenant = models.OneToOneField(Tenant, on_delete=models.PROTECT, related_name="billing_account")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="accounts")
    stripe_customer_id = models.CharField(max_length=100, null=True, blank=True, unique=True)
    stripe_subscription_id = models.CharField(max_length=100, null=True, blank=True, unique=True)
    # When that subscription started: meter events are never stamped earlier (Stripe would leave
    # usage before a subscription's first period off every invoice).
    stripe_subscription_started_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    past_due_since = models.DateTimeField(null=True, blank=True)
    # The invoice whose failed payment made the account past due (shown in the suspension reason).
    past_due_invoice_id = models.CharField(max_length=100, blank=True, default="")
    # Set when billing suspended the tenant, so only billing lifts that suspension.
    suspension = models.CharField(max_length=16, choices=Suspension.choices, blank=True, default="")

    def __str__(self) -> str:
        return f"{self.tenant} ({self.plan}, {self.status})"


class MonthlyAllowance(models.Model):
    """The included tokens of one tenant and calendar month (UTC), frozen the first time the
    month is billed, so a later plan change never rewrites a month already being billed."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=7)  # YYYY-MM, UTC
    included_tokens = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "period"], name="monthly_allowance_unique_period"),
        ]


class SubscriptionItem(TimeStampedModel):
    """The Stripe subscription item that bills one price line for one account."""

    account = models.ForeignKey(BillingAccount, on_delete=models.CASCADE, related_name="items")
    line = models.ForeignKey(PriceLine, on_delete=models.PROTECT, related_name="+")
    stripe_subscription_id = models.CharField(max_length=100)
    stripe_item_id = models.CharField(max_length=100, unique=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "line", "stripe_subscription_id"],
                                    name="subscription_item_unique_line"),
        ]


# --- Rollups -------------------------------------------------------------------------------------


class UsageRollup(models.Model):
    """Usage totals of one bucket (an hour or a UTC day) per tenant × model × API key × adapter.
    Rebuilt from the raw rows (never incremented), so recomputing a bucket is idempotent."""

    class Width(models.TextChoices):
        HOUR = "hour", "Hour"
        DAY = "day", "Day"

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    api_key = models.ForeignKey(ApiKey, on_delete=models.PROTECT, related_name="+")
    model = models.CharField(max_length=200)
    # LoRA adapter name, once adapters exist; null = the base model.
    adapter = models.CharField(max_length=200, null=True, blank=True)
    width = models.CharField(max_length=4, choices=Width.choices)
    bucket_start = models.DateTimeField()  # UTC, on the hour / midnight
    requests = models.PositiveBigIntegerField(default=0)
    # Prompt tokens, cached ones included (as OpenAI reports them).
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    # Of the prompt tokens, those served from the prefix cache (never more than prompt_tokens).
    cached_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "width", "bucket_start", "model", "api_key", "adapter"],
                nulls_distinct=False,
                name="usage_rollup_unique_bucket",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "width", "bucket_start"], name="rollup_tenant_width_start_idx"),
        ]


class RollupCursor(models.Model):
    """The rollup's ingestion watermark over UsageRecord.id (a sequence: the database assigns
    it, whatever the writer sends). `history` keeps recent `[epoch_s, max_id]` passes; rows up
    to the max id of a pass at least BILLING_ROLLUP_SETTLE_SECONDS old are surely committed,
    so each pass rescans from there (`settled_id`) and a slow committer is never skipped."""

    name = models.CharField(max_length=32, unique=True)
    settled_id = models.BigIntegerField(default=0)
    last_id = models.BigIntegerField(default=0)
    history = models.JSONField(default=list)
    updated_at = models.DateTimeField(auto_now=True)


class UsageDirtyMonth(models.Model):
    """A tenant-month whose hourly rollups changed and whose meter pushes must be re-planned.
    Written in the rollup's transaction, deleted in the planner's: a crash of either leaves it."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=7)  # YYYY-MM, UTC

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "period"], name="usage_dirty_month_unique"),
        ]


# --- Stripe --------------------------------------------------------------------------------------


class MeterPush(models.Model):
    """One meter event: the change of a (tenant, price line, hour) billable total since the
    previous push. Planned in a transaction that reads the ledger; sent after commit. The
    identifier is derived from the ledger and stored, so every retry of this delta sends the
    same identifier and Stripe counts it once."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    line = models.ForeignKey(PriceLine, on_delete=models.PROTECT, related_name="+")
    bucket_start = models.DateTimeField()  # the hour the tokens were used in (UTC)
    # 1, 2, … per (tenant, line, bucket): the n-th change of that bucket's total.
    sequence = models.PositiveIntegerField()
    # Tokens: the delta sent (may be negative when an allowance shifts) and the total after it.
    quantity = models.BigIntegerField()
    cumulative_quantity = models.BigIntegerField()
    identifier = models.CharField(max_length=100, unique=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    # Epoch seconds Stripe got as the event's timestamp.
    sent_timestamp = models.BigIntegerField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "line", "bucket_start", "sequence"],
                                    name="meter_push_unique_sequence"),
        ]
        indexes = [
            models.Index(fields=["status", "id"], name="meter_push_status_idx"),
            models.Index(fields=["tenant", "bucket_start"], name="meter_push_tenant_bucket_idx"),
        ]


class StripeEvent(models.Model):
    """A webhook event, stored before it is handled: the unique event id makes a replay a no-op."""

    event_id = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.event_id} {self.type}"
