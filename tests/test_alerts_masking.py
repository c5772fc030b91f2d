"""Masking of personal data, the failure alert's content, and its delivery through a real SMTP server."""
from __future__ import annotations

import email
import html
import json
import re
import time
from datetime import datetime, timezone
from email import policy
from types import SimpleNamespace

import pytest

from crm_sync.alerts import make_failure_callback, render_failure_message
from crm_sync.masking import mask_email, mask_phone, mask_text

RUN_ID = "manual__2026-11-24T06:53:17.219149+00:00"
PHONES = [
    ("+86 138 0013 8000", "***8000"),
    ("0086-13800138000", "***8000"),
    ("13800138000", "***8000"),
    ("138-0013-8000", "***8000"),
    ("8613800138000", "***8000"),
    ("010-87654321转123", "***4321"),
    ("(0755) 2345 6789", "***6789"),
    ("+86 10 8765 4321", "***4321"),
    ("１３８００１３８０００", "***8000"),
    ("＋８６ １３８ ００１３ ８０００", "***8000"),
    ("+1 415 555 2671", "***2671"),
]
UNTOUCHED = [
    RUN_ID,
    "scheduled__2026-11-23T02:00:00+00:00",
    "2026-11-24T06:53:17Z",
    "2026-11-24 06:53:17.123+08:00",
    "2026-11-24",
    "3f2a1b4c-1380-0138-0001-380013800013",
    "row_hash 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "amount 1234.56 CNY, total 13800138000.50",
    "1000000 rows, 12345678 keys, 0 rejected",
    "epoch 1732431197219",
    "took 06:53 at +08:00",
]
DIGITS = re.compile(r"\d{5,}")


def _leaks(text: str) -> list[str]:
    """Unmasked phone numbers or e-mail addresses left in `text`."""
    found = [p for p, _ in PHONES if p in text]
    found += re.findall(r"[\w.+-]{2,}@[\w.-]+", text.replace("***@", "@MASKED@"))
    return [f for f in found if "MASKED" not in f]


# ---------------------------------------------------------------- masking --------

@pytest.mark.parametrize("phone,masked", PHONES)
def test_every_phone_format_keeps_only_the_last_four_digits(phone, masked):
    assert mask_text(phone) == masked
    assert mask_phone(phone) == masked
    text = mask_text(f"客户电话：{phone}，请回电")
    assert text == f"客户电话：{masked}，请回电"


def test_phones_inside_text_and_json_are_masked():
    text = 'DataQualityError: {"mobile": "13800138000", "phone": "010-87654321", "n": 3} tel:13912345678;'
    out = mask_text(text)
    assert out == 'DataQualityError: {"mobile": "***8000", "phone": "***4321", "n": 3} tel:***5678;'


@pytest.mark.parametrize("address,masked", [
    ("zhang.san@example.com", "z***@example.com"),
    ("Li+crm@mail.example.co.uk", "L***@mail.example.co.uk"),
    ("13800138000@163.com", "1***@163.com"),
    ("张三@example.cn", "张***@example.cn"),
])
def test_emails_keep_first_character_and_domain(address, masked):
    assert mask_text(f"owner <{address}>.") == f"owner <{masked}>."
    assert mask_email(address) == masked


@pytest.mark.parametrize("text", UNTOUCHED)
def test_timestamps_run_ids_uuids_hashes_counts_and_amounts_are_untouched(text):
    assert mask_text(text) == text


def test_masking_is_idempotent_and_never_raises():
    once = mask_text("call +86 138 0013 8000 or mail zhang@example.com")
    assert once == "call ***8000 or mail z***@example.com"
    assert mask_text(once) == once
    assert mask_text(None) == ""
    assert mask_text(12345) == "12345"
    assert mask_text(b"13800138000") == "b'***8000'"
    assert mask_phone(None) == "" and mask_email(None) == ""


# ---------------------------------------------------------------- message --------

def _wrapped_dq_error() -> BaseException:
    """What the callback receives: AirflowFailException("DataQualityError: ...") raised from the original."""
    from airflow.sdk.exceptions import AirflowFailException

    from crm_sync.quality.validate import DataQualityError

    original = DataQualityError(
        "customers: expect_column_values_to_match_regex failed for 12 rows, e.g. mobile 13800138000 "
        "and email zhang.san@example.com"
    )
    try:
        try:
            raise original
        except DataQualityError as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
    except AirflowFailException as exc:
        return exc


COUNTS = {
    "state": "blocked",
    "rows_extracted": 1500,
    "rows_mapped": 1500,
    "rows_loaded": 0,
    "rows_rejected": 12,
    "top_quarantine_reasons": [
        "customers/validate: expect_column_values_to_match_regex: phone 13900001111 invalid (12 rows)",
    ],
}


