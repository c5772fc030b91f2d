"""Run one source's DAG in-process, inject faults between its tasks, and account for every source row.

`Pipeline(source).run(start, end)` builds the source's DAG (`dag_factory.build_dag`) and calls
each task's callable in the DAG's topological order (`extract.<stream>` …, `resolve.identities`,
`map.<stream>` …, `validate.<stream>` …, `load.publish`, `reconcile.check`) with the context
Airflow gives them (run id, data interval, the DAG's params with the trigger's values, the DAG
run's type), the way `dag.test()` runs a DAG, but in this process so a test can act between two
tasks (`before={"load.publish": fn}`), kill the run at a task (`kill_at=`: no failure callback
runs, as after a SIGKILL) or run a failed task again (`result.retry()`: the failed task and
everything after it, same run id, as an Airflow retry does; `result.clear()`: the whole DAG run).
A failing task stops the run like an upstream failure does; its error is kept as the text a user
sees in the task log (`result.error_text`), and the DAG's failure callback runs with it (its
e-mail captured by the case, not sent).

`account(...)` answers, per case, where each row the source holds went. The rows come from the
source itself (its database, or the API simulator's store), never from the pipeline's figures
(`sync.stream_account`, `sync.run_log` counters); where they went is read from the CRM:
- loaded: in the CRM table with the source's current content (`source_updated_at` equals the
  source's cursor), written by the case's last run; unchanged: the same, written by an earlier run;
- held: a fact waiting for its customer (`sync.held_fact`, not yet released);
- quarantined: a `blocks_key` row of `sync.quarantine` in the last run that saw the key (staged
  it in `stg.extracted` or quarantined it);
- superseded: an older version of a key delivered twice, whose newest version is accounted and
  whose own non-blocking quarantine row is there;
- lost: none of these (missing, stale content, or soft-deleted while the source still holds it).
`duplicated` counts a source key present more than once in a CRM table or link table (after
reducing the ways a source may spell a key, `1` / `1.0` / ` 1`, to one), a fact both loaded and
still held, and a row loaded again by a later run although its content and customer did not
change (from `snapshot()`s taken after each run). `ghosts` counts live CRM rows of the source
whose key the source no longer holds (deletes that never arrived).
"""
from __future__ import annotations

import re
import time
import types
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

from crm_sync import entities
from crm_sync.config import SourceConfig, load_source

NOW = datetime.now(timezone.utc)
# the end of the ERP's latest complete nightly interval (02:00 UTC): every case's first run ends here,
# the seeded sources hold rows up to 5 minutes before it
END = NOW.replace(hour=2, minute=0, second=0, microsecond=0) - (timedelta(days=1) if NOW.hour < 2 else timedelta())
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
FIX = END + timedelta(minutes=30)   # when a source's clerk fixes a bad row (read by the next run)


def the_dag(source: str):
    """The source's DAG as Airflow parses it (`dag_factory.build_dag`): its tasks, order and params."""
    from crm_sync.dag_factory import build_dag

    return build_dag(source)


def error_text(exc: BaseException) -> str:
    """What the task log shows as the task's error (AirflowFailException already carries the cause's name)."""
    from airflow.sdk.exceptions import AirflowFailException

    if isinstance(exc, AirflowFailException):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class RunResult:
    pipeline: "Pipeline"
    run_id: str
    context: dict
    outputs: dict[str, object] = field(default_factory=dict)
    failed_task: str | None = None
    error: BaseException | None = None
    killed_at: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)   # per task, wall clock

    @property
    def ok(self) -> bool:
        return self.error is None and self.killed_at is None

    @property
    def error_text(self) -> str:
        return error_text(self.error) if self.error is not None else ""

    @property
    def retryable(self) -> bool:
        """Whether Airflow would retry the failed task (anything but AirflowFailException)."""
        from airflow.sdk.exceptions import AirflowFailException

        return self.error is not None and not isinstance(self.error, AirflowFailException)

    def retry(self, **kw) -> "RunResult":
        """Run the failed (or killed) task again and everything after it, in the same DAG run."""
        start = self.failed_task or self.killed_at
        assert start, "nothing to retry: the run did not fail"
        return self.pipeline._run(self.run_id, self.context, from_task=start, **kw)

    def clear(self, **kw) -> "RunResult":
        """Clear the whole DAG run: every task again, same run id."""
        return self.pipeline._run(self.run_id, self.context, **kw)


