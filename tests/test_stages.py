"""Stage functions without a scheduler: extract staging, schema contract, watermark window, volume gate, casts."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from crm_sync import db, watermark
from crm_sync.config import load_source
from crm_sync.mapping import CastError, cast
from crm_sync.config import FieldMap
from crm_sync.quality.validate import DataQualityError
from crm_sync.quality.volume import check_volume
from crm_sync.sources import extract as ex
from crm_sync.sources.sql_source import SchemaDriftError, fetch_batches

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


def _user(pk, minutes, **kw):
    rec = {"id": pk, "name": "张三", "phone": "13800138000", "email": "a@b.cn", "organization": "x",
           "created_at": T0.isoformat(), "updated_at": (T0 + timedelta(minutes=minutes)).isoformat()}
    rec.update(kw)
    return rec


def test_stage_records_quarantines_missing_keys_and_keeps_newest_version(conn):
    cfg = load_source("ticketing")
    stream = cfg.stream("users")
    window = watermark.Window(since=None, until=T0 + timedelta(hours=1))
    batches = [[_user("u1", 1), _user(None, 2), _user("u2", 3, updated_at="garbage")], [_user("u1", 5, name="张三丰")]]
    result = ex.stage_records(conn, "run-a", cfg, stream, window, batches)
    assert (result.rows, result.rejected) == (1, 2)
    with conn.cursor() as cur:
        cur.execute("select source_pk, payload->>'name', cursor_value from stg.extracted where run_id = 'run-a'")
        assert cur.fetchall() == [("u1", "张三丰", T0 + timedelta(minutes=5))]
        cur.execute("select source_pk, field, reason, blocks_key from sync.quarantine where run_id = 'run-a'"
                    " order by field, source_pk")
        rows = cur.fetchall()
    assert rows[0][:2] == (None, "id") and "primary key is missing" in rows[0][2] and rows[0][3]
    # the older version of u1 is kept as superseded; it does not stop the newer one from loading
    assert rows[1][:2] == ("u1", "updated_at") and rows[1][2].startswith("superseded") and not rows[1][3]
    assert rows[2][:2] == ("u2", "updated_at") and "garbage" in rows[2][2] and rows[2][3]
    assert result.received == 4
    # a retried task starts clean: same run, different content, no leftovers
    ex.stage_records(conn, "run-a", cfg, stream, window, [[_user("u3", 1)]])
    with conn.cursor() as cur:
        cur.execute("select source_pk from stg.extracted where run_id = 'run-a'")
        assert cur.fetchall() == [("u3",)]
        cur.execute("select count(*) from sync.quarantine where run_id = 'run-a'")
        assert cur.fetchone()[0] == 0


def test_a_nul_character_or_a_10000_character_key_quarantines_that_record_only(conn):
    cfg = load_source("ticketing")
    stream = cfg.stream("users")
    window = watermark.Window(since=None, until=T0 + timedelta(hours=1))
    nul = _user("u-nul", 1, organization={"name": "Acme\x00Ltd"})
    huge = _user("k" * 10_000, 2)
    result = ex.stage_records(conn, "run-nul", cfg, stream, window, [[_user("u1", 1), nul, huge, _user("u2", 3)]])

    assert (result.rows, result.rejected) == (2, 2)
    with conn.cursor() as cur:
        cur.execute("select source_pk, field, reason, payload from sync.quarantine where run_id = 'run-nul'"
                    " order by field")
        (key_pk, key_field, key_reason, _), (nul_pk, nul_field, nul_reason, nul_payload) = cur.fetchall()
    assert key_field == "id" and "10000 characters long" in key_reason and len(key_pk) < 100
    assert (nul_pk, nul_field) == ("u-nul", "organization.name") and "NUL" in nul_reason
    assert nul_payload["organization"]["name"] == "Acme\u2400Ltd"  # kept, visibly, not lost


def test_a_field_missing_from_every_record_is_schema_drift(conn):
    cfg = load_source("ticketing")
    stream = cfg.stream("users")
    window = watermark.Window(since=None, until=T0 + timedelta(hours=1))
    renamed = [{k if k != "phone" else "mobile_phone": v for k, v in _user("u1", 1).items()}]
    with pytest.raises(SchemaDriftError) as err:
        ex.stage_records(conn, "run-b", cfg, stream, window, [renamed])
    message = str(err.value)
    assert "source 'ticketing' stream 'users'" in message and "['phone']" in message and "mobile_phone" in message


def test_sql_source_with_renamed_column_names_it(conn, fresh_dsn):
    with conn.cursor() as cur:
        cur.execute("create schema if not exists src_t; create table src_t.c (id text, mobile_phone text, "
                    "updated_at timestamptz)")
    conn.commit()
    src = db.connect(fresh_dsn)
    try:
        with pytest.raises(SchemaDriftError, match=r"source 'erp' stream 'customers'.*column \"mobile\" does not exist"):
            list(fetch_batches(src, "select id, mobile, updated_at from src_t.c where updated_at < %(until)s",
                               since=None, until=T0, name="customers", source="erp"))
    finally:
        src.close()


def test_extract_window_reads_the_runs_own_interval_widened_back_to_the_watermark(conn):
    cfg = load_source("ticketing")
    lookback = timedelta(minutes=cfg.lookback_minutes)
    start, end = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    # no watermark yet: the first run reads the whole history, a backfill run only its interval
    assert watermark.extract_window(conn, cfg, "users", end, start) == watermark.Window(since=None, until=end)
    assert watermark.extract_window(conn, cfg, "users", end, start, run_type="backfill").since == start - lookback
    with conn.cursor() as cur:
        cur.execute("insert into sync.watermark (source, stream, cursor_value, cursor_pk, run_id) "
                    "values ('ticketing', 'users', %s, 'u9', 'r0')", (T0,))
    # the watermark is older than the interval (a run was skipped): the window reaches back to it
    window = watermark.extract_window(conn, cfg, "users", end, start)
    assert window.since == T0 - lookback and window.until == end
    # a rerun of an interval long before the watermark reads that interval, not "from the watermark on"
    old_start, old_end = T0 - timedelta(days=3), T0 - timedelta(days=3) + timedelta(hours=1)
    assert watermark.extract_window(conn, cfg, "users", old_end, old_start) == \
        watermark.Window(since=old_start - lookback, until=old_end)
    # trigger-form params: an explicit window, a full refresh
    assert watermark.extract_window(conn, cfg, "users", end, start, {"window_start": "2026-01-01T00:00:00",
                                    "window_end": "2026-01-02T00:00:00+00:00"}) == \
        watermark.Window(since=datetime(2026, 1, 1, tzinfo=timezone.utc), until=datetime(2026, 1, 2, tzinfo=timezone.utc))
    assert watermark.extract_window(conn, cfg, "users", end, start, {"full_refresh": True}).since is None
    full = load_source("erp")
    assert watermark.extract_window(conn, full, "customers", end, start).since is None


def test_the_nightly_sweep_run_reads_its_horizon_back(conn):
    cfg = load_source("ticketing")
    assert cfg.sweep is not None
    with conn.cursor() as cur:
        cur.execute("insert into sync.watermark (source, stream, cursor_value, cursor_pk, run_id) "
                    "values ('ticketing', 'users', '2026-03-10T02:00:00+00', 'u9', 'r0') "
                    "on conflict (source, stream) do update set cursor_value = excluded.cursor_value")
    at_3 = datetime(2026, 3, 10, 3, 0, tzinfo=timezone.utc)
    sweep = watermark.extract_window(conn, cfg, "users", at_3, at_3 - timedelta(hours=1))
    assert sweep.sweep and sweep.since == at_3 - timedelta(hours=cfg.sweep.horizon_hours)
    assert sweep.normal_since == datetime(2026, 3, 10, 2, 0, tzinfo=timezone.utc) - timedelta(minutes=cfg.lookback_minutes)
    at_4 = at_3 + timedelta(hours=1)
    assert not watermark.extract_window(conn, cfg, "users", at_4, at_3).sweep
    assert watermark.extract_window(conn, cfg, "users", at_4, at_3, {"sweep": True}).sweep


def test_volume_gate_blocks_a_full_extract_that_shrank(conn):
    cfg = load_source("erp")
    stream = cfg.stream("customers")
    with conn.cursor() as cur:
        cur.execute("insert into sync.run_log (run_id, source, dag_id, state) values ('good', 'erp', 'd', 'success')")
        cur.execute("insert into sync.reconciliation (run_id, source, stream, check_name, source_value, target_value, ok)"
                    " values ('good', 'erp', 'customers', 'row_count', 1000, 1000, true)")
        cur.execute("insert into stg.extracted (run_id, source, stream, source_pk, cursor_value, payload) "
                    "select 'small', 'erp', 'customers', g::text, now(), '{}' from generate_series(1, 100) g")
        cur.execute("insert into stg.extracted (run_id, source, stream, source_pk, cursor_value, payload) "
                    "select 'fine', 'erp', 'customers', g::text, now(), '{}' from generate_series(1, 900) g")
    assert check_volume(conn, "fine", cfg, stream) == {"previous": 1000, "current": 900}
    with pytest.raises(DataQualityError, match=r"volume dropped from 1000 rows .* to 100 rows"):
        check_volume(conn, "small", cfg, stream)
    with conn.cursor() as cur:
        cur.execute("select success, element_count from sync.dq_result where run_id = 'small'")
        assert cur.fetchall() == [(False, 100)]


@pytest.mark.parametrize("value, fm, expected", [
    ("1234.50", FieldMap(**{"from": "a", "type": "numeric", "scale": 2}), Decimal("1234.50")),
    ("1,234.5", FieldMap(**{"from": "a", "type": "numeric", "scale": 2}), Decimal("1234.5")),
    ("2026-11-20", FieldMap(**{"from": "a", "type": "date"}), datetime(2026, 11, 20).date()),
    ("2026-11-20T08:00:00Z", FieldMap(**{"from": "a", "type": "timestamptz"}), T0),
    (" ", FieldMap(**{"from": "a"}), None),
    ("A", FieldMap(**{"from": "a", "values": {"A": "active"}}), "active"),
])
def test_cast_accepts(value, fm, expected):
    assert cast(value, fm) == expected


@pytest.mark.parametrize("value, fm, message", [
    ("10.005", FieldMap(**{"from": "amount", "type": "numeric", "scale": 2}), "more than 2 decimal places"),
    (10.5, FieldMap(**{"from": "amount", "type": "numeric"}), "binary float"),
    (None, FieldMap(**{"from": "order_date", "type": "date", "required": True}), "required field 'order_date'"),
    ("2026-11-20T08:00:00", FieldMap(**{"from": "t", "type": "timestamptz"}), "no time zone"),
    ("B", FieldMap(**{"from": "s", "values": {"A": "active"}}), "not one of the mapped values"),
])
def test_cast_rejects_with_a_reason(value, fm, message):
    with pytest.raises(CastError, match=message):
        cast(value, fm)


def test_run_log_keeps_a_sibling_failure_and_clears_its_own_on_retry(conn):
    from crm_sync import runlog

    with conn.cursor() as cur:
        runlog.start(cur, "r1", "erp", "crm_sync__erp", None, None, task_id="extract.customers")
        runlog.update(cur, "r1", "erp", state="failed", failed_task="extract.customers", error="SchemaDriftError: x")
        runlog.start(cur, "r1", "erp", "crm_sync__erp", None, None, task_id="extract.orders")
        cur.execute("select state, failed_task, error from sync.run_log where run_id = 'r1'")
        assert cur.fetchone() == ("failed", "extract.customers", "SchemaDriftError: x")
        runlog.start(cur, "r1", "erp", "crm_sync__erp", None, None, task_id="extract.customers")
        cur.execute("select state, failed_task, error from sync.run_log where run_id = 'r1'")
        assert cur.fetchone() == ("running", None, None)
