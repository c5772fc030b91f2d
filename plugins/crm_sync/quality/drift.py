"""Drift gate: a run's figures against a robust baseline of the stream's recent successful runs.

What is measured, per run, source and stream, in SQL aggregates into `sync.drift_metric`:
- at validate (before the load): `rows` received; `null_rate` of every mapped column (and of the
  identity columns a customer stream declares); `distinct` count of the record key and the
  key/identity columns (a fact's customer reference; a customer's id, phone and e-mail);
  `amount_sum` of every mapped money column (`entities.EntitySpec.money`); for customer streams
  the identity resolution's `merge_rate`, `review_rate` and `new_rate` (`sync.run_log.ids_*` of the
  run per resolved record); `rejection_rate` (distinct quarantined keys per received row);
- at reconcile: the run's `duration_s` (stream '*': a figure of the whole run).
Each figure is stored with its run type: 'nightly' (a full refresh or the late-row sweep) or
'hourly' (a regular incremental window) — a sweep reads a week, an hourly run an hour, so their
baselines are kept apart.

Baseline: the median and MAD of the figure over the last `drift.window` successful runs of the same
source, stream, metric, column and run type. Robust z = |x - median| / (1.4826 * MAD). When MAD is
0 (more than half of those runs had exactly the median) the scale falls back to 1.2533 * the mean
absolute deviation; when that is 0 too (every run had the same value) any change has an infinite z,
and the rule's `min_delta` / `min_rel_delta` decide whether the change is worth a word. With fewer
than `drift.min_history` runs the figure is recorded and judged by nothing (the volume gate,
`quality/volume.py`, still compares a full refresh with the last good run).

Guarantees:
- bounds come from the source YAML's `drift:` (defaults in `config.DRIFT_DEFAULTS`), never code;
- a critical deviation raises `DriftError` (a `DataQualityError`: fail-fast and the blocked-batch
  alert apply) at validate, before the load, after committing the figures and the event; the
  message names source, stream, metric, value, the baseline's median and MAD and the bound;
  nothing loads and the watermark stays;
- a warning is recorded in `sync.drift_event` with `alerted` false, logged masked, and returned;
- measuring a run again (a retried task) replaces its figures and events, never duplicates them;
- a blocked, failed or partial run never enters a baseline.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from decimal import Decimal

from psycopg2 import sql

from crm_sync import entities, staging
from crm_sync.config import DRIFT_DEFAULTS, DriftConfig, DriftRule, SourceConfig, StreamConfig
from crm_sync.masking import mask_text
from crm_sync.quality.validate import DataQualityError

log = logging.getLogger(__name__)

RUN_STREAM = "*"                   # figures of the whole run (duration)
MAD_SCALE = Decimal("1.4826")      # MAD -> standard deviation, for normally distributed figures
MEANAD_SCALE = Decimal("1.2533")   # mean absolute deviation -> standard deviation (the MAD = 0 fallback)


class DriftError(DataQualityError):
    """A figure of the batch drifted beyond a critical bound: the batch is blocked before the load."""


@dataclass(frozen=True)
class Baseline:
    history: int                   # successful runs the baseline was computed from
    median: Decimal | None
    mad: Decimal | None
    meanad: Decimal | None = None  # mean absolute deviation from the median

    @property
    def scale(self) -> Decimal:
        """The robust standard deviation: 1.4826 * MAD, else 1.2533 * mean absolute deviation, else 0."""
        if self.mad:
            return MAD_SCALE * self.mad
        if self.meanad:
            return MEANAD_SCALE * self.meanad
        return Decimal(0)


def robust_z(value: Decimal, base: Baseline) -> float:
    """|value - median| / scale; 0 for the median itself, infinite off a series that never moved."""
    delta = abs(Decimal(value) - base.median)
    if not delta:
        return 0.0
    scale = base.scale
    return float(delta / scale) if scale else math.inf


@dataclass(frozen=True)
class Finding:
    """A figure beyond its bound: a warning, or critical (the batch is blocked)."""

    source: str
    stream: str
    metric: str
    column: str
    run_type: str
    severity: str                  # warning | critical
    value: Decimal
    median: Decimal
    mad: Decimal
    history: int
    z: float | None
    bound: str

    @property
    def label(self) -> str:
        return f"{self.metric}({self.column})" if self.column else self.metric

    @property
    def detail(self) -> str:
        return (f"{self.label} = {fmt(self.metric, self.value)} against the {self.run_type} baseline median "
                f"{fmt(self.metric, self.median)}, MAD {fmt(self.metric, self.mad)} ({self.history} successful "
                f"runs): {self.bound}")

    @property
    def message(self) -> str:
        where = f"source '{self.source}'" + ("" if self.stream == RUN_STREAM else f" stream '{self.stream}'")
        return f"{where}: {self.severity} drift: {self.detail}"

    def as_dict(self) -> dict:
        """JSON-ready (XCom, alerts): numbers as text, exactly as measured."""
        return {"source": self.source, "stream": self.stream, "metric": self.metric, "column": self.column,
                "run_type": self.run_type, "severity": self.severity, "value": str(self.value),
                "median": str(self.median), "mad": str(self.mad), "history": self.history,
                "z": None if self.z is None or math.isinf(self.z) else round(self.z, 2),
                "bound": self.bound, "message": mask_text(self.message)}


def fmt(metric: str, value) -> str:
    """A figure as on-call reads it: rates in %, counts whole, sums to the cent, durations in s."""
    if value is None:
        return "n/a"
    value = Decimal(value)
    if metric.endswith("_rate"):
        return f"{value:.2%}"
    if metric == "amount_sum":
        return f"{value:.2f}"
    if metric == "duration_s":
        return f"{value:.0f}s"
    return f"{value:.0f}" if value == value.to_integral_value() else f"{value:.1f}"


def _dec(x: float) -> Decimal:
    return Decimal(str(x))


def judge(rule: DriftRule, value: Decimal, base: Baseline, *, full_refresh: bool,
          min_history: int) -> tuple[str, str, float | None] | None:
    """(severity, bound crossed, robust z) of a figure against its baseline; None when within bounds,
    when the rule is off, or when the baseline has fewer than `min_history` runs."""
    if not rule.enabled or base.history < min_history or base.median is None:
        return None
    value, median = Decimal(value), base.median
    delta = abs(value - median)
    if delta <= _dec(rule.min_delta) or delta <= _dec(rule.min_rel_delta) * abs(median):
        return None
    z = robust_z(value, base)
    crossed: list[tuple[bool, str]] = []
    if rule.critical_drop is not None and full_refresh and median > 0 and value < median:
        drop = (median - value) / median
        if drop >= _dec(rule.critical_drop):
            crossed.append((True, f"{drop:.0%} below the median on a full refresh; critical_drop is "
                                  f"{_dec(rule.critical_drop):.0%}"))
    if rule.max_ratio is not None and median >= 0 and value > median and value >= _dec(rule.max_ratio) * median:
        times = f"{value / median:.1f} times the median" if median else "above a median of 0"
        crossed.append((rule.critical, f"{times}; max_ratio is {rule.max_ratio:g}"))
    if rule.max_z is not None and z > rule.max_z:
        shown = "infinite (every baseline run had exactly the median)" if math.isinf(z) else f"{z:.1f}"
        crossed.append((rule.critical, f"robust z {shown} above max_z {rule.max_z:g}"))
    if not crossed:
        return None
    return ("critical" if any(c for c, _ in crossed) else "warning"), "; ".join(t for _, t in crossed), z


# ------------------------------------------------------------------------------ measuring ---

def figure_columns(stream: StreamConfig) -> tuple[list[str], list[str], list[str]]:
    """(null-rate columns, distinct-count columns, money columns) of a stream's staging table."""
    nullable = [name for name, fm in stream.mapping.items() if fm.value is None]  # a constant never goes missing
    distinct = ["source_pk"]
    if stream.entity == "customer":
        ident = stream.identity
        declared = [col for col, given in (("full_name", ident.name), ("phone_e164", ident.phones),
                                           ("email", ident.email), ("company", ident.company),
                                           ("city", ident.city)) if given]
        nullable += [c for c in declared if c not in nullable]
        distinct += ["customer_id"] + [c for c in ("phone_e164", "email") if c in declared]
    elif "source_customer_id" in stream.mapping:
        distinct.append("source_customer_id")
    money = [c for c in entities.get(stream.entity).money if c in stream.mapping]
    return nullable, distinct, money


