"""The test run's Redis databases, set before Django reads its settings.

A pytest plugin (`-p tests.environment` in pytest.ini): conftest.py is imported
only after pytest-django has configured Django, so defaults set there reached
the live processes the tests start but not the test process itself, whose
tenants then queued their Celery tasks on the development broker."""
import os

# The dev instance uses databases 0-2.
TEST_REDIS_ENV = {
    "REDIS_URL": "redis://127.0.0.1:6379/15",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/14",
    "CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/14",
    "CHANNEL_LAYER_REDIS_URL": "redis://127.0.0.1:6379/13",
}
for _name, _value in TEST_REDIS_ENV.items():
    os.environ.setdefault(_name, _value)
