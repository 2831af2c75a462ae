"""Run the simulator as a real subprocess on a free loopback port (test helper)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

REPO_ROOT = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_listening(url: str, process: subprocess.Popen, *, path: str = "/model_info",
                         headers: dict | None = None, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early with code {process.returncode}")
        try:
            if httpx.get(url + path, timeout=1.0, headers=headers).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up within {timeout_s}s")


@dataclass
class SimProcess:
    port: int
    process: subprocess.Popen
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


# The simulators under test look for their engine's answer to a health probe
# every 20 ms instead of SGLang's second (the gateways under test check health
# every 0.2 s), and a hung one answers 503 after 1 s instead of 20.
HEALTH_ARGS = ("--health-poll-ms", "20")
HEALTH_ENV = {"SGLANG_HEALTH_CHECK_TIMEOUT": "1"}


def start_sim(*extra_args: str, api_key: str | None = None, env: dict[str, str] | None = None) -> SimProcess:
    port = free_port()
    command = [sys.executable, "-m", "inference.sim", "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "demo-llm", "--model-path", "demo/demo-llm", *HEALTH_ARGS, *extra_args]
    if api_key:
        command += ["--api-key", api_key]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **HEALTH_ENV, **(env or {})})
    sim = SimProcess(port=port, process=process, api_key=api_key)
    try:
        wait_until_listening(sim.base_url, process,
                             headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
    except Exception:
        sim.stop()
        raise
    return sim
