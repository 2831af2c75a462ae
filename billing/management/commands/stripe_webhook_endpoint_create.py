from django.core.management.base import BaseCommand

from billing.stripe_client import stripe_client

# The events billing/webhooks.py handles.
EVENTS = ["invoice.paid", "invoice.payment_failed", "customer.subscription.deleted"]


class Command(BaseCommand):
    help = ("Register this platform's webhook URL with Stripe (or the local Stripe-compatible server) "
            "and print the signing secret to set as STRIPE_WEBHOOK_SECRET.")

    def add_arguments(self, parser):
        parser.add_argument("url", help="e.g. https://platform.example/billing/stripe/webhook")

    def handle(self, *args, url, **options):
        endpoint = stripe_client().v1.webhook_endpoints.create(params={"url": url, "enabled_events": EVENTS})
        self.stdout.write(endpoint.secret)
