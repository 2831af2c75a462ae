"""Project wiring: settings, root URLs, the ASGI entry point and the Celery app.

This package lives in the plain folder ``platform/`` (no ``__init__.py`` there), which
every entry point puts on ``sys.path``; it is imported as ``config``.
"""
from .celery import app as celery_app

__all__ = ("celery_app",)
