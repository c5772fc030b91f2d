"""Load-stage benchmark: N synthetic customer rows through `crm_sync.load.load` (run by `make bench`).

    .venv/bin/python bench/bench_load.py [--rows 1000000] [--keep]

What it measures, from one run on a fresh database `crm_bench` of the embedded PostgreSQL under
`.local/pg-bench` (dropped and recreated first, then migrated):
- setup, not timed: the run's `stg.extracted` and `stg.resolved` rows (as extract and resolve
  would have left them), 1% of the keys quarantined by validate, and the run-log row;
- raw COPY: the same rows as `stg.mapped_customer` gets, COPYed with `staging.copy_rows` into a
  scratch UNLOGGED table without keys or indexes — the ceiling for moving these rows at all;
- full load stage: COPY into `stg.mapped_customer` (what the map stage writes) plus
  `load.load(conn, run_id, cfg)` (customers, source records, links, survivorship, watermark,
  run log, one transaction), timed together and also separately, and once more without the time
  spent inside `load._survivorship` (measured by wrapping it, so both figures come from the same
  run): survivorship is being replaced by a config-driven module and costs about half of the load;
- rerun: `load.load` again for the same run, which must change nothing (idempotent);
- peak memory: `ru_maxrss` of this Python process, which includes the synthetic rows the benchmark
  holds in memory (their share is printed too). PostgreSQL runs in its own processes, whose memory
  is not included.
The mapped rows are generated once, before any timing, so the COPY figures measure
`staging.copy_rows` (COPY text encoding in Python + COPY in PostgreSQL), not the benchmark's generator.
Nothing about time is asserted; the target is printed next to the figure.
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from crm_sync import db, load, runlog, staging  # noqa: E402
from crm_sync.config import load_source  # noqa: E402

TARGET_ROWS_PER_SECOND = 100_000
DATABASE = "crm_bench"
STREAM = "customers"
QUARANTINE_EVERY = 100   # 1% of the keys were rejected by validate
SHARED_EVERY = 20        # 5% of the records resolve to a customer another record already has

MAPPED_COLUMNS = ["run_id", "source", "stream", "source_pk", "customer_id", "full_name", "name_key", "phone_raw",
                  "phone_e164", "phone_kind", "phone_ext", "email", "company", "city", "source_created_at",
                  "source_updated_at", "row_hash"]
RESOLVED_COLUMNS = ["run_id", "source", "stream", "source_pk", "customer_id", "decision", "match_rule",
                    "match_score", "explanation", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind",
                    "phone_ext", "email", "email_valid"]
SURNAMES = ["Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou"]
GIVEN = ["Wei", "Fang", "Na", "Min", "Jing", "Lei", "Qiang", "Yan", "Jun", "Tao", "Hui", "Ping"]
CITIES = ["Beijing", "Shanghai", "Guangzhou", "Shenzhen", "Chengdu", "Hangzhou", "Wuhan", "Xi'an"]
BASE_TIME = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _customer_id(i: int) -> str:
    owner = i - 1 if i % SHARED_EVERY == 1 else i   # every 20th record joins its neighbour's customer
    return str(uuid.UUID(int=(0xC0FFEE << 96) | owner))


def _person(i: int) -> dict:
    name = f"{SURNAMES[i % len(SURNAMES)]} {GIVEN[(i // 10) % len(GIVEN)]} {i}"
    mobile = f"13{(i % 7) + 3}{i:08d}"[-11:]
    return {
        "pk": f"C{i:08d}",
        "customer_id": _customer_id(i),
        "full_name": name,
        "name_key": name.lower().replace(" ", ""),
        "phone_raw": f"{mobile[:3]} {mobile[3:7]} {mobile[7:]}",
        "phone_e164": f"+86{mobile}",
        "phone_kind": "mobile" if i % 10 else "landline",
        "phone_ext": None,
        "email": f"user{i}@example.com" if i % 4 else None,
        "company": f"Company {i % 5000}",
        "city": CITIES[i % len(CITIES)],
        "created": BASE_TIME - timedelta(days=400, seconds=i),
        "updated": BASE_TIME + timedelta(seconds=i % 86_400),
    }


def mapped_rows(run_id: str, source: str, n: int):
    for i in range(n):
        p = _person(i)
        digest = hashlib.sha256(f"{p['pk']}|{p['full_name']}|{p['phone_e164']}|{p['email']}".encode()).hexdigest()
        yield (run_id, source, STREAM, p["pk"], p["customer_id"], p["full_name"], p["name_key"], p["phone_raw"],
               p["phone_e164"], p["phone_kind"], p["phone_ext"], p["email"], p["company"], p["city"],
               p["created"], p["updated"], digest)


def resolved_rows(run_id: str, source: str, n: int):
    for i in range(n):
        p = _person(i)
        shared = i % SHARED_EVERY == 1
        yield (run_id, source, STREAM, p["pk"], p["customer_id"], "linked" if shared else "new",
               "phone_exact" if shared else "new", 1.0 if shared else None,
               {"phone": 1.0} if shared else None, p["full_name"], p["name_key"], p["phone_raw"],
               p["phone_e164"], p["phone_kind"], p["phone_ext"], p["email"], p["email"] is not None)


def extracted_rows(run_id: str, source: str, n: int):
    for i in range(n):
        p = _person(i)
        yield (run_id, source, STREAM, p["pk"], p["updated"],
               {"customer_no": p["pk"], "name": p["full_name"], "mobile": p["phone_raw"], "email": p["email"],
                "company": p["company"], "city": p["city"], "updated_at": p["updated"]})


def fresh_database() -> str:
    admin = db.embedded_server_uri(ROOT / ".local" / "pg-bench")
    db.drop_database(admin, DATABASE)
    db.ensure_database(admin, DATABASE)
    return db.with_database(admin, DATABASE)


def setup(conn, run_id: str, cfg, n: int) -> None:
    with conn.cursor() as cur:
        runlog.start(cur, run_id, cfg.source, cfg.dag_id, BASE_TIME - timedelta(days=1), BASE_TIME)
        staging.copy_rows(cur, "stg.extracted", ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
                          extracted_rows(run_id, cfg.source, n))
        staging.copy_rows(cur, "stg.resolved", RESOLVED_COLUMNS, resolved_rows(run_id, cfg.source, n))
        cur.execute(
            """insert into sync.quarantine (run_id, source, stream, source_pk, stage, field, reason, expectation)
               select %s, %s, %s, 'C' || lpad(g::text, 8, '0'), 'validate', 'email', 'bench: rejected on purpose',
                      'expect_column_values_to_match_regex'
               from generate_series(0, %s - 1, %s) g""",
            (run_id, cfg.source, STREAM, n, QUARANTINE_EVERY),
        )
        cur.execute("create unlogged table stg.bench_scratch (like stg.mapped_customer)")
        cur.execute("analyze stg.extracted; analyze stg.resolved; analyze sync.quarantine")
    conn.commit()


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


class StepTimer:
    """Wraps a function of a module and adds up the seconds spent in it."""

    def __init__(self, module, name: str) -> None:
        self.module, self.name, self.seconds = module, name, 0.0
        self.original = getattr(module, name)

        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(module, name, timed_call)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    n = args.rows
    run_id = "scheduled__2026-11-01T00:00:00+00:00"

    dsn = fresh_database()
    conn = db.connect(dsn, application_name="crm-sync-bench")
    db.migrate(conn)
    cfg = load_source("erp")
    print(f"crm-sync load benchmark: {n:,} customer rows, source {cfg.source}, database {db.redact_dsn(dsn)}")
    _, setup_s = timed(lambda: setup(conn, run_id, cfg, n))
    print(f"  setup (not timed below): stg.extracted + stg.resolved + quarantine in {setup_s:.1f} s")
    rss_before = _max_rss_mib()
    mapped, gen_s = timed(lambda: list(mapped_rows(run_id, cfg.source, n)))
    rows_mib = _max_rss_mib() - rss_before
    print(f"  setup (not timed below): {n:,} mapped rows generated in memory in {gen_s:.1f} s (~{rows_mib:,.0f} MiB)")

    def raw_copy():
        with conn.cursor() as cur:
            written = staging.copy_rows(cur, "stg.bench_scratch", MAPPED_COLUMNS, mapped)
        conn.commit()
        return written

    def stage_copy():
        with conn.cursor() as cur:
            written = staging.copy_rows(cur, "stg.mapped_customer", MAPPED_COLUMNS, mapped)
        conn.commit()
        return written

    written, raw_s = timed(raw_copy)
    assert written == n
    _, copy_s = timed(stage_copy)
    with conn.cursor() as cur:  # the map stage's table is fresh; the planner should know its size
        cur.execute("analyze stg.mapped_customer")
    conn.commit()
    survivorship = StepTimer(load, "_survivorship")
    result, load_s = timed(lambda: load.load(conn, run_id, cfg))
    surv_s = survivorship.take()
    rerun, rerun_s = timed(lambda: load.load(conn, run_id, cfg))
    rerun_surv_s = survivorship.take()
    peak_mib = _max_rss_mib()

    with conn.cursor() as cur:
        cur.execute("select count(*) from crm.customer")
        customers = cur.fetchone()[0]
        cur.execute("select count(*) from crm.source_customer")
        source_records = cur.fetchone()[0]
    conn.close()

    full_s = copy_s + load_s
    bare_s = load_s - surv_s
    bare_full_s = copy_s + bare_s
    quarantined = len(range(0, n, QUARANTINE_EVERY))

    def verdict(seconds: float) -> str:
        return f"target >= {TARGET_ROWS_PER_SECOND:,}: {'met' if n / seconds >= TARGET_ROWS_PER_SECOND else 'NOT met'}"

    rows = [
        ("raw COPY (scratch unlogged, no keys)", raw_s, f"{n / raw_s:>12,.0f}", "staging.copy_rows alone"),
        ("COPY into stg.mapped_customer", copy_s, f"{n / copy_s:>12,.0f}", ""),
        ("load.load (one transaction)", load_s, f"{n / load_s:>12,.0f}", "upserts + links + survivorship + rest"),
        ("  of which load._survivorship", surv_s, f"{n / surv_s:>12,.0f}" if surv_s else f"{'-':>12}",
         f"{surv_s / load_s:.0%} of load.load"),
        ("  load.load without survivorship", bare_s, f"{n / bare_s:>12,.0f}", "load.load minus the line above"),
        ("full load stage (COPY + load.load)", full_s, f"{n / full_s:>12,.0f}", verdict(full_s)),
        ("full load stage without survivorship", bare_full_s, f"{n / bare_full_s:>12,.0f}", verdict(bare_full_s)),
        ("rerun load.load (nothing changes)", rerun_s, f"{n / rerun_s:>12,.0f}",
         f"survivorship {rerun_surv_s:.2f} s of it"),
    ]
    print()
    print(f"  {'step':<38} {'seconds':>8} {'rows/s':>12}  note")
    print(f"  {'-' * 38} {'-' * 8} {'-' * 12}  {'-' * 38}")
    for name, seconds, rate, note in rows:
        print(f"  {name:<38} {seconds:>8.2f} {rate}  {note}")
    print()
    print(f"  loaded: {result.customers:,} source records ({quarantined:,} quarantined rows held back), "
          f"{customers:,} customers, {source_records:,} in crm.source_customer; rerun loaded {rerun.customers:,}")
    print(f"  peak memory of this Python process (ru_maxrss): {peak_mib:,.0f} MiB, of which ~{rows_mib:,.0f} MiB are "
          f"the benchmark's pre-generated rows; PostgreSQL's own processes are not included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
