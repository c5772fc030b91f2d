"""Failure alerts: one e-mail to on-call per failed task, saying what broke and what to do next.

Guarantees:
- `render_failure_message(...)` is pure (no Airflow, no database): it returns the subject and the
  plain-text body, both passed through `mask_text`, so no phone number or e-mail address from an
  exception or a quarantine reason reaches a mailbox.
- `make_failure_callback(source, to=..., smtp_conn_id=..., counts_provider=...)` returns the
  `on_failure_callback` body. It reads the Airflow context, asks `counts_provider(run_id, source)`
  for the run's figures and sends the message with the smtp provider's `SmtpNotifier` through the
  Airflow connection `smtp_conn_id`. It never raises: a broken alert path is logged (masked) and
  the task's own failure stays what Airflow reports.
"""
from __future__ import annotations

import html
import logging
from datetime import datetime
from typing import Any, Callable, Mapping

from crm_sync.masking import mask_text

log = logging.getLogger("crm_sync.alerts")

DEFAULT_FROM = "crm-sync@localhost"

CountsProvider = Callable[[str, str], Mapping[str, Any]]

# errors a retry cannot fix: the task fails at once (tasks._fail_fast_errors), the alert says so
NOT_RETRIED = {"DataQualityError", "DriftError", "SuiteError", "ReconciliationError", "SourceRejected",
               "ConfigError", "SchemaDriftError", "DeleteBrakeError", "StagingLostError", "AirflowFailException"}
# a gate decided: the batch was stopped on purpose before load (as opposed to a crash)
BLOCKING = {"DataQualityError", "DriftError", "DeleteBrakeError", "SchemaDriftError"}

# run-log figures in the order on-call reads them
_COUNT_LABELS = [
    ("state", "run state"),
    ("rows_extracted", "rows extracted"),
    ("rows_mapped", "rows mapped"),
    ("rows_loaded", "rows loaded"),
    ("rows_unchanged", "rows unchanged (already in the CRM)"),
    ("rows_rejected", "rows rejected (quarantined)"),
    ("ids_new", "new customers"),
    ("ids_merged", "customers merged"),
    ("ids_review", "matches sent to review"),
    ("api_calls", "API calls"),
    ("reconcile_ok", "reconciliation ok"),
]


