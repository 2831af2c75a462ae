"""Settings for every environment. Defaults suit a developer machine with local
PostgreSQL and Redis; deployments change them through environment variables only."""
from pathlib import Path

from .env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent

SECRET_KEY = env_str("DJANGO_SECRET_KEY", "dev-only-insecure-secret-key-change-me")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "tenants",
    "inference",
    "billing",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": env_str("POSTGRES_DB", "llmplatform"),
        "USER": env_str("POSTGRES_USER", "postgres"),
        "PASSWORD": env_str("POSTGRES_PASSWORD", ""),
        "HOST": env_str("POSTGRES_HOST", "127.0.0.1"),
        "PORT": env_int("POSTGRES_PORT", 5432),
        # Seconds a connection is kept between requests in sync code paths.
        "CONN_MAX_AGE": env_int("POSTGRES_CONN_MAX_AGE", 60),
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {"connect_timeout": 5},
        "TEST": {"NAME": env_str("POSTGRES_TEST_DB", "test_llmplatform")},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# Redis: one server, separate logical databases for the gateway's own keys,
# the Celery broker and the Channels layer.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", CELERY_BROKER_URL)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_TIME_LIMIT = 300  # seconds
CELERY_TASK_SOFT_TIME_LIMIT = 240  # seconds
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE: dict = {
    # Draining backends leave their pool once they report nothing running.
    "backends-drained-remove": {"task": "inference.backends_drained_remove", "schedule": 10.0},
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [env_str("CHANNEL_LAYER_REDIS_URL", "redis://127.0.0.1:6379/2")]},
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}

