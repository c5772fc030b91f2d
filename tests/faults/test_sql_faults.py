"""Faults of SQL sources (the ERP and finance databases): bad rows, bad cursors, lost staging, dropped connections.

Each case breaks one thing in a real run of the source's DAG (in-process, `harness.Pipeline`),
asserts what the user sees, lets the pipeline heal (the source fixed and the next run, an Airflow
retry, or a cleared DAG run), and then accounts for every row the source holds: none lost, none
duplicated.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest

from faults.harness import DAY, END, FIX, HOUR

pytestmark = pytest.mark.integration

FIRST = (END - DAY, END)       # the first run's data interval (the ERP's nightly interval)
NEXT = (END, END + DAY)        # the next night's
T_IN = END - timedelta(minutes=10)   # inside the first interval


def settled(case, fault_counts, source: str, windows, **kw):
    """Account for the source's rows after healing, record the figures, and demand 0 lost, 0 duplicated."""
    acc = case.account(source, windows, **kw)
    fault_counts(acc)
    assert (acc.lost, acc.duplicated) == (0, 0), str(acc)
    return acc


def a_customer(src) -> str:
    return src.execute("select customer_no from src_erp.customers order by customer_no limit 1")[0][0]


def add_order(src, order_no: str, *, at: datetime, currency: str = "CNY", amount: str = "12.50") -> None:
    src.execute("insert into src_erp.orders (order_no, customer_no, order_date, amount, currency, status, updated_at)"
                " values (%s, %s, %s, %s, %s, 'paid', %s)",
                (order_no, a_customer(src), (END - DAY).date(), amount, currency, at))


def quarantined(case, run_id: str, source: str = "erp") -> list[tuple]:
    return case.crm("select stream, source_pk, stage, field, reason, blocks_key from sync.quarantine "
                    "where run_id = %s and source = %s order by stream, source_pk", (run_id, source))


def test_a_10000_character_key_is_quarantined_and_the_rest_of_the_batch_loads(case, fault_counts):
    src = case.sql_source("erp")
    src.execute("insert into src_erp.customers (customer_no, name, mobile, updated_at, created_at) "
                "values (%s, '王五', '13900000000', %s, %s)", ("K" * 10_000, T_IN, T_IN))
    erp = case.pipeline("erp")

    run = erp.run(*FIRST)

    assert run.ok, run.error_text
    assert case.run_log(run.run_id, "erp")["state"] == "success"
    [(stream, pk, stage, field, reason, blocks)] = quarantined(case, run.run_id)
    assert (stream, stage, field, blocks) == ("customers", "extract", "customer_no", True)
    assert pk == "K" * 80 + "…" and "primary key is 10000 characters long" in reason
    assert case.crm("select count(*) from crm.source_customer where source = 'erp'")[0][0] == \
        src.execute("select count(*) from src_erp.customers")[0][0] - 1
    assert erp.run(*NEXT).ok  # the next night: the key is still bad, still quarantined, nothing else moves
    acc = settled(case, fault_counts, "erp", [(None, NEXT[1])])
    assert acc.quarantined == 1


def test_an_order_with_an_unknown_currency_is_quarantined_while_the_rest_loads(case, fault_counts):
    src = case.sql_source("erp")
    add_order(src, "FAULT-XYZ", at=T_IN, currency="XYZ")
    add_order(src, "FAULT-OK", at=T_IN)
    erp = case.pipeline("erp")

    run = erp.run(*FIRST)

    assert run.ok, run.error_text
    rows = [r for r in quarantined(case, run.run_id) if r[1] == "FAULT-XYZ"]
    assert [(s, st, f, b) for s, _, st, f, _, b in rows] == [("orders", "validate", "currency", True)]
    assert "source 'erp' stream 'orders' record 'FAULT-XYZ' field 'currency'" in rows[0][4]
    assert "'XYZ'" in rows[0][4]
    assert case.crm("select order_id from crm.sales_order where order_id like 'FAULT-%%'") == [("FAULT-OK",)]
    assert case.account("erp", [(None, END)]).quarantined == 1

    # the clerk corrects the currency; the next night loads the order
    src.execute("update src_erp.orders set currency = 'USD', updated_at = %s where order_no = 'FAULT-XYZ'", (FIX,))
    assert erp.run(*NEXT).ok
    assert case.crm("select currency from crm.sales_order where order_id = 'FAULT-XYZ'") == [("USD",)]
    settled(case, fault_counts, "erp", [(None, NEXT[1])])