class Pipeline:
    """One source's DAG, run task by task in this process."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.runs: list[RunResult] = []

    @property
    def cfg(self) -> SourceConfig:
        return load_source(self.source)

    def run(self, start: datetime | None, end: datetime, *, run_type: str = "scheduled",
            run_id: str | None = None, params: dict | None = None, **kw) -> RunResult:
        run_id = run_id or f"{run_type}__{end.isoformat()}" + (f"__{len(self.runs)}" if run_type == "manual" else "")
        dag = the_dag(self.source)
        dag_run = types.SimpleNamespace(run_id=run_id, run_type=run_type, conf=params or {},
                                        data_interval_start=start, data_interval_end=end)
        context = {"run_id": run_id, "data_interval_start": start, "data_interval_end": end,
                   "params": {**dag.params.dump(), **(params or {})}, "dag_run": dag_run}
        return self._run(run_id, context, dag=dag, **kw)

    def _run(self, run_id: str, context: dict, *, dag=None, from_task: str | None = None,
             before: dict[str, Callable[[dict], None]] | None = None, kill_at: str | None = None) -> RunResult:
        result = RunResult(self, run_id, context)
        dag = dag or the_dag(self.source)
        order = [t.task_id for t in dag.topological_sort()]
        if from_task is not None:
            order = order[order.index(from_task):]
        for task_id in order:
            hook = (before or {}).get(task_id)
            if hook is not None:
                hook(context)
            if task_id == kill_at:
                result.killed_at = task_id  # SIGKILL: no exception handling, no callback
                break
            started = time.monotonic()
            try:
                task = dag.get_task(task_id)
                result.outputs[task_id] = task.python_callable(*task.op_args, **task.op_kwargs, **context)
            except Exception as exc:  # noqa: BLE001 - the task failed; Airflow would record it
                result.failed_task, result.error = task_id, exc
                self._on_failure(task_id, context, exc)
                break
            finally:
                result.seconds[task_id] = time.monotonic() - started
        self.runs.append(result)
        return result

    def _on_failure(self, task_id: str, context: dict, exc: BaseException) -> None:
        from crm_sync.tasks import FailureCallback

        cfg = self.cfg
        ti = types.SimpleNamespace(task_id=task_id, try_number=1, dag_id=cfg.dag_id, run_id=context["run_id"],
                                   log_url=None, map_index=-1, max_tries=cfg.retries)
        FailureCallback(self.source)({**context, "exception": exc, "ti": ti, "task_instance": ti,
                                      "task": types.SimpleNamespace(task_id=task_id)})


# --- accounting -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceRow:
    stream: str
    key: str | None
    cursor: datetime | None


@dataclass
class Account:
    source_rows: int = 0
    loaded: int = 0
    unchanged: int = 0
    quarantined: int = 0
    superseded: int = 0
    held: int = 0
    lost: int = 0
    duplicated: int = 0
    ghosts: int = 0
    lost_rows: list = field(default_factory=list)
    duplicated_keys: list = field(default_factory=list)
    ghost_keys: list = field(default_factory=list)

    def __str__(self) -> str:
        figures = ", ".join(f"{k} {getattr(self, k)}" for k in ("source_rows", "loaded", "unchanged", "quarantined",
                                                                 "superseded", "held", "lost", "duplicated", "ghosts"))
        detail = ""
        if self.lost_rows:
            detail += f"; lost: {self.lost_rows[:5]}"
        if self.duplicated_keys:
            detail += f"; duplicated: {self.duplicated_keys[:5]}"
        if self.ghost_keys:
            detail += f"; ghosts: {self.ghost_keys[:5]}"
        return figures + detail


def _ts(value) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def same_key(value) -> str | None:
    """A key as a source may spell it in several ways (`1`, `1.0`, ` 1`), reduced to one form.

    Written here, not taken from `crm_sync.keys`, so that the suite does not check the pipeline's
    key handling with the pipeline's own code."""
    if value is None:
        return None
    text = str(value).strip()
    match = re.fullmatch(r"(-?\d+)\.0+", text)
    return match.group(1) if match else (text or None)