def _error_names(exception: Any) -> list[str]:
    """Class names along the exception chain, plus a `Name:` prefix in the message.

    Stage errors reach the callback wrapped: `AirflowFailException("DataQualityError: ...")`
    raised `from` the original, so both the cause and the message prefix are looked at.
    """
    names: list[str] = []
    seen: set[int] = set()
    chain = []
    exc = exception
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        names.append(type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    for item in chain or [exception]:
        head = str(item or "").split(":", 1)[0].strip()
        if head.isidentifier():
            names.append(head)
    return names


def _what_to_do(names: list[str], *, source: str, run_id: str, dag_id: str, task_id: str,
                try_number: Any, max_tries: Any, conn_id: str | None, message: str = "") -> list[str]:
    run = f"run_id = '{run_id}' and source = '{source}'"
    clear = (f"In Airflow: DAG {dag_id} → run {run_id} → task {task_id} → Clear "
             "(with Downstream), once the cause is fixed.")
    tries = f"try {try_number}" + (f" of {int(max_tries) + 1}" if isinstance(max_tries, int) else "")
    if "DataQualityError" in names:
        return [
            "The batch is BLOCKED by a critical expectation: nothing of this run was loaded and the "
            "watermark did not move, so no data is lost and nothing wrong reached the CRM.",
            f"1. See which rows failed and why: select stream, stage, expectation, field, reason, count(*) "
            f"from sync.quarantine where {run} group by 1, 2, 3, 4, 5 order by 6 desc;",
            f"   and which expectations failed: select * from sync.dq_result where {run} and not success;",
            "2. Fix the rows in the source system (or, if the rule itself is wrong, the expectation "
            "suite under include/expectations/ — that is a code change, get it reviewed).",
            "3. Clear the run's extract task group with Downstream, so the fixed rows are re-extracted "
            "and validated again. Retrying validate alone re-checks the same staged rows.",
        ]
    if "SourceUnavailable" in names:
        return [
            f"The source could not be read ({tries}): the API or database was down, timed out or kept "
            "answering 429/5xx through every attempt with backoff. Nothing was loaded for this run and "
            "the watermark did not move, so the next successful run catches up.",
            f"1. Check the source system's status and the Airflow connection `{conn_id or '?'}` (host, port).",
            "2. Airflow retries the task by itself while tries remain; this alert means they are used up.",
            f"3. {clear} No data repair is needed.",
        ]
    if "SourceRejected" in names:
        return [
            "The source refused the request (a 4xx other than 429) — usually an expired or revoked token, "
            "a missing permission or a changed endpoint. Retrying only costs API calls, so it was not retried.",
            f"1. Check the credentials and endpoint in the Airflow connection `{conn_id or '?'}` and the "
            f"stream's endpoint in include/sources/{source}.yaml.",
            f"2. {clear}",
        ]
    if "ReconciliationError" in names:
        return [
            "The load COMMITTED, but reconciliation found source and target disagree (row count, keys or "
            "the exact amount sum). The run is not marked successful and its staging rows are kept.",
            f"1. See the failing checks: select * from sync.reconciliation where {run} and not ok;",
            f"2. Compare the run's staged rows (stg.mapped_* where {run}) with the crm.* tables; look for "
            "a concurrent writer or a manual edit of crm.* tables.",
            "3. Loads are idempotent: once the cause is understood, clear load and reconcile to publish "
            "the run again and re-check it. Do not mark the task success by hand.",
        ]
    if "SchemaDriftError" in names:
        return [
            "The source's structure changed (a column or field the source YAML reads is gone or renamed). "
            "Nothing was extracted or loaded and the watermark did not move. Retrying cannot fix it, so it "
            "was not retried.",
            "1. The message names the missing column/fields. Ask the source owner whether it was renamed.",
            f"2. Update the stream's query/mapping in include/sources/{source}.yaml (a reviewed change).",
            f"3. {clear}",
        ]
    if "ConfigError" in names or "SuiteError" in names:
        return [
            "A configuration file is invalid (source YAML or expectation suite); the message names the "
            "file and the field. Nothing was loaded.",
            f"1. Fix include/sources/{source}.yaml or the suite under include/expectations/, deploy it.",
            f"2. {clear}",
        ]
    if "DeleteBrakeError" in names:
        return [
            "The DELETE BRAKE stopped the run before load: the source's full snapshot no longer holds more "
            "of a stream's rows than max_delete_share allows. Nothing was loaded or deleted and the watermark "
            "did not move. A truncated export, an emptied table or a wrong connection looks like this.",
            "1. The error names the stream and how many rows would disappear. Ask the source owner whether "
            "they were really deleted.",
            f"2. If not: fix the source, then {clear}",
            f"3. If they were: trigger {dag_id} with config {{\"allow_deletes\": true}} to soft-delete them once "
            "(rows stay in the CRM with deleted_at set and come back if the source brings them again).",
        ]
    if {"LostRowsError", "StagingLostError"} & set(names):
        return [
            "Rows would have been LOST, so the run stopped: the source holds rows the run did not receive "
            "(count or key checksum differ), or the run's staging tables were emptied (a PostgreSQL restart "
            "wipes unlogged staging). Nothing of this run was loaded and the watermark did not move.",
            f"1. Compare: select * from sync.stream_account where {run};",
            f"2. In Airflow: DAG {dag_id} → run {run_id} → the extract task group → Clear (with Downstream): "
            "the extract reads the window again and the run loads it; nothing needs repair.",
        ]
    if "QueryCanceled" in names or "statement timeout" in message:
        return [
            "A statement ran longer than statement_timeout_seconds (source YAML) and was cancelled; the "
            "transaction rolled back, nothing was half-written. The task retries while tries remain.",
            "1. Look for locks or a long-running query on the database named in the error "
            "(pg_stat_activity), or a source that became much larger.",
            f"2. If the work is legitimately longer, raise statement_timeout_seconds in "
            f"include/sources/{source}.yaml. {clear}",
        ]
    if "source '" in message and " database" in message and (
            {"DatabaseError", "OperationalError", "InterfaceError"} & set(names)):
        return [
            f"The SOURCE database of '{source}' failed (not the CRM): it could not be reached or dropped "
            "the connection while being read. Nothing was loaded and the watermark did not move; the task "
            f"retries by itself ({tries}).",
            f"1. Check the source database and the Airflow connection `{conn_id or '?'}` (host, port, role).",
            f"2. {clear} No data repair is needed.",
        ]
    if {"DatabaseError", "OperationalError", "InterfaceError"} & set(names):
        return [
            "The CRM database could not be reached or refused the statement. Every stage is a single "
            "transaction, so nothing was half-written.",
            "1. Check the crm-db service and the Airflow connection `crm_db`.",
            f"2. {clear}",
        ]
    return [
        f"The task failed with an unexpected error ({tries}). Stages are transactions: a failed task "
        "rolled back its own writes, and the load publishes a run all at once or not at all.",
        "1. Read the task log for the traceback (Airflow UI: the failed task → Logs).",
        f"2. Look at the run's figures: select * from sync.run_log where {run};",
        f"3. {clear}",
    ]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _count_lines(counts: Mapping[str, Any] | None, counts_error: str | None) -> list[str]:
    if counts_error:
        return [f"  (figures unavailable: {counts_error})"]
    if not counts:
        return ["  (no figures recorded for this run yet)"]
    lines = []
    known = {key for key, _ in _COUNT_LABELS} | {"top_quarantine_reasons"}
    for key, label in _COUNT_LABELS:
        if key in counts:
            lines.append(f"  {label + ':':<30} {_fmt(counts[key])}")
    for key, value in counts.items():
        if key not in known:
            lines.append(f"  {key.replace('_', ' ') + ':':<30} {_fmt(value)}")
    reasons = counts.get("top_quarantine_reasons") or []
    if reasons:
        lines.append("  top quarantine reasons:")
        lines.extend(f"    - {reason}" for reason in reasons)
    return lines


def render_failure_message(
    *,
    dag_id: str,
    task_id: str,
    source: str,
    run_id: str,
    exception: Any = None,
    try_number: Any = None,
    max_tries: Any = None,
    logical_date: Any = None,
    data_interval_start: Any = None,
    data_interval_end: Any = None,
    counts: Mapping[str, Any] | None = None,
    counts_error: str | None = None,
    log_url: str | None = None,
    conn_id: str | None = None,
) -> tuple[str, str]:
    """(subject, plain-text body) of the failure alert, both masked."""
    names = _error_names(exception)
    if isinstance(exception, BaseException):
        error = f"{type(exception).__name__}: {exception}"
        cause = exception.__cause__
        if cause is not None and str(cause) not in error:
            error += f"\n  caused by {type(cause).__name__}: {cause}"
    else:
        error = _fmt(exception) if exception else "(no exception was passed to the callback)"
    if NOT_RETRIED & set(names):
        tries = f"{_fmt(try_number)} — not retried: retrying cannot fix this error"
    else:
        tries = _fmt(try_number) + (f" of {int(max_tries) + 1}" if isinstance(max_tries, int) else "")
    blocked = bool(BLOCKING & set(names))

    state = "BLOCKED" if blocked else "FAILED"
    subject = f"[crm-sync] {state} {dag_id} / {task_id} — source {source}, run {run_id}"
    body = "\n".join([
        f"crm-sync: task {task_id} of DAG {dag_id} "
        + ("was stopped by a data-quality gate (a decision, not a crash)." if blocked else "failed."),
        "",
        f"  {'DAG:':<14} {dag_id}",
        f"  {'task:':<14} {task_id}",
        f"  {'source:':<14} {source}",
        f"  {'run id:':<14} {run_id}",
        f"  {'try:':<14} {tries}",
        f"  {'logical date:':<14} {_fmt(logical_date)}",
        f"  {'data interval:':<14} {_fmt(data_interval_start)} → {_fmt(data_interval_end)}",
        *([f"  {'log:':<14} {log_url}"] if log_url else []),
        "",
        "Error",
        *(f"  {line}" for line in error.splitlines() or [""]),
        "",
        "Figures for this run (sync.run_log, sync.quarantine)",
        *_count_lines(counts, counts_error),
        "",
        "What to do",
        *(f"  {line}" for line in _what_to_do(names, source=source, run_id=run_id, dag_id=dag_id,
                                                task_id=task_id, try_number=try_number,
                                                max_tries=max_tries, conn_id=conn_id, message=error)),
        "",
        "-- crm-sync (personal data in this message is masked)",
    ])
    return mask_text(" ".join(subject.split())), mask_text(body)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    try:
        return getattr(obj, name, default)
    except Exception:  # noqa: BLE001 - lazy context values may fail to resolve
        return default


def _details(source: str, context: Mapping[str, Any]) -> dict[str, Any]:
    """What the message needs, read defensively from an Airflow context."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    task = context.get("task")
    run_id = context.get("run_id") or _get(ti, "run_id") or _get(dag_run, "run_id") or "?"
    return {
        "dag_id": _get(ti, "dag_id") or _get(dag, "dag_id") or _get(dag_run, "dag_id") or f"crm_sync__{source}",
        "task_id": _get(ti, "task_id") or _get(task, "task_id") or "?",
        "source": source,
        "run_id": str(run_id),
        "exception": context.get("exception"),
        "try_number": _get(ti, "try_number"),
        "max_tries": _get(ti, "max_tries"),
        "logical_date": context.get("logical_date") or _get(dag_run, "logical_date"),
        "data_interval_start": context.get("data_interval_start") or _get(dag_run, "data_interval_start"),
        "data_interval_end": context.get("data_interval_end") or _get(dag_run, "data_interval_end"),
        "log_url": _get(ti, "log_url"),
    }


def _source_conn_id(source: str) -> str | None:
    try:
        from crm_sync.config import load_source

        return load_source(source).conn_id
    except Exception:  # noqa: BLE001 - a broken source YAML may be why the task failed
        return None


def _as_html(body: str) -> str:
    # The smtp provider always sends its content as text/html; <pre> keeps the plain-text layout.
    return f'<pre style="font-family: monospace; white-space: pre-wrap">{html.escape(body, quote=False)}</pre>'


def _from_address(smtp_conn_id: str) -> str:
    from airflow.sdk import BaseHook

    try:
        configured = BaseHook.get_connection(smtp_conn_id).extra_dejson.get("from_email")
    except Exception:  # noqa: BLE001 - the notifier reports a missing connection itself
        configured = None
    return configured or DEFAULT_FROM


def make_failure_callback(
    source: str,
    *,
    to: list[str],
    smtp_conn_id: str,
    counts_provider: CountsProvider | None = None,
    from_email: str | None = None,
    conn_id: str | None = None,
    webhook_conn_id: str | None = None,
) -> Callable[[Mapping[str, Any]], None]:
    """An `on_failure_callback` body that e-mails on-call; it never raises.

    `from_email` defaults to the connection's `from_email` extra, else `crm-sync@localhost`.
    `conn_id` (the source's Airflow connection, named in the advice) defaults to the source YAML's.
    """

    def callback(context: Mapping[str, Any]) -> None:
        try:
            details = _details(source, context)
            counts, counts_error = None, None
            if counts_provider is not None:
                try:
                    counts = counts_provider(details["run_id"], source)
                except Exception as exc:  # noqa: BLE001 - an alert without figures beats no alert
                    counts_error = f"{type(exc).__name__}: {exc}"
            subject, body = render_failure_message(**details, counts=counts, counts_error=counts_error,
                                                   conn_id=conn_id or _source_conn_id(source))
            _send(subject, body, to=to, smtp_conn_id=smtp_conn_id, from_email=from_email, context=context,
                  webhook_conn_id=webhook_conn_id)
            log.info("failure alert for %s sent to %d recipient(s)", mask_text(details["run_id"]), len(to))
        except Exception as exc:  # noqa: BLE001 - a failing alert must not hide the task's failure
            log.error("could not send the failure alert for source %s: %s", source,
                      mask_text(f"{type(exc).__name__}: {exc}"))

    return callback


def send_notice(source: str, run_id: str, notices: list[str], *, to: list[str], smtp_conn_id: str,
                context: Mapping[str, Any], webhook_conn_id: str | None = None) -> None:
    """A warning e-mail for something on-call must act on while the run itself goes on; never raises."""
    try:
        subject = f"[crm-sync] WARNING {source}: {len(notices)} item(s) need attention — run {run_id}"
        body = "\n".join([
            f"source:  {source}", f"run:     {run_id}", "", "The run goes on; these need a person:",
            *(f"- {mask_text(n)}" for n in notices), "",
            "Rejected rows and files are in sync.quarantine (where run_id = the run above).",
        ])
        _send(subject, body, to=to, smtp_conn_id=smtp_conn_id, from_email=None, context=context,
              webhook_conn_id=webhook_conn_id)
    except Exception as exc:  # noqa: BLE001 - a failing notice must not fail the extract
        log.error("could not send the notice for source %s: %s", source, mask_text(f"{type(exc).__name__}: {exc}"))


def _send(subject: str, body: str, *, to: list[str], smtp_conn_id: str, from_email: str | None,
          context: Mapping[str, Any], webhook_conn_id: str | None = None) -> None:
    """E-mail, then the webhook when one is configured; both are tried, the first error is raised."""
    errors: list[BaseException] = []
    try:
        _send_mail(subject, body, to=to, smtp_conn_id=smtp_conn_id, from_email=from_email, context=context)
    except Exception as exc:  # noqa: BLE001 - still try the webhook
        errors.append(exc)
    if webhook_conn_id:
        try:
            from crm_sync.notifiers import WebhookNotifier

            WebhookNotifier(http_conn_id=webhook_conn_id, subject=subject, body=body).notify(dict(context))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    if errors:
        raise errors[0]


def _send_mail(subject: str, body: str, *, to: list[str], smtp_conn_id: str, from_email: str | None,
               context: Mapping[str, Any]) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    notifier = SmtpNotifier(
        to=list(to),
        from_email=from_email or _from_address(smtp_conn_id),
        subject=subject,
        html_content=_as_html(body),
        smtp_conn_id=smtp_conn_id,
    )
    # notify(), not notifier(context): __call__ renders subject and body as Jinja templates and
    # merges them into the task's context. The body quotes exception text we do not control, so
    # a stray "{{" would break (or be evaluated in) the alert. With subject, body and sender all
    # given, notify() renders nothing.
    notifier.notify(dict(context))


def render_resolved_message(*, source: str, dag_id: str, run_id: str, incident: Any,
                            counts: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(subject, body) of the one "resolved" message that closes an incident; masked."""
    subject = f"[crm-sync] RESOLVED {dag_id} — source {source} is healthy again (run {run_id})"
    opened = _fmt(incident.opened_at)
    lines = [
        f"crm-sync: source {source} recovered.",
        "",
        f"  {'DAG:':<16} {dag_id}",
        f"  {'recovered by:':<16} run {run_id}",
        f"  {'incident:':<16} #{incident.incident_id} ({incident.kind}), open since {opened}",
        f"  {'first failure:':<16} run {incident.opened_run_id}, task {incident.opened_task or '-'}",
        f"  {'while open:':<16} {incident.failures} failed task(s) in {incident.runs} run(s), alerted once",
        "",
        "First error",
        *(f"  {line}" for line in (incident.error or "-").splitlines()[:6]),
        "",
    ]
    if counts:
        lines += ["Figures of the recovering run (sync.run_log)", *_count_lines(counts, None), ""]
    lines.append("Nothing to do: the run loaded and reconciled. Rows still in quarantine are listed by "
                 f"`crm-sync quarantine list --source {source}`.")
    return mask_text(subject), mask_text("\n".join(lines))


def send_resolved(source: str, run_id: str, incident: Any, *, to: list[str], smtp_conn_id: str,
                  context: Mapping[str, Any], webhook_conn_id: str | None = None,
                  counts: Mapping[str, Any] | None = None) -> None:
    """Send the "resolved" message; never raises."""
    try:
        dag_id = f"crm_sync__{source}"
        subject, body = render_resolved_message(source=source, dag_id=dag_id, run_id=run_id, incident=incident,
                                                counts=counts)
        _send(subject, body, to=to, smtp_conn_id=smtp_conn_id, from_email=None, context=context,
              webhook_conn_id=webhook_conn_id)
    except Exception as exc:  # noqa: BLE001 - a failing notice must not fail the run
        log.error("could not send the resolved message for source %s: %s", source,
                  mask_text(f"{type(exc).__name__}: {exc}"))


def deadline_missed(source: str, deadline_minutes: int | None = None, context: Mapping[str, Any] | None = None) -> None:
    """Airflow `DeadlineAlert` callback: the source's run has not finished by its deadline (one message
    per incident: a run already failing does not alert again)."""
    from crm_sync import db, incidents
    from crm_sync.config import load_source

    cfg = load_source(source)
    context = dict(context or {})
    dag_run = context.get("dag_run")
    run_id = str(context.get("run_id") or _get(dag_run, "run_id") or "?")
    error = (f"run {run_id} of {cfg.dag_id} had not finished {deadline_minutes or cfg.alerts.deadline_minutes} "
             "minutes after it was queued")
    opened = True
    try:
        conn = db.task_connection(cfg.crm_conn_id, system="the CRM database")
        try:
            with conn.cursor() as cur:
                _, opened = incidents.open_or_repeat(cur, source, run_id, None, "deadline", error)
            conn.commit()
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - better a second message than none
        log.error("could not record the deadline incident: %s", mask_text(f"{type(exc).__name__}: {exc}"))
    if not opened:
        log.info("deadline missed by %s, but source %s already has an open incident: no new alert", run_id, source)
        return
    subject = f"[crm-sync] LATE {cfg.dag_id} — run {run_id} missed its deadline"
    body = "\n".join([
        f"crm-sync: {error}.", "",
        f"  {'DAG:':<10} {cfg.dag_id}", f"  {'source:':<10} {source}", f"  {'run id:':<10} {run_id}", "",
        "What to do",
        f"  1. In Airflow: DAG {cfg.dag_id} → run {run_id}: which task is still running or queued? A task stuck "
        "in 'queued' means no worker or pool slot; one running for long is waiting on its source or on a lock.",
        "  2. The run has loaded nothing until its load task succeeds; the next scheduled run catches up.",
        "  3. If a task hangs, mark it failed: its retry (or the next run) reads the window again.",
    ])
    try:
        _send(mask_text(subject), mask_text(body), to=cfg.alerts.to, smtp_conn_id=cfg.alerts.smtp_conn_id,
              from_email=None, context=context, webhook_conn_id=cfg.alerts.webhook_conn_id)
    except Exception as exc:  # noqa: BLE001
        log.error("could not send the deadline alert for %s: %s", source, mask_text(f"{type(exc).__name__}: {exc}"))
