"""Drift baselines (quality/drift.py): robust baseline maths, the critical gates, warnings, run types, YAML bounds.

Every test uses its own source name: a blocking check commits its evidence before raising.
"""
from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import yaml

from crm_sync.config import (ConfigError, SourceConfig, all_source_names, load_source, load_source_file,
                             source_path)
from crm_sync.quality import drift
from crm_sync.quality.validate import DataQualityError

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)

CUSTOMERS = {
    "name": "customers", "entity": "customer", "primary_key": "id", "cursor_field": "updated_at",
    "query": "select 1", "expectation_suite": "customer",
    "identity": {"name": "name", "phones": ["mobile"], "email": "email"},
    "mapping": {"full_name": {"from": "name"}, "city": {"from": "city"},
                "source_updated_at": {"from": "updated_at", "type": "timestamptz"}},
}
ORDERS = {
    "name": "orders", "entity": "order", "primary_key": "order_no", "cursor_field": "updated_at",
    "query": "select 1", "expectation_suite": "order",
    "mapping": {"source_customer_id": {"from": "customer_no"},
                "amount": {"from": "amount", "type": "numeric", "scale": 2},
                "status": {"from": "status"}, "currency": {"value": "CNY"}},
}


def source(name: str, sync_mode: str = "full", drift_section: dict | None = None) -> dict:
    raw = {"source": name, "kind": "sql", "conn_id": "src", "schedule": "0 2 * * *", "sync_mode": sync_mode,
           "streams": [dict(CUSTOMERS), dict(ORDERS)]}
    if drift_section is not None:
        raw["drift"] = drift_section
    return raw


def cfg_of(name: str, sync_mode: str = "full", drift_section: dict | None = None) -> SourceConfig:
    return SourceConfig.model_validate(source(name, sync_mode, drift_section))


def stage_run(conn, cfg: SourceConfig, run_id: str, stream_name: str, *, hour: int, rows: int, nulls: int = 0,
              merged: int = 0, window: str = "full", state: str = "success"):
    """Stage one run's batch as map/resolve would leave it, judge it, then close the run as reconcile would."""
    stream = cfg.stream(stream_name)
    with conn.cursor() as cur:
        cur.execute(
            """insert into sync.run_log (run_id, source, dag_id, started_at, ids_merged, ids_review, ids_new)
               values (%s, %s, 'dag', %s, %s, 0, 0)""",
            (run_id, cfg.source, T0 + timedelta(hours=hour), merged))
        cur.execute(
            """insert into sync.stream_account (run_id, source, stream, window_since, late_since, received, staged)
               values (%s, %s, %s, %s, %s, %s, %s)""",
            (run_id, cfg.source, stream_name, None if window == "full" else T0 + timedelta(hours=hour - 1),
             T0 if window == "sweep" else None, rows, rows))
        if stream.entity == "order":
            cur.execute(
                """insert into stg.mapped_order (run_id, source, stream, source_pk, source_customer_id, amount,
                                                 currency, status, row_hash)
                   select %s, %s, %s, 'o' || g, 'c' || (g %% 50), 10.00, 'CNY',
                          case when g <= %s then null else 'open' end, 'h'
                   from generate_series(1, %s) g""",
                (run_id, cfg.source, stream_name, nulls, rows))
        else:
            cur.execute(
                """insert into stg.mapped_customer (run_id, source, stream, source_pk, customer_id, full_name,
                                                    phone_e164, email, city, row_hash)
                   select %s, %s, %s, 'k' || g, md5('k' || g)::uuid, 'name ' || g, '+86138' || lpad(g::text, 8, '0'),
                          'p' || g || '@example.com', case when g <= %s then null else 'Shanghai' end, 'h'
                   from generate_series(1, %s) g""",
                (run_id, cfg.source, stream_name, nulls, rows))
            cur.execute(
                """insert into stg.resolved (run_id, source, stream, source_pk, customer_id, decision, match_rule)
                   select %s, %s, %s, 'k' || g, md5('k' || g)::uuid,
                          case when g <= %s then 'merged' else 'linked' end, 'rule'
                   from generate_series(1, %s) g""",
                (run_id, cfg.source, stream_name, merged, rows))
    findings = drift.check_stream(conn, run_id, cfg, stream)
    with conn.cursor() as cur:
        cur.execute("update sync.run_log set state = %s, finished_at = started_at + interval '10 minutes' "
                    "where run_id = %s and source = %s", (state, run_id, cfg.source))
    return findings