def test_a_null_cursor_is_quarantined_not_filtered_and_loads_once_fixed(case, fault_counts):
    src = case.sql_source("finance")
    buyer = src.execute("select nsrsbh from cw.kh_zl order by nsrsbh limit 1")[0][0]
    src.execute("insert into cw.fp (fphm, gmf_nsrsbh, kprq, je, se, jshj, bz, zt, gxsj) values "
                "('FAULT-NULL', %s, %s, '100.00', 13.00, '113.00', 'CNY', '0', null)", (buyer, (END - DAY).date()))
    finance = case.pipeline("finance")

    run = finance.run(*FIRST)

    assert run.ok, run.error_text
    [(stream, _, stage, field, reason, _)] = [r for r in quarantined(case, run.run_id, "finance")
                                              if r[1] == "FAULT-NULL"]
    assert (stream, stage, field) == ("invoices", "extract", "gxsj")
    assert "cursor field is missing" in reason
    received, staged, lost = case.crm("select received, staged, lost from sync.stream_account "
                                      "where run_id = %s and source = 'finance' and stream = 'invoices'",
                                      (run.run_id,))[0]
    assert (received, lost) == (staged + 1, 0)  # counted as received, quarantined, not lost

    src.execute("update cw.fp set gxsj = %s where fphm = 'FAULT-NULL'", (FIX,))
    assert finance.run(*NEXT).ok
    assert case.crm("select count(*) from crm.invoice where invoice_id = 'FAULT-NULL'")[0][0] == 1
    settled(case, fault_counts, "finance", [(None, NEXT[1])])


def test_a_future_cursor_is_clamped_to_the_interval_end_and_flagged(case, fault_counts):
    src = case.sql_source("erp")
    src.execute("insert into src_erp.customers (customer_no, name, mobile, updated_at, created_at) "
                "values ('FAULT-2099', '赵六', '13900000001', '2099-01-01T00:00:00Z', %s)", (T_IN,))
    erp = case.pipeline("erp")

    run = erp.run(*FIRST)

    assert run.ok, run.error_text
    assert case.crm("select count(*) from crm.source_customer where source_id = 'FAULT-2099'")[0][0] == 1
    [(mark,)] = case.crm("select cursor_value from sync.watermark where source = 'erp' and stream = 'customers'")
    assert mark <= END, f"the watermark jumped to {mark}"
    [(clamped,)] = case.crm("select future_clamped from sync.stream_account where run_id = %s and stream = 'customers'",
                            (run.run_id,))
    assert clamped == 1
    notices = [body for _, body in case.alerts if "in the future" in body]
    assert notices and "FAULT-2099" in notices[0] and "clamped" in notices[0]
    assert erp.run(*NEXT).ok
    settled(case, fault_counts, "erp", [(None, NEXT[1])])


def test_two_versions_of_one_key_in_one_batch_load_the_newest_and_keep_the_other(case, fault_counts):
    src = case.sql_source("erp")
    src.execute("alter table src_erp.orders drop constraint orders_pkey")  # a legacy table without a unique key
    add_order(src, "FAULT-DUP", at=T_IN - timedelta(minutes=5), amount="10.00")
    add_order(src, "FAULT-DUP", at=T_IN, amount="20.00")
    erp = case.pipeline("erp")

    run = erp.run(*FIRST)

    assert run.ok, run.error_text
    assert case.crm("select amount::text from crm.sales_order where order_id = 'FAULT-DUP'") == [("20.00",)]
    [(stage, reason, blocks)] = case.crm("select stage, reason, blocks_key from sync.quarantine "
                                         "where run_id = %s and source_pk = 'FAULT-DUP'", (run.run_id,))
    assert (stage, blocks) == ("extract", False) and reason.startswith("superseded: a newer version of this key")
    assert erp.run(*NEXT).ok
    acc = settled(case, fault_counts, "erp", [(None, NEXT[1])])
    assert acc.superseded == 1


