"""bench/metering: ledger ingest rate with zero loss, and rollup time.

Creates (drops first) a dedicated database, migrates it, and measures:
1. ingest: usage events written to billing_usagerecord by N writer processes, each a
   stream of batches, with retried batches and repeated events mixed in (duplicates), by
   - `gateway`: billing.services.usage_records_write, whatever the gateway's write is today
               (this benchmark runs it as is; also updates the keys' last_used_at)
   - `values`: the same multi-row INSERT … VALUES (…),(…) … ON CONFLICT (event_id) DO NOTHING
               in raw psycopg (no ORM, no last_used_at updates)
   - `unnest`: the multi-row INSERT as INSERT … SELECT * FROM unnest(<one array per column>)
               ON CONFLICT DO NOTHING (21 parameters whatever the batch size)
   - `copy`:   COPY into a temporary staging table + INSERT … SELECT … ON CONFLICT DO NOTHING
   Zero loss: count(*) afterwards equals the distinct events sent (duplicates count once).
2. rollup: --rollup-events events (default 1,000,000) over 48 hours, 100 tenants × 2 keys ×
   3 models, rolled up (hourly + daily) in one pass from an empty rollup table; then the
   totals are checked against the raw rows; then an incremental pass after 10,000 late events.
Prints a report and writes bench/results/metering.json.

Usage: bench/run.sh metering [--ingest-events N] [--writers 1,2] [--batch 500] [--rollup-events N]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
DB = "llmplatform_bench_metering"
GOAL_INGEST_PER_S = 20_000
GOAL_ROLLUP_S = 30.0
COLUMNS = ("event_id", "request_id", "tenant_id", "api_key_id", "model", "backend", "endpoint", "transport",
           "stream", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_micros", "status", "http_status",
           "error_code", "ttft_ms", "latency_ms", "started_at", "finished_at", "created_at")
MODELS = ("bench-small", "bench-medium", "bench-large")


def conninfo(db: str) -> str:
    return (f"host={os.environ.get('POSTGRES_HOST', '127.0.0.1')} port={os.environ.get('POSTGRES_PORT', '5432')} "
            f"user={os.environ.get('POSTGRES_USER', 'postgres')} dbname={db}"
            + (f" password={os.environ['POSTGRES_PASSWORD']}" if os.environ.get("POSTGRES_PASSWORD") else ""))


def database_create(db: str) -> None:
    with psycopg.connect(conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db}"')


def django_setup(db: str) -> None:
    os.environ["POSTGRES_DB"] = db
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()


def principals_create(tenants: int) -> list[tuple[int, int]]:
    """(tenant id, api key id) pairs, 2 keys per tenant, written directly (no billing setup)."""
    from tenants.models import ApiKey, Tenant

    pairs = []
    for n in range(tenants):
        tenant = Tenant.objects.create(slug=f"bench-{n}", name=f"Bench {n}", tier="standard")
        for k in range(2):
            key = ApiKey.objects.create(tenant=tenant, name=f"k{k}", prefix="sk-bench", key_hash=uuid.uuid4().hex * 2)
            pairs.append((tenant.pk, key.pk))
    return pairs


def rows_make(count: int, pairs: list[tuple[int, int]], *, start: datetime, hours: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    rows = []
    span = hours * 3600
    for _ in range(count):
        tenant_id, key_id = pairs[rng.randrange(len(pairs))]
        started = start + timedelta(seconds=rng.random() * span)
        prompt = rng.randrange(1, 4000)
        rows.append((uuid.uuid4(), "chatcmpl-bench", tenant_id, key_id, MODELS[rng.randrange(3)],
                     "http://sim", "chat.completions", "http", True, prompt, rng.randrange(0, 1000),
                     rng.choice((0, 0, prompt // 2)), 0, "ok", 200, "", 12.5, 80.0, started,
                     started + timedelta(milliseconds=80), now))
    return rows


def batches_with_duplicates(rows: list[tuple], batch: int, seed: int) -> list[list[tuple]]:
    """Batches of `batch` rows; 2% of batches sent twice (a retried write) and 1% of rows
    repeated in a later batch (an event recorded twice)."""
    rng = random.Random(seed)
    out = []
    for start in range(0, len(rows), batch):
        chunk = list(rows[start:start + batch])
        if start and rng.random() < 0.5:
            chunk += rng.sample(rows[:start], k=max(1, batch // 100))
        out.append(chunk)
        if rng.random() < 0.02:
            out.append(chunk)
    return out


# --- writers (one process each) ---------------------------------------------------------------------

INSERT_SQL_CACHE: dict[int, str] = {}


def _insert_sql(n: int) -> str:
    sql = INSERT_SQL_CACHE.get(n)
    if sql is None:
        one = "(" + ",".join(["%s"] * len(COLUMNS)) + ")"
        sql = (f"INSERT INTO billing_usagerecord ({','.join(COLUMNS)}) VALUES " + ",".join([one] * n)
               + " ON CONFLICT (event_id) DO NOTHING")
        INSERT_SQL_CACHE[n] = sql
    return sql


def writer_insert(db: str, batches: list[list[tuple]]) -> None:
    """Client-side binding (as Django's psycopg 3 backend does): one statement of literals.
    Server-side binding of batch × 21 parameters is several times slower to parse."""
    with psycopg.connect(conninfo(db), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        for chunk in batches:
            params = [value for row in chunk for value in row]
            conn.execute(_insert_sql(len(chunk)), params)


PG_TYPES = ("uuid", "text", "bigint", "bigint", "text", "text", "text", "text", "bool", "int", "int", "int", "bigint",
            "text", "int", "text", "float8", "float8", "timestamptz", "timestamptz", "timestamptz")
UNNEST_SQL = (f"INSERT INTO billing_usagerecord ({','.join(COLUMNS)}) SELECT * FROM unnest("
              + ",".join(f"%s::{t}[]" for t in PG_TYPES) + ") ON CONFLICT (event_id) DO NOTHING")


def writer_unnest(db: str, batches: list[list[tuple]]) -> None:
    """The multi-row INSERT with one array parameter per column (21 parameters, any batch size)."""
    with psycopg.connect(conninfo(db), autocommit=True) as conn:
        for chunk in batches:
            conn.execute(UNNEST_SQL, [list(column) for column in zip(*chunk)], prepare=True)


def writer_copy(db: str, batches: list[list[tuple]]) -> None:
    with psycopg.connect(conninfo(db), autocommit=True) as conn:
        conn.execute(f"CREATE TEMP TABLE usage_staging AS SELECT {','.join(COLUMNS)} FROM billing_usagerecord "
                     "WITH NO DATA")
        for chunk in batches:
            with conn.transaction():
                with conn.cursor() as cur:
                    with cur.copy(f"COPY usage_staging ({','.join(COLUMNS)}) FROM STDIN") as copy:
                        for row in chunk:
                            copy.write_row(row)
                    cur.execute(f"INSERT INTO billing_usagerecord ({','.join(COLUMNS)}) "
                                f"SELECT {','.join(COLUMNS)} FROM usage_staging ON CONFLICT (event_id) DO NOTHING")
                    cur.execute("TRUNCATE usage_staging")


def writer_orm(db: str, batches: list[list[tuple]]) -> None:
    django_setup(db)
    from billing.services import UsageEvent, usage_records_write

    fields = [c for c in COLUMNS if c != "created_at"]
    events = [[UsageEvent(**dict(zip(fields, row[:-1]))) for row in chunk] for chunk in batches]
    from django.db import connection

    connection.close()  # a fresh connection per forked writer
    for chunk in events:
        usage_records_write(events=chunk)


WRITERS = {"gateway": writer_orm, "values": writer_insert, "unnest": writer_unnest, "copy": writer_copy}


def ingest(db: str, method: str, writers: int, rows: list[tuple], batch: int) -> dict:
    with psycopg.connect(conninfo(db), autocommit=True) as conn:
        conn.execute("TRUNCATE billing_usagerecord")
    shares = [rows[i::writers] for i in range(writers)]
    plans = [batches_with_duplicates(share, batch, seed=i) for i, share in enumerate(shares)]
    sent_rows = sum(len(chunk) for plan in plans for chunk in plan)
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(writers + 1)

    def run(plan):
        ready.wait()
        WRITERS[method](db, plan)

    processes = [context.Process(target=run, args=(plan,)) for plan in plans]
    for process in processes:
        process.start()
    ready.wait()
    started = time.perf_counter()
    for process in processes:
        process.join()
    elapsed = time.perf_counter() - started
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    with psycopg.connect(conninfo(db)) as conn:
        stored = conn.execute("SELECT count(*) FROM billing_usagerecord").fetchone()[0]
    distinct = len(rows)
    return {"method": method, "writers": writers, "batch": batch, "events": distinct, "rows_sent": sent_rows,
            "seconds": round(elapsed, 3), "events_per_s": round(distinct / elapsed),
            "rows_sent_per_s": round(sent_rows / elapsed), "stored": stored, "zero_loss": stored == distinct and
            not failed, "writer_failures": failed}


def copy_load(db: str, rows: list[tuple]) -> None:
    with psycopg.connect(conninfo(db)) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY billing_usagerecord ({','.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        conn.execute("ANALYZE billing_usagerecord")


def rollup(db: str, rows: list[tuple], pairs, late_events: int) -> dict:
    from django.db import connection

    from billing.models import RollupCursor, UsageRollup
    from billing.rollups import usage_rollup_run

    with psycopg.connect(conninfo(db), autocommit=True) as conn:
        conn.execute("TRUNCATE billing_usagerecord, billing_usagerollup, billing_usagedirtymonth")
        conn.execute("DELETE FROM billing_rollupcursor")
    load_started = time.perf_counter()
    copy_load(db, rows)
    load_seconds = time.perf_counter() - load_started
    started = time.perf_counter()
    result = usage_rollup_run(max_rows=len(rows) * 2)
    rollup_seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), sum(prompt_tokens), sum(least(cached_tokens, prompt_tokens)), "
                       "sum(completion_tokens) FROM billing_usagerecord")
        raw = [int(v) for v in cursor.fetchone()]
        totals = {}
        for width in ("hour", "day"):
            cursor.execute("SELECT sum(requests), sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), "
                           "count(*) FROM billing_usagerollup WHERE width = %s", [width])
            values = [int(v) for v in cursor.fetchone()]
            totals[width] = {"totals_match_raw": values[:4] == raw, "rollup_rows": values[4]}
    # Incremental: late events (started hours ago) arriving after the pass.
    late = rows_make(late_events, pairs, start=rows[0][18].replace(minute=0, second=0, microsecond=0),
                     hours=48, seed=99)
    copy_load(db, late)
    started = time.perf_counter()
    incremental = usage_rollup_run()
    incremental_seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM billing_usagerecord")
        raw_count = cursor.fetchone()[0]
    hourly_requests = sum(UsageRollup.objects.filter(width="hour").values_list("requests", flat=True))
    return {"events": len(rows), "copy_load_seconds": round(load_seconds, 2),
            "rollup_seconds": round(rollup_seconds, 2), "dirty_hours": result.dirty_hours,
            "hourly": totals["hour"], "daily": totals["day"],
            "incremental": {"late_events": late_events, "seconds": round(incremental_seconds, 2),
                            "dirty_hours": incremental.dirty_hours,
                            "totals_match_raw": hourly_requests == raw_count},
            "cursor": RollupCursor.objects.values("settled_id", "last_id").first()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=DB)
    parser.add_argument("--ingest-events", type=int, default=200_000, help="distinct events per ingest run")
    parser.add_argument("--writers", default="1,2", help="writer processes, comma-separated runs")
    parser.add_argument("--batch", type=int, default=500, help="rows per batch (GATEWAY_USAGE_BATCH_ROWS)")
    parser.add_argument("--methods", default="gateway,values,unnest,copy")
    parser.add_argument("--rollup-events", type=int, default=1_000_000)
    parser.add_argument("--json", default=str(RESULTS / "metering.json"))
    args = parser.parse_args()

    database_create(args.db)
    django_setup(args.db)
    from django.core.management import call_command
    from django.db import connection

    os.environ["BILLING_ROLLUP_SETTLE_SECONDS"] = "0"
    from django.conf import settings

    settings.BILLING_ROLLUP_SETTLE_SECONDS = 0.0
    call_command("migrate", verbosity=0)
    pairs = principals_create(100)
    connection.close()
    print(f"database {args.db} created and migrated; 100 tenants × 2 keys", flush=True)

    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=48)
    ingest_rows = rows_make(args.ingest_events, pairs, start=start, hours=48, seed=1)
    ingest_results = []
    for method in args.methods.split(","):
        for writers in (int(w) for w in args.writers.split(",")):
            result = ingest(args.db, method, writers, ingest_rows, args.batch)
            ingest_results.append(result)
            print(f"ingest {method:<7} writers={writers} {result['events_per_s']:>8,} events/s "
                  f"({result['rows_sent']:,} rows sent incl. duplicates in {result['seconds']} s) "
                  f"stored={result['stored']:,} zero_loss={result['zero_loss']}", flush=True)

    print(f"generating {args.rollup_events:,} events for the rollup...", flush=True)
    rollup_rows = rows_make(args.rollup_events, pairs, start=start, hours=48, seed=2)
    rollup_result = rollup(args.db, rollup_rows, pairs, late_events=10_000)
    connection.close()
    print(f"rollup {rollup_result['events']:,} events: {rollup_result['rollup_seconds']} s "
          f"({rollup_result['dirty_hours']} dirty tenant-hours; hourly rows {rollup_result['hourly']['rollup_rows']:,}"
          f", daily rows {rollup_result['daily']['rollup_rows']:,}; totals match raw: hourly "
          f"{rollup_result['hourly']['totals_match_raw']}, daily {rollup_result['daily']['totals_match_raw']})")
    inc = rollup_result["incremental"]
    print(f"incremental pass after {inc['late_events']:,} late events: {inc['seconds']} s "
          f"({inc['dirty_hours']} dirty tenant-hours; totals match raw: {inc['totals_match_raw']})")

    best = max((r for r in ingest_results if r["zero_loss"]), key=lambda r: r["events_per_s"], default=None)
    goals = [
        {"goal": f">= {GOAL_INGEST_PER_S:,} events/s ingested with zero loss",
         "best": best and f"{best['method']} writers={best['writers']}: {best['events_per_s']:,}/s",
         "met": bool(best and best["events_per_s"] >= GOAL_INGEST_PER_S)},
        {"goal": f"{args.rollup_events:,} events rolled up in <= {GOAL_ROLLUP_S:.0f} s",
         "best": f"{rollup_result['rollup_seconds']} s",
         "met": rollup_result["rollup_seconds"] <= GOAL_ROLLUP_S and rollup_result["hourly"]["totals_match_raw"]
         and rollup_result["daily"]["totals_match_raw"]},
    ]
    for goal in goals:
        print(f"goal {'MET ' if goal['met'] else 'MISSED'}  {goal['goal']}: {goal['best']}")
    meta = {"when": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "postgres": psycopg.connect(conninfo("postgres")).info.server_version}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "ingest": ingest_results, "rollup": rollup_result,
                                           "goals": goals}, indent=2, default=str) + "\n")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
