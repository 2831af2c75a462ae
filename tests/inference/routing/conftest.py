"""Helpers for the routing unit tests; nothing here needs the database."""
from __future__ import annotations

import pytest

from inference.registry import BackendState, ModelEntry


def model_build(*urls: str, name: str = "m") -> ModelEntry:
    return ModelEntry(name, name, 8192, "tests", 0, backends=[BackendState(url) for url in urls])


@pytest.fixture
def pool() -> ModelEntry:
    return model_build("http://a", "http://b", "http://c", "http://d")


def by_url(model: ModelEntry) -> dict[str, BackendState]:
    return {backend.url: backend for backend in model.backends}
