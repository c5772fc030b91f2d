"""One incident = one message: the real failure callback against PostgreSQL, a local SMTP outbox and
a local webhook receiver. Five failing runs (two failed tasks each) alert once; the recovering run
sends one "resolved"; figures are read from what the run did."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from crm_sync import db, incidents, quarantine, runlog, tasks
from crm_sync.alerts import send_resolved
from crm_sync.config import load_source

from test_alerts_masking import _Inbox, _smtp_conn


class _Webhook:
    """A Slack-style receiver on loopback: records every JSON body POSTed to /hooks/crm."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                outer.bodies.append({"path": self.path, "json": json.loads(self.rfile.read(length))})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def wired(fresh_dsn, monkeypatch, tmp_path):
    """The erp source with a webhook, its CRM connection on the test database, SMTP and webhook receivers."""
    cfg = load_source("erp")
    cfg = cfg.model_copy(update={"alerts": cfg.alerts.model_copy(update={"webhook_conn_id": "alert_webhook"})})
    monkeypatch.setattr(tasks, "load_source", lambda name: cfg)
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", db.airflow_conn_json(fresh_dsn))
    hook = _Webhook()
    monkeypatch.setenv("AIRFLOW_CONN_ALERT_WEBHOOK", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": hook.port, "schema": "http",
        "extra": {"endpoint": "/hooks/crm"}}))
    with _Inbox(tmp_path / "outbox") as inbox:
        _smtp_conn(monkeypatch, inbox.port)
        yield cfg, inbox, hook
    hook.close()
    conn = db.connect(fresh_dsn)
    with conn.cursor() as cur:
        cur.execute("delete from sync.incident; delete from sync.run_log; delete from sync.quarantine")
    conn.commit()
    conn.close()


def _fail(run_id: str, task_id: str, error: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    ti = SimpleNamespace(task_id=task_id, dag_id="crm_sync__erp", run_id=run_id, try_number=1, max_tries=3,
                         map_index=-1, log_url=None)
    try:
        try:
            raise RuntimeError(error)
        except RuntimeError as cause:
            raise AirflowFailException(error) from cause
    except AirflowFailException as exc:
        tasks.FailureCallback("erp")({"run_id": run_id, "ti": ti, "task_instance": ti, "exception": exc,
                                      "dag_run": SimpleNamespace(run_id=run_id, dag_id="crm_sync__erp")})


def test_five_failing_runs_alert_once_and_the_recovery_once(wired, conn):
    cfg, inbox, hook = wired
    for n in range(5):
        run = f"scheduled__2026-11-2{n}T02:00:00+00:00"
        with conn.cursor() as cur:
            runlog.start(cur, run, "erp", cfg.dag_id, None, None, task_id="extract.customers")
            quarantine.add(cur, run, "erp", [
                quarantine.Reject("orders", f"O{n}-{i}", "validate", "currency", "value 'XYZ' is not one of CNY, USD",
                                  {}, "expect_column_values_to_be_in_set")
                for i in range(3)])
        conn.commit()
        _fail(run, "validate.orders", "DataQualityError: source 'erp' stream 'orders': 3 of 10 rows failed")
        _fail(run, "validate.customers", "DataQualityError: source 'erp' stream 'customers': blocked")

    messages = inbox.messages()
    assert len(messages) == 1, [m["Subject"] for m in messages]
    assert str(messages[0]["Subject"]).startswith("[crm-sync] BLOCKED crm_sync__erp / validate.orders")
    body = messages[0].get_body(("html", "plain")).get_content()
    # figures read from what the run did: 3 quarantined (not the load's 0), no identity figures, no retry wording
    assert "rows rejected (quarantined):   3" in body
    assert "new customers" not in body and "0 (nothing of this run reached the CRM)" in body
    assert "not retried" in body and "of 4" not in body
    assert "orders/validate: expect_column_values_to_be_in_set: 3 rows" in body
    assert len(hook.bodies) == 1 and hook.bodies[0]["path"] == "/hooks/crm"
    assert hook.bodies[0]["json"]["text"].startswith("*[crm-sync] BLOCKED crm_sync__erp")

    with conn.cursor() as cur:
        cur.execute("select state, failures, runs, kind from sync.incident where source = 'erp'")
        assert cur.fetchall() == [("open", 10, 5, "blocked")]
        cur.execute("select count(*) from sync.run_log where source = 'erp' and state = 'blocked'")
        assert cur.fetchone()[0] == 5

    # the first run that succeeds closes the incident: one "resolved" message
    with conn.cursor() as cur:
        resolved = incidents.resolve(cur, "erp", "scheduled__2026-11-26T02:00:00+00:00")
        assert incidents.resolve(cur, "erp", "again") is None
    conn.commit()
    send_resolved("erp", "scheduled__2026-11-26T02:00:00+00:00", resolved, to=cfg.alerts.to,
                  smtp_conn_id=cfg.alerts.smtp_conn_id, webhook_conn_id="alert_webhook", context={})
    messages = inbox.messages()
    assert len(messages) == 2
    subject = str(messages[1]["Subject"])
    assert subject.startswith("[crm-sync] RESOLVED crm_sync__erp")
    resolved_body = messages[1].get_body(("html", "plain")).get_content()
    assert "10 failed task(s) in 5 run(s), alerted once" in resolved_body
    assert len(hook.bodies) == 2 and "RESOLVED" in hook.bodies[1]["json"]["text"]

    # healthy again: the next failure is a new incident and alerts
    _fail("scheduled__2026-11-27T02:00:00+00:00", "load", "LostRowsError: the staging of run x is gone")
    assert len(inbox.messages()) == 3


def test_an_alert_still_goes_out_when_the_crm_database_is_down(wired, monkeypatch):
    cfg, inbox, hook = wired
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", json.dumps({"conn_type": "postgres", "host": "127.0.0.1",
                                                          "port": 1, "login": "nobody", "schema": "crm"}))
    _fail("manual__x", "load", "OperationalError: connection refused")
    messages = inbox.messages()
    assert len(messages) == 1 and "FAILED crm_sync__erp / load" in str(messages[0]["Subject"])


def test_a_nightly_run_past_its_deadline_alerts_once(wired):
    from crm_sync import alerts
    from crm_sync.dag_factory import build_dag

    cfg, inbox, _ = wired
    dag = build_dag("erp")
    deadline = dag.deadline[0] if isinstance(dag.deadline, list) else dag.deadline
    assert deadline.interval.total_seconds() == cfg.alerts.deadline_minutes * 60
    assert deadline.callback.path == "crm_sync.alerts.deadline_missed"
    # what the scheduler calls when the deadline passes (SyncCallback: kwargs + context)
    alerts.deadline_missed(**deadline.callback.kwargs, context={"run_id": "scheduled__2026-11-30T02:00:00+00:00"})
    alerts.deadline_missed(**deadline.callback.kwargs, context={"run_id": "scheduled__2026-11-30T02:00:00+00:00"})
    messages = inbox.messages()
    assert len(messages) == 1
    assert str(messages[0]["Subject"]) == ("[crm-sync] LATE crm_sync__erp — run scheduled__2026-11-30T02:00:00+00:00 "
                                          "missed its deadline")
    assert "had not finished 180 minutes after it was queued" in messages[0].get_body(("html", "plain")).get_content()
