from django.contrib import admin

from .models import UsageRecord


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ["request_id", "tenant", "model", "status", "prompt_tokens", "completion_tokens",
                    "cached_tokens", "ttft_ms", "latency_ms", "started_at"]
    list_filter = ["status", "model", "transport"]
    search_fields = ["request_id", "tenant__slug"]
    date_hierarchy = "started_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
