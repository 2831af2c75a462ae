"""Reads on tenants, members and API keys."""
from dataclasses import dataclass

from django.db.models import QuerySet

from .models import ApiKey, Membership, Tenant


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


def api_key_principal_get(*, key_hash: str) -> ApiKeyPrincipal | None:
    row = (
        ApiKey.objects.filter(key_hash=key_hash)
        .select_related("tenant")
        .only(
            "id", "prefix", "expires_at", "revoked_at",
            "tenant__id", "tenant__public_id", "tenant__slug", "tenant__tier",
            "tenant__status", "tenant__suspended_reason",
        )
        .first()
    )
    if row is None:
        return None
    tenant = row.tenant
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
    )


def tenant_get_by_slug(*, slug: str) -> Tenant | None:
    return Tenant.objects.filter(slug=slug).first()


def api_key_list(*, tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant)


def membership_list(*, tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user")
