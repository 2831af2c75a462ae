"""Writes on the model registry. Each change is pushed to the gateway processes."""
from django.db import transaction

from config.redis import invalidation_publish

from .models import Backend, ServedModel
from .sglang import LOAD_PATHS, load_ranks


def _registry_changed() -> None:
    transaction.on_commit(lambda: invalidation_publish(kind="registry"))


def served_model_upsert(
    *, name: str, upstream_name: str = "", context_length: int = 8192, owned_by: str = "platform",
    routing_policy: str | None = None, backend_priority: bool | None = None,
) -> ServedModel:
    """Create or update a served model; `routing_policy` and `backend_priority`
    change only when given."""
    defaults = {"upstream_name": upstream_name, "context_length": context_length, "owned_by": owned_by}
    if routing_policy is not None:
        defaults["routing_policy"] = routing_policy
    if backend_priority is not None:
        defaults["backend_priority"] = backend_priority
    model, _ = ServedModel.objects.update_or_create(name=name, defaults=defaults)
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


def backend_load_get(*, backend: Backend, timeout: float = 2.0) -> int | None:
    """Requests running or waiting on a backend, as it reports them (SGLang
    /v1/loads, or /get_load on releases before 0.5.23); None if it cannot say."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
    for path in LOAD_PATHS:
        try:
            with urllib.request.urlopen(urllib.request.Request(backend.url + path, headers=headers),
                                        timeout=timeout) as response:
                body = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        try:
            return sum(int(r.get("num_running_reqs", r.get("num_reqs", 0))) + int(r.get("num_waiting_reqs", 0))
                       for r in load_ranks(body))
        except (AttributeError, TypeError, ValueError):
            continue
    return None


def backends_drained_remove() -> list[str]:
    """Removes draining backends that report no request running or waiting.
    A backend that cannot be reached counts as idle: it serves nothing."""
    removed = []
    for backend in Backend.objects.filter(status=Backend.Status.DRAINING).select_related("model"):
        if not backend_load_get(backend=backend):
            removed.append(f"{backend.model.name} @ {backend.url}")
            backend_remove(backend=backend)
    return removed
