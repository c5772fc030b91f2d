"""Validate stage: a Great Expectations suite from `include/expectations/` on the mapped batch.

Each expectation carries `meta.severity`: `critical` or `warning`. Guarantees:
- every result is stored in `sync.dq_result` (GX's success and counts, and in `detail` whether the
  expectation is row- or batch-level, its tolerance and what this stage decided);
- row-level isolation: every row failing a critical ROW-level expectation (a GX map expectation:
  not null, in set, between, regex, lengths, unique, …, or a column-pair / multicolumn map one) is
  quarantined with its record key, field, expectation and a reason that names source, stream,
  record and field and shows no personal value unmasked — and the rest of the batch goes on;
- the batch is blocked (`DataQualityError`, raised after the quarantine and the results are
  committed, so load never runs and the watermark does not move) when
  * one critical row expectation fails for a larger share of the batch (unexpected_count /
    element_count) than it tolerates: 1 - its own `mostly` when it declares one, else the stream's
    `max_bad_share`;
  * the distinct rows quarantined by all critical expectations together are a larger share than
    the stream's `max_bad_share` — or, when an expectation that quarantined rows declares a looser
    `mostly`, than the loosest of those (a declared tolerance is never overruled by the total);
  * a critical BATCH-level expectation fails (table row count, column sums, means, distinct
    values, …: no single row is wrong, so none can be set aside), or a critical expectation could
    not be evaluated or did not name its failing rows;
- the error says which tolerance was exceeded, by how much, with counts and example record keys,
  and where the quarantined rows are;
- warnings are recorded, never block, never quarantine.

The expectations run in PostgreSQL (`quality/sqlchecks.py`: set-based statements over the run's
staged rows, GX's verdicts and result shapes), not in pandas: the batch never leaves the
database, only its failing rows do. An expectation type the SQL checks do not know is a
`SuiteError` naming the suite and the expectation. Great Expectations itself is imported only to
render the Data Docs page of a validation where something failed (`quality/report.py`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import date, datetime

from crm_sync import entities, paths, quarantine, staging
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.masking import mask_email, mask_phone, mask_text
from crm_sync.quality import sqlchecks
from crm_sync.quality.sqlchecks import SuiteError

log = logging.getLogger(__name__)


class DataQualityError(RuntimeError):
    """The batch is blocked, nothing of it loads: a quality tolerance was exceeded or a batch-level check failed."""


__all__ = ["DataQualityError", "SuiteError", "ValidationOutcome", "load_suite_doc", "validate_stream"]


@dataclass
class ValidationOutcome:
    rows: int
    quarantined: int
    failed_critical: list[str] = field(default_factory=list)
    failed_warning: list[str] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)  # why the batch is blocked; empty: it goes on


def load_suite_doc(name: str) -> dict:
    path = paths.expectations_dir() / f"{name}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"expectation suite {name!r} not found at {path}") from None
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path}: not valid JSON: {exc}") from None
    for i, exp in enumerate(doc.get("expectations", [])):
        severity = exp.get("meta", {}).get("severity")
        if severity not in ("critical", "warning"):
            raise SuiteError(f"{path}: expectations[{i}] ({exp.get('type')}): meta.severity must be "
                             f"'critical' or 'warning', got {severity!r}")
    sqlchecks.parse_suite(doc, f"suite {name!r} ({path})")  # every type and argument evaluable, or SuiteError
    return doc


def _run_gx(df, suite_doc: dict, asset_name: str):
    """Great Expectations' own pandas validation of a DataFrame: no longer what the stage runs, kept
    as the reference the SQL checks are compared with (tests/test_validate_sql_checks.py) and for
    the task-log test of GX's logging."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # cosmetic only
        pass
    batch = (
        context.data_sources.add_pandas("crm_sync")
        .add_dataframe_asset(asset_name)
        .add_batch_definition_whole_dataframe("run")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = gx.ExpectationSuite(name=suite_doc["name"], expectations=suite_doc["expectations"],
                                meta=suite_doc.get("meta", {}))
    return batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                "unexpected_index_column_names": ["source_pk"]})


def is_row_level(expectation_type: str) -> bool:
    """True for expectations that judge each row on its own (not null, in set, between, regex,
    lengths, unique, …): their failing rows can be set aside. Table expectations (row count)
    judge the batch as a whole."""
    return sqlchecks.level_of(expectation_type) == "row"


def _allowed(tolerance: float, rows: int) -> int:
    """How many of `rows` a tolerance lets through (rounded first: 1 - 0.9 is 0.0999…)."""
    return math.floor(round(tolerance * rows, 9))


def _pct(share: float) -> str:
    return f"{share * 100:.1f}%"


def _missing(value) -> bool:
    return sqlchecks.is_missing(value)


