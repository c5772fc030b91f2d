"""Per-source pipeline benchmark: each source's sample data through every stage, without Airflow.

    .venv/bin/python bench/bench_sources.py                  # ~100,000 rows per source
    .venv/bin/python bench/bench_sources.py --quick          # ~5,000 rows per source, a smoke run
    .venv/bin/python bench/bench_sources.py --rows 20000 --sources erp,im [--keep]

What it measures: for erp, finance, spreadsheet, ticketing, im and callcenter, in that order (the
demo's: customer-rich sources first), one full run of the source's DAG as `crm_sync.tasks` runs it
— extract (per stream) -> resolve -> map (per stream) -> validate (per stream, volume gate first)
-> load -> reconcile — by calling the functions the tasks call, committing after each stage.
Seconds are per stage (streams summed); rows/s is the source's rows (records extracted, summed over
its streams, as `sync.run_log.rows_extracted` counts them) divided by the stage's seconds.

Setup, not timed: one pool of people (`simulators.people.generate_people`, seed 42); each source
renders the first N of them, N picked from rows per person measured with small runs
(`ROWS_PER_PERSON`), so the sources overlap as real ones do (a caller is often an ERP customer).
The SQL sources are seeded into throw-away databases of their own; the API simulators serve
their stores from this process on loopback, without faults; the spreadsheet lists go to a
temporary landing folder. All six sources load into one fresh, migrated CRM database, so a later
source resolves against the customers the earlier ones created. Databases are on the server of
`CRM_SYNC_DSN`, else on the embedded PostgreSQL under `.local/pg-bench`; their names carry the
process id (two runs on one server must not drop each other's), and they are dropped at the end.

Caveats the figures carry: an API source's extract includes the simulator answering in the same
process (its own share is printed); the finance generator knows at most 1,920 companies, so
finance stops at about 5,000 rows whatever --rows asks (the real count is printed). Peak RSS is this Python process's high-water
mark during the source's pipeline (the sample store it serves included), reset before each source
where Linux allows; PostgreSQL's processes and resolve's worker processes are not included.
Nothing about time is asserted. The last line is JSON: {"sources": {name: {"rows", "stages", "rows_per_s"}}}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import secrets
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from crm_sync import db, runlog, watermark  # noqa: E402
from crm_sync.config import SourceConfig, StreamConfig, load_source  # noqa: E402

SOURCES = ("erp", "finance", "spreadsheet", "ticketing", "im", "callcenter")
STAGES = ("extract", "resolve", "map", "validate", "load", "reconcile")
SEED = 42
QUICK_ROWS = 5_000
# per process: two runs on one server (a lead's `make bench` and a helper's) must not drop each other's
CRM_DATABASE = f"crm_bench_sources_{os.getpid()}"
# rows the source serves per person of the pool, measured with 2,000-92,000 people (seed 42);
# finance is absent: its rows grow with the companies, not the people (see the module docstring)
ROWS_PER_PERSON = {"erp": 2.64, "spreadsheet": 1.12, "ticketing": 1.535, "im": 1.095, "callcenter": 0.95}


class CallTimer:
    """Adds up the seconds spent in one method of one object (a simulator store's paging)."""

    def __init__(self, obj, name: str) -> None:
        self.seconds = 0.0
        original = getattr(obj, name)

        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(obj, name, timed_call)


@dataclass
class Sample:
    """A source's sample data, ready to be extracted."""

    people: int
    generate_s: float
    open_extractor: Callable[[SourceConfig, StreamConfig], object]
    finish_kwargs: dict = field(default_factory=dict)
    simulator: CallTimer | None = None
    note: str = ""


class Samples:
    """Builds each source's sample (databases, servers, landing folder); `close()` removes them all."""

    def __init__(self, admin_dsn: str, pool: list, now: datetime, rows: int, keep: bool) -> None:
        self.admin_dsn, self.pool, self.now, self.rows, self.keep = admin_dsn, pool, now, rows, keep
        self.stack = ExitStack()

    def people(self, name: str) -> list:
        return self.pool[:people_for(name, self.rows, len(self.pool))]

    def __enter__(self) -> "Samples":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _database(self, name: str) -> str:
        database = f"crm_bench_src_{name}_{os.getpid()}"
        db.drop_database(self.admin_dsn, database)
        db.ensure_database(self.admin_dsn, database)
        if not self.keep:
            self.stack.callback(db.drop_database, self.admin_dsn, database)
        return db.with_database(self.admin_dsn, database)

    def _sql(self, name: str, seed_fn) -> Sample:
        from crm_sync.sources.sql_source import SqlExtractor

        dsn = self._database(name)
        people = self.pool if name == "finance" else self.people(name)
        conn = db.connect(dsn, application_name="crm-sync-bench")
        t0 = time.perf_counter()
        try:
            seed_fn(conn, people=people, seed=SEED, now=self.now)
        finally:
            conn.close()
        seconds = time.perf_counter() - t0
        note = ""
        if name == "finance":
            companies = len({p.company for p in people})
            note = f"finance is capped by its generator: {companies:,} companies, 30% of them finance customers"
        return Sample(len(people), seconds,
                      lambda cfg, stream: SqlExtractor(cfg, stream, db.connect(dsn, application_name="crm-sync-bench")),
                      note=note)

    def erp(self) -> Sample:
        from crm_sync.simulators import erp

        return self._sql("erp", erp.seed)

    def finance(self) -> Sample:
        from crm_sync.simulators import finance

        return self._sql("finance", finance.seed)

    def spreadsheet(self) -> Sample:
        from crm_sync.simulators import spreadsheet
        from crm_sync.sources.files_source import FilesExtractor

        landing = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="crm-bench-landing-")))
        people = self.people("spreadsheet")
        t0 = time.perf_counter()
        manifest = spreadsheet.write_landing(landing, people, seed=SEED, now=self.now)
        seconds = time.perf_counter() - t0
        return Sample(len(people), seconds, lambda cfg, stream: FilesExtractor(cfg, stream, landing),
                      finish_kwargs={"landing": landing}, note=f"{len(manifest.files)} files in the landing folder")

    def _api(self, name: str, store_cls, server_cls, method: str, client_login: str | None, client_password: str,
             **server_auth) -> Sample:
        import requests

        from crm_sync.sources.http_source import HttpExtractor

        people = self.people(name)
        t0 = time.perf_counter()
        store = store_cls.generate(people, SEED, self.now)
        seconds = time.perf_counter() - t0
        timer = CallTimer(store, method)
        server = self.stack.enter_context(server_cls(store, **server_auth))
        return Sample(len(people), seconds,
                      lambda cfg, stream: HttpExtractor(cfg, stream, requests.Session(), server.base_url,
                                                               client_login, client_password),
                      simulator=timer)

    def ticketing(self) -> Sample:
        from crm_sync.simulators.ticketing import TicketingServer, TicketingStore

        token = secrets.token_urlsafe(24)
        return self._api("ticketing", TicketingStore, TicketingServer, "page", None, token, token=token)

    def im(self) -> Sample:
        from crm_sync.simulators.im import ImServer, ImStore

        key = secrets.token_urlsafe(24)
        return self._api("im", ImStore, ImServer, "page", None, key, api_key=key)

    def callcenter(self) -> Sample:
        from crm_sync.simulators.callcenter import CallCenterServer, CallCenterStore

        login, password = "bench", secrets.token_urlsafe(24)
        return self._api("callcenter", CallCenterStore, CallCenterServer, "window", login, password,
                         login=login, password=password)


