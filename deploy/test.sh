#!/usr/bin/env bash
# Sets up and runs the test suite against local PostgreSQL and Redis.
# Extra arguments go to pytest, e.g. deploy/test.sh tests/inference -k websocket
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
.venv/bin/python deploy/check_services.py
export PYTHONPATH="$PWD/platform:$PWD"
exec .venv/bin/python -m pytest "$@"
