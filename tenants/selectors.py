"""Reads on tenants, members and API keys."""
from dataclasses import dataclass

from django.db.models import QuerySet

from .models import ApiKey, LimitFields, Membership, Tenant, TierLimits

# Budgets are set in minor units (cents); the gateway counts spend in millionths of
# the currency unit, so one minor unit of a two-decimal currency is 10,000 micros.
MICROS_PER_MINOR_UNIT = 10_000
DEFAULT_BUDGET_ALERT_PERCENT = 80


@dataclass(frozen=True, slots=True)
class Limits:
    """Effective limits of one scope (a key or a tenant); 0 means no limit."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    budget_micros: int = 0
    budget_tokens: int = 0
    alert_percent: int = DEFAULT_BUDGET_ALERT_PERCENT

    @property
    def has_budget(self) -> bool:
        return self.budget_micros > 0 or self.budget_tokens > 0


def limits_effective(*layers: LimitFields | None) -> Limits:
    """The first non-empty value of each field, from the most specific layer on."""

    def pick(field: str) -> int | None:
        for layer in layers:
            if layer is not None and getattr(layer, field) is not None:
                return getattr(layer, field)
        return None

    budget_minor = pick("monthly_budget_minor")
    return Limits(
        rpm=pick("rpm_limit") or 0,
        tpm=pick("tpm_limit") or 0,
        concurrency=pick("concurrency_limit") or 0,
        budget_micros=(budget_minor or 0) * MICROS_PER_MINOR_UNIT,
        budget_tokens=pick("monthly_token_budget") or 0,
        alert_percent=pick("budget_alert_percent") or DEFAULT_BUDGET_ALERT_PERCENT,
    )


@dataclass(frozen=True, slots=True)
class ApiKeyPrincipal:
    """What the gateway needs to know about a presented API key, cacheable as is."""

    api_key_id: int
    api_key_prefix: str
    tenant_id: int
    tenant_public_id: str
    tenant_slug: str
    tenant_tier: str
    tenant_status: str
    suspended_reason: str
    # Epoch seconds, or None for a key that never expires.
    expires_at: float | None
    revoked: bool
    key_limits: Limits = Limits()
    tenant_limits: Limits = Limits()
    cache_isolation: bool = False


def api_key_principal_get(*, key_hash: str) -> ApiKeyPrincipal | None:
    row = (
        ApiKey.objects.filter(key_hash=key_hash)
        .select_related("tenant")
        .first()
    )
    if row is None:
        return None
    tenant = row.tenant
    tier_limits = TierLimits.objects.filter(tier=tenant.tier).first()
    return ApiKeyPrincipal(
        api_key_id=row.id,
        api_key_prefix=row.prefix,
        tenant_id=tenant.id,
        tenant_public_id=str(tenant.public_id),
        tenant_slug=tenant.slug,
        tenant_tier=tenant.tier,
        tenant_status=tenant.status,
        suspended_reason=tenant.suspended_reason,
        expires_at=row.expires_at.timestamp() if row.expires_at else None,
        revoked=row.revoked_at is not None,
        key_limits=limits_effective(row),
        tenant_limits=limits_effective(tenant, tier_limits),
        cache_isolation=tenant.cache_isolation,
    )


def tenant_get_by_slug(*, slug: str) -> Tenant | None:
    return Tenant.objects.filter(slug=slug).first()


def api_key_list(*, tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant)


def membership_list(*, tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user")
