"""Validate stage: a Great Expectations suite from `include/expectations/` on the mapped batch.

Each expectation carries `meta.severity`: `critical` or `warning`. Guarantees:
- every result is stored in `sync.dq_result`;
- rows failing a critical expectation are quarantined with the expectation's name (they never
  load), even when the expectation as a whole passes thanks to its `mostly`;
- when a critical expectation fails as a whole (more bad rows than `mostly` tolerates), the batch
  is blocked: `DataQualityError` is raised after the quarantine and results are committed, so
  load never runs and the watermark does not move;
- warnings are recorded, never block, never quarantine.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from crm_sync import paths, quarantine, staging
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync import entities

log = logging.getLogger(__name__)


class DataQualityError(RuntimeError):
    """A critical expectation failed: the batch is blocked and its bad rows are quarantined."""


class SuiteError(ValueError):
    """An expectation suite file is missing or malformed."""


@dataclass
class ValidationOutcome:
    rows: int
    quarantined: int
    failed_critical: list[str] = field(default_factory=list)
    failed_warning: list[str] = field(default_factory=list)


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
    return doc


def _run_gx(df, suite_doc: dict, asset_name: str):
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


def _frame(cur, table: str, run_id: str, source: str, stream: str):
    import pandas as pd

    cur.execute(f"select * from {table} where run_id = %s and source = %s and stream = %s order by source_pk",
                (run_id, source, stream))
    names = [d[0] for d in cur.description]
    return pd.DataFrame.from_records(cur.fetchall(), columns=names)


def validate_stream(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> ValidationOutcome:
    suite_doc = load_suite_doc(stream.expectation_suite)
    table = entities.get(stream.entity).staging
    with conn.cursor() as cur:
        df = _frame(cur, table, run_id, cfg.source, stream.name)
        cur.execute("delete from sync.dq_result where run_id = %s and source = %s and stream = %s",
                    (run_id, cfg.source, stream.name))
        quarantine.clear(cur, run_id, cfg.source, stream.name, stage="validate")
        outcome = ValidationOutcome(rows=len(df), quarantined=0)
        if df.empty:
            return outcome
        result = _run_gx(df, suite_doc, f"{cfg.source}_{stream.name}")
        payloads = {row["source_pk"]: row for row in json.loads(df.to_json(orient="records", date_format="iso"))}
        rejects: list[quarantine.Reject] = []
        dq_rows = []
        for r in result.results:
            exp = r.expectation_config
            severity = exp.meta.get("severity", "critical")
            column = exp.kwargs.get("column") or exp.kwargs.get("column_A") or ""
            name = exp.type
            res = r.result or {}
            if not r.success:
                (outcome.failed_critical if severity == "critical" else outcome.failed_warning).append(
                    f"{name}({column}): {res.get('unexpected_count', '?')} of {res.get('element_count', len(df))} rows")
            dq_rows.append((run_id, cfg.source, stream.name, name, column, severity, bool(r.success),
                            res.get("element_count"), res.get("unexpected_count"),
                            staging.to_json({"kwargs": {k: v for k, v in exp.kwargs.items() if k != "batch_id"},
                                             "partial_unexpected_list": [None if v != v else v  # NaN is no JSON
                                                                         for v in res.get("partial_unexpected_list", [])[:20]],
                                             "exception": r.exception_info.get("exception_message")
                                             if isinstance(r.exception_info, dict) else None})))
            if severity != "critical":
                continue
            for item in res.get("unexpected_index_list") or []:
                pk = item.get("source_pk") if isinstance(item, dict) else None
                bad = item.get(column) if isinstance(item, dict) and column else None
                rejects.append(quarantine.Reject(
                    stream.name, pk, "validate", column or None,
                    f"{name} failed for value {bad!r}" if column else f"{name} failed",
                    payloads.get(pk), expectation=name))
        staging.copy_rows(cur, "sync.dq_result",
                          ["run_id", "source", "stream", "expectation", "column_name", "severity", "success",
                           "element_count", "unexpected_count", "detail"], _dedupe(dq_rows))
        quarantine.add(cur, run_id, cfg.source, rejects)
        outcome.quarantined = len({r.source_pk for r in rejects})
    if outcome.failed_critical:
        conn.commit()  # keep the evidence before failing the task
        raise DataQualityError(
            f"source '{cfg.source}' stream '{stream.name}': batch blocked by suite "
            f"'{stream.expectation_suite}': " + "; ".join(outcome.failed_critical)
            + f". {outcome.quarantined} rows quarantined in sync.quarantine (run_id = '{run_id}'); "
            "nothing was loaded and the watermark did not move."
        )
    return outcome


def _dedupe(rows):
    seen = set()
    for row in rows:
        key = (row[3], row[4])
        if key in seen:  # the same expectation twice on one column: keep the first result
            continue
        seen.add(key)
        yield row