def run_type(cur, run_id: str, cfg: SourceConfig, stream: str | None = None) -> tuple[str, bool]:
    """('nightly' | 'hourly', full refresh?) of a run's stream (None: of the run, any stream counts),
    from the window the extract recorded in `sync.stream_account`."""
    cur.execute(
        """select bool_or(window_since is null), bool_or(late_since is not null) from sync.stream_account
           where run_id = %s and source = %s and (%s::text is null or stream = %s)""",
        (run_id, cfg.source, stream, stream))
    full, sweep = cur.fetchone()
    if full is None:  # no account (the extract did not record one): the source's mode says
        full, sweep = cfg.sync_mode == "full", False
    return ("nightly" if full or sweep else "hourly"), bool(full)


_STREAM_FIGURES = """
insert into sync.drift_metric (run_id, source, stream, metric, column_name, run_type, full_refresh, value)
select %(run)s, %(source)s, %(stream)s, f.metric, '', %(type)s, %(full)s, f.value
from (
    select coalesce((select a.received from sync.stream_account a
                     where a.run_id = %(run)s and a.source = %(source)s and a.stream = %(stream)s),
                    (select count(*) from stg.extracted e
                     where e.run_id = %(run)s and e.source = %(source)s and e.stream = %(stream)s)) as received,
           (select count(distinct coalesce(q.source_pk, q.quarantine_id::text)) from sync.quarantine q
            where q.run_id = %(run)s and q.source = %(source)s and q.stream = %(stream)s and q.blocks_key) as rejected,
           (select count(*) from stg.resolved r where r.run_id = %(run)s and r.source = %(source)s) as resolved,
           l.ids_merged, l.ids_review, l.ids_new
    from (select) as one
    left join sync.run_log l on l.run_id = %(run)s and l.source = %(source)s
) s
cross join lateral (values
    ('rows', s.received::numeric),
    ('rejection_rate', s.rejected::numeric / nullif(s.received, 0)),
    ('merge_rate', case when %(customer)s then s.ids_merged::numeric / nullif(s.resolved, 0) end),
    ('review_rate', case when %(customer)s then s.ids_review::numeric / nullif(s.resolved, 0) end),
    ('new_rate', case when %(customer)s then s.ids_new::numeric / nullif(s.resolved, 0) end)
) as f (metric, value)
where f.value is not null
"""


