"""The one place stripe-python is configured. Every Stripe call of the project goes through
`stripe_client()`: real Stripe or the local Stripe-compatible server (billing/stripe_local/)
is a matter of STRIPE_API_KEY, STRIPE_API_BASE and STRIPE_METER_EVENTS_BASE only."""
from functools import lru_cache

import stripe
from django.conf import settings


@lru_cache(maxsize=4)
def _client(api_key: str, api_base: str, meter_events_base: str, retries: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base, "meter_events": meter_events_base},
        max_network_retries=retries,
    )


def stripe_client() -> stripe.StripeClient:
    return _client(settings.STRIPE_API_KEY, settings.STRIPE_API_BASE, settings.STRIPE_METER_EVENTS_BASE,
                   settings.STRIPE_MAX_NETWORK_RETRIES)


def stripe_session_client(authentication_token: str) -> stripe.StripeClient:
    """A client for POST /v2/billing/meter_event_stream, which authenticates with a meter event
    session's token instead of the secret key."""
    return _client(authentication_token, settings.STRIPE_API_BASE, settings.STRIPE_METER_EVENTS_BASE,
                   settings.STRIPE_MAX_NETWORK_RETRIES)


def stripe_error_is_duplicate_identifier(error: stripe.StripeError) -> bool:
    """Stripe answers a meter event whose identifier it has seen with 400 "An event already
    exists with identifier …" (no documented code): the event was delivered before."""
    message = (getattr(error, "user_message", None) or str(error) or "").lower()
    return isinstance(error, stripe.InvalidRequestError) and "already exists with identifier" in message
