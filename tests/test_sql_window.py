"""The SQL extractor's window against a real PostgreSQL: strays, future cursors, the source's own count.

Every row of the source table is either in the run's window, a stray (NULL cursor: quarantined with
a reason), or a future cursor (clamped and flagged) — none is filtered out silently — and the
extract checks what arrived against the count and key checksum the source reports in the same
snapshot.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from crm_sync import db, watermark
from crm_sync.config import load_source
from crm_sync.sources import extract as ex
from crm_sync.sources.sql_source import SqlExtractor, count_sql, window_sql

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture()
def source(fresh_dsn):
    conn = db.connect(fresh_dsn)
    with conn.cursor() as cur:
        cur.execute("drop schema if exists src_w cascade; create schema src_w")
        cur.execute("""create table src_w.orders (order_no text primary key, customer_no text, order_date date,
                       amount numeric(18,2), currency text, status text, updated_at timestamptz)""")
        rows = [(f"O{i}", "C1", "2026-02-01", "10.00", "CNY", "paid", T0 + timedelta(minutes=i)) for i in range(10)]
        rows += [("O-null", "C1", "2026-02-01", "1.00", "CNY", "paid", None),
                 ("O-2099", "C1", "2026-02-01", "2.00", "CNY", "paid", datetime(2099, 1, 1, tzinfo=timezone.utc)),
                 ("O-late", "C1", "2026-02-01", "3.00", "CNY", "paid", T0 + timedelta(days=2))]
        cur.executemany("insert into src_w.orders values (%s, %s, %s, %s, %s, %s, %s)", rows)
    conn.commit()
    yield conn
    conn.close()


def _stream():
    cfg = load_source("erp")
    stream = cfg.stream("orders").model_copy(update={
        "query": "select order_no, customer_no, order_date, amount, currency, status, updated_at from src_w.orders"})
    return cfg.model_copy(update={"streams": [stream]}), stream


def test_the_window_wrapper_keeps_strays_and_future_rows_and_orders_by_cursor():
    sql = window_sql("select * from t;", "updated_at", "order_no", bounded_below=True)
    assert "q.\"updated_at\" >= %(since)s" in sql and "q.\"updated_at\" is null" in sql
    assert sql.rstrip().endswith('order by q."updated_at", q."order_no"') and ";" not in sql
    assert "order by" not in count_sql("select * from t", "updated_at", "order_no", bounded_below=False)


def test_every_row_is_in_the_window_a_quarantined_stray_or_a_clamped_future_row(conn, source):
    cfg, stream = _stream()
    until = T0 + timedelta(hours=1)
    window = watermark.Window(since=T0 + timedelta(minutes=5), until=until)
    extractor = SqlExtractor(cfg, stream, source)
    result = ex.stage_records(conn, "run-w", cfg, stream, window, extractor.records(window))
    # minutes 5..9 in the window, the NULL cursor and the year-2099 row; O-late belongs to a later run
    assert extractor.source_total == 7 == result.received
    assert extractor.source_checksum == result.checksum
    ex.check_received(cfg, stream, result, source_total=extractor.source_total,
                      source_checksum=extractor.source_checksum, partial=False)
    with conn.cursor() as cur:
        cur.execute("select source_pk, cursor_value from stg.extracted where run_id = 'run-w' order by source_pk")
        staged = dict(cur.fetchall())
        cur.execute("select source_pk, field, reason from sync.quarantine where run_id = 'run-w'")
        quarantined = cur.fetchall()
    assert set(staged) == {"O5", "O6", "O7", "O8", "O9", "O-2099"}
    assert staged["O-2099"] == until  # clamped: the watermark cannot jump to 2099
    assert result.future == 1 and "in the future" in result.notices[0] and "O-2099" in result.notices[0]
    assert quarantined == [("O-null", "updated_at", quarantined[0][2])]
    assert "cursor field is missing" in quarantined[0][2]


def test_a_full_snapshot_lists_every_key_whatever_its_cursor(conn, source):
    cfg, stream = _stream()
    extractor = SqlExtractor(cfg, stream, source)
    window = watermark.Window(since=None, until=T0 + timedelta(hours=1))
    list(extractor.records(window))
    keys = [k for batch in extractor.snapshot_keys() for k in batch]
    assert sorted(keys) == sorted([f"O{i}" for i in range(10)] + ["O-null", "O-2099", "O-late"])


def test_rows_the_source_holds_but_that_did_not_arrive_fail_the_extract(conn, source):
    cfg, stream = _stream()
    window = watermark.Window(since=None, until=T0 + timedelta(hours=1))
    extractor = SqlExtractor(cfg, stream, source)
    batches = list(extractor.records(window))
    short = [batches[0][:-2]]  # two rows dropped on the way
    result = ex.stage_records(conn, "run-short", cfg, stream, window, short)
    with pytest.raises(ex.LostRowsError, match=r"source 'erp' stream 'orders': the source holds 12 rows .* only "
                                               r"10 arrived; 2 would be lost"):
        ex.check_received(cfg, stream, result, source_total=extractor.source_total,
                          source_checksum=extractor.source_checksum, partial=False)
    # the same number of rows but not the same keys: caught by the checksum
    swapped = [batches[0][:-1] + [batches[0][0]]]
    result = ex.stage_records(conn, "run-swap", cfg, stream, window, swapped)
    with pytest.raises(ex.LostRowsError, match="key checksum mismatch"):
        ex.check_received(cfg, stream, result, source_total=extractor.source_total,
                          source_checksum=extractor.source_checksum, partial=False)


def test_a_run_whose_staging_vanished_fails_instead_of_loading_nothing(conn, source):
    cfg, stream = _stream()
    window = watermark.Window(since=None, until=T0 + timedelta(hours=1))
    extractor = SqlExtractor(cfg, stream, source)
    result = ex.stage_records(conn, "run-gone", cfg, stream, window, extractor.records(window))
    with conn.cursor() as cur:
        ex.write_account(cur, "run-gone", cfg, stream, window, result, source_total=extractor.source_total,
                         source_checksum=extractor.source_checksum, partial=False)
    ex.check_staging(conn, "run-gone", cfg)  # intact: no error
    with conn.cursor() as cur:
        cur.execute("delete from stg.extracted where run_id = 'run-gone'")  # what a crash restart does
    with pytest.raises(ex.LostRowsError, match=r"run 'run-gone': the run's staging is gone \(orders: 11 rows "
                                               r"extracted, 0 left in staging\)"):
        ex.check_staging(conn, "run-gone", cfg)