# Gateway (the /v1/ hot path).
# Seconds an authenticated API key stays in a gateway process's memory; revocations
# and suspensions are also pushed to every process at once over Redis pub/sub.
GATEWAY_API_KEY_CACHE_SECONDS = env_float("GATEWAY_API_KEY_CACHE_SECONDS", 30.0)
# Seconds between reloads of the model registry from PostgreSQL (changes are also pushed).
GATEWAY_REGISTRY_REFRESH_SECONDS = env_float("GATEWAY_REGISTRY_REFRESH_SECONDS", 5.0)
# Seconds to wait for a backend TCP connection, and for its first byte / between chunks.
GATEWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 2.0)
GATEWAY_UPSTREAM_READ_TIMEOUT = env_float("GATEWAY_UPSTREAM_READ_TIMEOUT", 120.0)
# Upstream connections kept per gateway process (all backends together).
GATEWAY_UPSTREAM_MAX_CONNECTIONS = env_int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", 1024)
# Backend health (inference/health.py). Circuit breaker: a backend that refuses a
# connection, or fails this many requests in a row before their first token, is
# skipped for GATEWAY_BREAKER_OPEN_SECONDS, then tried again by one request.
GATEWAY_BREAKER_FAILURES = env_int("GATEWAY_BREAKER_FAILURES", 5)
GATEWAY_BREAKER_OPEN_SECONDS = env_float("GATEWAY_BREAKER_OPEN_SECONDS", 5.0)
# Active checks: GET /health every so many seconds; this many failures in a row
# mark a backend unhealthy, one success healthy again. SGLang answers /health
# after about a second (it sends its engine a one-token generation and looks
# for an answer every second), so the timeout must stay well above 1 s.
GATEWAY_HEALTH_CHECK_SECONDS = env_float("GATEWAY_HEALTH_CHECK_SECONDS", 5.0)
GATEWAY_HEALTH_TIMEOUT_SECONDS = env_float("GATEWAY_HEALTH_TIMEOUT_SECONDS", 2.0)
GATEWAY_HEALTH_FAILURES = env_int("GATEWAY_HEALTH_FAILURES", 2)
# Failover: backends tried for one request before its first token, the backoff
# before the second (doubling), and how long a stream may wait for its first chunk.
GATEWAY_FAILOVER_ATTEMPTS = env_int("GATEWAY_FAILOVER_ATTEMPTS", 3)
GATEWAY_FAILOVER_BACKOFF_SECONDS = env_float("GATEWAY_FAILOVER_BACKOFF_SECONDS", 0.05)
GATEWAY_FIRST_CHUNK_TIMEOUT_SECONDS = env_float("GATEWAY_FIRST_CHUNK_TIMEOUT_SECONDS", 60.0)
# Cache-aware routing: where each conversation lives is shared by the gateway
# processes through Redis (inference/routing/homes.py), for this many seconds
# after its last placement; off: each process routes on what it saw alone.
GATEWAY_ROUTING_SHARED_HOMES = env_bool("GATEWAY_ROUTING_SHARED_HOMES", True)
GATEWAY_ROUTING_HOME_TTL_SECONDS = env_int("GATEWAY_ROUTING_HOME_TTL_SECONDS", 3600)
# A backend server with several data-parallel ranks (its /server_info `dp_size`)
# is routed to rank by rank, each request naming its rank; off: as one backend,
# which hands requests to its ranks itself (SGLang: round robin).
GATEWAY_DATA_PARALLEL_RANKS = env_bool("GATEWAY_DATA_PARALLEL_RANKS", True)
# Cache-aware routing pictures a backend with a hierarchical cache (SGLang's
# HiCache: `enable_hierarchical_cache` in /server_info) as holding what its host
# pool holds too; 0 pictures only its KV pool on the device.
GATEWAY_HIERARCHICAL_CACHE = env_bool("GATEWAY_HIERARCHICAL_CACHE", True)
# Each gateway process publishes its view of the backend pools (health, circuit
# breakers, load, the last minute of traffic) to Redis this often, for
# `manage.py pool_status` and the admin's backend list (0: not published).
GATEWAY_POOL_REPORT_SECONDS = env_float("GATEWAY_POOL_REPORT_SECONDS", 2.0)
# GET /metrics (Prometheus) answers requests from this machine and staff logins;
# with a token set, also `Authorization: Bearer <token>` (a scraper elsewhere).
GATEWAY_METRICS_TOKEN = env_str("GATEWAY_METRICS_TOKEN", "")
# Prefix retention (inference/routing/retention.py): a prefix several conversations
# of a cache-aware pool started with (a tenant's system prompt) is kept in its
# backend's cache for this many seconds after its last use, by a one-token request
# when the backend would evict it next; checked every TICK seconds (0: off).
GATEWAY_PREFIX_RETENTION_SECONDS = env_float("GATEWAY_PREFIX_RETENTION_SECONDS", 300.0)
GATEWAY_PREFIX_RETENTION_TICK_SECONDS = env_float("GATEWAY_PREFIX_RETENTION_TICK_SECONDS", 0.5)
# Usage events: each gateway process appends them to a spool file in this folder
# (fsynced every GATEWAY_USAGE_FLUSH_SECONDS); a shipper process stores them in
# PostgreSQL ("embedded": the gateway starts it; "off": run
# `python -m inference.shipper --spool-dir DIR/<database>` yourself).
GATEWAY_USAGE_SPOOL_DIR = env_str("GATEWAY_USAGE_SPOOL_DIR", str(BASE_DIR / ".run" / "spool"))
GATEWAY_USAGE_SPOOL_FSYNC = env_bool("GATEWAY_USAGE_SPOOL_FSYNC", True)
GATEWAY_USAGE_FLUSH_SECONDS = env_float("GATEWAY_USAGE_FLUSH_SECONDS", 0.05)
GATEWAY_USAGE_SHIPPER = env_str("GATEWAY_USAGE_SHIPPER", "embedded")
# The shipper lowers its CPU priority by this much (nice), so on a shared core
# the gateway's requests come first; 0 leaves it alone.
GATEWAY_USAGE_SHIPPER_NICE = env_int("GATEWAY_USAGE_SHIPPER_NICE", 10)
# Limits (inference/limits.py). Redis calls of the hot path give up after this many
# seconds, and Redis is then left alone for GATEWAY_REDIS_RETRY_SECONDS.
GATEWAY_REDIS_TIMEOUT_SECONDS = env_float("GATEWAY_REDIS_TIMEOUT_SECONDS", 0.25)
GATEWAY_REDIS_RETRY_SECONDS = env_float("GATEWAY_REDIS_RETRY_SECONDS", 1.0)
# Prefix of the limiter's Redis keys: deployments sharing a Redis must differ.
GATEWAY_REDIS_NAMESPACE = env_str("GATEWAY_REDIS_NAMESPACE", DATABASES["default"]["NAME"])
# Seconds a request's reservation is held if its gateway dies before settling it.
GATEWAY_REQUEST_LEASE_SECONDS = env_float("GATEWAY_REQUEST_LEASE_SECONDS", 1800.0)
# Completion tokens reserved (and sent to the backend as max_tokens) when a request
# names no max_tokens.
GATEWAY_DEFAULT_MAX_TOKENS = env_int("GATEWAY_DEFAULT_MAX_TOKENS", 4096)
# Seconds a WebSocket connection may stay unauthenticated before it is closed (4401).
GATEWAY_WS_AUTH_TIMEOUT_SECONDS = env_float("GATEWAY_WS_AUTH_TIMEOUT_SECONDS", 10.0)
# While Redis is unreachable, what each process may spend per budgeted scope.
GATEWAY_BUDGET_OFFLINE_ALLOWANCE_MICROS = env_int("GATEWAY_BUDGET_OFFLINE_ALLOWANCE_MICROS", 10_000)
GATEWAY_BUDGET_OFFLINE_ALLOWANCE_TOKENS = env_int("GATEWAY_BUDGET_OFFLINE_ALLOWANCE_TOKENS", 20_000)
# Priority admission (inference/admission.py): requests in flight per backend from
# one gateway process before new ones queue; queue length per model; seconds a
# request of each tier may wait.
GATEWAY_BACKEND_MAX_OUTSTANDING = env_int("GATEWAY_BACKEND_MAX_OUTSTANDING", 256)
GATEWAY_QUEUE_MAX = env_int("GATEWAY_QUEUE_MAX", 1024)
# The backends' own view, shared by every gateway process: when each active backend
# of a model reports more than this many requests waiting in its queue (GET
# /v1/loads), standard and free requests wait here (negative: never). Polled every
# GATEWAY_BACKEND_LOAD_POLL_SECONDS (0: not polled).
GATEWAY_BACKEND_QUEUE_THRESHOLD = env_int("GATEWAY_BACKEND_QUEUE_THRESHOLD", 16)
GATEWAY_BACKEND_LOAD_POLL_SECONDS = env_float("GATEWAY_BACKEND_LOAD_POLL_SECONDS", 1.0)
GATEWAY_QUEUE_TIMEOUT_PREMIUM_SECONDS = env_float("GATEWAY_QUEUE_TIMEOUT_PREMIUM_SECONDS", 30.0)
GATEWAY_QUEUE_TIMEOUT_STANDARD_SECONDS = env_float("GATEWAY_QUEUE_TIMEOUT_STANDARD_SECONDS", 10.0)
GATEWAY_QUEUE_TIMEOUT_FREE_SECONDS = env_float("GATEWAY_QUEUE_TIMEOUT_FREE_SECONDS", 2.0)
# Fraction of that capacity each tier may fill: lower tiers leave headroom for
# higher ones, and premium may go past the capacity by a margin, so a premium
# request finds a slot at once even when the others have filled theirs.
GATEWAY_TIER_CAPACITY_SHARE = {
    "premium": env_float("GATEWAY_TIER_SHARE_PREMIUM", 1.25),
    "standard": env_float("GATEWAY_TIER_SHARE_STANDARD", 0.85),
    "free": env_float("GATEWAY_TIER_SHARE_FREE", 0.6),
}
# The `priority` each tier's requests carry to backends that schedule by it (a
# model's backend_priority): SGLang preempts running requests more than its
# --priority-scheduling-preemption-threshold (10) below a new one.
GATEWAY_TIER_BACKEND_PRIORITY = {
    "premium": env_int("GATEWAY_BACKEND_PRIORITY_PREMIUM", 40),
    "standard": env_int("GATEWAY_BACKEND_PRIORITY_STANDARD", 20),
    "free": env_int("GATEWAY_BACKEND_PRIORITY_FREE", 0),
}
# Largest request body accepted on /v1/ (bytes).
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 8 * 1024 * 1024)
# Web origins whose pages may call /v1/ from a browser (CORS), comma-separated
# ("https://app.example.com"): "*" for any (the default: the key travels in a
# header, never a cookie, so a page gets nothing it was not given), "none" for none.
GATEWAY_CORS_ORIGINS = env_list("GATEWAY_CORS_ORIGINS", ["*"])

