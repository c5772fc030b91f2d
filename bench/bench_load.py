"""Load-stage benchmark: N synthetic customer rows through `crm_sync.load.load`, a first load and a 1 % change.

    .venv/bin/python bench/bench_load.py [--rows 1000000] [--change-share 0.01] [--peer sql,dlt] [--keep]

On the server of `CRM_SYNC_BENCH_DSN` (an administrator's DSN) or else the embedded PostgreSQL under
`.local/pg-bench`, in a database of its own (`crm_bench_load_<pid>`, created and migrated first,
dropped at the end unless `--keep`):
- setup, not timed: for two runs, the rows extract and resolve would have left (`stg.extracted`,
  `stg.resolved`), 1 % of the keys quarantined by validate, the run-log rows; the mapped rows
  generated in memory before any timing (so the figures measure COPY and the load, not the generator);
- raw COPY: the first run's rows, as `stg.mapped_customer` gets them, COPYed with `staging.copy_rows`
  into a scratch UNLOGGED table without keys or indexes — the ceiling for moving these rows at all;
- first load: COPY into `stg.mapped_customer` (what the map stage writes) plus `load.load(conn, run_id,
  cfg)` (customers complete with their golden fields, source records, links, watermark, run log: one
  transaction), timed together and apart; the share of the time spent in `load._survivorship` (golden
  fields of existing customers whose records changed) is measured by wrapping it;
- rerun of the first load: must write nothing (`rows_loaded` 0);
- 1 % change: the same N keys delivered again, `--change-share` of them with a new city (a new
  row_hash) — the shape of a full snapshot or a wide incremental window — COPY plus `load.load`;
- peers, on the same rows and server: `sql` — a dlt-like merge written by hand (COPY into a fresh
  staging table, then `delete … using` + `insert … select` into a keyed table, dlt's `delete-insert`
  merge strategy without its Python side); `dlt` — `bench/dlt_peer.py` (dlt `write_disposition="merge"`,
  csv and insert_values loaders) when the virtualenv `.local/bench-dlt` that `bench_pipeline.py`
  installs exists (skipped otherwise);
- peak memory: `ru_maxrss` of this Python process (the pre-generated rows included).
Figures: seconds, rows/s, and rows/s as a share of the raw COPY — the issue-11 targets are >= 25 %
on a first load and >= 50 % on a 1 % change, for the whole load stage (COPY into staging + load.load).
Nothing about time is asserted; the target is printed next to the figure.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from crm_sync import db, load, runlog, staging  # noqa: E402
from crm_sync.config import load_source  # noqa: E402

TARGET_FIRST = 0.25      # share of the raw COPY's rows/s, first load
TARGET_CHANGE = 0.50     # share of the raw COPY's rows/s, 1 % change
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
FIRST_RUN = "scheduled__2026-11-01T00:00:00+00:00"
CHANGE_RUN = "scheduled__2026-11-02T00:00:00+00:00"


def _customer_id(i: int) -> str:
    owner = i - 1 if i % SHARED_EVERY == 1 else i   # every 20th record joins its neighbour's customer
    return str(uuid.UUID(int=(0xC0FFEE << 96) | owner))


def _changed(i: int, every: int) -> bool:
    return every > 0 and i % every == every // 2


def _person(i: int, every: int = 0) -> dict:
    name = f"{SURNAMES[i % len(SURNAMES)]} {GIVEN[(i // 10) % len(GIVEN)]} {i}"
    mobile = f"13{(i % 7) + 3}{i:08d}"[-11:]
    changed = _changed(i, every)
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
        "city": CITIES[(i + 1) % len(CITIES)] if changed else CITIES[i % len(CITIES)],
        "created": BASE_TIME - timedelta(days=400, seconds=i),
        "updated": BASE_TIME + timedelta(days=1 if changed else 0, seconds=i % 86_400),
    }


def mapped_rows(run_id: str, source: str, n: int, every: int = 0):
    for i in range(n):
        p = _person(i, every)
        digest = hashlib.sha256(f"{p['pk']}|{p['full_name']}|{p['phone_e164']}|{p['email']}|{p['city']}"
                                .encode()).hexdigest()
        yield (run_id, source, STREAM, p["pk"], p["customer_id"], p["full_name"], p["name_key"], p["phone_raw"],
               p["phone_e164"], p["phone_kind"], p["phone_ext"], p["email"], p["company"], p["city"],
               p["created"], p["updated"], digest)


def resolved_rows(run_id: str, source: str, n: int, every: int = 0):
    for i in range(n):
        p = _person(i, every)
        shared = i % SHARED_EVERY == 1
        yield (run_id, source, STREAM, p["pk"], p["customer_id"], "linked" if shared else "new",
               "phone_exact" if shared else "new", 1.0 if shared else None,
               {"phone": 1.0} if shared else None, p["full_name"], p["name_key"], p["phone_raw"],
               p["phone_e164"], p["phone_kind"], p["phone_ext"], p["email"], p["email"] is not None)


def extracted_rows(run_id: str, source: str, n: int, every: int = 0):
    for i in range(n):
        p = _person(i, every)
        yield (run_id, source, STREAM, p["pk"], p["updated"],
               {"customer_no": p["pk"], "name": p["full_name"], "mobile": p["phone_raw"], "email": p["email"],
                "company": p["company"], "city": p["city"], "updated_at": p["updated"]})


def bench_database(tag: int) -> tuple[str, str, str]:
    """(admin DSN, database name, DSN of a fresh database on the bench server)."""
    admin = os.environ.get("CRM_SYNC_BENCH_DSN") or db.embedded_server_uri(ROOT / ".local" / "pg-bench")
    name = f"crm_bench_load_{tag}"
    db.drop_database(admin, name)
    db.ensure_database(admin, name)
    return admin, name, db.with_database(admin, name)


def setup(conn, cfg, n: int, every: int) -> None:
    with conn.cursor() as cur:
        for day, (run_id, ev) in enumerate(((FIRST_RUN, 0), (CHANGE_RUN, every))):
            runlog.start(cur, run_id, cfg.source, cfg.dag_id, BASE_TIME + timedelta(days=day - 1),
                         BASE_TIME + timedelta(days=day))
            staging.copy_rows(cur, "stg.extracted",
                              ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
                              extracted_rows(run_id, cfg.source, n, ev))
            staging.copy_rows(cur, "stg.resolved", RESOLVED_COLUMNS, resolved_rows(run_id, cfg.source, n, ev))
            cur.execute(
                """insert into sync.quarantine (run_id, source, stream, source_pk, stage, field, reason, expectation)
                   select %s, %s, %s, 'C' || lpad(g::text, 8, '0'), 'validate', 'email', 'bench: rejected on purpose',
                          'expect_column_values_to_match_regex'
                   from generate_series(0, %s - 1, %s) g""",
                (run_id, cfg.source, STREAM, n, QUARANTINE_EVERY),
            )
        cur.execute("create unlogged table stg.bench_scratch (like stg.mapped_customer)")
        cur.execute("create schema bench_peer")
        cur.execute("create table bench_peer.dest (like stg.mapped_customer, primary key (source, source_pk))")
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


def sql_peer(conn, rows: list) -> float:
    """dlt's delete-insert merge by hand: COPY into a fresh staging table, delete the keys, insert; seconds."""
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("drop table if exists bench_peer.stage")
        cur.execute("create table bench_peer.stage (like stg.mapped_customer)")
        staging.copy_rows(cur, "bench_peer.stage", MAPPED_COLUMNS, rows)
        cur.execute("delete from bench_peer.dest d using bench_peer.stage s"
                    " where d.source = s.source and d.source_pk = s.source_pk")
        cur.execute("insert into bench_peer.dest select * from bench_peer.stage")
    conn.commit()
    return time.perf_counter() - t0


