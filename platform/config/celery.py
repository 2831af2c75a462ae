"""The Celery app. Workers start with ``celery -A config worker`` from a process
whose ``sys.path`` holds ``platform/`` (deploy/ scripts arrange it)."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("llmplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="config.runtime_report")
def runtime_report_task() -> dict:
    from .runtime_check import runtime_report

    return runtime_report()
