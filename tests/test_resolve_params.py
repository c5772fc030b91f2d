"""Match parameters: estimated when the operator asks (`crm-sync identity estimate`), stored with the
time in `crm.match_params`, and used as they are by every resolve run after — which estimates nothing."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest

from crm_sync import cli, db, runlog
from crm_sync.config import load_source
from crm_sync.identity import engine, evalset, resolve, scoring
from crm_sync.sources import extract
from crm_sync.watermark import Window

pytestmark = pytest.mark.integration

RECORDS = 2_000


def seed_master(dsn: str, records: int) -> int:
    """The evaluation set's records as a loaded master's identity inputs (what estimation reads)."""
    df = evalset.generate_records(records, seed=11)
    rows = [(src, rid, "customers", *(None if v != v else v for v in (name, phone, email, company, city)), "seed")
            for rid, src, name, phone, email, company, city in
            df[["record_id", "source", "name", "phone", "email", "company", "city"]].itertuples(index=False)]
    conn = db.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.executemany("""insert into crm.source_identity (source, source_id, stream, name, phone, email, company,
                                   city, loaded_run_id) values (%s, %s, %s, %s, %s, %s, %s, %s, %s)""", rows)
        conn.commit()
    finally:
        conn.close()
    return len(rows)


def test_estimate_refuses_a_master_too_small_and_says_why(fresh_dsn, monkeypatch, capsys):
    monkeypatch.setenv("CRM_SYNC_DSN", fresh_dsn)
    assert cli.main(["identity", "estimate", "--source", "erp"]) == 2
    err = capsys.readouterr().err
    assert "source 'erp' holds 0 records" in err and "min_records" in err
    with db.connection(fresh_dsn) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from crm.match_params")
        assert cur.fetchone()[0] == 0


def _scheduled_estimate(dsn: str, monkeypatch) -> dict:
    """The task of the `crm_sync__identity_estimate` DAG, as its Airflow run calls it."""
    from types import SimpleNamespace

    from crm_sync import tasks

    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", db.airflow_conn_json(dsn))
    return tasks.estimate_match_params({"dag": SimpleNamespace(dag_id="crm_sync__identity_estimate"),
                                        "run_id": "scheduled__2026-12-06T03:00:00+00:00"})


def test_the_scheduled_estimate_skips_a_master_too_small_with_the_reason(fresh_dsn, monkeypatch):
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match=r"the master holds 0 records: too few .*min_records"):
        _scheduled_estimate(fresh_dsn, monkeypatch)


@pytest.fixture(scope="module")
def estimated(fresh_dsn):
    population = seed_master(fresh_dsn, RECORDS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRM_SYNC_DSN", fresh_dsn)
        assert cli.main(["identity", "estimate", "--by", "ops.chen"]) == 0
    with db.connection(fresh_dsn) as conn, conn.cursor() as cur:
        cur.execute("""select params_id, config, source, params, matches_per_record, records, stats, estimated_by,
                              estimated_at from crm.match_params""")
        rows = cur.fetchall()
    assert len(rows) == 1
    return population, rows[0]


def test_estimate_stores_every_field_and_level_with_the_time(estimated):
    population, (params_id, config, source, params, per_record, records, stats, by, at) = estimated
    settings = resolve.match_settings()
    assert (config, source, by) == (settings.name, None, "ops.chen")
    assert records == population and stats["population"] == population and stats["em_sessions"]
    assert at is not None and abs((datetime.now(timezone.utc) - at).total_seconds()) < 3600
    assert 0 < params["prior"] < 0.5 and per_record > 0
    for spec in settings.fields:
        levels = params["fields"][spec.name]
        assert sorted(levels) == sorted(spec.level_names)
        assert all(0 < lv["m"] <= 1 and 0 < lv["u"] <= 1 for lv in levels.values())
    # EM moved the values away from the config's starting point: this is an estimate, not a copy
    config_params = scoring.Params.from_settings(settings).to_dict(settings)
    assert params["fields"] != config_params["fields"]


def _erp(no, name, mobile=None, email=None, company=None, city=None):
    ts = datetime(2025, 3, 1, tzinfo=timezone.utc).isoformat()
    return {"customer_no": no, "name": name, "mobile": mobile, "phone": None, "email": email, "company": company,
            "city": city, "created_at": ts, "updated_at": ts}


def test_resolve_uses_the_stored_estimate_and_never_estimates(estimated, fresh_dsn, monkeypatch, caplog):
    _, (params_id, _, _, stored, *_rest) = estimated
    calls = []
    real = engine.resolve

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    def no_em(*args, **kwargs):
        raise AssertionError("the resolve stage ran EM")

    monkeypatch.setattr(engine, "resolve", spy)
    monkeypatch.setattr(scoring, "estimate_m", no_em)
    monkeypatch.setattr(scoring, "sample_u", no_em)
    cfg = load_source("erp")
    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            runlog.start(cur, "erp-p1", "erp", cfg.dag_id, None, None)
        customers = [_erp(f"P{k}", name, mobile=f"1390000{k:04d}", city="北京") for k, name in
                     enumerate(["张三", "李四", "王五", "张三"])]
        for stream in cfg.streams:
            extract.stage_records(conn, "erp-p1", cfg, stream, Window(None, datetime(2025, 4, 1, tzinfo=timezone.utc)),
                                  [customers if stream.name == "customers" else []])
        conn.commit()
        with caplog.at_level(logging.INFO, logger="crm_sync.identity.resolve"):
            result = resolve.resolve(conn, "erp-p1", cfg)
        conn.commit()
    finally:
        conn.close()
    assert result.records == 4
    (kwargs,) = calls
    assert kwargs["estimate"] is False
    used = kwargs["params"]
    settings = resolve.match_settings()
    for spec in settings.fields:
        for k, level in enumerate(spec.level_names):
            assert used.m[spec.name][k] == pytest.approx(stored["fields"][spec.name][level]["m"], rel=1e-6)
    assert f"stored estimate #{params_id}" in caplog.text


def test_the_scheduled_estimate_stores_new_parameters_the_next_run_uses(estimated, fresh_dsn, monkeypatch):
    _, (first_id, *_rest) = estimated
    summary = _scheduled_estimate(fresh_dsn, monkeypatch)
    assert summary["params_id"] > first_id and summary["population"] >= RECORDS
    with db.connection(fresh_dsn) as conn, conn.cursor() as cur:
        cur.execute("select estimated_by from crm.match_params where params_id = %s", (summary["params_id"],))
        assert cur.fetchone()[0] == "airflow:crm_sync__identity_estimate/scheduled__2026-12-06T03:00:00+00:00"
        stored = resolve.stored_params(cur, resolve.match_settings(), "erp")
    assert stored.params_id == summary["params_id"]
