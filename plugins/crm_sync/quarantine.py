"""Quarantine: rejected rows are kept with the stage, field and reason, never silently dropped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from crm_sync import staging


@dataclass(frozen=True)
class Reject:
    stream: str
    source_pk: str | None
    stage: str
    field: str | None
    reason: str
    payload: dict | None = None
    expectation: str | None = None


# SQL predicate on a staging row aliased `m`: true when no stage of its run quarantined it.
ACCEPTED = """
    not exists (select 1 from sync.quarantine q
                where q.run_id = m.run_id and q.source = m.source and q.stream = m.stream
                  and q.source_pk = m.source_pk)
"""


def clear(cur, run_id: str, source: str, stream: str, stage: str) -> None:
    cur.execute(
        "delete from sync.quarantine where run_id = %s and source = %s and stream = %s and stage = %s",
        (run_id, source, stream, stage),
    )


def add(cur, run_id: str, source: str, rejects: Iterable[Reject]) -> int:
    return staging.copy_rows(
        cur, "sync.quarantine",
        ["run_id", "source", "stream", "source_pk", "stage", "field", "reason", "expectation", "payload"],
        ((run_id, source, r.stream, r.source_pk, r.stage, r.field, r.reason, r.expectation,
          staging.to_json(r.payload) if r.payload is not None else None) for r in rejects),
    )


def rejected_keys(cur, run_id: str, source: str, stream: str) -> set[str]:
    cur.execute(
        "select distinct source_pk from sync.quarantine where run_id = %s and source = %s and stream = %s"
        " and source_pk is not null",
        (run_id, source, stream),
    )
    return {row[0] for row in cur.fetchall()}
