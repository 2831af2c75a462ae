from django.contrib import admin

from .models import (BillingAccount, MeterPush, Plan, Price, PriceLine, StripeEvent, SubscriptionItem, UsageRecord,
                     UsageRollup)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ["request_id", "tenant", "model", "status", "prompt_tokens", "completion_tokens",
                    "cached_tokens", "ttft_ms", "latency_ms", "started_at"]
    list_filter = ["status", "model", "transport"]
    search_fields = ["request_id", "tenant__slug"]
    date_hierarchy = "started_at"


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    list_display = ["tenant", "width", "bucket_start", "model", "api_key", "requests", "prompt_tokens",
                    "cached_tokens", "completion_tokens"]
    list_filter = ["width", "model"]
    search_fields = ["tenant__slug"]


@admin.register(Price)
class PriceAdmin(ReadOnlyAdmin):
    """Prices are added with `manage.py price_create` (validated, never edited)."""

    list_display = ["model", "version", "currency", "input_per_million", "cached_input_per_million",
                    "output_per_million", "effective_from"]


@admin.register(PriceLine)
class PriceLineAdmin(ReadOnlyAdmin):
    list_display = ["event_name", "price", "token_class", "stripe_meter_id", "stripe_price_id"]


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "tier", "included_tokens_per_month"]


@admin.register(BillingAccount)
class BillingAccountAdmin(ReadOnlyAdmin):
    list_display = ["tenant", "plan", "status", "past_due_since", "suspension", "stripe_customer_id",
                    "stripe_subscription_id"]
    list_filter = ["status", "plan"]


@admin.register(SubscriptionItem)
class SubscriptionItemAdmin(ReadOnlyAdmin):
    list_display = ["account", "line", "stripe_subscription_id", "stripe_item_id"]


@admin.register(MeterPush)
class MeterPushAdmin(ReadOnlyAdmin):
    list_display = ["identifier", "quantity", "cumulative_quantity", "status", "sent_at", "attempts", "last_error"]
    list_filter = ["status"]


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "type", "received_at", "processed_at"]
    list_filter = ["type"]
