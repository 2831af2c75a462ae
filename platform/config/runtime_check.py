"""Proof, from inside any of our processes, that the standard library's `platform`
module is the one imported (our `platform/` folder must never shadow it)."""
import json
import platform

import stripe
from stripe._api_requestor import _APIRequestor


def runtime_report() -> dict:
    headers = _APIRequestor._global_instance().request_headers("post", "V1", {"api_key": "sk_test_probe"})
    return {
        "platform_module": getattr(platform, "__file__", None),
        "python_implementation": platform.python_implementation(),
        "stripe_version": stripe.VERSION,
        "stripe_client_user_agent": json.loads(headers["X-Stripe-Client-User-Agent"]),
    }
