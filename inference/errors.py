"""Errors a caller of /v1/ can get, in OpenAI's shape:
{"error": {"message", "type", "param", "code"}} with the matching HTTP status."""
import orjson


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    @property
    def usage_code(self) -> str:
        """The short reason stored on the usage record."""
        return (self.code or self.type)[:64]


def missing_api_key() -> ApiError:
    return ApiError(
        401,
        "You didn't provide an API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
        code="missing_api_key",
    )


def invalid_api_key(detail: str = "Incorrect API key provided.") -> ApiError:
    return ApiError(401, detail, code="invalid_api_key")


def tenant_suspended(reason: str) -> ApiError:
    message = "Your organization is suspended" + (f": {reason}" if reason else ".")
    return ApiError(403, message, type="permission_error", code="account_suspended")


def invalid_json() -> ApiError:
    return ApiError(
        400,
        "We could not parse the JSON body of your request. The body must be a JSON object.",
        code="invalid_json",
    )


def invalid_parameter(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def missing_parameter(param: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def context_length_exceeded(detail: str) -> ApiError:
    return ApiError(400, detail, param="messages", code="context_length_exceeded")


def no_healthy_backend(model: str) -> ApiError:
    return ApiError(
        503,
        f"No healthy backend is serving '{model}' right now. Please retry shortly.",
        type="server_error",
        code="no_healthy_backend",
        headers={"retry-after": "1"},
    )


def backend_busy(detail: str) -> ApiError:
    """Every backend tried was too busy to take the request (SGLang's 503 for a
    full queue, or a 429): nothing is broken, the caller may retry."""
    return ApiError(503, f"The model backends are busy ({detail}). Please retry shortly.", type="server_error",
                    code="overloaded", headers={"retry-after": "1", "retry-after-ms": "1000"})


def backend_failure(detail: str = "The model backend failed to complete the request.") -> ApiError:
    return ApiError(502, detail, type="server_error", code="backend_error")


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown request URL: {path}.", code="unknown_url")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"Method {method} is not allowed on {path}.", code="method_not_allowed")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body exceeds {limit} bytes.", code="request_too_large")