def people_for(name: str, rows: int, pool_size: int | None = None) -> int:
    if name == "finance":
        return pool_size or 0
    return math.ceil(rows / ROWS_PER_PERSON[name])


class StageFailed(Exception):
    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage = stage


def run_pipeline(conn, run_id: str, cfg: SourceConfig, sample: Sample, window: watermark.Window,
                 seconds: dict[str, float]) -> None:
    """One run of the source, stage by stage as `crm_sync.tasks` does it; adds seconds per stage to
    `seconds` (also those of a stage that failed, before `StageFailed` is raised)."""
    from crm_sync import entities, load, mapping
    from crm_sync.identity.resolve import resolve
    from crm_sync.quality.validate import validate_stream
    from crm_sync.quality.volume import check_volume
    from crm_sync.reconcile import reconcile
    from crm_sync.sources import extract as ex
    from crm_sync.sources.base import extractor_class

    def stage(name: str, body: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            body()
            conn.commit()
        except Exception as exc:
            conn.rollback()
            raise StageFailed(name, exc) from exc
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    def extract(stream: StreamConfig) -> None:
        with conn.cursor() as cur:
            runlog.start(cur, run_id, cfg.source, cfg.dag_id, None, window.until, task_id=f"extract.{stream.name}")
        conn.commit()
        extractor = sample.open_extractor(cfg, stream)
        try:
            extractor.bind(conn.cursor())
            ex.stage_records(conn, run_id, cfg, stream, window, extractor.records(window),
                             extra_rejects=extractor.rejects)
            with conn.cursor() as cur:
                extractor.stage(cur, run_id)
        finally:
            extractor.close()
        with conn.cursor() as cur:
            cur.execute("update sync.run_log set api_calls = api_calls + %s where run_id = %s and source = %s",
                        (extractor.calls, run_id, cfg.source))
            runlog.update(cur, run_id, cfg.source, extract_since=window.since)
        ex.record_extract(conn, run_id, cfg)

    def resolve_ids() -> None:
        ex.record_extract(conn, run_id, cfg)
        resolve(conn, run_id, cfg)

    def map_rows(stream: StreamConfig) -> None:
        mapping.map_stream(conn, run_id, cfg, stream)
        counts = " + ".join(f"(select count(*) from {t} where run_id = %(r)s and source = %(s)s)"
                            for t in entities.staging_tables())
        with conn.cursor() as cur:
            cur.execute(f"update sync.run_log set rows_mapped = {counts} where run_id = %(r)s and source = %(s)s",
                        {"r": run_id, "s": cfg.source})

    def validate(stream: StreamConfig) -> None:
        check_volume(conn, run_id, cfg, stream)
        validate_stream(conn, run_id, cfg, stream)

    def reconcile_run() -> None:
        reconcile(conn, run_id, cfg)
        with conn.cursor() as cur:
            cur.execute("update sync.run_log set state = 'success', finished_at = now() "
                        "where run_id = %s and source = %s", (run_id, cfg.source))
        conn.commit()
        extractor_class(cfg.kind).finish(conn, cfg, run_id, **sample.finish_kwargs)
        load.purge_staging(conn, cfg.source)

    for stream in cfg.streams:
        stage("extract", lambda: extract(stream))
    stage("resolve", resolve_ids)
    for stream in cfg.streams:
        stage("map", lambda: map_rows(stream))
    for stream in cfg.streams:
        stage("validate", lambda: validate(stream))
    stage("load", lambda: load.load(conn, run_id, cfg))
    stage("reconcile", reconcile_run)


def run_log_row(conn, run_id: str, source: str) -> dict:
    with conn.cursor() as cur:
        cur.execute("select * from sync.run_log where run_id = %s and source = %s", (run_id, source))
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
    conn.commit()
    return dict(zip(names, row)) if row else {}


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_rss_mib(resettable: bool) -> float:
    if resettable:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def admin_dsn() -> str:
    dsn = os.environ.get("CRM_SYNC_DSN")
    return db.with_database(dsn, "postgres") if dsn else db.embedded_server_uri(ROOT / ".local" / "pg-bench")


def warm_up() -> None:
    """Import what the stages and samples import lazily: the first source's figures do not carry it,
    and a module edited while the benchmark runs cannot break a later source halfway."""
    import great_expectations  # noqa: F401
    import requests  # noqa: F401

    from crm_sync import load, mapping  # noqa: F401
    from crm_sync.identity import engine, resolve  # noqa: F401
    from crm_sync.quality import validate, volume  # noqa: F401
    from crm_sync.simulators import callcenter, erp, finance, im, spreadsheet, ticketing  # noqa: F401
    from crm_sync.sources.base import extractor_class

    extractor_class("sql")  # loads every extractor kind


HEADER = (f"{'source':<11} {'rows':>8}  " + " ".join(f"{s:>9}" for s in STAGES)
          + f" {'total':>9} {'rows/s':>8}  peak RSS")


def rate(rows: int, seconds: float | None, width: int = 9) -> str:
    return f"{rows / seconds:>{width},.0f}" if seconds else f"{'-':>{width}}"


def secs(seconds: float | None) -> str:
    return f"{seconds:>8.1f}s" if seconds is not None else f"{'-':>9}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows per source (summed over its streams)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows per source: a smoke run")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated, in the order to run")
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    args = parser.parse_args(argv)
    rows = QUICK_ROWS if args.quick else args.rows
    names = [n.strip() for n in args.sources.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        parser.error(f"unknown sources {unknown}; choose from {', '.join(SOURCES)}")

    from crm_sync.simulators.people import generate_people

    wall0 = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still drops the databases
    admin = admin_dsn()
    with ExitStack() as cleanup:
        db.ensure_database(admin, CRM_DATABASE)
        if not args.keep:
            cleanup.callback(db.drop_database, admin, CRM_DATABASE)
        dsn = db.with_database(admin, CRM_DATABASE)
        conn = db.connect(dsn, application_name="crm-sync-bench")
        cleanup.callback(conn.close)
        db.migrate(conn)
        conn.commit()
        warm_up()

        pool_size = max([people_for(n, rows) for n in names if n != "finance"] or [people_for("erp", rows)])
        t0 = time.perf_counter()
        pool = generate_people(pool_size, SEED)
        pool_s = time.perf_counter() - t0
        now = datetime.now(timezone.utc).replace(microsecond=0)
        generated_at = now - timedelta(minutes=5)  # every sample record lies before the window's end
        window = watermark.Window(since=None, until=now)
        run_id = f"bench__{now.isoformat()}"
        samples = cleanup.enter_context(Samples(admin, pool, generated_at, rows, args.keep))
        print(f"crm-sync sources benchmark: ~{rows:,} rows per source, {len(pool):,} people in the pool "
              f"(generated in {pool_s:.1f} s), CRM database {db.redact_dsn(dsn)}")
        print("  stage figures: seconds, then rows/s (the source's rows / the stage's seconds); setup is not timed")
        print()
        print(HEADER)
        print("-" * len(HEADER))
        sys.stdout.flush()

        report: dict[str, dict] = {}
        totals = dict.fromkeys(STAGES, 0.0)
        total_rows = 0
        for name in names:
            cfg = load_source(name)
            sample = getattr(samples, name)()
            resettable = reset_peak_rss()
            seconds: dict[str, float] = {}
            error = None
            try:
                run_pipeline(conn, run_id, cfg, sample, window, seconds)
            except StageFailed as exc:
                error = str(exc).splitlines()[0][:300]
            peak = peak_rss_mib(resettable)
            log = run_log_row(conn, run_id, name)
            n = log.get("rows_extracted") or 0
            total = sum(seconds.values())
            for stage in STAGES:
                totals[stage] += seconds.get(stage, 0.0)
            total_rows += n
            print(f"{name:<11} {n:>8,}  " + " ".join(secs(seconds.get(s)) for s in STAGES)
                  + f" {secs(total)} {rate(n, total, 8)}  {peak:,.0f} MiB")
            # a source without a customer stream resolves nothing: no rate for that stage
            idle = set() if any(s.entity == "customer" for s in cfg.streams) else {"resolve"}
            print(f"{'  rows/s':<11} {'':>8}  "
                  + " ".join(f"{'-':>9}" if s in idle else rate(n, seconds.get(s)) for s in STAGES))
            held, rejected, loaded = log.get("facts_held") or 0, log.get("rows_rejected") or 0, log.get("rows_loaded") or 0
            rest = n - loaded - rejected
            # a held fact (customer not known yet) is quarantined for the run too: it is part of `rejected`
            print(f"  {name}: extracted {n:,} = loaded {loaded:,} + quarantined {rejected:,} (of which held "
                  f"{held:,}: customer not known yet)"
                  + (f" + {rest:,} not loaded" if rest > 0 else f" - {-rest:,} (loaded more than extracted?)"
                     if rest < 0 else "")
                  + f"; identities new {log.get('ids_new') or 0:,}, linked {log.get('ids_linked') or 0:,}, "
                    f"merged {log.get('ids_merged') or 0:,}, review pairs {log.get('ids_review') or 0:,}; "
                    f"held facts released {log.get('facts_released') or 0:,}")
            detail = f"  {name}: {sample.people:,} people, sample built in {sample.generate_s:.1f} s (not timed)"
            if sample.simulator is not None:
                own = seconds.get("extract", 0.0) - sample.simulator.seconds
                detail += (f"; {log.get('api_calls') or 0:,} API calls, the simulator's own paging took "
                           f"{sample.simulator.seconds:.1f} s of the extract (the rest, {own:.1f} s, is "
                           f"{rate(n, own).strip()} rows/s)")
            if sample.note:
                detail += f"; {sample.note}"
            print(detail)
            if error:
                print(f"  {name}: FAILED at {error}")
            print()
            sys.stdout.flush()
            entry = {"rows": n, "stages": {s: round(v, 3) for s, v in seconds.items()},
                     "rows_per_s": round(n / total, 1) if total else None}
            if error:
                entry["error"] = error
            report[name] = entry

    grand = sum(totals.values())
    print(f"{'total':<11} {total_rows:>8,}  " + " ".join(secs(totals[s]) for s in STAGES)
          + f" {secs(grand)} {rate(total_rows, grand, 8)}  {peak_rss_mib(False):,.0f} MiB (ru_maxrss)")
    print(f"{'  rows/s':<11} {'':>8}  " + " ".join(rate(total_rows, totals[s]) for s in STAGES))
    print(f"  wall time of the benchmark (setup included): {time.perf_counter() - wall0:.0f} s")
    print(json.dumps({"sources": report}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
