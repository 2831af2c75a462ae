"""Drives a live simulator's admin endpoints from tests."""
import contextlib
import json
import urllib.request


def sim_call(sim, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(sim.url + path, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def sim_faults(sim, **faults):
    previous = sim_call(sim, "/sim/faults")
    sim_call(sim, "/sim/faults", faults)
    try:
        yield
    finally:
        sim_call(sim, "/sim/faults", {name: previous[name] for name in faults})
