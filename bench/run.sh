#!/usr/bin/env bash
# Runs one benchmark: bench/run.sh NAME [args...] executes bench/NAME/run.py with the
# project's virtualenv and PYTHONPATH. `bench/run.sh` alone lists the benchmarks.
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$BENCH")"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

available() { for d in "$BENCH"/*/; do [ -f "$d/run.py" ] && basename "$d"; done; }

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: bench/run.sh NAME [args...]   (NAME --help for its options)" >&2
  echo "benchmarks:" >&2
  available | sed 's/^/  /' >&2
  exit 2
fi
name="$1"; shift
if [ ! -f "$BENCH/$name/run.py" ]; then
  echo "no benchmark '$name'; available:" >&2
  available | sed 's/^/  /' >&2
  exit 2
fi
export PYTHONPATH="$ROOT/platform:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-config.settings}"
cd "$ROOT"
exec "$PYTHON" "$BENCH/$name/run.py" "$@"
