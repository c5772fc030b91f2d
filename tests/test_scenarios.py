"""The demo scenarios (`crm-sync demo --scenario …`, issue 10) as tests: the source's real DAG task
callables run in-process (`faults.harness.Pipeline`) against a case's own CRM and source databases,
with the alert e-mails captured instead of sent.

Each scenario starts from a source that had one good run. Where a gate (or an outage) stops the
run: it fails at the expected task, the CRM tables and `sync.watermark` are exactly as before, one
alert went out, its figures are the database's, no bad row's e-mail or phone appears unmasked, and
the source has one open incident. Drift loads and sends one warning; recovery alerts once, stays
quiet while it keeps failing, and sends one "resolved" when the fixed source loads.
"""
from __future__ import annotations

import re
from datetime import timedelta

import pytest

from faults.conftest import case, fault_include, templates  # noqa: F401 - the fault suite's fixtures
from faults.harness import DAY, END, HOUR

pytestmark = pytest.mark.integration

NIGHT = [(END + (i - 1) * DAY, END + i * DAY) for i in range(8)]   # the ERP's nightly intervals, NIGHT[0] first
HOURS = [(END + (i - 1) * HOUR, END + i * HOUR) for i in range(3)]  # the ticketing desk's hourly intervals
BAD_EMAILS = ("zhang.wei@", "li na@163", "wang@@qq.com", "not-an-email", "@example")


@pytest.fixture(autouse=True)
def _reports_in_tmp(monkeypatch, tmp_path):
    """Quality reports of these runs go to the test's folder, not the checkout's `.local/reports`."""
    from crm_sync.quality import report

    monkeypatch.setenv(report.REPORTS_ENV, str(tmp_path / "reports"))


# --- helpers ------------------------------------------------------------------------------------

def crm_state(case) -> dict:
    """A fingerprint of everything a run may write in the CRM: every crm.* table and sync.watermark."""
    tables = [f"crm.{t}" for (t,) in case.crm(
        "select table_name from information_schema.tables where table_schema = 'crm' "
        "and table_type = 'BASE TABLE' order by 1")] + ["sync.watermark"]
    parts = ", ".join(f"(select count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' order by t::text)), '') "
                      f"from {table} t)" for table in tables)
    return dict(zip(tables, case.crm(f"select {parts}")[0]))


def watermarks(case, source: str) -> list[tuple]:
    return case.crm("select stream, cursor_value, cursor_pk, run_id from sync.watermark where source = %s "
                    "order by stream", (source,))


def figure(body: str, label: str) -> str:
    """The value printed after `label:` in an alert body."""
    match = re.search(rf"^\s*{re.escape(label)}:\s*(.+)$", body, re.M)
    assert match, f"no {label!r} line in the alert:\n{body}"
    return match.group(1).strip()


def rejected_in_db(case, run_id: str, source: str) -> int:
    """Distinct record keys of the run that sync.quarantine holds back (what 'rows rejected' must say)."""
    return case.crm("select count(distinct (stream, coalesce(source_pk, quarantine_id::text))) from sync.quarantine "
                    "where run_id = %s and source = %s and blocks_key", (run_id, source))[0][0]


def incidents(case, source: str) -> list[tuple]:
    return case.crm("select state, kind, opened_run_id, failures, runs, resolved_run_id from sync.incident "
                    "where source = %s order by incident_id", (source,))


def good_first_run(case, source: str = "erp"):
    pipeline = case.pipeline(source)
    first = pipeline.run(*(NIGHT[0] if source == "erp" else HOURS[0]))
    assert first.ok, first.error_text
    assert case.alerts == [], case.alerts
    return pipeline