def series(cur, src: str, metric: str, values, *, stream: str = "s", run_type: str = "nightly",
           states=None, start: int = 0) -> None:
    """Successful (or `states`) runs of `src` with one figure each, oldest first."""
    for i, value in enumerate(values):
        run = f"{src}_{start + i}"
        cur.execute("insert into sync.run_log (run_id, source, dag_id, state, started_at) values (%s, %s, 'd', %s, %s)",
                    (run, src, (states or {}).get(i, "success"), T0 + timedelta(hours=start + i)))
        cur.execute("""insert into sync.drift_metric (run_id, source, stream, metric, run_type, value)
                       values (%s, %s, %s, %s, %s, %s)""", (run, src, stream, metric, run_type, value))


def judged(cur, src: str, metric: str, value, *, stream: str = "s", run_type: str = "nightly", window: int = 14):
    """Baseline of `value` as the current run's figure (run started after every run of `series`)."""
    cur.execute("insert into sync.run_log (run_id, source, dag_id, started_at) values ('now', %s, 'd', %s)",
                (src, T0 + timedelta(days=30)))
    cur.execute("""insert into sync.drift_metric (run_id, source, stream, metric, run_type, value)
                   values ('now', %s, %s, %s, %s, %s)""", (src, stream, metric, run_type, value))
    (row,) = drift.baselines(cur, src, run_id="now", stream=stream, window=window)
    return row[-1]


# ---------------------------------------------------------------------------------- maths ------

def test_median_and_mad_of_known_series(conn):
    with conn.cursor() as cur:
        series(cur, "m_odd", "rows", [10, 12, 11, 13, 50])
        base = judged(cur, "m_odd", "rows", 15)
        assert (base.history, base.median, base.mad) == (5, 12, 1)
        assert base.meanad == Decimal("8.4")          # (2 + 0 + 1 + 1 + 38) / 5
        assert drift.robust_z(Decimal(15), base) == pytest.approx(3 / 1.4826)

        series(cur, "m_even", "rows", [1, 2, 3, 4])  # even count: the mean of the middle two
        base = judged(cur, "m_even", "rows", 2)
        assert (base.history, base.median, base.mad) == (4, Decimal("2.5"), 1)


def test_window_keeps_the_last_n_successful_runs_of_the_same_run_type(conn):
    with conn.cursor() as cur:
        # 20 runs valued 1..20; run 19 (value 20) failed; hourly runs of the same metric stay apart
        series(cur, "m_win", "rows", range(1, 21), states={19: "failed", 18: "blocked"})
        series(cur, "m_win", "rows", [1000] * 5, run_type="hourly", start=100)
        base = judged(cur, "m_win", "rows", 10, window=14)
        assert base.history == 14                      # values 5..18
        assert base.median == Decimal("11.5")
        assert base.mad == Decimal("3.5")


def test_mad_zero_falls_back_to_mean_absolute_deviation_then_to_any_change(conn):
    with conn.cursor() as cur:
        series(cur, "m_flat", "null_rate", [0, 0, 0, 0, Decimal("0.3")])
        base = judged(cur, "m_flat", "null_rate", Decimal("0.3"))
        assert (base.median, base.mad, base.meanad) == (0, 0, Decimal("0.06"))
        assert base.scale == Decimal("1.2533") * Decimal("0.06")
        assert drift.robust_z(Decimal("0.3"), base) == pytest.approx(0.3 / (1.2533 * 0.06))

        constant = drift.Baseline(history=5, median=Decimal(7), mad=Decimal(0), meanad=Decimal(0))
        assert drift.robust_z(Decimal(7), constant) == 0
        assert math.isinf(drift.robust_z(Decimal(8), constant))
    rule = cfg_of("m_rule").drift.rows                 # max_z 4, min_rel_delta 5 %
    # a series that never moved: a 1 % change is below min_rel_delta, a 50 % change warns
    constant = drift.Baseline(history=5, median=Decimal(1000), mad=Decimal(0), meanad=Decimal(0))
    assert drift.judge(rule, Decimal(1010), constant, full_refresh=False, min_history=5) is None
    severity, bound, z = drift.judge(rule, Decimal(1500), constant, full_refresh=False, min_history=5)
    assert severity == "warning" and math.isinf(z) and "every baseline run had exactly the median" in bound


