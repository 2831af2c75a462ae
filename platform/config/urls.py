from django.contrib import admin
from django.urls import include, path

from billing.urls import urlpatterns as billing_urlpatterns
from billing.urls import usage_urlpatterns

from .views import healthz, metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("v1/usage", include((usage_urlpatterns, "usage"))),
    path("billing/", include((billing_urlpatterns, "billing"))),
]
