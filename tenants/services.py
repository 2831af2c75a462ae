"""Writes on tenants, members and API keys."""
import hashlib
import secrets
from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from config.redis import invalidation_publish

from .models import ApiKey, LimitFields, Membership, Tenant, TierLimits

API_KEY_PREFIX = "sk-"
# Characters of the key kept in clear for display ("sk-" and 9 more).
API_KEY_VISIBLE_CHARS = 12


def api_key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def tenant_create(*, slug: str, name: str, tier: str = Tenant.Tier.FREE) -> Tenant:
    from billing.accounts import billing_account_create  # billing imports tenants

    with transaction.atomic():
        tenant = Tenant(slug=slug, name=name, tier=tier)
        tenant.full_clean()
        tenant.save()
        billing_account_create(tenant=tenant)
    return tenant


def tenant_set_tier(*, tenant: Tenant, tier: str) -> Tenant:
    """Moves a tenant to another tier: its limits follow at once, its billing plan too."""
    from billing.accounts import billing_plan_change  # billing imports tenants

    with transaction.atomic():
        tenant.tier = tier
        tenant.full_clean()
        tenant.save(update_fields=["tier", "updated_at"])
        billing_plan_change(tenant=tenant)
    transaction.on_commit(lambda: invalidation_publish(kind="tenant", tenant_id=tenant.pk))
    return tenant


def tenant_suspend(*, tenant: Tenant, reason: str = "") -> Tenant:
    tenant.status = Tenant.Status.SUSPENDED
    tenant.suspended_reason = reason
    tenant.save(update_fields=["status", "suspended_reason", "updated_at"])
    transaction.on_commit(lambda: invalidation_publish(kind="tenant", tenant_id=tenant.pk))
    return tenant


def tenant_activate(*, tenant: Tenant) -> Tenant:
    tenant.status = Tenant.Status.ACTIVE
    tenant.suspended_reason = ""
    tenant.save(update_fields=["status", "suspended_reason", "updated_at"])
    transaction.on_commit(lambda: invalidation_publish(kind="tenant", tenant_id=tenant.pk))
    return tenant


def user_create(*, username: str, email: str = "", password: str | None = None):
    user_model = get_user_model()
    user = user_model(username=username, email=email)
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    user.full_clean()
    user.save()
    return user


def membership_create(*, tenant: Tenant, user, role: str = Membership.Role.MEMBER) -> Membership:
    membership = Membership(tenant=tenant, user=user, role=role)
    membership.full_clean()
    membership.save()
    return membership


def api_key_create(
    *, tenant: Tenant, name: str, expires_at: datetime | None = None, created_by=None
) -> tuple[ApiKey, str]:
    """Returns the key row and the secret, which exists only in this return value."""
    raw_key = API_KEY_PREFIX + secrets.token_urlsafe(32)  # 32 bytes = 256 random bits
    api_key = ApiKey(
        tenant=tenant,
        name=name,
        prefix=raw_key[:API_KEY_VISIBLE_CHARS],
        key_hash=api_key_hash(raw_key),
        expires_at=expires_at,
        created_by=created_by,
    )
    api_key.full_clean()
    api_key.save()
    return api_key, raw_key


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at", "updated_at"])
    key_hash = api_key.key_hash
    transaction.on_commit(lambda: invalidation_publish(kind="api_key", key_hash=key_hash))
    return api_key


def limits_set(*, target: Tenant | ApiKey | TierLimits, **limits: int | None) -> None:
    """Sets rate limits or budgets (LimitFields names) on a tenant, a key or a tier;
    None clears a field. Every gateway process reloads the affected keys at once."""
    unknown = set(limits) - set(LimitFields.LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown limit fields: {sorted(unknown)}")
    for name, value in limits.items():
        setattr(target, name, value)
    target.full_clean()
    target.save(update_fields=[*limits, "updated_at"])
    gateways_reload(target=target)


def gateways_reload(*, target: Tenant | ApiKey | TierLimits) -> None:
    """Once the transaction commits, every gateway process drops what it cached of
    `target` (a key, a tenant's keys, or every key for a tier's defaults) and reads it
    again on its next request. For writes made elsewhere than these services, e.g. in
    Django admin."""
    if isinstance(target, ApiKey):
        key_hash = target.key_hash
        transaction.on_commit(lambda: invalidation_publish(kind="api_key", key_hash=key_hash))
    elif isinstance(target, Tenant):
        tenant_id = target.pk
        transaction.on_commit(lambda: invalidation_publish(kind="tenant", tenant_id=tenant_id))
    else:
        transaction.on_commit(lambda: invalidation_publish(kind="all_keys"))
