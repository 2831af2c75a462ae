"""Our `platform/` folder must never shadow the standard library's `platform`
module: uuid, Celery, redis-py and stripe-python import it. Checked in this
(Django) process, in a real Celery worker and in the ASGI server process."""
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT, process_env, process_stop

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def assert_runtime_report_is_stdlib(report: dict) -> None:
    assert Path(report["platform_module"]).resolve().parent == STDLIB
    assert report["python_implementation"] == "CPython"
    user_agent = report["stripe_client_user_agent"]
    assert user_agent["lang_version"] == ".".join(map(str, sys.version_info[:3]))
    # stripe-python swallows errors from platform functions and writes "(disabled)".
    assert user_agent["lang_version"] != "(disabled)"


def test_platform_resolves_to_stdlib_in_django_process():
    import platform

    from config.runtime_check import runtime_report

    spec = importlib.util.find_spec("platform")
    assert Path(spec.origin).resolve().parent == STDLIB
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert platform.python_implementation() == "CPython"
    assert_runtime_report_is_stdlib(runtime_report())


def test_platform_resolves_to_stdlib_when_run_from_project_root():
    """A plain `python` started in the project root (cwd first on sys.path) must
    still get the standard module, not the folder."""
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.__file__); print(platform.python_implementation())"],
        cwd=ROOT, env=process_env(), capture_output=True, text=True, check=True,
    ).stdout.split()
    assert Path(out[0]).resolve().parent == STDLIB
    assert out[1] == "CPython"


def test_platform_resolves_to_stdlib_in_asgi_server(gateway):
    import json
    import urllib.request

    with urllib.request.urlopen(gateway.url + "/healthz", timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "ok"
    assert_runtime_report_is_stdlib(body["runtime"])


@pytest.fixture
def celery_worker_process(live_tmp):
    log = live_tmp / "celery-worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "--loglevel", "INFO",
         "--without-heartbeat", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=process_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    yield process
    process_stop(process)


def test_platform_resolves_to_stdlib_in_celery_worker(celery_worker_process):
    from config.celery import runtime_report_task

    report = runtime_report_task.delay().get(timeout=60)
    assert_runtime_report_is_stdlib(report)