def _incremental(case) -> None:
    """The ERP read hourly and incrementally, with the nightly late-row sweep (config is data)."""
    case.patch_source("erp", sync_mode="incremental", schedule="0 * * * *", lookback_minutes=10,
                      sweep={"schedule": "0 3 * * *", "horizon_hours": 168})


def test_a_row_committed_later_than_the_lookback_is_caught_by_the_nightly_sweep(case, fault_counts):
    _incremental(case)
    src = case.sql_source("erp")
    erp = case.pipeline("erp")
    assert erp.run(END, END + HOUR).ok  # no watermark yet: the whole history
    [(mark,)] = case.crm("select cursor_value from sync.watermark where source = 'erp' and stream = 'orders'")
    # committed now, stamped 30 minutes before the watermark: behind it by more than the 10-minute lookback
    add_order(src, "FAULT-LATE", at=mark - timedelta(minutes=30))

    hourly = erp.run(END + HOUR, END + 2 * HOUR)

    assert hourly.ok, hourly.error_text
    missed = case.account("erp", [(None, END + 2 * HOUR)])
    assert [k for _, k, _ in missed.lost_rows] == ["FAULT-LATE"], "the accounting must see the row the window missed"
    sweep = erp.run(END + DAY, END + DAY + HOUR)  # the next night's 03:00 run is the sweep
    assert sweep.ok, sweep.error_text
    assert sweep.outputs["extract.orders"]["sweep"] is True
    assert sweep.outputs["reconcile.check"]["late_rows"] == 1
    assert any("late-row sweep" in body and "loaded 1 rows" in body for _, body in case.alerts), case.alerts
    assert case.crm("select count(*) from crm.sales_order where order_id = 'FAULT-LATE'")[0][0] == 1
    settled(case, fault_counts, "erp", [(None, END + DAY + HOUR)])


def _wipe_unlogged_staging(case) -> None:
    """What a PostgreSQL crash restart does: every unlogged table comes back empty."""
    tables = [t for (t,) in case.crm("select format('%%I.%%I', n.nspname, c.relname) from pg_class c "
                                     "join pg_namespace n on n.oid = c.relnamespace "
                                     "where c.relpersistence = 'u' and c.relkind = 'r'")]
    assert "stg.extracted" in tables
    case.crm(f"truncate {', '.join(tables)}")


def test_staging_emptied_between_extract_and_load_fails_the_load_and_a_rerun_loads_everything(case, fault_counts):
    case.sql_source("erp")
    erp = case.pipeline("erp")

    run = erp.run(*FIRST, before={"load.publish": lambda ctx: _wipe_unlogged_staging(case)})

    assert run.failed_task == "load.publish"
    assert run.error_text.startswith(f"StagingLostError: source 'erp' run '{run.run_id}': the run's staging is gone (")
    assert "customers: " in run.error_text and ", 0 left in staging" in run.error_text
    assert case.crm("select count(*) from crm.source_customer")[0][0] == 0
    assert case.run_log(run.run_id, "erp")["state"] == "failed"
    rerun = run.clear()  # "clear this whole DAG run (every task) to redo it now"
    assert rerun.ok, rerun.error_text
    assert case.run_log(run.run_id, "erp")["state"] == "success"
    settled(case, fault_counts, "erp", [(None, END)])


