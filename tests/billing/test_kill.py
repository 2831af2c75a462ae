"""Crashes lose nothing and bill nothing twice: a Celery worker (a real `celery -A config
worker` process) SIGKILLed in the middle of a Stripe push or a rollup, and the Redis broker
killed and restarted. Each time the next run (what beat would start) makes the totals exact."""
import random
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from billing.meter_push import meter_pushes_plan
from billing.models import MeterPush, UsageRollup
from billing.rollups import usage_rollup_catch_up
from billing.services import usage_records_write
from tests.billing.conftest import (celery_app_for, random_events, redis_start, stripe_tokens_by_class_for,
                                    wait_for, worker_start)
from tests.conftest import process_stop

pytestmark = pytest.mark.timeout(120)


def ledger_by_class(tenant) -> dict[str, int]:
    from tests.billing.test_meter_push import ledger_tokens_by_class

    return ledger_tokens_by_class(tenant)


def hour_events(tk, count: int, seed: int):
    now = timezone.now()
    start = max(now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3),
                now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
    hours = max(1, int((now - start).total_seconds() // 3600))
    return random_events(tk, count, rng=random.Random(seed), start=start, hours=hours)


@pytest.fixture
def worker_env(stripe_env):
    return {"db_name": connection.settings_dict["NAME"], "stripe_env": stripe_env}


def test_worker_killed_mid_push_then_rerun_pushes_nothing_twice(billing_tenant, stripe_local, private_redis,
                                                                 worker_env, tmp_path):
    tk = billing_tenant()
    usage_records_write(events=hour_events(tk, 300, seed=11))
    usage_rollup_catch_up()
    meter_pushes_plan()
    pending = MeterPush.objects.filter(tenant=tk.tenant, status="pending").count()
    assert pending > 0
    # given a worker whose push batch stalls after Stripe accepted it, before it is marked sent
    worker = worker_start(tmp_path, broker_url=private_redis.url, BILLING_TEST_TASK_DELAY_SECONDS="30",
                          **worker_env)
    app = celery_app_for(private_redis.url)
    try:
        app.send_task("billing.meter_push")
        wait_for(lambda: len(stripe_local.meter_events(customer=tk.account.stripe_customer_id)) == pending,
                 timeout=30)
        # when the worker is SIGKILLed there
        worker.kill()
    finally:
        process_stop(worker.process)
    assert MeterPush.objects.filter(tenant=tk.tenant, status="pending").count() == pending
    # then a fresh worker's run (as beat starts it) resends the same identifiers: Stripe has each once
    worker = worker_start(tmp_path, broker_url=private_redis.url, **worker_env)
    try:
        app.send_task("billing.meter_push")
        wait_for(lambda: not MeterPush.objects.filter(tenant=tk.tenant, status="pending").exists(), timeout=30)
    finally:
        process_stop(worker.process)
    events = stripe_local.meter_events(customer=tk.account.stripe_customer_id)
    assert len(events) == len({e["identifier"] for e in events}) == pending
    assert stripe_tokens_by_class_for(stripe_local, tk.account) == ledger_by_class(tk.tenant)


def test_worker_killed_mid_rollup_then_rerun_gives_exact_totals(billing_tenant, stripe_local, private_redis,
                                                                worker_env, tmp_path):
    tk = billing_tenant()
    usage_records_write(events=hour_events(tk, 300, seed=12))
    # given a worker whose rollup pass stalls inside its transaction
    worker = worker_start(tmp_path, broker_url=private_redis.url, BILLING_TEST_TASK_DELAY_SECONDS="30",
                          **worker_env)
    app = celery_app_for(private_redis.url)
    try:
        app.send_task("billing.usage_rollup")
        wait_for(lambda: "billing.usage_rollup" in worker.log.read_text(), timeout=20)
        import time

        time.sleep(1.5)  # inside the pass (its temp table is made, the rollup not written)
        worker.kill()
    finally:
        process_stop(worker.process)
    # then nothing of the killed pass is left (one transaction)
    assert not UsageRollup.objects.filter(tenant=tk.tenant).exists()
    # when the next run happens (a new worker; beat's next tick)
    worker = worker_start(tmp_path, broker_url=private_redis.url, **worker_env)
    try:
        app.send_task("billing.usage_rollup")
        wait_for(lambda: not MeterPush.objects.filter(tenant=tk.tenant, status="pending").exists()
                 and MeterPush.objects.filter(tenant=tk.tenant).exists(), timeout=40)
    finally:
        process_stop(worker.process)
    # then rollups and Stripe both equal the ledger
    rollup = {"input": 0, "cached_input": 0, "output": 0}
    for row in UsageRollup.objects.filter(tenant=tk.tenant, width="hour"):
        rollup["input"] += row.prompt_tokens - row.cached_tokens
        rollup["cached_input"] += row.cached_tokens
        rollup["output"] += row.completion_tokens
    assert rollup == ledger_by_class(tk.tenant)
    assert stripe_tokens_by_class_for(stripe_local, tk.account) == ledger_by_class(tk.tenant)


def test_a_redis_restart_loses_no_usage(billing_tenant, stripe_local, worker_env, tmp_path):
    tk = billing_tenant()
    usage_records_write(events=hour_events(tk, 200, seed=13))
    redis_server = redis_start(tmp_path)
    port = redis_server.port
    app = celery_app_for(redis_server.url)
    try:
        # given billing tasks queued while no worker runs
        app.send_task("billing.usage_rollup")
        # when the broker crashes (SIGKILL) and restarts
        redis_server.process.kill()
        redis_server.process.wait(timeout=10)
        redis_server = redis_start(tmp_path, port=port)
        # and more usage arrives meanwhile (the ledger is PostgreSQL, not Redis)
        usage_records_write(events=hour_events(tk, 100, seed=14))
        # then a worker started afterwards runs the queued task (kept by the append-only file)
        worker = worker_start(tmp_path, broker_url=redis_server.url, **worker_env)
        try:
            wait_for(lambda: "billing.usage_rollup" in worker.log.read_text() and "succeeded" in
                     worker.log.read_text(), timeout=30)
            # and across a second restart with the worker connected, beat's next tick still runs
            redis_server.process.kill()
            redis_server.process.wait(timeout=10)
            usage_records_write(events=hour_events(tk, 100, seed=15))
            redis_server = redis_start(tmp_path, port=port)
            app = celery_app_for(redis_server.url)
            for _ in range(3):
                app.send_task("billing.usage_rollup")
            wait_for(lambda: MeterPush.objects.filter(tenant=tk.tenant).exists() and not MeterPush.objects.filter(
                tenant=tk.tenant, status="pending").exists() and stripe_tokens_by_class_for(
                stripe_local, tk.account) == ledger_by_class(tk.tenant), timeout=60, interval=0.5)
        finally:
            process_stop(worker.process)
    finally:
        process_stop(redis_server.process)
    assert stripe_tokens_by_class_for(stripe_local, tk.account) == ledger_by_class(tk.tenant)
