"""The real sglang-router (Rust "smg") in front of two simulators.

The router discovers workers through GET /health, /server_info and
/model_info, then polls /get_load; a stream must pass through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx2 as httpx
import openai
import pytest

from .sim_process import REPO_ROOT, free_port, start_sim

pytest.importorskip("sglang_router")

ROUTER_STARTUP_TIMEOUT_S = 30.0


@contextlib.contextmanager
def _router(sims, *flags: str, expected: int):
    """sglang-router's cache_aware policy in front of `sims`, once it lists
    `expected` healthy workers; its URL."""
    router_port = free_port()
    command = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
               "--port", str(router_port), "--worker-urls", *[sim.base_url for sim in sims],
               "--policy", "cache_aware", "--log-level", "warn",
               "--prometheus-port", str(free_port()), *flags]
    router = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    router_url = f"http://127.0.0.1:{router_port}"
    try:
        _wait_for_workers(router_url, router, expected=expected)
        yield router_url
    finally:
        router.terminate()
        try:
            router.wait(timeout=10)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait(timeout=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A local (empty) model directory: the router then looks for a tokenizer
    # on disk instead of asking Hugging Face, so nothing leaves the machine.
    return tmp_path_factory.mktemp("sim-model")


@pytest.fixture(scope="module")
def routed_sims(model_dir):
    sims = [start_sim("--model-path", str(model_dir), "--enable-cache-report") for _ in range(2)]
    try:
        with _router(sims, expected=2) as router_url:
            yield router_url, sims
    finally:
        for sim in sims:
            sim.stop()


def _wait_for_workers(router_url: str, router: subprocess.Popen, *, expected: int) -> None:
    deadline = time.monotonic() + ROUTER_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if router.poll() is not None:
            raise RuntimeError(f"router exited: {router.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            workers = httpx.get(f"{router_url}/workers", timeout=1.0)
            if workers.status_code == 200:
                listed = workers.json()
                entries = listed.get("workers", listed) if isinstance(listed, dict) else listed
                if len(entries) >= expected and all(entry.get("is_healthy", True) for entry in entries):
                    return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError("router did not register the simulators in time")


def _received(sims) -> list[int]:
    return [httpx.get(f"{sim.base_url}/sim/stats").json()["requests_received"] for sim in sims]


def test_stream_chat_completion_through_router(routed_sims):
    router_url, sims = routed_sims
    before = _received(sims)
    client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="x", max_retries=0)

    chunks = list(client.chat.completions.create(
        model="demo-llm", messages=[{"role": "user", "content": "Hello through the router"}],
        max_tokens=6, stream=True, stream_options={"include_usage": True}))

    role, *contents, finish, usage = chunks
    assert role.choices[0].delta.role == "assistant"
    assert len(contents) == 6
    assert finish.choices[0].finish_reason == "length"
    assert usage.usage.completion_tokens == 6 and usage.usage.prompt_tokens_details is not None
    after = _received(sims)
    assert sum(after) - sum(before) == 1  # exactly one worker served it, no retries


def test_cache_aware_router_keeps_a_prefix_on_one_worker(routed_sims):
    router_url, sims = routed_sims
    client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "A long shared system prompt about rivers and mountains " * 8}]
    before = _received(sims)
    completions = [client.chat.completions.create(model="demo-llm", messages=messages, max_tokens=2)
                   for _ in range(4)]
    deltas = [after - start for after, start in zip(_received(sims), before)]
    assert sorted(deltas) == [0, 4]
    # every repeat after the first hits the worker's radix cache (all but the last prompt token)
    assert all(c.usage.prompt_tokens_details.cached_tokens == c.usage.prompt_tokens - 1 for c in completions[1:])


def test_native_generate_through_router(routed_sims):
    router_url, _ = routed_sims
    response = httpx.post(f"{router_url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 3}},
                          timeout=10)
    assert response.status_code == 200
    assert response.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 3}


def test_dp_aware_router_pins_a_prefix_to_one_data_parallel_rank(model_dir):
    """sglang-router's --dp-aware mode reads `dp_size` from /server_info,
    lists one worker per rank (url@rank) and names the rank in each request;
    the simulator's ranks cache apart, so a repeated prompt hits the rank it
    was pinned to (without the rank, the server's round robin would alternate)."""
    sim = start_sim("--model-path", str(model_dir), "--enable-cache-report", "--dp-size", "2")
    try:
        with _router([sim], "--dp-aware", expected=2) as router_url:
            workers = httpx.get(f"{router_url}/workers", timeout=5).json()["workers"]
            client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="x", max_retries=0)
            messages = [{"role": "user", "content": "A long shared prompt about rivers and mountains " * 4}]
            completions = [client.chat.completions.create(model="demo-llm", messages=messages, max_tokens=2)
                           for _ in range(4)]
            loads = httpx.get(f"{sim.base_url}/v1/loads").json()["loads"]
    finally:
        sim.stop()
    assert sorted(worker["url"] for worker in workers) == [f"{sim.base_url}@0", f"{sim.base_url}@1"]
    assert all(c.usage.prompt_tokens_details.cached_tokens == c.usage.prompt_tokens - 1 for c in completions[1:])
    assert sorted(load["num_running_reqs"] + load["num_waiting_reqs"] for load in loads) == [0, 0]
    assert sorted(load["cache_hit_rate"] > 0 for load in loads) == [False, True]  # one rank served them all