def test_short_history_gives_no_verdict(conn):
    rule = cfg_of("m_short").drift.rows
    short = drift.Baseline(history=4, median=Decimal(1000), mad=Decimal(10), meanad=Decimal(10))
    assert drift.judge(rule, Decimal(1), short, full_refresh=True, min_history=5) is None
    enough = drift.Baseline(history=5, median=Decimal(1000), mad=Decimal(10), meanad=Decimal(10))
    assert drift.judge(rule, Decimal(1), enough, full_refresh=True, min_history=5)[0] == "critical"
    none = drift.Baseline(history=0, median=None, mad=None)
    assert drift.judge(rule, Decimal(1), none, full_refresh=True, min_history=5) is None


def test_bounds_are_exact_at_the_edge():
    rules = cfg_of("m_edge").drift
    base = drift.Baseline(history=5, median=Decimal(1000), mad=Decimal(10))
    # exactly 80 % fewer rows on a full refresh blocks; 79 % warns (z); not a full refresh: warns
    assert drift.judge(rules.rows, Decimal(200), base, full_refresh=True, min_history=5)[0] == "critical"
    assert drift.judge(rules.rows, Decimal(210), base, full_refresh=True, min_history=5)[0] == "warning"
    assert drift.judge(rules.rows, Decimal(200), base, full_refresh=False, min_history=5)[0] == "warning"
    # exactly three times the usual merge rate blocks (exact decimals: 0.3 is 3 x 0.1)
    rate = drift.Baseline(history=5, median=Decimal("0.1"), mad=Decimal("0.01"))
    assert drift.judge(rules.merge_rate, Decimal("0.3"), rate, full_refresh=False, min_history=5)[0] == "critical"
    assert drift.judge(rules.merge_rate, Decimal("0.29"), rate, full_refresh=False, min_history=5) is None


# ---------------------------------------------------------------------------------- the gate ---

def test_full_refresh_with_80_percent_fewer_rows_blocks_before_the_load(conn):
    cfg = cfg_of("d_volume")
    for i, rows in enumerate([1000, 990, 1010, 1005, 995]):
        assert stage_run(conn, cfg, f"v{i}", "orders", hour=24 * i, rows=rows) == []
    with pytest.raises(DataQualityError) as err:
        stage_run(conn, cfg, "v_drop", "orders", hour=24 * 5, rows=200)
    assert isinstance(err.value, drift.DriftError)
    message = str(err.value)
    assert "source 'd_volume' stream 'orders'" in message
    assert "rows = 200 against the nightly baseline median 1000, MAD 5 (5 successful runs)" in message
    assert "80% below the median on a full refresh; critical_drop is 80%" in message
    assert "Nothing was loaded" in message and "include/sources/d_volume.yaml" in message
    conn.rollback()  # the evidence was committed before the error
    with conn.cursor() as cur:
        cur.execute("""select metric, column_name, severity, value, median, mad, history, alerted from sync.drift_event
                       where run_id = 'v_drop' and source = 'd_volume' order by metric, column_name""")
        events = {(m, c): rest for m, c, *rest in cur.fetchall()}
        cur.execute("select value, run_type, full_refresh from sync.drift_metric "
                    "where run_id = 'v_drop' and source = 'd_volume' and metric = 'rows'")
        assert cur.fetchone() == (200, "nightly", True)
    assert events[("rows", "")] == ["critical", 200, 1000, 5, 5, False]
    # the sum and the distinct keys shrank too: recorded as warnings (not critical by default)
    assert events[("amount_sum", "amount")][0] == "warning"
    assert events[("distinct", "source_pk")][0] == "warning"


def test_merge_rate_three_times_its_usual_blocks(conn):
    cfg = cfg_of("d_merge")
    for i, merged in enumerate([10, 9, 11, 10, 10]):
        assert stage_run(conn, cfg, f"m{i}", "customers", hour=24 * i, rows=100, merged=merged) == []
    # twice the usual is within max_ratio 3
    assert [f.metric for f in stage_run(conn, cfg, "m_twice", "customers", hour=24 * 5, rows=100,
                                        merged=20, state="failed")] == []
    with pytest.raises(drift.DriftError) as err:
        stage_run(conn, cfg, "m_thrice", "customers", hour=24 * 6, rows=100, merged=30)
    message = str(err.value)
    assert "source 'd_merge' stream 'customers'" in message
    assert "merge_rate = 30.00% against the nightly baseline median 10.00%, MAD 0.00% (5 successful runs)" in message
    assert "3.0 times the median; max_ratio is 3" in message


