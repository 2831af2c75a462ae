"""Choosing a backend from a model's pool."""
import time

from .registry import BackendState, ModelEntry


def route_pick_backend(model: ModelEntry, *, exclude: set[str] = frozenset()) -> BackendState | None:
    """Least outstanding requests among the available backends; ties rotate."""
    now = time.monotonic()
    backends = model.backends
    count = len(backends)
    best: BackendState | None = None
    start = model.next_index
    for offset in range(count):
        backend = backends[(start + offset) % count]
        if backend.url in exclude or not backend.available(now):
            continue
        if best is None or backend.outstanding < best.outstanding:
            best = backend
    if best is not None:
        model.next_index = (start + 1) % count
    return best
