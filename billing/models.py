"""Metering: one usage record per request served through the gateway."""
from django.db import models

from tenants.models import ApiKey, Tenant


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
    endpoint = models.CharField(max_length=32)  # chat.completions | completions
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