def dlt_peer(admin: str, crm_dsn: str, tag: int) -> dict | None:
    """`bench/dlt_peer.py` on the two runs' rows, in its own virtualenv and database; its figures or None."""
    python = ROOT / ".local" / "bench-dlt" / "bin" / "python"
    if not python.exists():
        print("  dlt peer skipped: .local/bench-dlt is missing (bench_pipeline.py installs it)")
        return None
    dest = f"dlt_bench_load_{tag}"
    db.ensure_database(admin, dest)
    try:
        done = subprocess.run([str(python), str(ROOT / "bench" / "dlt_peer.py"), "--source-dsn", crm_dsn,
                               "--dest-dsn", db.with_database(admin, dest), "--first", FIRST_RUN,
                               "--change", CHANGE_RUN, "--formats", "csv,insert_values"],
                              capture_output=True, text=True)
    finally:
        db.drop_database(admin, dest)
    if done.returncode != 0:
        print(f"  dlt peer failed (exit {done.returncode}): "
              + " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:]))
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_loaded(conn, run_id: str) -> int:
    with conn.cursor() as cur:
        cur.execute("select rows_loaded from sync.run_log where run_id = %s", (run_id,))
        value = cur.fetchone()[0]
    conn.commit()
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--change-share", type=float, default=0.01, help="share of the keys the second run changes")
    parser.add_argument("--peer", default="sql,dlt", help="peers to run: sql, dlt, both (default) or none")
    parser.add_argument("--keep", action="store_true", help="keep the bench database afterwards")
    args = parser.parse_args(argv)
    n = args.rows
    every = max(1, round(1 / args.change_share)) if args.change_share > 0 else 0
    peers = {p for p in args.peer.split(",") if p and p != "none"}
    tag = os.getpid()

    # what the load imports lazily (the identity package, the survivorship config), once, before timing
    import crm_sync.identity.apply  # noqa: F401
    import crm_sync.survivorship  # noqa: F401

    admin, name, dsn = bench_database(tag)
    conn = db.connect(dsn, application_name="crm-sync-bench")
    try:
        db.migrate(conn)
        cfg = load_source("erp")
        print(f"crm-sync load benchmark: {n:,} customer rows, then the same keys with 1 in {every} changed; "
              f"source {cfg.source}, database {db.redact_dsn(dsn)}")
        _, setup_s = timed(lambda: setup(conn, cfg, n, every))
        print(f"  setup (not timed below): stg.extracted + stg.resolved + quarantine of two runs in {setup_s:.1f} s")
        rss_before = _max_rss_mib()
        first_rows, gen_s = timed(lambda: list(mapped_rows(FIRST_RUN, cfg.source, n)))
        change_rows = list(mapped_rows(CHANGE_RUN, cfg.source, n, every))
        rows_mib = _max_rss_mib() - rss_before
        print(f"  setup (not timed below): 2 x {n:,} mapped rows generated in memory in {gen_s:.1f} s + "
              f"(~{rows_mib:,.0f} MiB)")

        def copy_into(table: str, rows: list) -> float:
            def run():
                with conn.cursor() as cur:
                    written = staging.copy_rows(cur, table, MAPPED_COLUMNS, rows)
                conn.commit()
                return written
            written, seconds = timed(run)
            assert written == n
            return seconds

        raw_s = copy_into("stg.bench_scratch", first_rows)
        survivorship = StepTimer(load, "_survivorship")
        figures: dict[str, dict] = {}
        for step, run_id, rows in (("first load", FIRST_RUN, first_rows), ("1 % change", CHANGE_RUN, change_rows)):
            copy_s = copy_into("stg.mapped_customer", rows)
            result, load_s = timed(lambda: load.load(conn, run_id, cfg))
            figures[step] = {"copy_s": copy_s, "load_s": load_s, "surv_s": survivorship.take(),
                             "written": rows_loaded(conn, run_id), "accepted": result.customers}
            if step == "first load":
                rerun, rerun_s = timed(lambda: load.load(conn, run_id, cfg))
                figures["rerun"] = {"load_s": rerun_s, "surv_s": survivorship.take(),
                                    "written": rows_loaded(conn, run_id)}
        peer_s = {}
        if "sql" in peers:
            peer_s = {"first load": sql_peer(conn, first_rows), "1 % change": sql_peer(conn, change_rows)}
        peak_mib = _max_rss_mib()
        del first_rows, change_rows
        with conn.cursor() as cur:
            cur.execute("select count(*), count(*) filter (where provenance = '{}'::jsonb) from crm.customer")
            customers, bare = cur.fetchone()
            cur.execute("select count(*) from crm.source_customer")
            source_records = cur.fetchone()[0]
        conn.commit()
        dlt = dlt_peer(admin, dsn, tag) if "dlt" in peers else None
    finally:
        conn.close()
        if not args.keep:
            db.drop_database(admin, name)

    raw_rate = n / raw_s

    def share(seconds: float) -> str:
        return f"{n / seconds / raw_rate:>6.1%}"

    print()
    print(f"  {'step':<46} {'seconds':>8} {'rows/s':>10} {'of COPY':>7}  note")
    print(f"  {'-' * 46} {'-' * 8} {'-' * 10} {'-' * 7}  {'-' * 34}")

    def line(label: str, seconds: float, note: str = "") -> None:
        print(f"  {label:<46} {seconds:>8.2f} {n / seconds:>10,.0f} {share(seconds)}  {note}")

    line("raw COPY (scratch unlogged, no keys)", raw_s, "staging.copy_rows alone: the ceiling")
    summary = {"rows": n, "raw_copy_s": round(raw_s, 2), "copy_rows_per_s": round(raw_rate)}
    for step, target in (("first load", TARGET_FIRST), ("1 % change", TARGET_CHANGE)):
        f = figures[step]
        full_s = f["copy_s"] + f["load_s"]
        verdict = f"target >= {target:.0%} of COPY: {'met' if n / full_s >= target * raw_rate else 'NOT met'}"
        print(f"  {step}: {f['accepted']:,} accepted rows, {f['written']:,} written")
        line("  COPY into stg.mapped_customer", f["copy_s"])
        line("  load.load (one transaction)", f["load_s"], f"of which _survivorship {f['surv_s']:.2f} s")
        line("  load stage (COPY + load.load)", full_s, verdict)
        if step in peer_s:
            line("  peer: COPY + delete-insert merge (dlt-like)", peer_s[step], "no links, no golden records")
        key = "first" if step == "first load" else "change"
        summary.update({f"{key}_load_s": round(full_s, 2), f"{key}_rows_per_s": round(n / full_s),
                        f"{key}_share_of_copy": round(n / full_s / raw_rate, 3), f"{key}_written": f["written"]})
        if step in peer_s:
            summary[f"{key}_peer_sql_s"] = round(peer_s[step], 2)
    r = figures["rerun"]
    line("rerun of the first load (nothing changes)", r["load_s"], f"written {r['written']:,}")
    for fmt, fig in (dlt or {}).items():
        if fmt == "dlt_version":
            continue
        for step, key in (("first load", "first_load"), ("1 % change", "change")):
            s = fig[key]["seconds"]
            print(f"  dlt {dlt['dlt_version']} merge, {fmt} loader, {step:<18} {s:>8.2f} {n / s:>10,.0f} {share(s)}  "
                  f"its load step {fig[key]['load_s']} s")
            summary[f"dlt_{fmt}_{key}_s"] = s
    print()
    print(f"  {customers:,} customers ({bare:,} without golden fields), {source_records:,} in crm.source_customer")
    print(f"  peak memory of this Python process (ru_maxrss): {peak_mib:,.0f} MiB, of which ~{rows_mib:,.0f} MiB are "
          f"the benchmark's pre-generated rows; PostgreSQL's own processes are not included")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
