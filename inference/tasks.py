from celery import shared_task

from .services import backends_drained_remove


@shared_task(name="inference.backends_drained_remove", ignore_result=True, soft_time_limit=60, time_limit=90)
def backends_drained_remove_task() -> None:
    backends_drained_remove()