def _shown(column: str, value) -> str:
    """A failing value as a quarantine reason may show it: personal data masked, no Python reprs."""
    name = column.lower()
    if isinstance(value, dict):  # a row of a multicolumn expectation: each value as its column says
        return "(" + ", ".join(f"{k} {_shown(str(k), v)}" for k, v in value.items()) + ")"
    if _missing(value):
        return "(missing)"
    if "email" in name or "phone" in name:
        text = str(value)
        masked = mask_email(text) if "email" in name else mask_phone(text)
        # a malformed address or number is not recognised by the masks: show only its first character
        return repr(masked if masked != text else text[:1] + "***")
    if name in ("full_name", "name", "name_key", "contact"):
        return repr(str(value)[:1] + "***")
    if isinstance(value, list):
        return mask_text(staging.to_json(value)[:80])
    if isinstance(value, str):
        return mask_text(repr(value if len(value) <= 80 else value[:80] + "…"))
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return mask_text(str(value))


def _range(kwargs: dict) -> str:
    def bound(v):
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)

    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if low is None:
        return f"the range up to {bound(high)}"
    if high is None:
        return f"the range from {bound(low)}"
    return f"{bound(low)} … {bound(high)}"


def _what_failed(name: str, kwargs: dict, column: str, value) -> str:
    """Why one row failed one expectation, in words; 'missing value' for a None/NaN, never 'value nan'."""
    if _missing(value) or name == "expect_column_values_to_not_be_null":
        return "missing value"
    shown = _shown(column, value)
    if name == "expect_column_values_to_be_in_set":
        return f"value {shown} is not one of {list(kwargs.get('value_set') or [])}"
    if name == "expect_column_values_to_not_be_in_set":
        return f"value {shown} is one of the forbidden values {list(kwargs.get('value_set') or [])}"
    if name == "expect_column_values_to_be_between":
        return f"value {shown} is outside {_range(kwargs)}"
    if name == "expect_column_value_lengths_to_be_between":
        return f"value of {len(str(value))} characters is outside the lengths {_range(kwargs)}"
    if name == "expect_column_value_lengths_to_equal":
        return f"value of {len(str(value))} characters is not {kwargs.get('value')} characters long"
    if name == "expect_column_values_to_match_regex":
        return f"value {shown} does not match {kwargs.get('regex')}"
    if name == "expect_column_values_to_not_match_regex":
        return f"value {shown} matches the forbidden pattern {kwargs.get('regex')}"
    if name == "expect_column_values_to_be_unique":
        return f"value {shown} occurs in more than one row of the batch"
    return f"value {shown} is unexpected"


def _column_of(kwargs: dict) -> str:
    if kwargs.get("column"):
        return kwargs["column"]
    if kwargs.get("column_A"):
        return f"{kwargs['column_A']},{kwargs.get('column_B', '')}"
    return ",".join(kwargs.get("column_list") or [])


