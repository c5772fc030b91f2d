"""Airflow glue: each task opens its connections, calls one stage function, and commits.

Stage logic lives in plain modules that take (connection, run id, config); this module only maps
an Airflow context onto them and turns data errors into `AirflowFailException` — a bad batch or a
reconciliation mismatch does not get better by retrying, an unreachable API might.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

from crm_sync.config import SourceConfig, load_source

log = logging.getLogger("crm_sync")


def _fail_fast_errors() -> tuple[type[BaseException], ...]:
    from crm_sync.config import ConfigError
    from crm_sync.deletes import DeleteBrakeError
    from crm_sync.quality.validate import DataQualityError, SuiteError
    from crm_sync.reconcile import ReconciliationError
    from crm_sync.sources.http_source import SourceRejected
    from crm_sync.sources.extract import StagingLostError
    from crm_sync.sources.sql_source import SchemaDriftError

    return (DataQualityError, SuiteError, ReconciliationError, SourceRejected, ConfigError, SchemaDriftError,
            DeleteBrakeError, StagingLostError)


# libraries whose INFO lines drown a task's own log (GX alone writes ~200 per validation)
_CHATTY = ("great_expectations", "great_expectations.core", "great_expectations.data_context",
           "great_expectations.expectations", "great_expectations.validator", "urllib3", "httpx", "httpcore",
           "charset_normalizer", "asyncio", "numexpr", "py.warnings")


def quiet_libraries() -> None:
    """Keep other libraries' INFO chatter out of task logs: on-call reads crm-sync's lines, warnings and errors.

    Some GX modules set their own logger to INFO when imported, so every existing logger under
    those names is quieted too: call this again after importing such a library."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    prefixes = tuple(n + "." for n in _CHATTY)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(prefixes):
            logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _stage(cfg: SourceConfig):
    import psycopg2
    from airflow.sdk.exceptions import AirflowFailException

    from crm_sync import db

    quiet_libraries()

    conn = db.task_connection(cfg.crm_conn_id, system="the CRM database",
                              statement_timeout_s=cfg.statement_timeout_seconds)
    try:
        yield conn
        conn.commit()
    except _fail_fast_errors() as exc:
        _rollback(conn)
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        # raw driver errors here come from the CRM connection (a source's are named by _from_source)
        _rollback(conn)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise db.DatabaseError(
            f"the CRM database (Airflow connection '{cfg.crm_conn_id}') failed during the task: {first}. "
            "The task's transaction rolled back, nothing of it was written; Airflow retries the task while tries remain.") from exc
    except Exception:
        _rollback(conn)
        raise
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _rollback(conn) -> None:
    """Roll back; a connection the server already dropped must not hide the error that dropped it."""
    try:
        conn.rollback()
    except Exception:  # noqa: BLE001
        pass


def selected(cfg: SourceConfig, stream_name: str, context: dict) -> bool:
    """Whether the run covers this stream (the trigger form's `streams`; empty = every stream)."""
    streams = (context.get("params") or {}).get("streams") or []
    unknown = sorted(set(streams) - {s.name for s in cfg.streams})
    if unknown:
        from crm_sync.config import ConfigError

        raise ConfigError(f"trigger param 'streams': {unknown} are not streams of source '{cfg.source}' "
                          f"(it has {[s.name for s in cfg.streams]})")
    return not streams or stream_name in streams


