#!/usr/bin/env bash
# Sets up and runs the whole platform on this machine: migrations, an SGLang-protocol
# simulator, a local Stripe-compatible server, the ASGI server (which starts its
# usage shipper), a Celery worker and beat, a demo tenant, key and price.
# Ctrl-C stops everything. Ports: GATEWAY_PORT (8000), SIM_PORT (30000), EMBED_SIM_PORT (30001).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GATEWAY_HOST="${GATEWAY_HOST:-127.0.0.1}"
GATEWAY_PORT="${GATEWAY_PORT:-8000}"
SIM_PORT="${SIM_PORT:-30000}"
STRIPE_PORT="${STRIPE_PORT:-12111}"
EMBED_SIM_PORT="${EMBED_SIM_PORT:-30001}"
MODEL="${DEMO_MODEL:-demo-llm}"
EMBED_MODEL="${DEMO_EMBED_MODEL:-demo-embed}"
export PYTHONPATH="$ROOT/platform:$ROOT"
export DJANGO_SETTINGS_MODULE=config.settings

deploy/setup.sh
.venv/bin/python deploy/check_services.py
.venv/bin/python manage.py migrate --noinput >/dev/null
mkdir -p .run

pids=()
stop_all() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_all INT TERM EXIT

wait_http() {  # url, name, log
  for _ in $(seq 1 100); do
    if .venv/bin/python -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  echo "error: $2 did not start; see $3" >&2
  tail -n 20 "$3" >&2
  exit 1
}

.venv/bin/python -m inference.sim --host 127.0.0.1 --port "$SIM_PORT" --served-model-name "$MODEL" \
  --enable-cache-report --tool-call-parser qwen25 --ttft-ms 40 --itl-ms 15 > .run/sim.log 2>&1 &
pids+=($!)
.venv/bin/python -m inference.sim --host 127.0.0.1 --port "$EMBED_SIM_PORT" --served-model-name "$EMBED_MODEL" \
  --is-embedding --json-model-override-args '{"is_matryoshka": true}' > .run/sim-embed.log 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/health" simulator .run/sim.log
wait_http "http://127.0.0.1:$EMBED_SIM_PORT/health" "embedding simulator" .run/sim-embed.log

# Billing goes to the local Stripe-compatible server unless STRIPE_API_BASE names another.
if [ -z "${STRIPE_API_BASE:-}" ]; then
  .venv/bin/python -m billing.stripe_local --host 127.0.0.1 --port "$STRIPE_PORT" \
    --state-file .run/stripe-local.json > .run/stripe-local.log 2>&1 &
  pids+=($!)
  export STRIPE_API_BASE="http://127.0.0.1:$STRIPE_PORT" STRIPE_METER_EVENTS_BASE="http://127.0.0.1:$STRIPE_PORT"
  export STRIPE_API_KEY="${STRIPE_API_KEY:-sk_test_local}"
  wait_http "http://127.0.0.1:$STRIPE_PORT/_local/health" "Stripe-compatible server" .run/stripe-local.log
fi
if [ -z "${STRIPE_WEBHOOK_SECRET:-}" ]; then
  STRIPE_WEBHOOK_SECRET=$(.venv/bin/python manage.py stripe_webhook_endpoint_create \
    "http://$GATEWAY_HOST:$GATEWAY_PORT/billing/stripe/webhook")
  export STRIPE_WEBHOOK_SECRET
fi

API_KEY=$(.venv/bin/python manage.py demo_setup --model "$MODEL" --backend "http://127.0.0.1:$SIM_PORT")
.venv/bin/python manage.py model_register "$EMBED_MODEL" --backend "http://127.0.0.1:$EMBED_SIM_PORT" >/dev/null
# Prices for the demo models (per million tokens), once.
.venv/bin/python manage.py price_create "$MODEL" --version v1 --input 0.50 --cached-input 0.25 --output 1.50 \
  --effective-from 2026-01-01T00:00Z >/dev/null 2>&1 || true
.venv/bin/python manage.py price_create "$EMBED_MODEL" --version v1 --input 0.02 --cached-input 0.02 --output 0 \
  --effective-from 2026-01-01T00:00Z >/dev/null 2>&1 || true

.venv/bin/python -m uvicorn config.asgi:application --app-dir platform --host "$GATEWAY_HOST" \
  --port "$GATEWAY_PORT" --loop uvloop --http httptools --lifespan on --no-access-log > .run/gateway.log 2>&1 &
pids+=($!)
.venv/bin/python -m celery -A config worker --loglevel INFO --concurrency 2 > .run/worker.log 2>&1 &
pids+=($!)
.venv/bin/python -m celery -A config beat --loglevel INFO --schedule .run/celerybeat-schedule > .run/beat.log 2>&1 &
pids+=($!)
wait_http "http://$GATEWAY_HOST:$GATEWAY_PORT/healthz" gateway .run/gateway.log

BASE="http://$GATEWAY_HOST:$GATEWAY_PORT/v1"
cat <<TXT

The platform is running (logs in .run/). Export these to use it:

OPENAI_BASE_URL=$BASE
OPENAI_API_KEY=$API_KEY

Try it:
  curl -N $BASE/chat/completions -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" \\
    -d '{"model": "$MODEL", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}'
  .venv/bin/python -c 'from openai import OpenAI; c = OpenAI(base_url="$BASE", api_key="$API_KEY"); print(c.chat.completions.create(model="$MODEL", messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content)'
  curl $BASE/embeddings -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" \
    -d '{"model": "$EMBED_MODEL", "input": "Hello"}'

Admin: http://$GATEWAY_HOST:$GATEWAY_PORT/admin/ (create a login with: .venv/bin/python manage.py createsuperuser)
WebSocket API: ws://$GATEWAY_HOST:$GATEWAY_PORT/v1/ws
Press Ctrl-C to stop.
TXT
wait -n "${pids[@]}"
echo "a platform process exited; see .run/*.log" >&2
