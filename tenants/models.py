"""Tenants (customer organisations), their members and their API keys."""
import uuid

from django.conf import settings
from django.db import models


class TimeStampedModel(models.Model):
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class LimitFields(models.Model):
    """Rate limits and monthly budgets. On a tenant, an empty field takes the tier's
    default (TierLimits); on an API key, an empty field means no key-level limit."""

    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute.")
    tpm_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Tokens (prompt + completion) per minute."
    )
    concurrency_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests in flight.")
    # Minor units of the price book's currency (cents for USD) per calendar month (UTC).
    monthly_budget_minor = models.PositiveBigIntegerField(null=True, blank=True)
    monthly_token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    # Percent of a budget at which a soft alert is recorded (once per month).
    budget_alert_percent = models.PositiveSmallIntegerField(null=True, blank=True)

    LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "concurrency_limit", "monthly_budget_minor",
                    "monthly_token_budget", "budget_alert_percent")

    class Meta:
        abstract = True


class TierLimits(LimitFields, TimeStampedModel):
    """The default limits of every tenant on a tier."""

    tier = models.CharField(max_length=16, unique=True)

    class Meta:
        verbose_name_plural = "tier limits"
        ordering = ["tier"]

    def __str__(self) -> str:
        return f"{self.tier} limits"


class Tenant(LimitFields, TimeStampedModel):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    class Tier(models.TextChoices):
        FREE = "free", "Free"
        STANDARD = "standard", "Standard"
        PREMIUM = "premium", "Premium"

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    slug = models.SlugField(max_length=63, unique=True)
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    tier = models.CharField(max_length=16, choices=Tier.choices, default=Tier.FREE)
    # Shown to the tenant's API callers when status is suspended.
    suspended_reason = models.CharField(max_length=500, blank=True, default="")
    # Keep this tenant's prompts out of other tenants' prefix caches (SGLang cache_salt).
    cache_isolation = models.BooleanField(default=False)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Membership(TimeStampedModel):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="membership_unique_tenant_user"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class ApiKey(LimitFields, TimeStampedModel):
    """A tenant's secret for the /v1/ API. The secret itself is never stored:
    only its SHA-256 (the secret has 256 random bits, so a fast hash is safe)
    and a short visible prefix that lets people tell their keys apart."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="First characters of the key, for display.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                condition=models.Q(revoked_at__isnull=True),
                name="apikey_unique_live_name_per_tenant",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"
