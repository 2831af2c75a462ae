"""Billing's HTTP API: a tenant's usage (GET /v1/usage), its invoices (GET /billing/invoices),
and Stripe's webhook (POST /billing/stripe/webhook)."""
import time
from datetime import UTC, datetime

from django.http import HttpResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from tenants.authentication import ApiKeyAuthentication, OpenAIError, openai_exception_handler

from .selectors import BUCKET_SECONDS, tenant_invoices_list, usage_buckets
from .webhooks import WebhookSignatureInvalid, stripe_event_construct, stripe_event_receive

# Largest number of buckets one request may span.
MAX_BUCKETS = {"1h": 24 * 31, "1d": 366}
GROUP_BY_FIELDS = ("model", "api_key")


class ApiKeyApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes: list = []

    def get_exception_handler(self):
        return openai_exception_handler


def _invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, code="invalid_value", param=param)


class UsageApi(ApiKeyApi):
    class InputSerializer(serializers.Serializer):
        start_time = serializers.IntegerField(min_value=0)
        end_time = serializers.IntegerField(min_value=0, required=False)
        bucket_width = serializers.ChoiceField(choices=list(BUCKET_SECONDS), required=False, default="1d")
        group_by = serializers.CharField(required=False, allow_blank=True, default="")

    class CostSerializer(serializers.Serializer):
        amount_minor = serializers.IntegerField(source="cost_minor")
        # The exact amount before rounding, in minor units (a decimal string).
        amount_minor_exact = serializers.SerializerMethodField()
        currency = serializers.CharField()

        def get_amount_minor_exact(self, bucket) -> str:
            return format(bucket.exact_cost_minor.normalize(), "f")

    class BucketSerializer(serializers.Serializer):
        object = serializers.SerializerMethodField()
        start_time = serializers.IntegerField()
        end_time = serializers.IntegerField()
        input_tokens = serializers.IntegerField()
        cached_input_tokens = serializers.IntegerField()
        output_tokens = serializers.IntegerField()
        requests = serializers.IntegerField()

        def get_object(self, bucket) -> str:
            return "usage.bucket"

        def to_representation(self, bucket):
            data = super().to_representation(bucket)
            if bucket.model is not None:
                data["model"] = bucket.model
            if bucket.api_key_id is not None:
                data["api_key_id"] = bucket.api_key_id
            data["cost"] = UsageApi.CostSerializer(bucket).data
            return data

    def get(self, request):
        params = request.query_params.copy()
        # group_by may be repeated (group_by=model&group_by=api_key) or comma-separated.
        params["group_by"] = ",".join(request.query_params.getlist("group_by"))
        serializer = self.InputSerializer(data=params)
        if not serializer.is_valid():
            param, messages = next(iter(serializer.errors.items()))
            raise _invalid(param, f"Invalid '{param}': {messages[0]}")
        data = serializer.validated_data
        width = data["bucket_width"]
        seconds = BUCKET_SECONDS[width]
        group_by = [item.strip() for item in data["group_by"].split(",") if item.strip()]
        unknown = [item for item in group_by if item not in GROUP_BY_FIELDS]
        if unknown:
            raise _invalid("group_by", f"Invalid 'group_by': {unknown[0]!r}; use model and/or api_key.")
        # Without end_time: up to the end of the bucket holding now.
        end_time = data.get("end_time", max(int(time.time()) + 1, data["start_time"] + 1))
        if end_time <= data["start_time"]:
            raise _invalid("end_time", "Invalid 'end_time': must be after start_time.")
        start = data["start_time"] - data["start_time"] % seconds
        end = end_time + (-end_time) % seconds
        if (end - start) // seconds > MAX_BUCKETS[width]:
            raise _invalid("end_time", f"Invalid 'end_time': at most {MAX_BUCKETS[width]} buckets of {width}.")
        buckets = usage_buckets(tenant_id=request.auth.tenant_id, start=datetime.fromtimestamp(start, UTC),
                                end=datetime.fromtimestamp(end, UTC), bucket_width=width, group_by=group_by)
        return Response({"object": "list", "data": self.BucketSerializer(buckets, many=True).data,
                         "has_more": False})


class InvoiceListApi(ApiKeyApi):
    class OutputSerializer(serializers.Serializer):
        id = serializers.CharField()
        number = serializers.CharField(allow_null=True)
        status = serializers.CharField()
        currency = serializers.CharField()
        amount_due = serializers.IntegerField()
        amount_paid = serializers.IntegerField()
        total = serializers.IntegerField()
        period_start = serializers.IntegerField()
        period_end = serializers.IntegerField()
        created = serializers.IntegerField()
        hosted_invoice_url = serializers.CharField(allow_null=True)

    def get(self, request):
        invoices = tenant_invoices_list(tenant_id=request.auth.tenant_id)
        return Response({"object": "list", "data": self.OutputSerializer(invoices, many=True).data,
                         "has_more": False})


@method_decorator(csrf_exempt, name="dispatch")
class StripeWebhookApi(View):
    """Plain Django view: the signature covers the raw body, which must reach
    stripe.Webhook.construct_event untouched."""

    def post(self, request):
        try:
            event = stripe_event_construct(payload=request.body,
                                           signature_header=request.headers.get("Stripe-Signature", ""))
        except WebhookSignatureInvalid:
            return HttpResponse('{"error": "invalid signature"}', status=400, content_type="application/json")
        processed = stripe_event_receive(event=event, raw_body=request.body)
        return HttpResponse('{"received": true, "replay": %s}' % ("false" if processed else "true"),
                            content_type="application/json")
