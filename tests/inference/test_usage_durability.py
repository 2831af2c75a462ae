"""No usage event is lost when a gateway or a shipper process dies, and none is
stored twice."""
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import openai
from django.db import connection

from billing.models import UsageRecord
from billing.services import UsageEvent
from inference.metering import SHIPPER_LOCK, usage_event_line
from tests.conftest import ROOT, gateway_start, process_env, process_stop, usage_rows_wait

MESSAGES = [{"role": "user", "content": "Bill me exactly once."}]


def serve_requests(gateway, tk, count: int) -> list[str]:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tk.secret, max_retries=0)
    ids = []
    for i in range(count):
        chunks = list(client.chat.completions.create(model="test-llm", messages=MESSAGES, max_tokens=5 + i,
                                                     stream=True, stream_options={"include_usage": True}))
        ids.append(chunks[0].id)
    return ids


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_gateway_killed_right_after_streams_end_loses_nothing(live_tmp, registry, make_tenant):
    spool = live_tmp / "spool-kill"
    db_name = connection.settings_dict["NAME"]
    folder = spool / db_name
    # No shipper: the events stay in the spool when the process is killed.
    gateway = gateway_start(live_tmp, db_name, GATEWAY_USAGE_SPOOL_DIR=str(spool), GATEWAY_USAGE_SHIPPER="off")
    tk = make_tenant()
    ids = serve_requests(gateway, tk, 5)
    os.kill(gateway.process.pid, signal.SIGKILL)
    gateway.process.wait()
    assert not UsageRecord.objects.filter(api_key=tk.api_key).exists()
    [orphan] = list(folder.glob("usage-*.jsonl"))
    backup = live_tmp / "orphan-copy.jsonl"
    shutil.copy(orphan, backup)

    # The next gateway's shipper stores the dead process's spool, then deletes it.
    successor = gateway_start(live_tmp, db_name, GATEWAY_USAGE_SPOOL_DIR=str(spool))
    try:
        rows = usage_rows_wait(api_key=tk.api_key, count=5)
        assert sorted(r.request_id for r in rows) == sorted(ids)
        assert [r.completion_tokens for r in sorted(rows, key=lambda r: ids.index(r.request_id))] == [5, 6, 7, 8, 9]
        wait_until(lambda: not orphan.exists(), what="the orphan spool to be removed")

        # The same events shipped again (a second copy of the file) are stored once.
        again = folder / "usage-copied-again.jsonl"
        shutil.copy(backup, again)
        wait_until(lambda: not again.exists(), what="the copied spool to be shipped")
        assert UsageRecord.objects.filter(api_key=tk.api_key).count() == 5
    finally:
        process_stop(successor.process)


def test_graceful_stop_stores_everything_and_removes_the_spool(live_tmp, registry, make_tenant):
    spool = live_tmp / "spool-graceful"
    db_name = connection.settings_dict["NAME"]
    gateway = gateway_start(live_tmp, db_name, GATEWAY_USAGE_SPOOL_DIR=str(spool))
    tk = make_tenant()
    serve_requests(gateway, tk, 3)
    process_stop(gateway.process)  # SIGTERM: the shipper drains the folder and exits
    assert UsageRecord.objects.filter(api_key=tk.api_key).count() == 3
    assert list((spool / db_name).glob("usage-*.jsonl")) == []


def test_stop_signal_to_gateway_and_shipper_at_once_stores_everything_and_removes_the_spool(
        live_tmp, registry, make_tenant):
    """A service manager signals a whole process group: the shipper gets its
    SIGTERM while the gateway still holds its spool file. It waits for the file
    to be closed, stores the rest and deletes it, rather than leaving it to be
    shipped again by the next start."""
    spool = live_tmp / "spool-group"
    db_name = connection.settings_dict["NAME"]
    gateway = gateway_start(live_tmp, db_name, GATEWAY_USAGE_SPOOL_DIR=str(spool))
    tk = make_tenant()
    serve_requests(gateway, tk, 3)
    children = open(f"/proc/{gateway.process.pid}/task/{gateway.process.pid}/children").read().split()
    [shipper_pid] = [int(pid) for pid in children
                     if b"inference.shipper" in open(f"/proc/{pid}/cmdline", "rb").read()]
    os.kill(shipper_pid, signal.SIGTERM)
    os.kill(gateway.process.pid, signal.SIGTERM)
    gateway.process.wait(timeout=15)
    wait_until(lambda: not os.path.exists(f"/proc/{shipper_pid}"), what="the shipper to exit")
    assert UsageRecord.objects.filter(api_key=tk.api_key).count() == 3
    assert list((spool / db_name).glob("usage-*.jsonl")) == []