def test_null_rate_jump_warns_without_blocking(conn, caplog):
    cfg = cfg_of("d_null", sync_mode="incremental")
    for i, nulls in enumerate([0, 1, 2, 1, 0, 1]):
        assert stage_run(conn, cfg, f"n{i}", "orders", hour=i, rows=100, nulls=nulls, window="hourly") == []
    with caplog.at_level(logging.WARNING, logger="crm_sync.quality.drift"):
        warnings = stage_run(conn, cfg, "n_jump", "orders", hour=6, rows=100, nulls=40, window="hourly")
    assert [(w.metric, w.column, w.severity, w.run_type) for w in warnings] == [
        ("null_rate", "status", "warning", "hourly")]
    assert "null_rate(status) = 40.00% against the hourly baseline median 1.00%" in warnings[0].message
    assert "robust z" in warnings[0].bound and "above max_z 4" in warnings[0].bound
    assert any("null_rate(status)" in r.getMessage() for r in caplog.records)
    assert warnings[0].as_dict()["value"] == "0.40000000000000000000"
    with conn.cursor() as cur:
        cur.execute("select severity, alerted, message from sync.drift_event where run_id = 'n_jump' and source = 'd_null'")
        (severity, alerted, message), = cur.fetchall()
    assert (severity, alerted) == ("warning", False) and "stream 'orders'" in message
    # a retried task measures again: figures and events are replaced, not duplicated
    drift.check_stream(conn, "n_jump", cfg, cfg.stream("orders"))
    with conn.cursor() as cur:
        cur.execute("select count(*) from sync.drift_event where run_id = 'n_jump' and source = 'd_null'")
        assert cur.fetchone()[0] == 1
        cur.execute("select count(*) from sync.drift_metric where run_id = 'n_jump' and source = 'd_null'")
        assert cur.fetchone()[0] == 8  # rows, rejection rate, 3 null rates, 2 distinct counts, 1 sum


def test_hourly_and_nightly_baselines_are_apart(conn):
    cfg = cfg_of("d_types", sync_mode="incremental")
    hour = 0
    for i in range(5):
        for rows in (50, 48, 52):
            hour += 1
            assert stage_run(conn, cfg, f"h{hour}", "orders", hour=hour, rows=rows, window="hourly") == []
        hour += 1
        assert stage_run(conn, cfg, f"s{i}", "orders", hour=hour, rows=5000 + 10 * i, window="sweep") == []
    with conn.cursor() as cur:
        cur.execute("select run_type, full_refresh, count(*) from sync.drift_metric where source = 'd_types' "
                    "and metric = 'rows' group by 1, 2 order by 1")
        assert cur.fetchall() == [("hourly", False, 15), ("nightly", False, 5)]
    # a regular sweep and a regular hour are both normal against their own baselines
    assert stage_run(conn, cfg, "s_next", "orders", hour=hour + 1, rows=5030, window="sweep") == []
    assert stage_run(conn, cfg, "h_next", "orders", hour=hour + 2, rows=49, window="hourly") == []
    # an hour with a sweep's volume is drift against the hourly baseline (and an incremental drop never blocks)
    (finding,) = [f for f in stage_run(conn, cfg, "h_big", "orders", hour=hour + 3, rows=5000, window="hourly")
                  if f.metric == "rows"]
    assert (finding.run_type, finding.median, finding.history) == ("hourly", 50, 14)
    report = {(r["stream"], r["metric"], r["column"], r["run_type"]): r for r in drift.baseline_report(conn, "d_types")}
    assert report[("orders", "rows", "", "hourly")]["median"] == 50
    assert report[("orders", "rows", "", "hourly")]["status"] == "warning"
    assert report[("orders", "rows", "", "nightly")]["median"] == 5020
    assert report[("orders", "rows", "", "nightly")]["status"] == "ok"


def test_duration_is_a_figure_of_the_run_that_only_warns(conn):
    cfg = cfg_of("d_time")
    with conn.cursor() as cur:
        for i, minutes in enumerate([10, 11, 9, 10, 12, 60]):
            cur.execute("""insert into sync.run_log (run_id, source, dag_id, state, started_at, finished_at)
                           values (%s, 'd_time', 'd', 'success', %s, %s)""",
                        (f"t{i}", T0 + timedelta(days=i), T0 + timedelta(days=i, minutes=minutes)))
            warnings = drift.check_run(conn, f"t{i}", cfg)
    assert warnings and warnings[0].metric == "duration_s" and warnings[0].stream == drift.RUN_STREAM
    assert "duration_s = 3600s against the nightly baseline median 600s" in warnings[0].message


# ---------------------------------------------------------------------------------- config -----

