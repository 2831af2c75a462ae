import threading

from django.contrib import admin

from config.redis import invalidation_publish

from .models import Backend, ServedModel
from .pool_health import TTFT_BOUNDS_MS, WINDOW_SECONDS, pools_read


class RegistryChangeAdmin(admin.ModelAdmin):
    """Every save or delete tells the gateway processes to reload the registry."""

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        invalidation_publish(kind="registry")

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        invalidation_publish(kind="registry")


class BackendInline(admin.TabularInline):
    model = Backend
    extra = 0


@admin.register(ServedModel)
class ServedModelAdmin(RegistryChangeAdmin):
    list_display = ["name", "upstream_name", "context_length", "routing_policy", "backend_priority", "status"]
    list_filter = ["status"]
    search_fields = ["name"]
    inlines = [BackendInline]

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        invalidation_publish(kind="registry")


@admin.register(Backend)
class BackendAdmin(RegistryChangeAdmin):
    """The list shows each backend as the gateway processes see it now
    (inference.pool_health): read once per page from their reports."""

    list_display = ["url", "model", "status", "health", "in_flight", "queue", "kv_use",
                    "requests_per_minute", "hit_rate", "ttft_p50"]
    list_filter = ["status", "model"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._page = threading.local()

    def changelist_view(self, request, extra_context=None):
        try:
            self._page.rows = {(row.model, row.url): row for row in pools_read(ranks=False)}
        except Exception:  # Redis down: the list without live figures
            self._page.rows = {}
        try:
            response = super().changelist_view(request, extra_context)
            if hasattr(response, "render"):  # the columns are read while it renders
                response.render()
            return response
        finally:
            self._page.rows = {}

    def _row(self, obj):
        return getattr(self._page, "rows", {}).get((obj.model.name, obj.url))

    @admin.display(description="health")
    def health(self, obj):
        row = self._row(obj)
        if row is None:
            return "-"
        if row.processes and row.health != "not reported":
            return f"{row.health} ({row.healthy_in}/{row.processes} gateways)"
        return row.health

    @admin.display(description="in flight")
    def in_flight(self, obj):
        row = self._row(obj)
        return "-" if row is None or not row.processes else row.in_flight

    @admin.display(description="queue")
    def queue(self, obj):
        row = self._row(obj)
        return "-" if row is None or row.waiting < 0 else row.waiting

    @admin.display(description="KV in use")
    def kv_use(self, obj):
        row = self._row(obj)
        return "-" if row is None or row.kv_usage < 0 else f"{row.kv_usage:.0%}"

    @admin.display(description=f"requests (last {WINDOW_SECONDS} s)")
    def requests_per_minute(self, obj):
        row = self._row(obj)
        if row is None or not row.processes:
            return "-"
        return f"{row.requests} ({row.errors} failed)" if row.errors else row.requests

    @admin.display(description="prefix-cache hits")
    def hit_rate(self, obj):
        row = self._row(obj)
        return "-" if row is None or row.hit_rate is None else f"{row.hit_rate:.1%}"

    @admin.display(description="TTFT p50")
    def ttft_p50(self, obj):
        row = self._row(obj)
        value = None if row is None else row.ttft_p50_ms
        if value is None:
            return "-"
        return f"> {TTFT_BOUNDS_MS[-1]:,} ms" if value == float("inf") else f"≤ {value:,.0f} ms"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("model")
