"""Stripe's error body: `{"error": {"type", "code", "message", "param", "doc_url", ...}}`.

stripe-python maps a v1 error by HTTP status (400/404 → InvalidRequestError, 401 →
AuthenticationError, ...) except `type: idempotency_error` → IdempotencyError; a v2 error
by `type` first (`temporary_session_expired` → TemporarySessionExpiredError).
"""

from __future__ import annotations

from typing import Any

DOCS_ERROR_CODES = "https://stripe.com/docs/error-codes/"


class StripeError(Exception):
    """An API error response (4xx/5xx with Stripe's error body)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = DOCS_ERROR_CODES + self.code.replace("_", "-")
        if self.param:
            error["param"] = self.param
        error["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}"
        error.update(self.extra)
        return {"error": error}


def invalid_request(message: str, *, param: str | None = None, code: str | None = None,
                    status: int = 400, headers: dict[str, str] | None = None) -> StripeError:
    return StripeError(status, message, code=code, param=param, headers=headers)


def resource_missing(kind: str, object_id: str, *, param: str = "id", status: int = 404) -> StripeError:
    """`No such customer: 'cus_x'`: 404 for the URL's own id, 400 for an id inside the parameters."""
    return StripeError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def parameter_missing(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def parameter_unknown(param: str) -> StripeError:
    return StripeError(400, f"Received unknown parameter: {param}", code="parameter_unknown", param=param)


def parameter_invalid(kind: str, value: Any, param: str) -> StripeError:
    return StripeError(400, f"Invalid {kind}: {value}", code=f"parameter_invalid_{kind}", param=param)


def url_unrecognized(method: str, path: str) -> StripeError:
    return StripeError(404, f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
                            "or we can help at https://support.stripe.com/.")


def idempotency_mismatch(key: str) -> StripeError:
    return StripeError(400, "Keys for idempotent requests can only be used with the same parameters they were "
                            f"first used with. Try using a key other than '{key}' if you meant to execute a "
                            "different request.", type="idempotency_error")


def api_key_invalid(key: str | None) -> StripeError:
    if not key:
        return StripeError(401, "You did not provide an API key. You need to provide your API key in the "
                                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                                "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, "
                                "or we can help at https://support.stripe.com/.")
    shown = key[:8] + "*" * max(0, len(key) - 12) + key[-4:] if len(key) > 12 else key
    return StripeError(401, f"Invalid API Key provided: {shown}")