class _LoadKiller:
    """Holds the run's `sync.run_log` row so the load blocks inside its transaction (customers and
    facts already written), then terminates the load's backend from another session."""

    def __init__(self, case, run_id: str) -> None:
        from crm_sync import db

        self.conn = db.connect(case.crm_dsn)
        self.watcher = db.connect(case.crm_dsn)
        self.watcher.autocommit = True  # pg_stat_activity is a snapshot per transaction: look afresh each time
        self.killed: list[int] = []
        with self.conn.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            self.pid = cur.fetchone()[0]
            cur.execute("select 1 from sync.run_log where run_id = %s and source = 'erp' for update", (run_id,))
        self.thread = threading.Thread(target=self._kill, daemon=True)
        self.thread.start()

    def _kill(self) -> None:
        deadline = time.monotonic() + 30
        with self.watcher.cursor() as cur:
            while time.monotonic() < deadline and not self.killed:
                cur.execute("select pid from pg_stat_activity where %s = any(pg_blocking_pids(pid))", (self.pid,))
                for (pid,) in cur.fetchall():
                    cur.execute("select pg_terminate_backend(%s)", (pid,))
                    self.killed.append(pid)
                time.sleep(0.02)
        self.watcher.close()
        self.conn.rollback()
        self.conn.close()


def test_the_crm_connection_killed_mid_load_leaves_nothing_half_loaded_and_the_retry_completes(case, fault_counts):
    case.sql_source("erp")
    erp = case.pipeline("erp")
    killers = []

    run = erp.run(*FIRST, before={"load.publish": lambda ctx: killers.append(_LoadKiller(case, ctx["run_id"]))})

    killers[0].thread.join(5)
    assert killers[0].killed, "the load never blocked on the run-log row"
    assert run.failed_task == "load.publish" and run.retryable
    for table in ("crm.source_customer", "crm.customer_link", "crm.sales_order", "sync.watermark"):
        assert case.crm(f"select count(*) from {table}")[0][0] == 0, f"{table} was half loaded"
    retry = run.retry()
    assert retry.ok, retry.error_text
    settled(case, fault_counts, "erp", [(None, END)])
    # what on-call reads: the CRM database went away (checked last, so the figures above are recorded)
    assert "the CRM database" in run.error_text and "connection already closed" not in run.error_text, \
        run.error_text


def test_the_erp_connection_dropped_mid_extract_names_the_source_database_not_the_crm(case, fault_counts):
    proxy = case.proxied("erp")
    proxy.cut_when_client_sends(b"FETCH")  # the window is counted; the rows are being read
    erp = case.pipeline("erp")

    run = erp.run(*FIRST)

    assert proxy.cuts >= 1
    assert run.failed_task == "extract.customers" and run.retryable
    assert run.error_text.startswith("DatabaseError: source 'erp' database (Airflow connection 'erp_src') failed "
                                     "while reading: "), run.error_text
    assert "CRM" not in run.error_text and "Nothing was loaded; Airflow retries the task while tries remain." in run.error_text
    assert case.crm("select count(*) from stg.extracted")[0][0] == 0
    retry = run.retry()  # the link is back
    assert retry.ok, retry.error_text
    settled(case, fault_counts, "erp", [(None, END)])


def test_a_killed_task_leaves_its_run_running_and_the_next_run_closes_it_as_failed(case, fault_counts):
    case.sql_source("erp")
    erp = case.pipeline("erp")
    killed = erp.run(*FIRST, kill_at="resolve.identities")  # SIGKILL / OOM: no callback records anything
    assert case.run_log(killed.run_id, "erp")["state"] == "running"

    run = erp.run(*NEXT)

    assert run.ok, run.error_text
    closed = case.run_log(killed.run_id, "erp")
    assert closed["state"] == "failed" and closed["finished_at"] is not None
    assert closed["error"].startswith("abandoned: a task of this run was killed") and run.run_id in closed["error"]
    assert any(killed.run_id in body and "left 'running' by a killed task" in body for _, body in case.alerts)
    settled(case, fault_counts, "erp", [(None, NEXT[1])])