def sql_rows(src_conn, cfg: SourceConfig) -> list[SourceRow]:
    """Every row of each stream's table as the source database holds it (the stream query, unwindowed)."""
    rows: list[SourceRow] = []
    with src_conn.cursor() as cur:
        for stream in cfg.streams:
            cur.execute(f'select q."{stream.primary_key}", q."{stream.cursor_field}" '
                        f"from ({stream.query.rstrip().rstrip(';')}) q")
            rows += [SourceRow(stream.name, same_key(k), _ts(c)) for k, c in cur.fetchall()]
    src_conn.rollback()
    return rows


def store_rows(records: dict[str, Iterable[dict]], key: str = "id", cursor: str = "updated_at") -> list[SourceRow]:
    """Every record of an API simulator's store, per stream (`{"users": store.users, ...}`)."""
    return [SourceRow(stream, same_key(r.get(key)) if not isinstance(r.get(key), (dict, list)) else repr(r.get(key)),
                      _safe_ts(r.get(cursor)))
            for stream, recs in records.items() for r in recs]


def _safe_ts(value) -> datetime | None:
    try:
        return _ts(value)
    except (TypeError, ValueError):
        return None


Window = tuple  # (since | None, until)


def in_windows(row: SourceRow, windows: list[Window], now: datetime, future_skew: timedelta) -> bool:
    """Whether a run reading these windows must account for the row: its cursor is in one of them,
    is NULL (a stray every run sees), or lies beyond the source's clock (clamped, never skipped)."""
    if row.cursor is None or row.cursor > now + future_skew:
        return True
    return any((since is None or row.cursor >= since) and row.cursor < until for since, until in windows)


def _q(conn, sql: str, params=()) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _key_matches(quarantined_pk: str | None, key: str) -> bool:
    if quarantined_pk is None:
        return False
    if quarantined_pk == key:
        return True
    # an over-long key is quarantined under its first 80 characters and an ellipsis
    return quarantined_pk.endswith("…") and key.startswith(quarantined_pk[:-1])


