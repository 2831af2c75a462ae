from django.contrib import admin, messages
from django.db import transaction

from . import services
from .models import ApiKey, LimitFields, Membership, Tenant, TierLimits

LIMITS_FIELDSET = ("Limits and budgets", {
    "fields": LimitFields.LIMIT_FIELDS,
    "description": "Empty: on a tenant, the tier's default; on an API key, no key-level limit.",
})


class GatewaysReloadMixin:
    """Edits made here reach every gateway process at once (their caches of keys
    and tenants are dropped when the transaction commits), as the services' do."""

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        services.gateways_reload(target=obj)

    def delete_model(self, request, obj):
        services.gateways_reload(target=obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            services.gateways_reload(target=obj)
        super().delete_queryset(request, queryset)


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(TierLimits)
class TierLimitsAdmin(GatewaysReloadMixin, admin.ModelAdmin):
    """The default limits of each tier (free, standard, premium)."""

    list_display = ["tier", *LimitFields.LIMIT_FIELDS]
    fieldsets = [(None, {"fields": ["tier"]}), LIMITS_FIELDSET]


@admin.register(Tenant)
class TenantAdmin(GatewaysReloadMixin, admin.ModelAdmin):
    list_display = ["slug", "name", "tier", "status", "created_at"]
    list_filter = ["tier", "status"]
    search_fields = ["slug", "name", "public_id"]
    readonly_fields = ["public_id", "created_at", "updated_at"]
    inlines = [MembershipInline]
    actions = ["suspend", "activate"]

    def save_model(self, request, obj, form, change):
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            if change and "tier" in form.changed_data:
                from billing.accounts import billing_plan_change  # billing imports tenants

                billing_plan_change(tenant=obj)

    @admin.action(description="Suspend selected tenants")
    def suspend(self, request, queryset):
        for tenant in queryset:
            services.tenant_suspend(tenant=tenant, reason="Suspended by an operator.")

    @admin.action(description="Reactivate selected tenants")
    def activate(self, request, queryset):
        for tenant in queryset:
            services.tenant_activate(tenant=tenant)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["tenant", "user", "role"]
    list_filter = ["role"]
    search_fields = ["tenant__slug", "user__username"]


@admin.register(ApiKey)
class ApiKeyAdmin(GatewaysReloadMixin, admin.ModelAdmin):
    """Keys are created with `manage.py apikey_create` or the portal, which show the
    secret once; here they can be inspected and revoked."""

    list_display = ["prefix", "name", "tenant", "created_at", "expires_at", "revoked_at", "last_used_at"]
    list_filter = ["tenant"]
    search_fields = ["prefix", "name", "tenant__slug"]
    readonly_fields = ["tenant", "prefix", "public_id", "key_hash", "created_by", "created_at",
                       "updated_at", "revoked_at", "last_used_at"]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            services.api_key_revoke(api_key=api_key)
        messages.success(request, f"Revoked {queryset.count()} key(s).")
