from django.contrib import admin, messages

from . import services
from .models import ApiKey, Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "tier", "status", "created_at"]
    list_filter = ["tier", "status"]
    search_fields = ["slug", "name", "public_id"]
    readonly_fields = ["public_id", "created_at", "updated_at"]
    inlines = [MembershipInline]
    actions = ["suspend", "activate"]

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
class ApiKeyAdmin(admin.ModelAdmin):
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