def _column_figures(stream: StreamConfig) -> sql.Composed:
    """One pass over the stream's staging rows: every null rate, distinct count and money sum."""
    nullable, distinct, money = figure_columns(stream)
    aggregates, figures = [sql.SQL("count(*) as n")], []
    for prefix, columns, aggregate, value in (
            ("nn", nullable, "count(nullif({}::text, ''))", "('null_rate', {}, 1 - s.{}::numeric / nullif(s.n, 0))"),
            ("d", distinct, "count(distinct {})", "('distinct', {}, s.{}::numeric)"),
            ("s", money, "sum({})", "('amount_sum', {}, s.{}::numeric)")):
        for i, column in enumerate(columns):
            alias = sql.Identifier(f"{prefix}{i}")
            aggregates.append(sql.SQL(aggregate + " as {}").format(sql.Identifier(column), alias))
            figures.append(sql.SQL(value).format(sql.Literal(column), alias))
    schema, table = entities.get(stream.entity).staging.split(".")
    return sql.SQL("""
insert into sync.drift_metric (run_id, source, stream, metric, column_name, run_type, full_refresh, value)
select %(run)s, %(source)s, %(stream)s, f.metric, f.column_name, %(type)s, %(full)s, f.value
from (select {aggregates} from {table}
      where run_id = %(run)s and source = %(source)s and stream = %(stream)s) s
cross join lateral (values {figures}) as f (metric, column_name, value)
where f.value is not null
""").format(aggregates=sql.SQL(", ").join(aggregates), table=sql.Identifier(schema, table),
            figures=sql.SQL(", ").join(figures))


