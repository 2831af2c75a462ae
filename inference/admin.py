from django.contrib import admin

from config.redis import invalidation_publish

from .models import Backend, ServedModel


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
    list_display = ["url", "model", "status"]
    list_filter = ["status", "model"]
