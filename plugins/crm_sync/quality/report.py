"""Quality reports: what a run checked, what failed and what it quarantined, readable by people.

Guarantees:
- `after_validation` (called by the validate stage for every batch it validated) writes the GX
  Data Docs page of that validation, `<run folder>/gx/<stream>.html`, and its compact JSON, then
  (re)builds the run's report. It never raises: a report that cannot be written is logged and the
  validation goes on.
- `build(conn, run_id, source)` writes the run's report, `<run folder>/report.html` and
  `report.json`: the run's figures, every check of `sync.dq_result` (expectations and the volume
  check: severity, row- or batch-level, decision, counts, examples), reconciliation, drift events
  when `sync.drift_event` exists, where every row of each stream went, the quarantine grouped by
  stage, rule and field, and links to the Data Docs pages. Its paths are stored in
  `sync.quality_report`, so an alert and the DAG run note can link them.
- The run folder is `.local/reports/<source>/<run id>/` ($CRM_SYNC_REPORTS_DIR replaces
  `.local/reports`).
- Nothing personal leaves unmasked: every value of a phone, e-mail or name field (by its name or
  the source YAML) is masked whatever its shape (`zhang.wei@` -> `z***`), in the Data Docs as in the
  report; other texts go through `mask_text`.

Why GX's renderer and not a file-backed GX context: with GX 1.x an ephemeral context builds no
Data Docs. A file-backed context per run costs ~0.2 s to set up plus ~0.6 s for the checkpoint
and site build on top of the validation, writes ~4 MB of static assets into every run folder and
renders the failing values unmasked. `ValidationResultsPageRenderer` on a trimmed, masked copy of
the result makes the same page in ~0.15-0.2 s (100,000 rows, 13,000 failing) as one ~40 KB file.
`CRM_SYNC_DATA_DOCS=off` skips the page (the report is still built).

Importing GX costs a task process seconds (~6 s on an idle 2-core machine, far more on a busy
one), so only a page that shows something failed pays for it: a validation in which every
expectation passed on every row gets a page with the same facts written here (`render_clean_page`).
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from crm_sync import paths, quarantine
from crm_sync.masking import mask_text

log = logging.getLogger(__name__)

REPORTS_ENV = "CRM_SYNC_REPORTS_DIR"
DATA_DOCS_ENV = "CRM_SYNC_DATA_DOCS"
EXAMPLES = 20  # failing values kept per expectation (GX's own partial list is 20 long)


@dataclass(frozen=True)
class Report:
    run_id: str
    source: str
    html_path: Path
    json_path: Path
    failed: int
    quarantined: int


def reports_dir() -> Path:
    env = os.environ.get(REPORTS_ENV)
    return Path(env).resolve() if env else paths.local_dir() / "reports"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def run_dir(source: str, run_id: str) -> Path:
    """The folder of one run's reports (not created)."""
    return reports_dir() / _safe(source) / _safe(run_id)


# --- GX Data Docs of one validation ------------------------------------------------------------

def _column_of(kwargs: dict) -> str | None:
    if kwargs.get("column"):
        return kwargs["column"]
    return None