def assert_blocked(case, run, *, task: str, before: dict, marks: list, subject_state: str, source: str = "erp",
                   secrets: tuple[str, ...] = ()) -> str:
    """What every failing scenario must show; returns the alert's body for the scenario's own checks."""
    assert not run.ok and run.failed_task == task, (run.failed_task, run.error_text)
    assert crm_state(case) == before, "a stopped run changed the CRM or a watermark"
    assert watermarks(case, source) == marks
    assert len(case.alerts) == 1, [s for s, _ in case.alerts]
    subject, body = case.alerts[0]
    assert subject.startswith(f"[crm-sync] {subject_state} "), subject
    assert source in subject and run.run_id in subject and task in subject, subject
    # figures from the database at alert time (nothing has run since)
    log = case.run_log(run.run_id, source)
    assert log["state"] == ("blocked" if subject_state == "BLOCKED" else "failed")
    assert log["failed_task"] == task
    assert figure(body, "run state") == log["state"]
    assert int(figure(body, "rows rejected (quarantined)")) == rejected_in_db(case, run.run_id, source)
    assert figure(body, "rows loaded") == "0 (nothing of this run reached the CRM)"
    assert "new customers:" not in body and "customers merged:" not in body  # figures of a load that never ran
    assert int(figure(body, "rows extracted")) == log["rows_extracted"]
    for value in secrets:
        assert value not in body and value not in subject, f"{value!r} unmasked in the alert:\n{body}"
    kind = "blocked" if subject_state == "BLOCKED" else "failed"
    assert [(s, k, o) for s, k, o, *_ in incidents(case, source)] == [("open", kind, run.run_id)]
    return body


def bad_phones(src) -> tuple[str, ...]:
    return tuple(p for (p,) in src.execute("select mobile from src_erp.customers where email in %s and mobile <> ''",
                                           (BAD_EMAILS,)) if p)


# --- the scenarios -------------------------------------------------------------------------------

def test_bad_batch_is_blocked_with_one_alert_whose_figures_are_the_databases(case):
    from crm_sync.simulators import erp as sim

    src = case.sql_source("erp")
    erp = good_first_run(case)
    before, marks = crm_state(case), watermarks(case, "erp")
    conn = src.conn()
    try:
        batch = sim.inject_bad_batch(conn, now=NIGHT[1][1] - timedelta(minutes=1))
    finally:
        conn.close()

    run = erp.run(*NIGHT[1])

    body = assert_blocked(case, run, task="validate.customers", before=before, marks=marks, subject_state="BLOCKED",
                          secrets=("zhang.wei@", "li na@163", "wang@@qq.com", *bad_phones(src)))
    assert "DataQualityError" in run.error_text
    rejected = int(figure(body, "rows rejected (quarantined)"))
    assert rejected >= batch.bad_customers > 0
    assert "not retried" in figure(body, "try")


def test_volume_drop_is_blocked_with_one_alert(case):
    from crm_sync.simulators import erp as sim

    src = case.sql_source("erp")
    phones = tuple(p for (p,) in src.execute("select mobile from src_erp.customers where mobile <> ''") if p)
    erp = good_first_run(case)
    before, marks = crm_state(case), watermarks(case, "erp")
    conn = src.conn()
    try:
        dropped = sim.drop_volume(conn, 0.9)
    finally:
        conn.close()
    assert dropped["customers"] > 0

    run = erp.run(*NIGHT[1])

    body = assert_blocked(case, run, task="validate.customers", before=before, marks=marks, subject_state="BLOCKED",
                          secrets=phones[:20])
    assert "volume dropped" in run.error_text
    assert int(figure(body, "rows extracted")) < len(phones)


def test_schema_drift_is_blocked_at_extract_with_one_alert(case):
    from crm_sync.simulators import erp as sim

    src = case.sql_source("erp")
    erp = good_first_run(case)
    before, marks = crm_state(case), watermarks(case, "erp")
    conn = src.conn()
    try:
        sim.add_column_drift(conn, rename=True)
    finally:
        conn.close()

    run = erp.run(*NIGHT[1])

    body = assert_blocked(case, run, task="extract.customers", before=before, marks=marks, subject_state="BLOCKED")
    assert "SchemaDriftError" in run.error_text and "mobile" in body
    assert int(figure(body, "rows rejected (quarantined)")) == 0


