"""The run log (`sync.run_log`): one row per (run, source), the figures `crm-sync status` shows."""
from __future__ import annotations

from datetime import datetime

from psycopg2 import sql

COUNTERS = {
    "rows_extracted", "rows_mapped", "rows_loaded", "rows_rejected", "ids_linked", "ids_merged",
    "ids_review", "ids_new", "api_calls", "facts_held", "facts_released", "rows_deleted", "rows_unchanged",
    "late_rows",
}
FIELDS = COUNTERS | {"state", "interval_start", "interval_end", "extract_since", "reconcile_ok",
                     "failed_task", "error", "finished_at", "partial"}


def start(cur, run_id: str, source: str, dag_id: str, interval_start: datetime | None,
          interval_end: datetime | None, task_id: str | None = None) -> None:
    """Open (or reopen) the run's row. A retry of the task that failed clears its failure; a sibling
    task starting after another one failed leaves that failure standing."""
    cur.execute(
        """
        insert into sync.run_log as l (run_id, source, dag_id, interval_start, interval_end)
        values (%(run)s, %(source)s, %(dag)s, %(start)s, %(end)s)
        on conflict (run_id, source) do update
            set state = case when l.failed_task is null or l.failed_task = %(task)s then 'running' else l.state end,
                error = case when l.failed_task is null or l.failed_task = %(task)s then null else l.error end,
                finished_at = case when l.failed_task is null or l.failed_task = %(task)s then null else l.finished_at end,
                failed_task = case when l.failed_task = %(task)s then null else l.failed_task end
        """,
        {"run": run_id, "source": source, "dag": dag_id, "start": interval_start, "end": interval_end,
         "task": task_id},
    )


def update(cur, run_id: str, source: str, **fields) -> None:
    unknown = set(fields) - FIELDS
    if unknown:
        raise ValueError(f"unknown run_log fields: {sorted(unknown)}")
    if not fields:
        return
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = %s").format(sql.Identifier(name)) for name in fields
    )
    cur.execute(
        sql.SQL("update sync.run_log set {} where run_id = %s and source = %s").format(assignments),
        [*fields.values(), run_id, source],
    )


def counts(conn, run_id: str, source: str) -> dict:
    """Figures for an alert, each read from what the run did.

    Quarantined rows are counted at every stage so far (distinct record keys that will not load),
    not the load's figure, which a blocked run never reaches. A run that loaded nothing shows no
    identity figures (they describe a load that did not happen). The top reasons are grouped by
    stream, stage and rule or field, with one (masked) example, not by raw value."""
    with conn.cursor() as cur:
        cur.execute(
            """select state, rows_extracted, rows_mapped, rows_loaded, rows_unchanged, ids_merged,
                      ids_review, ids_new, api_calls, reconcile_ok
               from sync.run_log where run_id = %s and source = %s""",
            (run_id, source),
        )
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
        result = dict(zip(names, row)) if row else {}
        cur.execute(
            """select count(distinct (stream, coalesce(source_pk, quarantine_id::text))) from sync.quarantine
               where run_id = %s and source = %s and blocks_key""", (run_id, source))
        result["rows_rejected"] = cur.fetchone()[0]
        if result and not result.get("rows_loaded") and result.get("state") not in ("success", "partial"):
            for key in ("ids_merged", "ids_review", "ids_new", "rows_unchanged"):
                result.pop(key, None)
            result["rows_loaded"] = "0 (nothing of this run reached the CRM)"
        cur.execute(
            """select stream, stage, coalesce(expectation, field, '-') as what,
                      count(distinct coalesce(source_pk, quarantine_id::text)) as n, min(reason)
               from sync.quarantine where run_id = %s and source = %s and blocks_key
               group by 1, 2, 3 order by n desc, 1, 2, 3 limit 5""",
            (run_id, source),
        )
        result["top_quarantine_reasons"] = [
            f"{stream}/{stage}: {what}: {n} rows (e.g. {reason[:160]})"
            for stream, stage, what, n, reason in cur.fetchall()
        ]
    return result


def close_abandoned(cur, source: str, run_id: str) -> list[str]:
    """Mark failed the runs of `source` still 'running' when a new run starts; return their ids.

    A DAG allows one active run (`max_active_runs=1`), so another run of the same source still
    'running' here was left so by a task that was killed (SIGKILL, OOM, a lost worker) before its
    failure callback could record anything. Its data never loaded (the load is one transaction
    and its watermarks move only with it), so this run reads that window again."""
    cur.execute(
        """update sync.run_log set state = 'failed', finished_at = now(),
                  error = coalesce(error, 'abandoned: a task of this run was killed before it could record '
                                          'its failure; closed by run ' || %(run)s)
           where source = %(source)s and run_id <> %(run)s and state = 'running'
           returning run_id""",
        {"source": source, "run": run_id})
    return sorted(r[0] for r in cur.fetchall())