def account(crm_conn, cfg: SourceConfig, source_rows: list[SourceRow], windows: list[Window], *,
            snapshots: list[dict] | None = None, now: datetime | None = None) -> Account:
    """Where every source row in `windows` went (see the module doc). `snapshots` (of `snapshot()`,
    one after each successful run) find rows loaded twice."""
    now = now or datetime.now(timezone.utc)
    skew = timedelta(minutes=cfg.future_skew_minutes)
    acc = Account()
    runs = [r[0] for r in _q(crm_conn, "select run_id from sync.run_log where source = %s order by started_at",
                             (cfg.source,))]
    last_run = runs[-1] if runs else None
    rank = {r: i for i, r in enumerate(runs)}
    held = {(s, k) for s, k in _q(crm_conn, "select stream, source_pk from sync.held_fact where source = %s "
                                            "and released_run_id is null", (cfg.source,))}
    by_stream: dict[str, list[SourceRow]] = {}
    for row in source_rows:
        by_stream.setdefault(row.stream, []).append(row)
    for stream in cfg.streams:
        spec = entities.get(stream.entity)
        target = {k: (updated, loaded_by, deleted) for k, updated, loaded_by, deleted in _q(
            crm_conn, f"select {spec.key}, source_updated_at, loaded_run_id, deleted_at is not null "
                      f"from {spec.target} where source = %s", (cfg.source,))}
        # the runs that saw each key: staged it, or quarantined it (blocking or not)
        seen: dict[str, list[tuple[str, bool | None]]] = {}
        for run_id, pk in _q(crm_conn, "select run_id, source_pk from stg.extracted where source = %s and stream = %s",
                             (cfg.source, stream.name)):
            seen.setdefault(pk, []).append((run_id, None))
        quarantine = _q(crm_conn, "select run_id, source_pk, blocks_key from sync.quarantine "
                                  "where source = %s and stream = %s", (cfg.source, stream.name))
        rows = [r for r in by_stream.get(stream.name, []) if in_windows(r, windows, now, skew)]
        keys: dict[str | None, list[SourceRow]] = {}
        for row in rows:
            keys.setdefault(row.key, []).append(row)
        keyless = keys.pop(None, [])  # no key: each row must be in the quarantine of some run
        for row in keyless:
            acc.source_rows += 1
            if any(pk is None and blocks for _, pk, blocks in quarantine):
                acc.quarantined += 1
            else:
                acc.lost += 1
                acc.lost_rows.append((stream.name, None, "a row without a key, not quarantined"))
        for key, versions in keys.items():
            versions.sort(key=lambda r: (r.cursor is not None, r.cursor or datetime.min.replace(tzinfo=timezone.utc)))
            newest, older = versions[-1], versions[:-1]
            acc.source_rows += len(versions)
            marks = list(seen.get(key, []))
            marks += [(run, blocks) for run, pk, blocks in quarantine if _key_matches(pk, key)]
            latest = max((rank.get(run, -1) for run, _ in marks), default=None)
            blocked_last = latest is not None and any(rank.get(run, -1) == latest and blocks for run, blocks in marks)
            superseded_last = latest is not None and any(rank.get(run, -1) == latest and blocks is False
                                                         for run, blocks in marks)
            current = target.get(key)
            expected = newest.cursor
            fresh = current is not None and not current[2] and (
                expected is None or current[0] is None or current[0] == expected)
            if fresh:
                if current[1] == last_run:
                    acc.loaded += 1
                else:
                    acc.unchanged += 1
                accounted = True
            elif (stream.name, key) in held:  # (held facts are also quarantined "customer not known yet")
                acc.held += 1
                accounted = True
            elif blocked_last:
                acc.quarantined += 1
                accounted = True
            else:
                acc.lost += 1
                why = ("deleted in the CRM" if current and current[2] else
                       f"stale (CRM has {current[0]}, source {expected})" if current else "not in the CRM")
                acc.lost_rows.append((stream.name, key[:40], why))
                accounted = False
            for row in older:
                if accounted and superseded_last:
                    acc.superseded += 1
                else:
                    acc.lost += 1
                    acc.lost_rows.append((stream.name, key[:40], f"older version {row.cursor} unaccounted"))
        # duplicates: one source key, several CRM rows; a fact both loaded and held
        spelled: dict[str, list[str]] = {}
        for k in target:
            spelled.setdefault(same_key(k), []).append(k)
        for k, spellings in spelled.items():
            if len(spellings) > 1:
                acc.duplicated += len(spellings) - 1
                acc.duplicated_keys.append((stream.name, spellings))
        for s, k in held:
            if s == stream.name and k in target and not target[k][2]:
                acc.duplicated += 1
                acc.duplicated_keys.append((stream.name, k, "loaded and still held"))
        source_keys = {r.key for r in by_stream.get(stream.name, [])}
        for k, (_, _, deleted) in target.items():
            if not deleted and same_key(k) not in source_keys:
                acc.ghosts += 1
                acc.ghost_keys.append((stream.name, k))
    links = _q(crm_conn, "select source_id from crm.customer_link where source = %s", (cfg.source,))
    linked: dict[str, int] = {}
    for (k,) in links:
        linked[same_key(k)] = linked.get(same_key(k), 0) + 1
    for k, n in linked.items():
        if n > 1:
            acc.duplicated += n - 1
            acc.duplicated_keys.append(("customer_link", k))
    for before, after in zip(snapshots or [], (snapshots or [])[1:]):
        for where, (row_hash, run, customer) in after.items():
            was = before.get(where)
            if was is not None and was[0] == row_hash and was[2] == customer and was[1] != run:
                acc.duplicated += 1
                acc.duplicated_keys.append((*where, f"loaded again by {run} unchanged"))
    return acc


def snapshot(crm_conn, cfg: SourceConfig) -> dict:
    """(table, key) -> (row_hash, loaded_run_id, customer_id) of the source's CRM rows."""
    out = {}
    for stream in cfg.streams:
        spec = entities.get(stream.entity)
        for key, row_hash, run, customer in _q(crm_conn, f"select {spec.key}, row_hash, loaded_run_id, customer_id "
                                                         f"from {spec.target} where source = %s", (cfg.source,)):
            out[(spec.target, key)] = (row_hash, run, customer)
    crm_conn.rollback()
    return out
