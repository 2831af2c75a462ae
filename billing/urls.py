from django.urls import path

from .apis import InvoiceListApi, StripeWebhookApi, UsageApi

# Mounted at /v1/usage (config.urls; config.asgi routes that prefix to Django).
usage_urlpatterns = [
    path("", UsageApi.as_view(), name="usage"),
]

# Mounted at /billing/.
urlpatterns = [
    path("stripe/webhook", StripeWebhookApi.as_view(), name="stripe-webhook"),
    path("invoices", InvoiceListApi.as_view(), name="invoices"),
]
