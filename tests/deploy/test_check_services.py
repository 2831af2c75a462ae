"""The run and test commands say what is missing instead of a traceback."""
import subprocess
import sys

from tests.conftest import ROOT, free_port, process_env


def test_missing_postgres_and_redis_are_named_with_how_to_start_them():
    pg_port, redis_port = free_port(), free_port()
    result = subprocess.run(
        [sys.executable, "deploy/check_services.py"], cwd=ROOT, capture_output=True, text=True,
        env=process_env(POSTGRES_PORT=str(pg_port), REDIS_URL=f"redis://127.0.0.1:{redis_port}/0"),
    )
    assert result.returncode == 1
    assert f"PostgreSQL is not reachable at 127.0.0.1:{pg_port}" in result.stderr
    assert f"Redis is not reachable at redis://127.0.0.1:{redis_port}/0" in result.stderr
    assert result.stderr.count("Start it:") == 2
    assert "Traceback" not in result.stderr


def test_reachable_services_pass():
    result = subprocess.run([sys.executable, "deploy/check_services.py"], cwd=ROOT, capture_output=True, text=True,
                            env=process_env())
    assert result.returncode == 0, result.stderr
