"""Incidents: one message per incident, whatever the number of failed tasks or runs.

A source is healthy or has exactly one open incident (`sync.incident`, a partial unique index keeps
it so even when two failed tasks report at once on different workers).

Guarantees:
- `open_or_repeat()` opens the source's incident and returns `opened=True` for the first failure
  only; every later failure while it is open is counted (`failures`, `runs`) and returns False, so
  the caller alerts exactly once.
- `resolve()` closes the open incident (if any) when a run of the source succeeds and returns it, so
  the caller sends exactly one "resolved" message.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

_COLUMNS = ("incident_id", "source", "kind", "opened_run_id", "opened_task", "opened_at", "error",
            "last_run_id", "failures", "runs", "resolved_run_id", "resolved_at")


@dataclass(frozen=True)
class Incident:
    incident_id: int
    source: str
    kind: str
    opened_run_id: str
    opened_task: str | None
    opened_at: datetime
    error: str | None
    last_run_id: str
    failures: int
    runs: int
    resolved_run_id: str | None = None
    resolved_at: datetime | None = None


def open_or_repeat(cur, source: str, run_id: str, task_id: str | None, kind: str,
                   error: str | None) -> tuple[Incident, bool]:
    """Record a failure; (the open incident, whether this failure opened it)."""
    cur.execute(
        f"""insert into sync.incident as i (source, state, kind, opened_run_id, opened_task, error, last_run_id)
            values (%(source)s, 'open', %(kind)s, %(run)s, %(task)s, %(error)s, %(run)s)
            on conflict (source) where state = 'open' do update
                set failures = i.failures + 1,
                    runs = i.runs + case when i.last_run_id = excluded.last_run_id then 0 else 1 end,
                    last_run_id = excluded.last_run_id, last_at = now()
            returning {", ".join(_COLUMNS)}, (xmax = 0) as opened""",
        {"source": source, "kind": kind, "run": run_id, "task": task_id, "error": (error or "")[:2000]})
    *row, opened = cur.fetchone()
    return Incident(*row), bool(opened)


def resolve(cur, source: str, run_id: str) -> Incident | None:
    """Close the source's open incident because `run_id` succeeded; the incident, or None if there was none."""
    cur.execute(
        f"""update sync.incident set state = 'resolved', resolved_run_id = %s, resolved_at = now()
            where source = %s and state = 'open'
            returning {", ".join(_COLUMNS)}""", (run_id, source))
    row = cur.fetchone()
    return Incident(*row) if row else None


def open_incident(cur, source: str) -> Incident | None:
    cur.execute(f"select {', '.join(_COLUMNS)} from sync.incident where source = %s and state = 'open'", (source,))
    row = cur.fetchone()
    return Incident(*row) if row else None