def extract(source: str, stream_name: str, context: dict) -> dict:
    from crm_sync import runlog, watermark
    from crm_sync.sources import extract as ex
    from crm_sync.sources.base import extractor_for

    cfg = load_source(source)
    stream = cfg.stream(stream_name)
    run_id = context["run_id"]
    params = context.get("params") or {}
    if not selected(cfg, stream_name, context):
        log.info("%s.%s is not among the streams this run was triggered for; nothing extracted", source, stream_name)
        return {"skipped": True}
    notices: list[str] = []
    with _stage(cfg) as conn:
        with conn.cursor() as cur:
            runlog.start(cur, run_id, source, cfg.dag_id, context.get("data_interval_start"),
                         context.get("data_interval_end"), task_id=f"extract.{stream_name}")
            abandoned = runlog.close_abandoned(cur, source, run_id)
        conn.commit()  # the run is visible (and its row unlocked) while the extract pages through the source
        if abandoned:
            notices.append(f"runs {', '.join(abandoned)} of source '{source}' were left 'running' by a killed task; "
                           "they are now marked failed (their data never loaded; this run reads their window again)")
        window = watermark.extract_window(conn, cfg, stream.name, context["data_interval_end"],
                                          context.get("data_interval_start"), params,
                                          getattr(context.get("dag_run"), "run_type", None))
        extractor = extractor_for(cfg, stream)
        listed = None
        resumed = ex.read_checkpoint(conn, source, stream.name) if extractor.resumable else None
        if resumed is not None and not (resumed["status"] == "partial"
                                        or (resumed["status"] == "paging" and resumed["run_id"] == run_id)):
            resumed = None
        if resumed is not None:
            window = watermark.Window(since=resumed["since"], until=resumed["until"])
            log.info("%s.%s resumes paging where %s stopped (%d pages, %d records)", source, stream.name,
                     "this run's last attempt" if resumed["run_id"] == run_id else f"run {resumed['run_id']}",
                     resumed["pages"], resumed["records"])
        else:  # keys a steward released from quarantine are read again
            from crm_sync import quarantine

            window = quarantine.release_window(conn, cfg, stream, window)
        log.info("extracting %s.%s for %s: since=%s until=%s%s", source, stream.name, run_id, window.since,
                 window.until, " (late-row sweep)" if window.sweep else "")
        try:
            ledger = conn.cursor()  # the extractor's read access to the CRM (e.g. the files ledger)
            extractor.bind(ledger)
            if extractor.resumable:
                result = ex.stage_pages(conn, run_id, cfg, stream, window, extractor, resumed=resumed)
            else:
                result = ex.stage_records(conn, run_id, cfg, stream, window,
                                          _from_source(cfg, lambda: extractor.records(window)),
                                          extra_rejects=extractor.rejects)
                keys = extractor.snapshot_keys()
                if keys is not None:
                    with conn.cursor() as cur:
                        listed = ex.stage_snapshot_keys(cur, run_id, source, stream.name,
                                                        _from_source(cfg, lambda: keys))
            ex.check_received(cfg, stream, result, source_total=extractor.source_total,
                              source_checksum=extractor.source_checksum, partial=extractor.partial)
            with conn.cursor() as cur:
                extractor.stage(cur, run_id)
                ex.write_account(cur, run_id, cfg, stream, window, result, source_total=extractor.source_total,
                                 source_checksum=extractor.source_checksum, partial=extractor.partial,
                                 snapshot_keys=listed)
        except Exception as exc:
            # the staged rows go, but paid calls were made: count them in a transaction of their own
            _rollback(conn)
            if extractor.calls:
                _add_api_calls(run_id, source, cfg, extractor.calls)
            _record_schema_drift(conn, run_id, cfg, stream.name, exc)
            raise
        finally:
            if extractor.calls:
                log.info("%s.%s: %d API calls %s", source, stream.name, extractor.calls, extractor.by_status)
            extractor.close()
        with conn.cursor() as cur:
            cur.execute("update sync.run_log set api_calls = api_calls + %s where run_id = %s and source = %s",
                        (extractor.calls, run_id, source))
            runlog.update(cur, run_id, source, extract_since=window.since)
            if extractor.partial:
                runlog.update(cur, run_id, source, partial=True)
        ex.record_extract(conn, run_id, cfg)
    notices += result.notices + extractor.notices
    if extractor.partial:
        notices.append(f"source '{source}' stream '{stream.name}': the call budget of "
                       f"{cfg.http.max_calls_per_run} calls per run was spent after {result.received} records; "
                       "this run loads what it read and the next run resumes paging where it stopped.")
    if notices:
        from crm_sync.alerts import send_notice

        send_notice(source, run_id, notices, to=cfg.alerts.to, smtp_conn_id=cfg.alerts.smtp_conn_id,
                    context=context, webhook_conn_id=cfg.alerts.webhook_conn_id)
    return {"rows": result.rows, "rejected": result.rejected, "received": result.received,
            "api_calls": extractor.calls, "partial": extractor.partial, "sweep": window.sweep,
            "since": window.since.isoformat() if window.since else None, "until": window.until.isoformat()}


def _record_schema_drift(conn, run_id: str, cfg: SourceConfig, stream: str, exc: BaseException) -> None:
    """A schema-contract failure of the extract is a drift event too (`sync.drift_event`, kind 'schema')."""
    from crm_sync.sources.sql_source import SchemaDriftError

    if not isinstance(exc, SchemaDriftError):
        return
    from crm_sync.quality import drift

    try:
        with conn.cursor() as cur:
            drift.record_event(cur, run_id, cfg.source, stream, "schema", str(exc))
        conn.commit()
    except Exception as err:  # noqa: BLE001 - the extract's own error is what the task reports
        conn.rollback()
        log.error("could not record the schema drift event: %s", type(err).__name__)