def test_shipper_killed_mid_batch_then_restarted_stores_each_event_once(live_tmp, make_tenant):
    tk = make_tenant()
    folder = live_tmp / "spool-shipper" / connection.settings_dict["NAME"]
    folder.mkdir(parents=True)
    now = datetime.now(timezone.utc)
    events = [UsageEvent(uuid.uuid4(), f"chatcmpl-{i}", tk.tenant.id, tk.api_key.id, "test-llm", "", "completions",
                         "http", False, 10, i % 7, 0, 0, "ok", 200, "", 1.0, 2.0, now, now) for i in range(6000)]
    (folder / "usage-synthetic.jsonl").write_bytes(b"".join(usage_event_line(e) for e in events))

    def shipper() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "inference.shipper", "--spool-dir", str(folder),
                                 "--batch-rows", "200"], cwd=ROOT,
                                env=process_env(POSTGRES_DB=connection.settings_dict["NAME"]))

    first = shipper()
    wait_until(lambda: UsageRecord.objects.filter(api_key=tk.api_key).exists(), what="a first batch")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    stored_before_restart = UsageRecord.objects.filter(api_key=tk.api_key).count()
    assert 0 < stored_before_restart <= 6000

    second = shipper()
    try:
        wait_until(lambda: not (folder / "usage-synthetic.jsonl").exists(), what="the spool to be shipped")
    finally:
        process_stop(second)
    rows = UsageRecord.objects.filter(api_key=tk.api_key)
    assert rows.count() == 6000
    assert sum(rows.values_list("completion_tokens", flat=True)) == sum(i % 7 for i in range(6000))


def _niceness(pid: int) -> int:
    # /proc/PID/stat: the command name may hold spaces; fields after ")" start at 3.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[16])


def test_shipper_runs_at_lower_cpu_priority_than_the_gateway(live_tmp):
    """The shipper shares the gateway's cores; it lowers its own priority so
    requests come first (GATEWAY_USAGE_SHIPPER_NICE, 10 by default; 0 keeps it)."""
    ours = os.nice(0)
    for setting, expected in ((None, min(19, ours + 10)), ("0", ours)):
        folder = live_tmp / f"spool-nice-{setting}"
        folder.mkdir()
        extra = {} if setting is None else {"GATEWAY_USAGE_SHIPPER_NICE": setting}
        proc = subprocess.Popen([sys.executable, "-m", "inference.shipper", "--spool-dir", str(folder),
                                 "--parent-pid", str(os.getpid())], cwd=ROOT,
                                env=process_env(POSTGRES_DB=connection.settings_dict["NAME"], **extra))
        try:
            # The shipper takes its lock once set up, after lowering its priority.
            wait_until(lambda: (folder / SHIPPER_LOCK).exists() or proc.poll() is not None, what="the shipper to start")
            assert proc.poll() is None
            assert _niceness(proc.pid) == expected
        finally:
            process_stop(proc)


def test_a_finished_request_and_its_meter_need_no_cycle_collector():
    """A request holds its meter and the meter does not hold the request, so both
    are freed when the request ends, not by a garbage-collector pass."""
    import gc

    from inference.streaming import CHAT, CompletionRequest, UsageMeter
    from tenants.selectors import ApiKeyPrincipal

    principal = ApiKeyPrincipal(1, "sk-abc", 1, "t_1", "acme", "standard", "active", "", None, False)
    recorded = []
    gc.collect()
    gc.disable()
    try:
        for i in range(50):
            request = CompletionRequest(principal=principal, endpoint=CHAT, transport="http", request_id=f"r{i}",
                                        body={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                                        stream=False, include_usage=False)
            request.meter = UsageMeter(recorded.append, lambda *args, **kwargs: None)
            request.meter.observe({"prompt_tokens": 5, "completion_tokens": 2})
            request.meter.finish(request)
            del request
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert [(e.request_id, e.prompt_tokens, e.completion_tokens) for e in recorded[:2]] == [("r0", 5, 2), ("r1", 5, 2)]


def test_lines_written_while_the_shipper_stores_wait_for_its_next_round(tmp_path):
    """A gateway writes a line per request while the shipper stores the last
    ones: chasing them one read at a time made a transaction per line or two
    (200 a second at 650 requests/s). A round stores what was there when it
    looked; what arrived meanwhile goes in the next round's one batch."""
    from inference.shipper import Shipper

    now = datetime.now(timezone.utc)

    def line(i: int) -> bytes:
        return usage_event_line(UsageEvent(uuid.uuid4(), f"chatcmpl-{i}", 1, 1, "m", "", "completions", "http",
                                           False, 10, 1, 0, 0, "ok", 200, "", 1.0, 2.0, now, now))

    path = tmp_path / "usage-test.jsonl"
    path.write_bytes(b"".join(line(i) for i in range(3)))
    batches = []

    def store(*, events):
        batches.append(len(events))
        if len(batches) < 10:  # the gateway goes on writing meanwhile (a while)
            with path.open("ab") as spool:
                spool.write(line(100 + len(batches)) + line(200 + len(batches)))
        return len(events)

    shipper = Shipper(tmp_path, batch_rows=5000)
    shipper._store = store
    assert shipper.ship_new_lines(path) == 3
    assert shipper.ship_new_lines(path) == 2
    assert batches == [3, 2]