# Stripe (the billing issue builds on this; a local Stripe-compatible server in tests).
STRIPE_API_KEY = env_str("STRIPE_API_KEY", "sk_test_local")
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "https://api.stripe.com")

# --- Billing (billing/README.md) -------------------------------------------------------------
# stripe-python reaches Stripe (or the local Stripe-compatible server) only through these.
STRIPE_METER_EVENTS_BASE = env_str("STRIPE_METER_EVENTS_BASE", "https://meter-events.stripe.com")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET", "")
# Retries stripe-python makes itself (connection errors, 409, 5xx), same idempotency key each time.
STRIPE_MAX_NETWORK_RETRIES = env_int("STRIPE_MAX_NETWORK_RETRIES", 2)
# Every price in the book, plan and Stripe subscription is in this currency (ISO 4217, lower case).
BILLING_CURRENCY = env_str("BILLING_CURRENCY", "usd")
# Raw UsageRecord rows older than this are deleted (after they are rolled up); rollups are kept.
BILLING_RAW_RETENTION_DAYS = env_int("BILLING_RAW_RETENTION_DAYS", 400)
# A rollup pass rescans rows inserted up to this many seconds before it, so a writer whose
# transaction commits late (after a later id committed) is still rolled up.
BILLING_ROLLUP_SETTLE_SECONDS = env_float("BILLING_ROLLUP_SETTLE_SECONDS", 120.0)
# Largest number of raw rows one rollup pass reads (a backlog is caught up over several passes).
BILLING_ROLLUP_MAX_ROWS = env_int("BILLING_ROLLUP_MAX_ROWS", 5_000_000)
# Meter events sent per batch by one push task; above BILLING_METER_STREAM_THRESHOLD pending
# events a batch goes through Stripe's v2 meter event stream instead of v1 calls.
BILLING_PUSH_BATCH = env_int("BILLING_PUSH_BATCH", 200)
BILLING_METER_STREAM_THRESHOLD = env_int("BILLING_METER_STREAM_THRESHOLD", 1000)
# Seconds a tenant may stay past due (payment failed) before its keys are suspended.
BILLING_PAST_DUE_GRACE_SECONDS = env_float("BILLING_PAST_DUE_GRACE_SECONDS", 3 * 24 * 3600.0)
# Test-only: seconds each push batch / rollup pass sleeps inside its work (kill tests).
BILLING_TEST_TASK_DELAY_SECONDS = env_float("BILLING_TEST_TASK_DELAY_SECONDS", 0.0)
# Seconds between periodic billing runs (Celery beat).
BILLING_ROLLUP_EVERY_SECONDS = env_float("BILLING_ROLLUP_EVERY_SECONDS", 60.0)
BILLING_PUSH_EVERY_SECONDS = env_float("BILLING_PUSH_EVERY_SECONDS", 60.0)
BILLING_ENFORCE_EVERY_SECONDS = env_float("BILLING_ENFORCE_EVERY_SECONDS", 300.0)
CELERY_BEAT_SCHEDULE.update({
    "billing-usage-rollup": {"task": "billing.usage_rollup", "schedule": BILLING_ROLLUP_EVERY_SECONDS},
    "billing-meter-push": {"task": "billing.meter_push", "schedule": BILLING_PUSH_EVERY_SECONDS},
    "billing-accounts-sync": {"task": "billing.accounts_sync", "schedule": 600.0},
    "billing-past-due-enforce": {"task": "billing.past_due_enforce", "schedule": BILLING_ENFORCE_EVERY_SECONDS},
    "billing-raw-purge": {"task": "billing.usage_records_purge", "schedule": 3600.0},
})
# --- end Billing -----------------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # stripe-python logs every request at INFO.
    "loggers": {"stripe": {"level": "WARNING"}},
}