def _mask(info, column: str | None, value):
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, (int, float, Decimal)) and info.kind(column) is None):
        return value
    if isinstance(value, dict):  # one row of a multicolumn expectation: each value as its column says
        return {k: _mask(info, str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and info.kind(column) is None:
        return [_mask(info, column, v) for v in value]
    return quarantine.mask_value(info, column, value)


def _masked_result_dict(res: dict, info, column: str | None) -> dict:
    """A GX result dict trimmed to what a page shows, every value masked as its column says."""
    out = {}
    for key, value in (res or {}).items():
        if key in ("unexpected_list", "unexpected_index_list", "unexpected_index_query", "details"):
            continue  # every failing row (the quarantine has them) or raw value tables: not for a page
        if key == "partial_unexpected_list":
            value = [_mask(info, column, v) for v in (value or [])[:EXAMPLES]]
        elif key == "partial_unexpected_counts":
            value = [{"value": _mask(info, column, c.get("value")), "count": c.get("count")}
                     for c in (value or [])[:EXAMPLES] if isinstance(c, dict)]
        elif key == "partial_unexpected_index_list":
            value = [{k: (v if k == "source_pk" else _mask(info, k, v)) for k, v in item.items()}
                     if isinstance(item, dict) else item for item in (value or [])[:EXAMPLES]]
        elif key == "observed_value":
            value = _mask(info, column, value)
        out[key] = value
    return out


def _masked_exception(info: dict | None) -> dict | None:
    if not isinstance(info, dict):
        return info
    out = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out[key] = _masked_exception(value)
        elif key == "exception_traceback":
            out[key] = None
        elif isinstance(value, str):
            out[key] = mask_text(value)
        else:
            out[key] = value
    return out


def masked_validation(result, info=None):
    """A copy of a suite's results (`sqlchecks.SuiteResult`) fit for a page: lists of every failing
    row dropped, examples cut to 20, every value of a phone, e-mail or name column masked, no
    payloads."""
    from crm_sync.quality.sqlchecks import CheckResult, SuiteResult

    info = info or quarantine.StreamFields()
    results = [CheckResult(r.check, r.success, _masked_result_dict(r.result, info, _column_of(r.check.kwargs)),
                           _masked_exception(r.exception_info)) for r in result.results]
    return SuiteResult(result.suite_name, results, result.element_count, meta=dict(result.meta))


def to_gx(masked):
    """GX's own `ExpectationSuiteValidationResult` of (masked) results, for its page renderer.
    Imports Great Expectations (seconds): only a page that shows a failure needs it."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult, ExpectationValidationResult)
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    _quiet_gx()
    results = [ExpectationValidationResult(
        success=r.success, expectation_config=ExpectationConfiguration(
            type=r.check.type, kwargs=dict(r.check.kwargs), meta=dict(r.check.meta)),
        result=r.result, meta={}, exception_info=r.exception_info) for r in masked.results]
    return ExpectationSuiteValidationResult(
        success=masked.success, results=results, suite_name=masked.suite_name, statistics=masked.statistics,
        meta={"great_expectations_version": gx.__version__, **masked.meta})


def _quiet_gx() -> None:
    """GX sets some of its loggers to INFO when imported; a task log is for crm-sync's lines."""
    for name in list(logging.root.manager.loggerDict):
        if name == "great_expectations" or name.startswith("great_expectations."):
            logging.getLogger(name).setLevel(logging.WARNING)


def _validation_json(masked, run_id: str, source: str, stream: str) -> dict:
    checks = []
    for r in masked.results:
        res = r.result or {}
        checks.append({
            "expectation": r.check.type, "kwargs": dict(r.check.kwargs),
            "severity": (r.check.meta or {}).get("severity"), "success": r.success,
            "element_count": res.get("element_count"), "unexpected_count": res.get("unexpected_count"),
            "unexpected_percent": res.get("unexpected_percent"),
            "examples": res.get("partial_unexpected_list", []), "observed_value": res.get("observed_value"),
            "exception": r.error})
    return {"run_id": run_id, "source": source, "stream": stream, "suite": masked.suite_name,
            "success": masked.success, "statistics": masked.statistics, "results": checks}


def data_docs_enabled() -> bool:
    return os.environ.get(DATA_DOCS_ENV, "on").strip().lower() not in ("0", "off", "false", "no")


def write_data_docs(run_id: str, source: str, stream: str, result, info=None) -> Path | None:
    """The Data Docs page (and compact JSON) of one validation; returns the page's path.

    Where an expectation failed, let a row fail (within its `mostly`) or could not run, the page is
    GX's own (`ValidationResultsPageRenderer`); where every expectation passed on every row, it is
    a page of the same facts written without importing GX (seconds per task process)."""
    folder = run_dir(source, run_id) / "gx"
    folder.mkdir(parents=True, exist_ok=True)
    masked = masked_validation(result, info)
    _write(folder / f"{_safe(stream)}.json", _dumps(_validation_json(masked, run_id, source, stream)))
    if not data_docs_enabled():
        return None
    if masked.clean:
        page = render_clean_page(masked, run_id, source, stream)
    else:
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultJinjaPageView

        page = DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(to_gx(masked)))
    path = folder / f"{_safe(stream)}.html"
    _write(path, page)
    return path


def _describe(check) -> str:
    """An expectation in words, as GX's page says it (for the page of a clean validation)."""
    kw = check.kwargs
    mostly = kw.get("mostly")
    tail = f", at least {mostly * 100:g} % of the time" if mostly is not None and mostly < 1 else ""
    low, high = kw.get("min_value"), kw.get("max_value")
    bounds = (f"greater than or equal to {low} and less than or equal to {high}" if low is not None and high is not None
              else f"greater than or equal to {low}" if low is not None else f"less than or equal to {high}")
    text = {
        "expect_column_values_to_not_be_null": "values must never be null",
        "expect_column_values_to_be_null": "values must be null",
        "expect_column_values_to_be_unique": "values must be unique",
        "expect_column_values_to_be_in_set": f"values must belong to this set: {kw.get('value_set')}",
        "expect_column_values_to_not_be_in_set": f"values must not belong to this set: {kw.get('value_set')}",
        "expect_column_values_to_be_between": f"values must be {bounds}",
        "expect_column_value_lengths_to_be_between": f"values must be {bounds} characters long",
        "expect_column_value_lengths_to_equal": f"values must be {kw.get('value')} characters long",
        "expect_column_values_to_match_regex": f"values must match this regular expression: {kw.get('regex')}",
        "expect_column_values_to_not_match_regex": f"values must not match this regular expression: {kw.get('regex')}",
        "expect_table_row_count_to_be_between": f"Must have {bounds} rows",
        "expect_table_row_count_to_equal": f"Must have exactly {kw.get('value')} rows",
    }.get(check.type, check.type)
    return text + tail


def render_clean_page(masked, run_id: str, source: str, stream: str) -> str:
    """The Data Docs page of a validation in which every expectation passed on every row."""
    stats = masked.statistics
    rows = []
    for r in masked.results:
        res = r.result or {}
        observed = (f"{res['observed_value']}" if "observed_value" in res
                    else f"0 unexpected of {res.get('element_count')} rows"
                    + (f" ({res['missing_count']} missing)" if res.get("missing_count") else ""))
        rows.append([_e(r.check.column or "table"), "<span class='ok'>passed</span>",
                     f"<code>{_e(r.check.type)}</code><br>{_e(_describe(r.check))}",
                     _e((r.check.meta or {}).get("severity")), _e(observed)])
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>Validation results: {_e(masked.suite_name)} — "
        f"{_e(source)} / {_e(stream)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Validation results: suite {_e(masked.suite_name)}</h1>",
        f"<p>source <code>{_e(source)}</code> · stream <code>{_e(stream)}</code> · run <code>{_e(run_id)}</code>"
        f" · {_e(masked.element_count)} rows</p>",
        f"<p class='ok'>Every expectation passed on every row: {_e(stats['successful_expectations'])} of "
        f"{_e(stats['evaluated_expectations'])} successful, none failed.</p>",
        _table(["column", "status", "expectation", "severity", "observed"], rows),
        "<p class='muted'>Evaluated in PostgreSQL by crm-sync's SQL checks with Great Expectations' semantics. "
        "A validation with a failing row gets Great Expectations' own Data Docs page.</p>",
        "</body></html>"])