def test_api_outage_fails_with_one_alert_and_nothing_loaded(case):
    desk = case.ticketing()
    with desk.store.lock:
        secrets = tuple(u["email"] for u in desk.store.users if u.get("email"))[:20]
    ticketing = good_first_run(case, "ticketing")
    before, marks = crm_state(case), watermarks(case, "ticketing")
    desk.set_faults(outage=True)

    run = ticketing.run(*HOURS[1])

    assert_blocked(case, run, task="extract.users", before=before, marks=marks, subject_state="FAILED",
                   source="ticketing", secrets=secrets)
    assert run.retryable, run.error_text


def test_drift_loads_and_sends_one_warning_naming_the_null_rate(case):
    from crm_sync.simulators import erp as sim

    src = case.sql_source("erp")
    erp = good_first_run(case)
    needed = case.config("erp").drift.min_history
    for night in NIGHT[1:needed]:   # ordinary nights until drift has its baseline
        run = erp.run(*night)
        assert run.ok, run.error_text
    assert case.alerts == [], [s for s, _ in case.alerts]
    conn = src.conn()
    try:
        assert sim.shift_distribution(conn, 0.4) > 0
    finally:
        conn.close()

    run = erp.run(*NIGHT[needed])

    assert run.ok, run.error_text            # a warning does not block
    assert case.run_log(run.run_id, "erp")["state"] == "success"
    assert len(case.alerts) == 1, [s for s, _ in case.alerts]
    subject, body = case.alerts[0]
    assert "WARNING" in subject and "erp" in subject, subject
    assert "null_rate(email)" in body, body
    events = case.crm("select metric, column_name, severity, alerted from sync.drift_event "
                      "where run_id = %s and source = 'erp'", (run.run_id,))
    assert ("null_rate", "email", "warning", True) in events, events
    assert all(alerted for *_, alerted in events), events
    assert incidents(case, "erp") == []


def test_recovery_alerts_once_counts_repeats_and_sends_one_resolved(case):
    from crm_sync.simulators import erp as sim

    src = case.sql_source("erp")
    erp = good_first_run(case)
    conn = src.conn()
    try:
        batch = sim.inject_bad_batch(conn, now=NIGHT[1][1] - timedelta(minutes=1))
    finally:
        conn.close()

    failed = [erp.run(*night) for night in NIGHT[1:4]]   # the bad batch, and two more nights still failing

    assert [r.failed_task for r in failed] == ["validate.customers"] * 3, [r.error_text for r in failed]
    assert len(case.alerts) == 1 and case.alerts[0][0].startswith("[crm-sync] BLOCKED "), \
        [s for s, _ in case.alerts]
    [(state, kind, opened, failures, runs, resolved)] = incidents(case, "erp")
    assert (state, kind, opened, failures, runs, resolved) == ("open", "blocked", failed[0].run_id, 3, 3, None)

    # the source is fixed: the bad batch is gone (the demo's "fixed source" is the healthy ERP)
    src.execute("delete from src_erp.orders where order_no = any(%s)", (batch.orders,))
    src.execute("delete from src_erp.truth where customer_no = any(%s)", (batch.customers,))
    src.execute("delete from src_erp.customers where customer_no = any(%s)", (batch.customers,))
    healed = erp.run(*NIGHT[4])

    assert healed.ok, healed.error_text
    assert len(case.alerts) == 2, [s for s, _ in case.alerts]
    subject, body = case.alerts[1]
    assert subject.startswith("[crm-sync] RESOLVED"), subject
    assert "erp" in subject
    assert incidents(case, "erp") == [("resolved", "blocked", failed[0].run_id, 3, 3, healed.run_id)]
    # the recovering run's figures are what it did: nothing changed in the source, so nothing was written
    [(written,)] = case.crm("""select (select count(*) from crm.source_customer where loaded_run_id = %(r)s)
                                    + (select count(*) from crm.sales_order where loaded_run_id = %(r)s)""",
                            {"r": healed.run_id})
    loaded_line = next(line for line in body.splitlines() if line.strip().startswith("rows loaded:"))
    assert loaded_line.split(":", 1)[1].strip() == str(written), loaded_line
    assert "rows unchanged (already in the CRM):" in body
