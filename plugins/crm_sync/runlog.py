"""The run log (`sync.run_log`): one row per (run, source), the figures `crm-sync status` shows."""
from __future__ import annotations

from datetime import datetime

from psycopg2 import sql

COUNTERS = {
    "rows_extracted", "rows_mapped", "rows_loaded", "rows_rejected", "ids_linked", "ids_merged",
    "ids_review", "ids_new", "api_calls",
}
FIELDS = COUNTERS | {"state", "interval_start", "interval_end", "extract_since", "reconcile_ok",
                     "failed_task", "error", "finished_at"}


def start(cur, run_id: str, source: str, dag_id: str, interval_start: datetime | None,
          interval_end: datetime | None) -> None:
    cur.execute(
        """
        insert into sync.run_log (run_id, source, dag_id, interval_start, interval_end)
        values (%s, %s, %s, %s, %s)
        on conflict (run_id, source) do update
            set state = 'running', failed_task = null, error = null, finished_at = null
        """,
        (run_id, source, dag_id, interval_start, interval_end),
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
    """Figures for an alert: the run-log row plus the most frequent quarantine reasons."""
    with conn.cursor() as cur:
        cur.execute(
            """select state, rows_extracted, rows_mapped, rows_loaded, rows_rejected, ids_merged,
                      ids_review, ids_new, api_calls, reconcile_ok
               from sync.run_log where run_id = %s and source = %s""",
            (run_id, source),
        )
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
        result = dict(zip(names, row)) if row else {}
        cur.execute(
            """select stream, stage, coalesce(expectation, field, '-') as what, reason, count(*)
               from sync.quarantine where run_id = %s and source = %s
               group by 1, 2, 3, 4 order by count(*) desc limit 5""",
            (run_id, source),
        )
        result["top_quarantine_reasons"] = [
            f"{stream}/{stage}: {what}: {reason} ({n} rows)" for stream, stage, what, reason, n in cur.fetchall()
        ]
    return result