def test_a_backfill_of_an_old_interval_of_an_incremental_source_loads_that_periods_rows(case, fault_counts):
    _incremental(case)
    src = case.sql_source("erp")
    old = END - 10 * DAY + 6 * HOUR
    for i in range(3):
        at = old + i * HOUR + timedelta(minutes=20)
        src.execute("insert into src_erp.customers (customer_no, name, mobile, updated_at, created_at) "
                    "values (%s, %s, %s, %s, %s)", (f"FAULT-BF-C{i}", f"回填{i}", f"1390000010{i}", at, at))
        for j in range(2):
            src.execute("insert into src_erp.orders (order_no, customer_no, order_date, amount, currency, status, "
                        "updated_at) values (%s, %s, %s, 5.00, 'CNY', 'paid', %s)",
                        (f"FAULT-BF-O{i}{j}", f"FAULT-BF-C{i}", old.date(), at + timedelta(minutes=j)))
    erp = case.pipeline("erp")
    # onboarded yesterday: a manual run read the last day only; the watermark now stands at the newest row
    assert erp.run(END - HOUR, END, run_type="manual", params={"window_start": (END - DAY).isoformat()}).ok
    assert case.crm("select count(*) from crm.source_customer where source_id like 'FAULT-BF-%%'")[0][0] == 0

    backfill = [erp.run(old + i * HOUR, old + (i + 1) * HOUR, run_type="backfill") for i in range(3)]

    assert all(r.ok for r in backfill), [r.error_text for r in backfill]
    assert case.crm("select count(*) from crm.source_customer where source_id like 'FAULT-BF-%%'")[0][0] == 3
    assert case.crm("select count(*) from crm.sales_order where order_id like 'FAULT-BF-%%'")[0][0] == 6
    assert all(r.outputs["extract.orders"]["rows"] >= 2 for r in backfill)
    settled(case, fault_counts, "erp", [(END - DAY, END), (old - timedelta(minutes=10), old + 3 * HOUR)])


def test_a_rerun_of_the_same_interval_duplicates_nothing(case, fault_counts):
    case.sql_source("finance")
    finance = case.pipeline("finance")
    first = finance.run(*FIRST)
    assert first.ok, first.error_text
    snapshots = [case.snapshot("finance")]

    manual = finance.run(*FIRST, run_type="manual")      # a manual run of the same interval
    assert manual.ok, manual.error_text
    snapshots.append(case.snapshot("finance"))
    cleared = first.clear()                                # the first run cleared and run again
    assert cleared.ok, cleared.error_text
    snapshots.append(case.snapshot("finance"))

    assert snapshots[0] == snapshots[1] == snapshots[2]
    assert manual.outputs["load.publish"]["customers"] >= 0
    acc = settled(case, fault_counts, "finance", [(None, END)], snapshots=snapshots)
    assert acc.held > 0  # the finance sample has invoices of customers not keyed in yet: held, not lost


def test_the_accounting_itself_sees_lost_stale_and_duplicated_rows(case):
    """Not a fault of the pipeline: the suite's own yardstick, checked on a CRM damaged by hand."""
    case.sql_source("erp")
    erp = case.pipeline("erp")
    assert erp.run(*FIRST).ok
    clean = case.account("erp", [(None, END)])
    assert (clean.lost, clean.duplicated) == (0, 0) and clean.loaded == clean.source_rows > 100, str(clean)
    gone, stale, twin = [k for (k,) in case.crm("select order_id from crm.sales_order order by order_id limit 3")]
    case.crm("delete from crm.sales_order where order_id = %s", (gone,))
    case.crm("update crm.sales_order set source_updated_at = source_updated_at - interval '1 day' "
             "where order_id = %s", (stale,))
    case.crm("create temp table twin as select * from crm.sales_order where order_id = %s; "
             "update twin set order_id = ' ' || order_id || ' '; insert into crm.sales_order select * from twin",
             (twin,))

    damaged = case.account("erp", [(None, END)])

    assert sorted(k for _, k, _ in damaged.lost_rows) == sorted([gone, stale]), str(damaged)
    assert damaged.duplicated == 1 and damaged.duplicated_keys[0][1] == sorted([twin, f" {twin} "]), str(damaged)
    snap = case.snapshot("erp")
    reloaded = {k: (h, "another run", c) if k == ("crm.sales_order", twin) else (h, r, c)
                for k, (h, r, c) in snap.items()}
    assert case.account("erp", [(None, END)], snapshots=[snap, reloaded]).duplicated == 2