def test_message_names_dag_task_source_run_error_counts_and_next_steps():
    subject, body = render_failure_message(
        dag_id="crm_sync__erp", task_id="validate.customers", source="erp", run_id=RUN_ID,
        exception=_wrapped_dq_error(), try_number=1, max_tries=3,
        logical_date=datetime(2026, 11, 24, 6, 53, tzinfo=timezone.utc),
        data_interval_start=datetime(2026, 11, 23, 2, tzinfo=timezone.utc),
        data_interval_end=datetime(2026, 11, 24, 2, tzinfo=timezone.utc),
        counts=COUNTS,
    )
    assert subject == f"[crm-sync] BLOCKED crm_sync__erp / validate.customers — source erp, run {RUN_ID}"
    for expected in ("crm_sync__erp", "validate.customers", "source:        erp", RUN_ID, "try:           1 — not retried: retrying cannot fix this error",
                     "2026-11-23T02:00:00+00:00 → 2026-11-24T02:00:00+00:00", "DataQualityError",
                     "expect_column_values_to_match_regex failed for 12 rows",
                     "rows extracted:                1500", "rows rejected (quarantined):   12",
                     "phone ***1111 invalid (12 rows)", "sync.quarantine where run_id = '" + RUN_ID,
                     "BLOCKED", "Clear"):
        assert expected in body, expected
    assert "mobile ***8000 and email z***@example.com" in body
    assert _leaks(subject + body) == []


def test_retry_wording_only_for_errors_that_retry():
    blocked = RuntimeError("DataQualityError: a critical expectation failed")
    outage = RuntimeError("SourceUnavailable: ticketing.users: GET /api/v2/users failed after 6 attempts")
    _, body = render_failure_message(dag_id="crm_sync__erp", task_id="validate.orders", source="erp", run_id=RUN_ID,
                                     exception=blocked, try_number=1, max_tries=3)
    assert "not retried" in body and "1 of 4" not in body
    assert "was stopped by a data-quality gate" in body
    subject, body = render_failure_message(dag_id="crm_sync__ticketing", task_id="extract.users", source="ticketing",
                                           run_id=RUN_ID, exception=outage, try_number=4, max_tries=3)
    assert "4 of 4" in body and "not retried" not in body and subject.startswith("[crm-sync] FAILED")


@pytest.mark.parametrize("error,advice", [
    ("SourceUnavailable: ticketing.users: GET /api/v2/users failed after 6 attempts (last: 503)",
     "Nothing was loaded for this run"),
    ("SourceRejected: ticketing.users: GET /api/v2/users was refused: 401", "credentials"),
    ("ReconciliationError: orders.amount_sum: source 1234.56 != target 1234.55", "sync.reconciliation"),
    ("KeyError: 'mobile'", "unexpected error"),
    ("DeleteBrakeError: source 'erp': delete brake — stream 'customers': 800 of 1000 rows in the CRM (80%) are "
     "missing from the source's snapshot", '{"allow_deletes": true}'),
    ("StagingLostError: source 'erp' run 'x': the run's staging is gone", "the extract task group"),
    ("LostRowsError: source 'erp' stream 'orders': the source holds 12 rows in the window but only 11 arrived",
     "sync.stream_account"),
    ("DatabaseError: source 'erp' database failed while reading: server closed the connection unexpectedly",
     "failed (not the CRM)"),
    ("DatabaseError: cannot connect to the CRM database through Airflow connection 'crm_db'",
     "The CRM database could not be reached"),
    ("QueryCanceled: canceling statement due to statement timeout", "statement_timeout_seconds"),
])
def test_advice_depends_on_the_error(error, advice):
    _, body = render_failure_message(dag_id="crm_sync__ticketing", task_id="extract.users", source="ticketing",
                                     run_id=RUN_ID, exception=RuntimeError(error), try_number=4, max_tries=3)
    assert advice in body
    assert error.split(": ", 1)[1] in body  # amounts and counts survive masking


def test_message_survives_missing_counts_and_a_failing_provider():
    _, body = render_failure_message(dag_id="d", task_id="t", source="erp", run_id="r", exception=None)
    assert "no figures recorded" in body
    _, body = render_failure_message(dag_id="d", task_id="t", source="erp", run_id="r", exception=None,
                                     counts_error="OperationalError: could not connect as zhang@example.com")
    assert "figures unavailable: OperationalError: could not connect as z***@example.com" in body


# ---------------------------------------------------------------- delivery -------

