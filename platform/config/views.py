"""Operational endpoints served by Django."""
import hmac

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse

from inference.pool_health import metrics_read

from .redis import redis_sync
from .runtime_check import runtime_report

LOCAL_ADDRESSES = {"127.0.0.1", "::1"}


def healthz(request):
    """200 when PostgreSQL and Redis answer; the runtime report proves the process
    imports the standard `platform` module."""
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as error:  # reported, not raised: this is the health endpoint
        checks["postgres"] = f"error: {error}"
    try:
        redis_sync().ping()
        checks["redis"] = "ok"
    except Exception as error:
        checks["redis"] = f"error: {error}"
    healthy = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if healthy else "degraded", "checks": checks}
    # Interpreter and library details are for operators only.
    if request.META.get("REMOTE_ADDR") in LOCAL_ADDRESSES or request.user.is_staff:
        body["runtime"] = runtime_report()
    return JsonResponse(body, status=200 if healthy else 503)


def metrics(request):
    """The backend pools in Prometheus' text format, every gateway process's
    view (inference.pool_health). For operators only, since it names the
    backends and their traffic: a staff login, or `Authorization: Bearer
    GATEWAY_METRICS_TOKEN` when that is set, else a request from this machine
    (behind a reverse proxy on the same machine every request is: set the
    token); 403 otherwise."""
    token = settings.GATEWAY_METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        allowed = hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
    else:
        allowed = request.META.get("REMOTE_ADDR") in LOCAL_ADDRESSES
    allowed = allowed or request.user.is_staff
    if not allowed:
        return JsonResponse({"error": {"message": "The metrics are for operators: send the metrics token.",
                                       "type": "permission_error", "param": None, "code": "forbidden"}},
                            status=403)
    try:
        body = metrics_read()
    except Exception as error:  # Redis or PostgreSQL down: say so, as a scrape failure
        return HttpResponse(f"# pool reports unavailable: {type(error).__name__}\n", status=503,
                            content_type="text/plain; version=0.0.4; charset=utf-8")
    return HttpResponse(body, content_type="text/plain; version=0.0.4; charset=utf-8")