def _exception_message(info) -> str | None:
    """GX reports an expectation that could not run either at the top level or per metric."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception") and info.get("exception_message"):
        return str(info["exception_message"])
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "exception without a message")
    return None


def _examples(keys: list) -> str:
    shown = ", ".join(repr(str(k)) for k in keys[:5])
    return f"records {shown}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _severity(check: sqlchecks.Check) -> str:
    return check.meta.get("severity", "critical")


def validate_stream(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> ValidationOutcome:
    suite_doc = load_suite_doc(stream.expectation_suite)
    checks = sqlchecks.parse_suite(suite_doc, f"suite {stream.expectation_suite!r}")
    table = entities.get(stream.entity).staging
    max_bad = stream.max_bad_share
    with conn.cursor() as cur:
        cur.execute("delete from sync.dq_result where run_id = %s and source = %s and stream = %s",
                    (run_id, cfg.source, stream.name))
        quarantine.clear(cur, run_id, cfg.source, stream.name, stage="validate")
        result = sqlchecks.run_suite(cur, table, run_id, cfg.source, stream.name, suite_doc["name"], checks,
                                     critical=lambda check: _severity(check) == "critical")
        rows = result.element_count
        outcome = ValidationOutcome(rows=rows, quarantined=0)
        if not rows:
            return outcome
        rejects: list[quarantine.Reject] = []
        dq_rows = []
        # tolerances of the row expectations that quarantined rows and declare their own `mostly`
        declared: list[tuple[float, str]] = []
        for r in result.results:
            check = r.check
            severity = _severity(check)
            kwargs = check.kwargs
            column = _column_of(kwargs)
            name = check.type
            label = f"{name}({column})" if column else name
            res = r.result or {}
            error = _exception_message(r.exception_info)
            total = res.get("element_count") or rows
            unexpected = res.get("unexpected_count")
            row_level = is_row_level(name)
            decision, tolerance = "passed" if r.success and not error else "failed", None
            if not r.success or error:
                seen = error or f"{unexpected if unexpected is not None else '?'} of {total} rows"
                (outcome.failed_critical if severity == "critical" else outcome.failed_warning).append(
                    f"{label}: {seen}")
            if severity == "critical":
                index_list = res.get("unexpected_index_list")
                if error:
                    decision = "blocked"
                    outcome.breaches.append(f"{label} could not be evaluated: {error}")
                elif not row_level:
                    if not r.success:
                        decision = "blocked"
                        observed = res.get("observed_value")
                        outcome.breaches.append(
                            f"{label} failed" + (f" (observed {observed})" if observed is not None else "")
                            + ": a batch-level expectation tolerates no failure, no single row can be set aside")
                elif unexpected and (index_list is None or len(index_list) < unexpected):
                    decision = "blocked"
                    outcome.breaches.append(f"{label} failed for {unexpected} of {total} rows but named "
                                            f"{len(index_list or [])} of them, so they cannot be set aside")
                elif unexpected:
                    mostly = kwargs.get("mostly")
                    if mostly is not None:
                        tolerance, whose = 1 - float(mostly), f"its own mostly = {mostly}"
                        declared.append((tolerance, label))
                    else:
                        tolerance, whose = max_bad, f"the stream's max_bad_share = {max_bad}"
                    allowed = _allowed(tolerance, total)
                    keys = [item.get("source_pk") for item in index_list if isinstance(item, dict)]
                    decision = "quarantined"
                    if unexpected > allowed:
                        decision = "blocked"
                        share = unexpected / total
                        outcome.breaches.append(
                            f"{label} failed for {unexpected} of {total} rows ({_pct(share)}), more than the "
                            f"{_pct(tolerance)} ({allowed} rows) tolerated by {whose}: over by "
                            f"{(share - tolerance) * 100:.1f} percentage points, {unexpected - allowed} rows too many "
                            f"({_examples(keys)})")
                    for item in index_list:
                        if not isinstance(item, dict):
                            continue
                        pk = item.get("source_pk")
                        values = [v for k, v in item.items() if k != "source_pk"]
                        bad = values[0] if len(values) == 1 else (None if not values else dict(
                            (k, v) for k, v in item.items() if k != "source_pk"))
                        why = _what_failed(name, kwargs, column, bad)
                        rejects.append(quarantine.Reject(
                            stream.name, pk, "validate", column or None,
                            f"{quarantine.where(cfg.source, stream.name, pk, column or None)}: {name} failed: {why}",
                            result.payloads.get(pk), expectation=name))
            dq_rows.append((run_id, cfg.source, stream.name, name, column, severity, bool(r.success),
                            res.get("element_count"), unexpected,
                            staging.to_json({"kwargs": kwargs,
                                             "level": "row" if row_level else "batch",
                                             "decision": decision if severity == "critical" else "recorded",
                                             "tolerance": tolerance,
                                             "partial_unexpected_list": [None if _missing(v) else v
                                                                         for v in res.get("partial_unexpected_list", [])[:20]],
                                             "exception": error})))
        outcome.quarantined = len({r.source_pk for r in rejects})
        if outcome.quarantined:
            loosest = max([(max_bad, f"the stream's max_bad_share = {max_bad}")] + declared)
            allowed = _allowed(loosest[0], rows)
            if outcome.quarantined > allowed:
                share = outcome.quarantined / rows
                whose = loosest[1] if loosest[1].startswith("the stream") else f"the own mostly of {loosest[1]}"
                outcome.breaches.append(
                    f"together the critical expectations quarantined {outcome.quarantined} distinct rows of "
                    f"{rows} ({_pct(share)}), more than the {_pct(loosest[0])} ({allowed} rows) tolerated by "
                    f"{whose}: over by {(share - loosest[0]) * 100:.1f} percentage points, "
                    f"{outcome.quarantined - allowed} rows too many")
        staging.copy_rows(cur, "sync.dq_result",
                          ["run_id", "source", "stream", "expectation", "column_name", "severity", "success",
                           "element_count", "unexpected_count", "detail"], _dedupe(dq_rows))
        quarantine.add(cur, run_id, cfg.source, rejects)
    _report(conn, run_id, cfg, stream, suite_doc, result)
    if outcome.breaches:
        conn.commit()  # keep the evidence before failing the task
        raise DataQualityError(
            f"source '{cfg.source}' stream '{stream.name}': batch blocked by suite "
            f"'{stream.expectation_suite}' ({rows} rows validated): " + "; ".join(outcome.breaches)
            + f". {outcome.quarantined} rows quarantined at stage 'validate': select source_pk, field, expectation,"
            f" reason from sync.quarantine where run_id = '{run_id}' and source = '{cfg.source}' and stream = "
            f"'{stream.name}' and stage = 'validate'; nothing was loaded and the watermark did not move."
        )
    return outcome


def _report(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig, suite_doc: dict, result) -> None:
    """GX Data Docs of this validation (masked) and the run's quality report: `quality/report.py`.
    Before the blocked batch's commit, so the alert can link them; a report never fails the gate."""
    from crm_sync.quality import report

    report.after_validation(conn, run_id, cfg, stream, suite_doc, result)


def _dedupe(rows):
    seen = set()
    for row in rows:
        key = (row[3], row[4])
        if key in seen:  # the same expectation twice on one column: keep the first result
            continue
        seen.add(key)
        yield row