def _from_source(cfg: SourceConfig, open_batches):
    """Iterate a source's batches; a dropped source connection is the source's failure, not the CRM's.

    The error names the source system and its connection (the task retries): on-call must not go
    looking at the CRM database when the ERP went away."""
    import psycopg2

    from crm_sync.db import DatabaseError

    def fail(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DatabaseError(f"source '{cfg.source}' database (Airflow connection '{cfg.conn_id}') failed while "
                             f"reading: {first}. Nothing was loaded; Airflow retries the task while tries remain.")

    try:
        batches = open_batches()
        for batch in batches:
            yield batch
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        if isinstance(exc, psycopg2.errors.QueryCanceled):
            raise
        raise fail(exc) from exc


def _add_api_calls(run_id: str, source: str, cfg: SourceConfig, calls: int) -> None:
    """Paid calls are counted even when the extract fails, in a transaction of their own."""
    from crm_sync import db

    conn = db.task_connection(cfg.crm_conn_id)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """insert into sync.run_log (run_id, source, dag_id, api_calls) values (%s, %s, %s, %s)
                   on conflict (run_id, source) do update set api_calls = sync.run_log.api_calls + excluded.api_calls""",
                (run_id, source, cfg.dag_id, calls))
        conn.commit()
    finally:
        conn.close()


def resolve(source: str, context: dict) -> dict:
    from crm_sync.identity.resolve import resolve as run_resolve
    from crm_sync.sources.extract import record_extract

    from crm_sync.sources.extract import check_staging

    cfg = load_source(source)
    with _stage(cfg) as conn:
        check_staging(conn, context["run_id"], cfg)
        record_extract(conn, context["run_id"], cfg)
        result = run_resolve(conn, context["run_id"], cfg)
    return {"records": result.records, "linked": result.linked, "merged": result.merged, "new": result.new}


