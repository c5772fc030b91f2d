"""The DAG run note: rendered from the run's figures, sent through Airflow's REST API as Airflow 3.3
expects it (JWT from /auth/token, PATCH …/dagRuns/{run_id}?update_mask=note), never raising."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from crm_sync import run_note


class _FakeAirflowApi:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _body(self):
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_POST(self):  # noqa: N802
                body = self._body()
                outer.requests.append(("POST", self.path, dict(self.headers), body))
                ok = body == {"username": "admin", "password": "s3cret"}
                self.send_response(201 if ok else 401)
                self.end_headers()
                self.wfile.write(json.dumps({"access_token": "jwt-1"} if ok else {"detail": "no"}).encode())

            def do_PATCH(self):  # noqa: N802
                outer.requests.append(("PATCH", self.path, dict(self.headers), self._body()))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]


def test_note_is_rendered_masked_and_patched_through_the_api(monkeypatch):
    api = _FakeAirflowApi()
    monkeypatch.setenv("AIRFLOW_CONN_AIRFLOW_API", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": api.port, "schema": "http",
        "login": "admin", "password": "s3cret"}))
    note = run_note.render("blocked", {"rows_extracted": 1500, "rows_rejected": 383,
                                       "top_quarantine_reasons": ["orders/validate: amount: 383 rows (e.g. -12.00)"]},
                           "Gate at `validate.orders`: phone 13800138000 failed")
    assert note.startswith("**⛔ BLOCKED by a quality gate — nothing loaded, watermark unchanged**")
    assert "| rows rejected | 383 |" in note and "13800138000" not in note and "***8000" in note
    assert run_note.set_note("crm_sync__erp", "scheduled__2026-11-24T02:00:00+00:00", note) is True
    (m1, p1, _, b1), (m2, p2, h2, b2) = api.requests
    assert (m1, p1) == ("POST", "/auth/token")
    assert m2 == "PATCH"
    assert p2 == "/api/v2/dags/crm_sync__erp/dagRuns/scheduled__2026-11-24T02%3A00%3A00%2B00%3A00?update_mask=note"
    assert h2["Authorization"] == "Bearer jwt-1" and b2 == {"note": note}
    api.server.shutdown()


def test_without_an_api_connection_or_with_bad_credentials_nothing_raises(monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_AIRFLOW_API", raising=False)
    assert run_note.set_note("crm_sync__erp", "r1", "x") is False
    api = _FakeAirflowApi()
    monkeypatch.setenv("AIRFLOW_CONN_AIRFLOW_API", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": api.port, "schema": "http",
        "login": "admin", "password": "wrong"}))
    assert run_note.set_note("crm_sync__erp", "r1", "x") is False
    assert "could not set the run note of crm_sync__erp r1" in caplog.text and "wrong" not in caplog.text
    api.server.shutdown()