class _Inbox:
    """A real aiosmtpd SMTP server on 127.0.0.1; the project's outbox simulator when present."""

    def __init__(self, folder):
        self.folder = folder
        self._server = None
        self._controller = None
        self.received: list[tuple[str, list[str], bytes]] = []
        self.port = 0

    def __enter__(self):
        try:
            from crm_sync.simulators.smtp_outbox import OutboxServer
        except ImportError:
            OutboxServer = None
        if OutboxServer is not None:
            self._server = OutboxServer(self.folder, port=0).start()
            self.port = self._server.port
        else:
            import socket

            from aiosmtpd.controller import Controller

            inbox = self

            class Handler:
                async def handle_DATA(self, server, session, envelope):
                    inbox.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
                    return "250 OK"

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.port = sock.getsockname()[1]
            self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
            self._controller.start()
        return self

    def __exit__(self, *exc):
        if self._server is not None:
            self._server.stop()
        if self._controller is not None:
            self._controller.stop()

    def messages(self) -> list[email.message.EmailMessage]:
        deadline = time.monotonic() + 5
        while True:
            if self._server is not None:
                raw = [p.read_bytes() for p in self._server.messages()]
            else:
                raw = [content for _, _, content in self.received]
            if raw or time.monotonic() > deadline:
                return [email.message_from_bytes(r, policy=policy.default) for r in raw]
            time.sleep(0.05)


def _smtp_conn(monkeypatch, port: int) -> None:
    # the extras the smtp provider's hook reads: disable_ssl / disable_tls (plain SMTP), from_email,
    # timeout and retry_limit
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": port,
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "crm-sync@localhost",
                  "timeout": 5, "retry_limit": 0},
    }))


def _context() -> dict:
    from airflow.sdk import DAG

    exc = _wrapped_dq_error()
    dag = DAG(dag_id="crm_sync__erp", schedule=None)
    ti = SimpleNamespace(task_id="validate.customers", dag_id="crm_sync__erp", run_id=RUN_ID, try_number=1,
                         max_tries=3, map_index=-1, log_url="http://localhost:8080/dags/crm_sync__erp/runs/x")
    dag_run = SimpleNamespace(run_id=RUN_ID, dag_id="crm_sync__erp",
                              logical_date=datetime(2026, 11, 24, 6, 53, 17, tzinfo=timezone.utc))
    return {
        "dag": dag, "dag_run": dag_run, "ti": ti, "task_instance": ti, "run_id": RUN_ID,
        "task": SimpleNamespace(task_id="validate.customers"),
        "logical_date": dag_run.logical_date,
        "data_interval_start": datetime(2026, 11, 23, 2, tzinfo=timezone.utc),
        "data_interval_end": datetime(2026, 11, 24, 2, tzinfo=timezone.utc),
        "exception": exc,
    }


def test_callback_sends_the_masked_alert_through_smtp(tmp_path, monkeypatch):
    asked = []

    def counts_provider(run_id, source):
        asked.append((run_id, source))
        return COUNTS

    with _Inbox(tmp_path / "outbox") as inbox:
        _smtp_conn(monkeypatch, inbox.port)
        callback = make_failure_callback("erp", to=["oncall-data@example.com"], smtp_conn_id="smtp_alerts",
                                         counts_provider=counts_provider)
        context = _context()
        callback(context)
        messages = inbox.messages()

    assert asked == [(RUN_ID, "erp")]
    assert len(messages) == 1
    msg = messages[0]
    assert str(msg["Subject"]) == f"[crm-sync] BLOCKED crm_sync__erp / validate.customers — source erp, run {RUN_ID}"
    assert msg["To"] == "oncall-data@example.com"
    assert msg["From"] == "crm-sync@localhost"
    body = html.unescape(msg.get_body(("html", "plain")).get_content())
    for expected in ("crm_sync__erp", "validate.customers", RUN_ID, "DataQualityError", "rows extracted",
                     "phone ***1111 invalid", "mobile ***8000 and email z***@example.com",
                     "2026-11-24T06:53:17+00:00", "sync.quarantine"):
        assert expected in body, expected
    assert _leaks(body) == []
    assert "13800138000" not in msg.as_string() and "zhang.san@" not in msg.as_string()
    assert "exception" in context and "html_content" not in context  # the task's context is left alone


def test_callback_never_raises_when_smtp_or_counts_fail(monkeypatch, caplog):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    _smtp_conn(monkeypatch, dead_port)

    def broken_counts(run_id, source):
        raise RuntimeError("database down for zhang@example.com")

    callback = make_failure_callback("erp", to=["oncall-data@example.com"], smtp_conn_id="smtp_alerts",
                                     counts_provider=broken_counts)
    with caplog.at_level("ERROR", logger="crm_sync.alerts"):
        callback(_context())  # must not raise
    errors = [r.getMessage() for r in caplog.records if r.name == "crm_sync.alerts"]
    assert errors and "could not send the failure alert" in errors[0]
    assert _leaks(" ".join(errors)) == []


def test_callback_never_raises_on_a_missing_connection_or_an_empty_context(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SMTP_ALERTS", raising=False)
    callback = make_failure_callback("erp", to=["oncall@example.com"], smtp_conn_id="no_such_conn_for_test",
                                     counts_provider=None)
    callback({})
    callback({"exception": "plain string error 13800138000"})