def estimate_match_params(context: dict, conn_id: str = "crm_db") -> dict:
    """The scheduled `crm-sync identity estimate`: EM over a sample of the master into `crm.match_params`.
    A master too small to estimate from skips the run (the config's values stay in use)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from crm_sync import db
    from crm_sync.identity import resolve as identity

    quiet_libraries()
    conn = db.task_connection(conn_id, system="the CRM database")
    try:
        try:
            summary = identity.estimate(conn, by=f"airflow:{context['dag'].dag_id}/{context['run_id']}")
        except ValueError as exc:   # too few records, or no candidate pairs to estimate from
            conn.rollback()
            raise AirflowSkipException(str(exc)) from None
    finally:
        conn.close()
    log.info("match parameters %s estimated from %s of %s master records in %s s: %.2f matches per record",
             summary["params_id"], summary["sampled"], summary["population"], summary["seconds"],
             summary["matches_per_record"])
    return {k: summary[k] for k in ("params_id", "population", "sampled", "matches_per_record", "seconds")}


def map_stream(source: str, stream_name: str, context: dict) -> dict:
    from crm_sync import mapping

    cfg = load_source(source)
    if not selected(cfg, stream_name, context):
        return {"skipped": True}
    with _stage(cfg) as conn:
        result = mapping.map_stream(conn, context["run_id"], cfg, cfg.stream(stream_name))
        from crm_sync import entities

        counts = " + ".join(f"(select count(*) from {t} where run_id = %(r)s and source = %(s)s)"
                            for t in entities.staging_tables())
        with conn.cursor() as cur:
            cur.execute(f"update sync.run_log set rows_mapped = {counts} where run_id = %(r)s and source = %(s)s",
                        {"r": context["run_id"], "s": source})
    return {"mapped": result.mapped, "rejected": result.rejected, "mapped_in_sql": result.in_sql}


def validate_stream(source: str, stream_name: str, context: dict) -> dict:
    from crm_sync.quality import drift
    from crm_sync.quality.validate import validate_stream as run_validate
    from crm_sync.quality.volume import check_volume

    cfg = load_source(source)
    if not selected(cfg, stream_name, context):
        return {"skipped": True}
    # the suites run in PostgreSQL; Great Expectations is imported only to render a page with failures
    with _stage(cfg) as conn:
        check_volume(conn, context["run_id"], cfg, cfg.stream(stream_name))
        outcome = run_validate(conn, context["run_id"], cfg, cfg.stream(stream_name))
        drift_warnings = drift.check_stream(conn, context["run_id"], cfg, cfg.stream(stream_name))
    return {"rows": outcome.rows, "quarantined": outcome.quarantined, "warnings": outcome.failed_warning,
            "drift_warnings": [w.as_dict() for w in drift_warnings]}


def load(source: str, context: dict) -> dict:
    from crm_sync import load as loader

    from crm_sync.sources.extract import check_staging

    cfg = load_source(source)
    with _stage(cfg) as conn:
        check_staging(conn, context["run_id"], cfg)
        result = loader.load(conn, context["run_id"], cfg,
                             allow_deletes=bool((context.get("params") or {}).get("allow_deletes")))
    return {"customers": result.customers, "deleted": result.deleted, **result.facts, "held": result.held,
            "released": result.released, "rejected": result.rejected}


def reconcile(source: str, context: dict) -> dict:
    from crm_sync import incidents
    from crm_sync.load import purge_staging
    from crm_sync.quality import drift
    from crm_sync.reconcile import reconcile as run_reconcile
    from crm_sync.sources.base import extractor_class

    cfg = load_source(source)
    run_id = context["run_id"]
    with _stage(cfg) as conn:
        checks = run_reconcile(conn, run_id, cfg)
        with conn.cursor() as cur:
            cur.execute("""update sync.run_log set state = case when partial then 'partial' else 'success' end,
                               finished_at = now() where run_id = %s and source = %s
                           returning state, late_rows, rows_deleted""", (run_id, source))
            state, late, deleted = cur.fetchone() or ("success", 0, 0)
            resolved = incidents.resolve(cur, source, run_id)
        drift_warnings = drift.check_run(conn, run_id, cfg)
        _report(conn, run_id, source)
        with conn.cursor() as cur:
            # every drift warning of the run (any stream, and the run's own figures) goes out in one notice
            cur.execute("""update sync.drift_event set alerted = true
                           where run_id = %s and source = %s and severity = 'warning' and not alerted
                           returning stream, message""", (run_id, source))
            drifted = sorted(cur.fetchall())
        conn.commit()
        extractor_class(cfg.kind).finish(conn, cfg, run_id)
        purge_staging(conn, source)
        expired = _housekeeping(conn, cfg)
    _note(cfg, run_id, context)
    if resolved is not None:
        from crm_sync.alerts import send_resolved

        try:
            figures = _counts(cfg, run_id, source)
        except Exception:  # the message goes out without figures rather than not at all
            figures = None
        send_resolved(source, run_id, resolved, to=cfg.alerts.to, smtp_conn_id=cfg.alerts.smtp_conn_id,
                      webhook_conn_id=cfg.alerts.webhook_conn_id, context=context, counts=figures)
    notices = [f"{message} (loaded: a warning does not block; the figures: select * from sync.drift_event where "
               f"run_id = '{run_id}' and source = '{source}')" for _, message in drifted]
    if expired:
        from crm_sync.quarantine import expiry_days, group_rows

        for g in group_rows(expired):
            notices.append(
                f"{g['rows']} quarantined rows of stream '{g['stream']}' ({g['stage']}: {g['rule']}"
                f"{', field ' + g['field'] if g['field'] else ''}) expired after {expiry_days(source)} days "
                "without a fix or a release: they will not be retried. Keep them with `crm-sync quarantine list "
                f"--source {source} --status expired --rows`; release them after fixing the source.")
    if late:
        notices.append(
            f"the late-row sweep of source '{source}' loaded {late} rows that the regular runs missed: they were "
            f"committed in the source after their window had been read (beyond the {cfg.lookback_minutes}-minute "
            "lookback). They are loaded now; if this repeats, raise lookback_minutes in "
            f"include/sources/{source}.yaml.")
    if notices:
        from crm_sync.alerts import send_notice

        send_notice(source, run_id, notices, to=cfg.alerts.to, smtp_conn_id=cfg.alerts.smtp_conn_id,
                    context=context, webhook_conn_id=cfg.alerts.webhook_conn_id)
    return {"state": state, "late_rows": late, "deleted": deleted,
            "checks": {f"{c.stream}.{c.name}": c.ok for c in checks},
            "drift_warnings": [w.as_dict() for w in drift_warnings]}


class FailureCallback:
    """`on_failure_callback`: records the failure in the run log and the source's incident, then
    alerts on-call — once per incident: the first failed task of a healthy source alerts; further
    failed tasks of the same run, and failing runs after it, are counted in `sync.incident` until
    a run succeeds and sends the one "resolved" message."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, context: dict) -> None:
        from crm_sync.masking import mask_text

        cfg = load_source(self.source)
        run_id = context.get("run_id") or getattr(context.get("dag_run"), "run_id", None)
        exc = context.get("exception")
        ti = context.get("ti") or context.get("task_instance")
        opened = True
        try:
            opened = self._record(cfg, run_id, ti, exc, mask_text)
        except Exception as err:  # alerting must still happen when the database is the problem
            log.error("could not record the failure in sync.run_log / sync.incident: %s", mask_text(str(err)))
        _note(cfg, run_id, context, error=exc)
        if not opened:
            log.info("source %s already has an open incident: this failure is counted there, no new alert",
                     self.source)
            return
        from crm_sync.alerts import make_failure_callback

        make_failure_callback(self.source, to=cfg.alerts.to, smtp_conn_id=cfg.alerts.smtp_conn_id,
                              webhook_conn_id=cfg.alerts.webhook_conn_id,
                              counts_provider=lambda rid, src: _counts(cfg, rid, src))(context)

    def _record(self, cfg: SourceConfig, run_id, ti, exc, mask_text) -> bool:
        """Record the failure; whether it opened the source's incident (and so must alert)."""
        from crm_sync import db, incidents, runlog
        from crm_sync.alerts import BLOCKING, _error_names

        blocked = bool(BLOCKING & set(_error_names(exc)))
        error = mask_text(f"{type(exc).__name__}: {exc}")[:2000]
        conn = db.task_connection(cfg.crm_conn_id, system="the CRM database")
        try:
            with conn.cursor() as cur:
                cur.execute(
                    """insert into sync.run_log (run_id, source, dag_id) values (%s, %s, %s)
                       on conflict (run_id, source) do nothing""",
                    (run_id, self.source, cfg.dag_id),
                )
                runlog.update(cur, run_id, self.source, state="blocked" if blocked else "failed",
                              failed_task=getattr(ti, "task_id", None), error=error)
                cur.execute("update sync.run_log set finished_at = now() where run_id = %s and source = %s",
                            (run_id, self.source))
                _, opened = incidents.open_or_repeat(cur, self.source, run_id, getattr(ti, "task_id", None),
                                                     "blocked" if blocked else "failed", error)
            conn.commit()
            _report(conn, run_id, self.source)  # what was checked and what failed, linked from the alert
            conn.commit()
        finally:
            conn.close()
        return opened


