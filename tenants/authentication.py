"""API-key authentication for the few /v1/ endpoints served by Django (DRF), with the same
checks and OpenAI-shaped errors as the gateway (inference/auth.py, inference/errors.py)."""
import hashlib
import time

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication

from .selectors import ApiKeyPrincipal, api_key_principal_get


class OpenAIError(exceptions.APIException):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, code: str | None, type: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = status
        self.message = message
        self.error_type = type
        self.error_code = code
        self.param = param

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.error_code}}


def openai_exception_handler(exc, context):
    """DRF exception handler answering every error in OpenAI's shape."""
    from rest_framework.response import Response

    if not isinstance(exc, OpenAIError):
        if isinstance(exc, exceptions.APIException):
            exc = OpenAIError(exc.status_code, str(exc.detail), code=getattr(exc, "default_code", None))
        else:
            return None
    return Response(exc.payload(), status=exc.status_code)


class ApiKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer sk-…`. The principal is both request.user and request.auth."""

    def authenticate(self, request) -> tuple[ApiKeyPrincipal, ApiKeyPrincipal]:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "You didn't provide an API key. Send it in the Authorization header as "
                                   "'Bearer YOUR_KEY'.", code="missing_api_key")
        principal = api_key_principal_get(key_hash=hashlib.sha256(token.encode()).hexdigest())
        if principal is None:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if principal.revoked:
            raise OpenAIError(401, "This API key has been revoked.", code="invalid_api_key")
        if principal.expires_at is not None and principal.expires_at <= time.time():
            raise OpenAIError(401, "This API key has expired.", code="invalid_api_key")
        if principal.tenant_status != "active":
            reason = principal.suspended_reason
            raise OpenAIError(403, "Your organization is suspended" + (f": {reason}" if reason else "."),
                              code="account_suspended", type="permission_error")
        return principal, principal

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
