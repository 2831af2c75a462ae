"""No usage event is lost when a gateway process dies, and none is stored twice."""
import os
import shutil
import signal
import time

import openai
from django.db import connection

from billing.models import UsageRecord
from tests.conftest import gateway_start, process_stop, usage_rows_wait

MESSAGES = [{"role": "user", "content": "Bill me exactly once."}]


def serve_requests(gateway, tk, count: int) -> list[str]:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    ids = []
    for i in range(count):
        chunks = list(client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=5 + i,
                                                     stream=True, stream_options={"include_usage": True}))
        ids.append(chunks[0].id)
    return ids


def test_gateway_killed_right_after_streams_end_loses_nothing(live_tmp, registry, make_tenant):
    spool = live_tmp / "spool-kill"
    db_name = connection.settings_dict["NAME"]
    # Batches are held for 60 s: the kill comes before any reaches PostgreSQL.
    gateway = gateway_start(live_tmp, db_name, GATEWAY_USAGE_SPOOL_DIR=str(spool), GATEWAY_USAGE_FLUSH_SECONDS="60",
                            GATEWAY_USAGE_BATCH_ROWS="1000")
    tk = make_tenant()
    ids = serve_requests(gateway, tk, 5)
    assert not UsageRecord.objects.filter(api_key=tk.api_key).exists()
    os.kill(gateway.process.pid, signal.SIGKILL)
    gateway.process.wait()
    [orphan] = list((spool / db_name).glob("usage-*.jsonl"))
    backup = live_tmp / "orphan-copy.jsonl"
    shutil.copy(orphan, backup)

    # A new process finds the dead one's spool at start and stores it.
    successor = gateway_start(live_tmp, db_name, GATEWAY_USAGE_SPOOL_DIR=str(spool),
                              GATEWAY_USAGE_SPOOL_SCAN_SECONDS="0.2")
    try:
        rows = usage_rows_wait(api_key=tk.api_key, count=5)
        assert sorted(r.request_id for r in rows) == sorted(ids)
        assert [r.completion_tokens for r in sorted(rows, key=lambda r: ids.index(r.request_id))] == [5, 6, 7, 8, 9]
        assert not orphan.exists()

        # The same events replayed again (a second copy of the file) are stored once.
        shutil.copy(backup, spool / db_name / "usage-replayed-again.jsonl")
        deadline = time.monotonic() + 5
        while (spool / db_name / "usage-replayed-again.jsonl").exists():
            assert time.monotonic() < deadline, "the copied spool was never replayed"
            time.sleep(0.05)
        assert UsageRecord.objects.filter(api_key=tk.api_key).count() == 5
    finally:
        process_stop(successor.process)


def test_graceful_stop_writes_everything_and_removes_its_spool(live_tmp, registry, make_tenant):
    spool = live_tmp / "spool-graceful"
    db_name = connection.settings_dict["NAME"]
    gateway = gateway_start(live_tmp, db_name, GATEWAY_USAGE_SPOOL_DIR=str(spool), GATEWAY_USAGE_FLUSH_SECONDS="60",
                            GATEWAY_USAGE_BATCH_ROWS="1000")
    tk = make_tenant()
    serve_requests(gateway, tk, 3)
    process_stop(gateway.process)  # SIGTERM: lifespan shutdown flushes
    assert UsageRecord.objects.filter(api_key=tk.api_key).count() == 3
    assert list((spool / db_name).glob("usage-*.jsonl")) == []