def measure(cur, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> int:
    """Store the stream's figures of this run (replacing earlier ones); return how many."""
    kind, full = run_type(cur, run_id, cfg, stream.name)
    params = {"run": run_id, "source": cfg.source, "stream": stream.name, "type": kind, "full": full,
              "customer": stream.entity == "customer"}
    cur.execute("delete from sync.drift_metric where run_id = %s and source = %s and stream = %s",
                (run_id, cfg.source, stream.name))
    cur.execute(_STREAM_FIGURES, params)
    stored = cur.rowcount
    cur.execute(_column_figures(stream), params)
    return stored + cur.rowcount


def measure_run(cur, run_id: str, cfg: SourceConfig) -> int:
    """Store the run's duration (start of its first task to the end of reconcile, or now)."""
    kind, full = run_type(cur, run_id, cfg)
    cur.execute("delete from sync.drift_metric where run_id = %s and source = %s and stream = %s",
                (run_id, cfg.source, RUN_STREAM))
    cur.execute(
        """insert into sync.drift_metric (run_id, source, stream, metric, column_name, run_type, full_refresh, value)
           select run_id, source, %s, 'duration_s', '', %s, %s,
                  extract(epoch from coalesce(finished_at, now()) - started_at)
           from sync.run_log where run_id = %s and source = %s""",
        (RUN_STREAM, kind, full, run_id, cfg.source))
    return cur.rowcount


# ------------------------------------------------------------------------------ baselines ---

# The figures to judge (`judged`), each with the median, MAD and mean absolute deviation of the
# same figure over the last N successful runs of its run type (N per stream from %(windows)s).
# The median is exact NUMERIC: the mean of the lower and upper middle values (percentile_disc).
_BASELINE = """
with judged as ({judged}),
history as (
    select c.stream, c.metric, c.column_name, c.run_type, m.value,
           row_number() over (partition by c.stream, c.metric, c.column_name, c.run_type
                              order by l.started_at desc, m.run_id desc) as k
    from judged c
    join sync.drift_metric m on m.source = %(source)s and m.stream = c.stream and m.metric = c.metric
         and m.column_name = c.column_name and m.run_type = c.run_type and m.run_id <> c.run_id
    join sync.run_log l on l.run_id = m.run_id and l.source = m.source and l.state = 'success'
),
recent as (
    select * from history h where h.k <= coalesce((%(windows)s::jsonb ->> h.stream)::int, %(window)s)
),
centre as (
    select stream, metric, column_name, run_type, count(*) as history,
           (percentile_disc(0.5) within group (order by value)
            + percentile_disc(0.5) within group (order by value desc)) / 2 as median
    from recent group by stream, metric, column_name, run_type
),
spread as (
    select r.stream, r.metric, r.column_name, r.run_type,
           (percentile_disc(0.5) within group (order by abs(r.value - c.median))
            + percentile_disc(0.5) within group (order by abs(r.value - c.median) desc)) / 2 as mad,
           avg(abs(r.value - c.median)) as meanad
    from recent r join centre c using (stream, metric, column_name, run_type)
    group by r.stream, r.metric, r.column_name, r.run_type
)
select c.run_id, c.stream, c.metric, c.column_name, c.run_type, c.full_refresh, c.value,
       coalesce(ce.history, 0), ce.median, s.mad, s.meanad
from judged c
left join centre ce using (stream, metric, column_name, run_type)
left join spread s using (stream, metric, column_name, run_type)
order by c.stream, c.metric, c.column_name, c.run_type
"""
_OF_RUN = """select run_id, stream, metric, column_name, run_type, full_refresh, value from sync.drift_metric
             where source = %(source)s and run_id = %(run)s and stream = %(stream)s"""
_LATEST = """select distinct on (m.stream, m.metric, m.column_name, m.run_type)
                    m.run_id, m.stream, m.metric, m.column_name, m.run_type, m.full_refresh, m.value
             from sync.drift_metric m
             left join sync.run_log l on l.run_id = m.run_id and l.source = m.source
             where m.source = %(source)s
             order by m.stream, m.metric, m.column_name, m.run_type, l.started_at desc nulls last,
                      m.measured_at desc"""


def baselines(cur, source: str, *, run_id: str | None = None, stream: str | None = None,
              windows: dict[str, int] | None = None, window: int = 14) -> list[tuple]:
    """(run_id, stream, metric, column, run_type, full_refresh, value, Baseline) of the figures of
    `run_id`'s `stream`, or, without a run, of the latest figure of every series of the source.
    The baseline never includes the run being judged."""
    query = _BASELINE.format(judged=_OF_RUN if run_id is not None else _LATEST)
    cur.execute(query, {"source": source, "run": run_id, "stream": stream,
                        "windows": json.dumps(windows or {}), "window": window})
    return [(*row[:7], Baseline(history=row[7], median=row[8], mad=row[9], meanad=row[10]))
            for row in cur.fetchall()]


def evaluate(cur, run_id: str, source: str, stream: str, drift: DriftConfig) -> list[Finding]:
    """The stream's figures of this run beyond their bounds."""
    findings = []
    for _, _, metric, column, kind, full, value, base in baselines(
            cur, source, run_id=run_id, stream=stream, windows={stream: drift.window}, window=drift.window):
        if metric not in DRIFT_DEFAULTS:
            continue
        verdict = judge(drift.rule(metric), value, base, full_refresh=full, min_history=drift.min_history)
        if verdict is not None:
            severity, bound, z = verdict
            findings.append(Finding(source, stream, metric, column, kind, severity, value, base.median,
                                    base.mad, base.history, z, bound))
    return findings


# ------------------------------------------------------------------------------ events -------

_EVENT_COLUMNS = ["run_id", "source", "stream", "kind", "metric", "column_name", "run_type", "severity", "value",
                  "median", "mad", "history", "z", "bound", "message", "detail"]


def _record(cur, run_id: str, source: str, stream: str, findings: list[Finding]) -> None:
    cur.execute("delete from sync.drift_event where run_id = %s and source = %s and stream = %s and kind = 'metric'",
                (run_id, source, stream))
    staging.copy_rows(cur, "sync.drift_event", _EVENT_COLUMNS, [
        (run_id, source, stream, "metric", f.metric, f.column, f.run_type, f.severity, f.value, f.median, f.mad,
         f.history, None if f.z is None else (f.z if math.isfinite(f.z) else "Infinity"), f.bound,
         mask_text(f.message), None) for f in findings])


def record_event(cur, run_id: str, source: str, stream: str, kind: str, detail, *,
                 severity: str = "critical") -> None:
    """Record drift another stage found (kind 'schema': `SchemaDriftError` from the extract's
    schema contract) in `sync.drift_event`, `alerted` false. `detail` is the error's text or a dict
    (with a 'message'); the text is stored masked, a dict as JSON (it must carry no personal
    values). Recording it again for the same run, stream and kind replaces it."""
    if severity not in ("warning", "critical"):
        raise ValueError(f"severity must be 'warning' or 'critical', not {severity!r}")
    if isinstance(detail, dict):
        text, doc = str(detail.get("message") or staging.to_json(detail)), staging.to_json(detail)
    else:
        text, doc = str(detail), None
    cur.execute("delete from sync.drift_event where run_id = %s and source = %s and stream = %s and kind = %s",
                (run_id, source, stream, kind))
    cur.execute(
        """insert into sync.drift_event (run_id, source, stream, kind, severity, message, detail)
           values (%s, %s, %s, %s, %s, %s, %s)""",
        (run_id, source, stream, kind, severity, mask_text(text), doc))


# ------------------------------------------------------------------------------ the gate -----

def _warn(findings: list[Finding]) -> list[Finding]:
    warnings = [f for f in findings if f.severity == "warning"]
    for finding in warnings:
        log.warning("%s", mask_text(finding.message))
    return warnings


def check_stream(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> list[Finding]:
    """Measure the stream's batch, judge it against its baselines, record what drifted.

    Returns the warnings; raises `DriftError` (after committing the figures and events) when a
    critical bound is crossed. Call it after the batch is mapped and validated, before the load."""
    with conn.cursor() as cur:
        measure(cur, run_id, cfg, stream)
        findings = evaluate(cur, run_id, cfg.source, stream.name, stream.drift)
        _record(cur, run_id, cfg.source, stream.name, findings)
    critical = [f for f in findings if f.severity == "critical"]
    warnings = _warn(findings)
    if critical:
        conn.commit()  # keep the evidence before failing the task
        raise DriftError(
            f"source '{cfg.source}' stream '{stream.name}': batch blocked by drift: "
            + "; ".join(f.detail for f in critical)
            + f". Nothing was loaded and the watermark did not move. If the change is real, loosen "
            f"drift.{critical[0].metric} in include/sources/{cfg.source}.yaml (or set critical: false) and clear "
            f"the task; the figures: select * from sync.drift_metric where run_id = '{run_id}' and source = "
            f"'{cfg.source}' and stream = '{stream.name}'.")
    return warnings


def check_run(conn, run_id: str, cfg: SourceConfig) -> list[Finding]:
    """Measure and judge the figures of the whole run (its duration) at reconcile; return the
    warnings (the load is done: these never block, and a failure to measure is logged, not raised,
    so it cannot undo the run's success recorded in the same transaction)."""
    with conn.cursor() as cur:
        cur.execute("savepoint drift_check_run")
        try:
            measure_run(cur, run_id, cfg)
            findings = evaluate(cur, run_id, cfg.source, RUN_STREAM, cfg.drift)
            findings = [replace(f, severity="warning") for f in findings]
            _record(cur, run_id, cfg.source, RUN_STREAM, findings)
        except Exception as exc:
            cur.execute("rollback to savepoint drift_check_run")
            log.error("drift figures of run %s of source %s were not recorded: %s", run_id, cfg.source,
                      mask_text(f"{type(exc).__name__}: {exc}"))
            return []
        cur.execute("release savepoint drift_check_run")
    return _warn(findings)


# ------------------------------------------------------------------------------ report -------

def baseline_report(conn, source: str) -> list[dict]:
    """Every series of the source (stream, metric, column, run type): its latest figure, the
    baseline it is judged against (median, MAD, runs) and the verdict — 'ok', 'warning',
    'critical', or 'learning' while the baseline has fewer than `min_history` runs."""
    from crm_sync.config import ConfigError, load_source

    try:
        cfg: SourceConfig | None = load_source(source)
    except ConfigError:
        cfg = None  # a source whose YAML is gone still has history: judged by the defaults
    run_drift = cfg.drift if cfg else DriftConfig()
    per_stream = {s.name: s.drift for s in cfg.streams} if cfg else {}
    with conn.cursor() as cur:
        rows = baselines(cur, source, windows={**{n: d.window for n, d in per_stream.items()},
                                               RUN_STREAM: run_drift.window}, window=run_drift.window)
    report = []
    for run_id, stream, metric, column, kind, full, value, base in rows:
        drift = per_stream.get(stream, run_drift)
        verdict = None
        if metric in DRIFT_DEFAULTS:
            verdict = judge(drift.rule(metric), value, base, full_refresh=full, min_history=drift.min_history)
        status = "learning" if base.history < drift.min_history else (verdict[0] if verdict else "ok")
        if verdict and stream == RUN_STREAM:
            status = "warning"
        z = robust_z(value, base) if base.median is not None else None
        report.append({
            "source": source, "stream": stream, "metric": metric, "column": column, "run_type": kind,
            "run_id": run_id, "full_refresh": full, "value": value, "median": base.median, "mad": base.mad,
            "history": base.history, "min_history": drift.min_history,
            "z": None if z is None or math.isinf(z) else round(z, 2), "status": status,
            "bound": verdict[1] if verdict else None,
        })
    return report
