"""Operational endpoints served by Django."""
from django.db import connection
from django.http import JsonResponse

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