def _report(conn, run_id: str, source: str) -> None:
    """The run's quality report (HTML + JSON, path in `sync.quality_report`); never fails the task."""
    try:
        from crm_sync.quality import report

        report.build(conn, run_id, source)
    except Exception as exc:  # noqa: BLE001 - a report is evidence, not a gate
        log.warning("quality report of %s not built: %s", run_id, type(exc).__name__)


def _housekeeping(conn, cfg: SourceConfig) -> list[dict]:
    """Expire quarantine rows nobody settled in time and purge old settled ones; the rows expired now."""
    from crm_sync import quarantine

    try:
        expired = quarantine.expire(conn, source=cfg.source)
        quarantine.purge(conn, cfg.quarantine_purge_days, source=cfg.source)
        conn.commit()
        return expired
    except Exception as exc:  # noqa: BLE001 - housekeeping must not fail a run that loaded
        conn.rollback()
        log.warning("quarantine housekeeping of %s failed: %s", cfg.source, type(exc).__name__)
        return []


def _note(cfg: SourceConfig, run_id: str, context: dict, *, error=None) -> None:
    """The DAG run note in the Airflow UI (only where an `airflow_api` connection exists); never raises."""
    from crm_sync import run_note
    from crm_sync.alerts import BLOCKING, _error_names

    try:
        figures = _counts(cfg, run_id, cfg.source)
        state = figures.get("state") or "failed"
        decision = None
        if error is not None:
            blocked = bool(BLOCKING & set(_error_names(error)))
            state = "blocked" if blocked else "failed"
            task = getattr(context.get("ti") or context.get("task_instance"), "task_id", "?")
            decision = f"{'Gate' if blocked else 'Error'} at `{task}`: {str(error).splitlines()[0][:400]}"
        dag_id = getattr(context.get("dag_run"), "dag_id", None) or cfg.dag_id
        run_note.set_note(dag_id, run_id, run_note.render(state, figures, decision))
    except Exception as exc:  # noqa: BLE001 - a note is a courtesy
        log.warning("run note not set: %s", type(exc).__name__)


def _counts(cfg: SourceConfig, run_id: str, source: str) -> dict:
    from crm_sync import db, runlog

    conn = db.task_connection(cfg.crm_conn_id, system="the CRM database")
    try:
        figures = runlog.counts(conn, run_id, source)
        try:
            from crm_sync.quality import report

            stored = report.stored(conn, run_id, source)
        except Exception:  # noqa: BLE001 - figures without the link beat no figures
            conn.rollback()
            stored = None
        if stored and stored.get("html_path"):
            figures["quality_report"] = stored["html_path"]
        return figures
    finally:
        conn.close()