def after_validation(conn, run_id: str, cfg, stream, suite_doc: dict, result) -> Report | None:
    """The validate stage's hook: Data Docs of this validation, then the run's report. Never raises."""
    try:
        write_data_docs(run_id, cfg.source, stream.name, result,
                        quarantine.source_fields(cfg.source).get(stream.name))
    except Exception as exc:  # noqa: BLE001 - a report must never fail the gate
        log.warning("GX Data Docs of %s.%s (run %s) not written: %s", cfg.source, stream.name, run_id,
                    mask_text(f"{type(exc).__name__}: {exc}"))
    try:
        return build(conn, run_id, cfg.source)
    except Exception as exc:  # noqa: BLE001
        log.warning("quality report of %s (run %s) not built: %s", cfg.source, run_id,
                    mask_text(f"{type(exc).__name__}: {exc}"))
        return None


# --- the run's report ----------------------------------------------------------------------------

def _rows(cur, query: str, params) -> list[dict]:
    cur.execute(query, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def _exists(cur, table: str) -> bool:
    cur.execute("select to_regclass(%s) is not null", (table,))
    return cur.fetchone()[0]


def _checks(dq_rows: list[dict], fields: dict) -> list[dict]:
    checks = []
    for row in dq_rows:
        detail = row.get("detail") or {}
        info = fields.get(row["stream"]) or quarantine.StreamFields()
        column = row["column_name"] or None
        examples = [_mask(info, column.split(",")[0] if column else None, v)
                    for v in (detail.get("partial_unexpected_list") or [])[:5]]
        checks.append({
            "stream": row["stream"], "check": row["expectation"], "column": column, "severity": row["severity"],
            "level": detail.get("level"), "success": row["success"],
            "decision": detail.get("decision") or ("passed" if row["success"] else "failed"),
            "element_count": row["element_count"], "unexpected_count": row["unexpected_count"],
            "tolerance": detail.get("tolerance"), "examples": examples,
            "kwargs": detail.get("kwargs") or {k: v for k, v in detail.items()
                                                if k in ("previous_success_rows", "max_volume_drop")},
            "exception": mask_text(detail["exception"]) if detail.get("exception") else None})
    return checks


def _clean(check: dict) -> bool:
    """Passed with no failing row: GX's own success is not enough, a `mostly` lets some rows fail
    (and the validate stage quarantined those)."""
    return bool(check["success"]) and not check["exception"] and not check["unexpected_count"]


def _failed_lines(checks, reconciliation, drift) -> list[str]:
    lines = []
    for c in checks:
        if _clean(c):
            continue
        what = f"{c['check']}({c['column']})" if c["column"] else c["check"]
        counts = (f"{c['unexpected_count']} of {c['element_count']} rows" if c["unexpected_count"] is not None
                  else "failed")
        lines.append(f"{c['stream']}: {what} [{c['severity']}, {c['decision']}]: {c['exception'] or counts}")
    for r in reconciliation:
        if not r["ok"]:
            lines.append(f"{r['stream']}: reconciliation {r['check_name']}: source {r['source_value']} "
                         f"vs target {r['target_value']}")
    for d in drift:
        lines.append(f"{d['stream']}: drift [{d['severity']}]: {d['message']}")
    return lines


def collect(conn, run_id: str, source: str) -> dict:
    """Everything the report shows, as one JSON-able document (values already masked)."""
    fields = quarantine.source_fields(source)
    with conn.cursor() as cur:
        run = _rows(cur, "select * from sync.run_log where run_id = %s and source = %s", (run_id, source))
        streams = _rows(cur, """select stream, window_since, window_until, source_rows, received, staged, quarantined,
                                       superseded, tombstones, loaded, unchanged, deleted, lost, late, partial
                                from sync.stream_account where run_id = %s and source = %s order by stream""",
                        (run_id, source))
        dq = _rows(cur, """select stream, expectation, column_name, severity, success, element_count, unexpected_count,
                                  detail, checked_at
                           from sync.dq_result where run_id = %s and source = %s
                           order by stream, success, severity, expectation, column_name""", (run_id, source))
        reconciliation = _rows(cur, """select stream, check_name, source_value, target_value, ok
                                       from sync.reconciliation where run_id = %s and source = %s
                                       order by stream, check_name""", (run_id, source))
        drift = []
        if _exists(cur, "sync.drift_event"):
            drift = _rows(cur, """select stream, kind, metric, column_name, severity, value, median, mad, bound, message
                                  from sync.drift_event where run_id = %s and source = %s
                                  order by severity, stream, metric""", (run_id, source))
            for d in drift:
                d["message"] = mask_text(d["message"])
        cur.execute("""select count(distinct (stream, coalesce(source_pk, 'quarantine:' || quarantine_id)))
                                filter (where blocks_key),
                              count(*) filter (where blocks_key), count(*) filter (where not blocks_key)
                       from sync.quarantine where run_id = %s and source = %s""", (run_id, source))
        keys, rows, superseded = cur.fetchone()
    groups = quarantine.summary(conn, run_id=run_id, source=source)
    figures = {}
    if run:
        r = run[0]
        figures = {k: r.get(k) for k in ("rows_extracted", "rows_mapped", "rows_loaded", "rows_unchanged",
                                         "rows_deleted", "ids_linked", "ids_merged", "ids_review", "ids_new",
                                         "api_calls", "reconcile_ok") if k in r}
        if not r.get("rows_loaded") and r.get("state") not in ("success", "partial"):
            for k in ("ids_linked", "ids_merged", "ids_review", "ids_new"):
                figures.pop(k, None)  # they describe a load that did not happen
    checks = _checks(dq, fields)
    docs_dir = run_dir(source, run_id) / "gx"
    data_docs = {p.stem: f"gx/{p.name}" for p in sorted(docs_dir.glob("*.html"))} if docs_dir.is_dir() else {}
    state = run[0]["state"] if run else None
    return {
        "source": source, "run_id": run_id, "state": state,
        "built_at": datetime.now(timezone.utc),
        "started_at": run[0].get("started_at") if run else None,
        "finished_at": run[0].get("finished_at") if run else None,
        "window": {"since": run[0].get("extract_since"), "until": run[0].get("interval_end")} if run else None,
        "error": mask_text(run[0]["error"]) if run and run[0].get("error") else None,
        "failed_task": run[0].get("failed_task") if run else None,
        "figures": figures,
        "checks": checks,
        "failed": _failed_lines(checks, reconciliation, drift),
        "reconciliation": reconciliation,
        "drift": drift,
        "streams": streams,
        "quarantine": {"keys": keys, "rows": rows, "superseded": superseded, "groups": groups},
        "data_docs": data_docs,
    }


def build(conn, run_id: str, source: str) -> Report:
    """Write the run's report (HTML and JSON) and record its paths in `sync.quality_report`.

    Runs in the caller's transaction under a savepoint (a failure here leaves it usable); the
    caller commits."""
    with conn.cursor() as cur:
        cur.execute("savepoint quality_report")
    try:
        doc = collect(conn, run_id, source)
        folder = run_dir(source, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, html_path = folder / "report.json", folder / "report.html"
        _write(json_path, _dumps(doc))
        _write(html_path, render_html(doc))
        failed = len(doc["failed"])
        with conn.cursor() as cur:
            cur.execute(
                """insert into sync.quality_report as r (run_id, source, html_path, json_path, data_docs, failed,
                       quarantined, built_at)
                   values (%s, %s, %s, %s, %s, %s, %s, now())
                   on conflict (run_id, source) do update set html_path = excluded.html_path,
                       json_path = excluded.json_path, data_docs = excluded.data_docs, failed = excluded.failed,
                       quarantined = excluded.quarantined, built_at = excluded.built_at""",
                (run_id, source, str(html_path), str(json_path),
                 json.dumps({k: str(folder / v) for k, v in doc["data_docs"].items()}), failed,
                 doc["quarantine"]["keys"]))
            cur.execute("release savepoint quality_report")
    except BaseException:
        with conn.cursor() as cur:
            cur.execute("rollback to savepoint quality_report")
        raise
    return Report(run_id, source, html_path, json_path, failed, doc["quarantine"]["keys"])


def latest_run(conn, source: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute("select run_id from sync.run_log where source = %s order by started_at desc limit 1", (source,))
        row = cur.fetchone()
    return row[0] if row else None


def stored(conn, run_id: str, source: str) -> dict | None:
    """The recorded report of a run (paths, failed checks, quarantined keys), for alerts and notes."""
    with conn.cursor() as cur:
        rows = _rows(cur, "select * from sync.quality_report where run_id = %s and source = %s", (run_id, source))
    return rows[0] if rows else None


# --- files ---------------------------------------------------------------------------------------

def _default(value):
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and abs(value) < 2 ** 53 else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _dumps(doc) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False, default=_default)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # readers never see half a report


# --- HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#222;max-width:78rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem} th,td{border:1px solid #ddd;padding:.25rem .5rem;
text-align:left;vertical-align:top} th{background:#f5f5f5} td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37} .bad{color:#c62828;font-weight:600} .warn{color:#9a6700} .muted{color:#666}
.state{display:inline-block;padding:.1rem .5rem;border-radius:.3rem;background:#eee} ul.failed li{margin:.2rem 0}
code{font-size:.85rem}
"""


def _e(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return html.escape(value.isoformat(timespec="seconds"))
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value, ensure_ascii=False, default=_default))
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class='n'>{cell}</td>" if i in numeric else f"<td>{cell}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdict(check: dict) -> str:
    if _clean(check):
        return "<span class='ok'>passed</span>"
    css = "bad" if check["severity"] == "critical" else "warn"
    return f"<span class='{css}'>{_e(check['decision'])}</span>"


def render_html(doc: dict) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>crm-sync quality report: {_e(doc['source'])} "
             f"{_e(doc['run_id'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>Quality report: source {_e(doc['source'])}</h1>",
             f"<p>run <code>{_e(doc['run_id'])}</code> · state <span class='state'>{_e(doc['state'] or 'unknown')}</span>"
             f" · built {_e(doc['built_at'])}</p>"]
    window = doc.get("window") or {}
    if window:
        parts.append(f"<p class='muted'>window {_e(window.get('since') or 'from the beginning')} … "
                     f"{_e(window.get('until'))}</p>")
    if doc.get("error"):
        parts.append(f"<p class='bad'>{_e(doc.get('failed_task') or '')} {_e(doc['error'])}</p>")

    parts.append("<h2>What failed</h2>")
    if doc["failed"]:
        parts.append("<ul class='failed'>" + "".join(f"<li>{_e(line)}</li>" for line in doc["failed"]) + "</ul>")
    else:
        parts.append("<p class='ok'>Every check passed.</p>")

    if doc["figures"]:
        parts.append("<h2>Figures</h2>")
        parts.append(_table(["figure", "value"], [[_e(k.replace("_", " ")), _e(v)] for k, v in doc["figures"].items()],
                            {1}))

    parts.append("<h2>What was checked</h2>")
    if doc["checks"]:
        rows = []
        for c in doc["checks"]:
            rows.append([_e(c["stream"]), f"<code>{_e(c['check'])}</code>", _e(c["column"]), _e(c["severity"]),
                         _e(c["level"]), _verdict(c), _e(c["unexpected_count"]), _e(c["element_count"]),
                         _e(c["tolerance"]), _e(", ".join(map(str, c["examples"])) if c["examples"] else ""),
                         _e(c["kwargs"])])
        parts.append(_table(["stream", "check", "column", "severity", "level", "result", "failing rows", "rows",
                             "tolerance", "examples (masked)", "arguments"], rows, {6, 7}))
    else:
        parts.append("<p class='muted'>No checks recorded for this run (it stopped before validation).</p>")

    if doc["data_docs"]:
        parts.append("<h2>Great Expectations Data Docs</h2><ul>" + "".join(
            f"<li><a href='{_e(href)}'>{_e(stream)}</a></li>" for stream, href in doc["data_docs"].items()) + "</ul>")

    q = doc["quarantine"]
    parts.append(f"<h2>Quarantine</h2><p>{_e(q['keys'])} records rejected ({_e(q['rows'])} quarantine rows"
                 + (f", plus {_e(q['superseded'])} superseded versions" if q["superseded"] else "") + ").</p>")
    if q["groups"]:
        rows = [[_e(g["stream"]), _e(g["stage"]), f"<code>{_e(g['rule'])}</code>", _e(g["field"]), _e(g["keys"]),
                 _e(g["rows"]), _e(", ".join(f"{k} {v}" for k, v in g["status"].items())), _e(g["example_value"]),
                 _e(g["example_reason"])] for g in q["groups"]]
        parts.append(_table(["stream", "stage", "rule", "field", "records", "rows", "status", "example value",
                             "example reason"], rows, {4, 5}))
        parts.append(f"<p class='muted'>crm-sync quarantine list --source {_e(doc['source'])} --run "
                     f"{_e(doc['run_id'])} --rows</p>")

    if doc["reconciliation"]:
        parts.append("<h2>Reconciliation</h2>")
        parts.append(_table(["stream", "check", "source", "target", "result"],
                            [[_e(r["stream"]), _e(r["check_name"]), _e(r["source_value"]), _e(r["target_value"]),
                              "<span class='ok'>ok</span>" if r["ok"] else "<span class='bad'>mismatch</span>"]
                             for r in doc["reconciliation"]], {2, 3}))
    if doc["drift"]:
        parts.append("<h2>Drift</h2>")
        parts.append(_table(["stream", "metric", "column", "severity", "value", "median", "MAD", "bound", "message"],
                            [[_e(d["stream"]), _e(d["metric"]), _e(d["column_name"]), _e(d["severity"]), _e(d["value"]),
                              _e(d["median"]), _e(d["mad"]), _e(d["bound"]), _e(d["message"])] for d in doc["drift"]],
                            {4, 5, 6}))
    if doc["streams"]:
        parts.append("<h2>Where every row went</h2>")
        cols = ["source_rows", "received", "staged", "quarantined", "superseded", "tombstones", "loaded", "unchanged",
                "deleted", "lost", "late"]
        parts.append(_table(["stream", *[c.replace("_", " ") for c in cols], "partial"],
                            [[_e(s["stream"]), *[_e(s[c]) for c in cols], _e(s["partial"])] for s in doc["streams"]],
                            set(range(1, len(cols) + 1))))
    parts.append("</body></html>")
    return "\n".join(parts)
