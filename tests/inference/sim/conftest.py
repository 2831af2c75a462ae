"""Fixtures for the simulator's tests; nothing here needs Django.

Run with `pytest -p no:django tests/inference/sim`.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest

from .sim_process import SimProcess, start_sim


@pytest.fixture(scope="session")
def sim_factory():
    """Start simulators with custom flags; all are stopped at session end."""
    started: list[SimProcess] = []

    def factory(*extra_args: str, api_key: str | None = None, env: dict[str, str] | None = None) -> SimProcess:
        sim = start_sim(*extra_args, api_key=api_key, env=env)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


@pytest.fixture(scope="session")
def cache_report_sim(sim_factory) -> SimProcess:
    """The shared simulator: cache report on, zero latency, small context."""
    return sim_factory("--enable-cache-report", "--context-length", "4096")


@pytest.fixture
def sim(cache_report_sim):
    """The shared simulator with default faults before and after each test."""
    defaults = {"error_rate": 0.0, "crash_after_tokens": None, "hang": False, "unhealthy": False,
                "ttft_ms": 0.0, "itl_ms": 0.0, "prefill_us_per_token": 0.0, "startup_delay_ms": 0.0}
    with cache_report_sim.client() as client:
        client.post("/sim/faults", json=defaults).raise_for_status()
    yield cache_report_sim
    with cache_report_sim.client() as client:
        client.post("/sim/faults", json=defaults).raise_for_status()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests of this folder on a fresh event loop (no pytest-asyncio here)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**arguments))
        return True
    return None
