"""Quarantine: rejected rows are kept with the stage, field and reason, never silently dropped.

A quarantine row either rejects its key for the run (`blocks_key`, the default: the key does not
load) or only records a version that was not kept (an older duplicate of a key inside one batch,
`blocks_key = false`): that one never stops the key's kept version from loading.
"""
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
    blocks_key: bool = True


# SQL predicate on a staging row aliased `m`: true when no stage of its run quarantined its key.
ACCEPTED = """
    not exists (select 1 from sync.quarantine q
                where q.run_id = m.run_id and q.source = m.source and q.stream = m.stream
                  and q.source_pk = m.source_pk and q.blocks_key)
"""


def where(source: str, stream: str, source_pk, field: str | None) -> str:
    """How an error text names the place of a bad value: source, stream, record key and field."""
    text = f"source '{source}' stream '{stream}' record {_key(source_pk)}"
    return text + (f" field '{field}'" if field else "")


def _key(source_pk) -> str:
    if source_pk is None:
        return "(no key)"
    text = str(source_pk)
    return repr(text if len(text) <= 80 else text[:80] + "…")


def clear(cur, run_id: str, source: str, stream: str, stage: str) -> None:
    cur.execute(
        "delete from sync.quarantine where run_id = %s and source = %s and stream = %s and stage = %s",
        (run_id, source, stream, stage),
    )


def add(cur, run_id: str, source: str, rejects: Iterable[Reject]) -> int:
    return staging.copy_rows(
        cur, "sync.quarantine",
        ["run_id", "source", "stream", "source_pk", "stage", "field", "reason", "expectation", "payload",
         "blocks_key"],
        ((run_id, source, r.stream, r.source_pk, r.stage, r.field, r.reason, r.expectation,
          staging.to_json(r.payload) if r.payload is not None else None, r.blocks_key) for r in rejects),
    )


def rejected_keys(cur, run_id: str, source: str, stream: str) -> set[str]:
    """Keys of the stream that do not load in this run (superseded-version records excluded)."""
    cur.execute(
        "select distinct source_pk from sync.quarantine where run_id = %s and source = %s and stream = %s"
        " and source_pk is not null and blocks_key",
        (run_id, source, stream),
    )
    return {row[0] for row in cur.fetchall()}