def test_thresholds_read_from_yaml_override_defaults(tmp_path, conn):
    raw = source("d_yaml", sync_mode="incremental", drift_section={
        "window": 10, "min_history": 4,
        "rows": {"max_z": 9},
        "merge_rate": {"critical": False},
        "null_rate": {"max_z": 2, "critical": True},
    })
    raw["streams"][0]["drift"] = {"null_rate": {"min_delta": 0.5}}
    path = tmp_path / "d_yaml.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    cfg = load_source_file(path)
    assert cfg.drift.window == 10 and cfg.drift.min_history == 4
    assert (cfg.drift.rows.max_z, cfg.drift.rows.critical_drop) == (9, 0.8)       # unnamed keys keep defaults
    assert (cfg.drift.merge_rate.max_ratio, cfg.drift.merge_rate.critical) == (3, False)
    assert cfg.drift.amount_sum == drift.DriftConfig().amount_sum                 # unnamed metrics too
    customers, orders = cfg.stream("customers").drift, cfg.stream("orders").drift
    assert (customers.null_rate.max_z, customers.null_rate.critical, customers.null_rate.min_delta) == (2, True, 0.5)
    assert orders == cfg.drift and orders.window == 10                            # streams inherit the source's

    # the YAML's bounds are the ones applied: a null-rate jump is now critical, after 4 runs
    for i, nulls in enumerate([0, 1, 2, 1]):
        assert stage_run(conn, cfg, f"y{i}", "orders", hour=i, rows=100, nulls=nulls, window="hourly") == []
    with pytest.raises(drift.DriftError, match=r"null_rate\(status\) = 40\.00% .* \(4 successful runs\)"):
        stage_run(conn, cfg, "y_jump", "orders", hour=5, rows=100, nulls=40, window="hourly")

    for bad, why in (({"duration_s": {"critical": True}}, "duration_s is known only after the load"),
                     ({"window": 3, "min_history": 5}, "min_history"),
                     ({"rows": {"max_z": -1}}, "drift.rows.max_z"),
                     ({"row": {"max_z": 3}}, "drift.row")):
        path.write_text(yaml.safe_dump(source("d_yaml", drift_section=bad)), encoding="utf-8")
        with pytest.raises(ConfigError, match=why):
            load_source_file(path)


def test_every_source_yaml_declares_its_drift_bounds():
    for name in all_source_names():
        raw = yaml.safe_load(source_path(name).read_text(encoding="utf-8"))
        assert isinstance(raw.get("drift"), dict), f"{source_path(name)} has no drift: section"
        cfg = load_source(name)
        assert cfg.drift.duration_s.critical is False
        if cfg.sync_mode == "full":  # the nightly full refreshes keep both blocking bounds
            assert cfg.drift.merge_rate.critical and cfg.drift.rows.critical_drop == 0.8


# ---------------------------------------------------------------------------------- events -----

def test_schema_drift_is_recorded_as_a_drift_event(conn):
    with conn.cursor() as cur:
        drift.record_event(cur, "r1", "d_schema", "customers", "schema",
                           "source 'd_schema' stream 'customers': fields ['mobile'] are missing; e.g. 13800138000")
        drift.record_event(cur, "r1", "d_schema", "customers", "schema",  # a retried extract: replaced
                           {"message": "fields ['mobile'] are missing", "missing": ["mobile"]})
        cur.execute("select kind, severity, alerted, message, detail from sync.drift_event "
                    "where run_id = 'r1' and source = 'd_schema'")
        (kind, severity, alerted, message, detail), = cur.fetchall()
    assert (kind, severity, alerted) == ("schema", "critical", False)
    assert message == "fields ['mobile'] are missing" and detail["missing"] == ["mobile"]
    with conn.cursor() as cur:
        drift.record_event(cur, "r2", "d_schema", "customers", "schema", "phone 13800138000 gone", severity="warning")
        cur.execute("select message from sync.drift_event where run_id = 'r2' and source = 'd_schema'")
        assert "13800138000" not in cur.fetchone()[0]
        with pytest.raises(ValueError):
            drift.record_event(cur, "r3", "d_schema", "customers", "schema", "x", severity="fatal")


def test_baseline_report_says_learning_until_min_history(conn):
    cfg = cfg_of("d_report")
    for i in range(3):
        stage_run(conn, cfg, f"r{i}", "orders", hour=i, rows=100 + i)
    report = drift.baseline_report(conn, "d_report")
    rows = next(r for r in report if r["metric"] == "rows")
    assert rows["run_id"] == "r2" and rows["value"] == 102 and rows["history"] == 2
    assert rows["status"] == "learning" and rows["min_history"] == 5
    assert {r["metric"] for r in report} == {"rows", "rejection_rate", "null_rate", "distinct", "amount_sum"}
