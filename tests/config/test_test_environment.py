"""The test process itself uses the test run's Redis databases, not the
development instance's: its tenants' Celery tasks must not reach a development
worker, which would run them against another database."""
import os

from django.conf import settings


def test_the_test_process_reads_the_test_redis_databases():
    assert settings.REDIS_URL == os.environ["REDIS_URL"]
    assert settings.CELERY_BROKER_URL == os.environ["CELERY_BROKER_URL"]
    assert settings.CELERY_RESULT_BACKEND == os.environ["CELERY_RESULT_BACKEND"]
    assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] == [os.environ["CHANNEL_LAYER_REDIS_URL"]]
