"""Writes on the model registry. Each change is pushed to the gateway processes."""
from django.db import transaction

from config.redis import invalidation_publish

from .models import Backend, ServedModel


def _registry_changed() -> None:
    transaction.on_commit(lambda: invalidation_publish(kind="registry"))


def served_model_upsert(
    *, name: str, upstream_name: str = "", context_length: int = 8192, owned_by: str = "platform"
) -> ServedModel:
    model, _ = ServedModel.objects.update_or_create(
        name=name,
        defaults={"upstream_name": upstream_name, "context_length": context_length, "owned_by": owned_by},
    )
    _registry_changed()
    return model


def backend_add(*, model: ServedModel, url: str, api_key: str = "") -> Backend:
    backend, _ = Backend.objects.update_or_create(
        model=model, url=url.rstrip("/"), defaults={"api_key": api_key, "status": Backend.Status.ACTIVE}
    )
    _registry_changed()
    return backend


def backend_set_status(*, backend: Backend, status: str) -> Backend:
    backend.status = status
    backend.save(update_fields=["status", "updated_at"])
    _registry_changed()
    return backend


def backend_remove(*, backend: Backend) -> None:
    backend.delete()
    _registry_changed()
