"""Extract stage: source records into `stg.extracted` for one run, all or nothing.

Guarantees: the run's previous staging rows for the stream are replaced in the same transaction
(a retried task starts clean); rows are written with COPY; a record without its primary key or
cursor is quarantined with the field named, never dropped; duplicates of one key inside the
batch (a record updated while we paged) keep the newest version.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from crm_sync import quarantine, runlog, staging
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.watermark import Window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    rows: int
    rejected: int
    since: datetime | None
    until: datetime


def _parse_ts(value) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


MAX_KEY_CHARS = 512  # a longer "key" is a broken record, and would not fit a B-tree index entry


def _nul_field(value, path: str = "") -> str | None:
    """The dotted path of the first string holding a NUL character, if any."""
    if isinstance(value, str):
        return path or "(value)" if "\x00" in value else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _nul_field(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _printable(record: dict) -> dict:
    """The record as it can be kept in the quarantine: NULs shown as U+2400, long texts cut."""
    def clean(value):
        if isinstance(value, str):
            value = value.replace("\x00", "\u2400")
            return value if len(value) <= 2000 else value[:2000] + f"… ({len(value)} characters)"
        if isinstance(value, dict):
            return {str(k)[:200]: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(record)


def stage_records(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig, window: Window,
                  batches: Iterable[list[dict]], extra_rejects: Iterable[quarantine.Reject] = ()) -> ExtractResult:
    """Write the records of `batches` to staging in one transaction (caller commits).

    `extra_rejects` are records the extractor itself could not read (read after `batches` is
    exhausted, so an extractor may add to its list while it yields)."""
    latest: dict[str, tuple[datetime | None, dict]] = {}
    rejects: list[quarantine.Reject] = []
    seen_fields: set[str] = set()
    for batch in batches:
        for record in batch:
            seen_fields.update(record)
            pk = record.get(stream.primary_key)
            if pk is None or str(pk).strip() == "":
                rejects.append(quarantine.Reject(stream.name, None, "extract", stream.primary_key,
                                                 "primary key is missing", record))
                continue
            pk = str(pk)
            if len(pk) > MAX_KEY_CHARS:
                rejects.append(quarantine.Reject(
                    stream.name, pk[:80] + "…", "extract", stream.primary_key,
                    f"primary key is {len(pk)} characters long, more than the {MAX_KEY_CHARS} a key may have",
                    _printable(record)))
                continue
            bad = _nul_field(record)
            if bad is not None:
                rejects.append(quarantine.Reject(stream.name, pk, "extract", bad,
                                                 "contains a NUL character, which no PostgreSQL text can hold",
                                                 _printable(record)))
                continue
            try:
                cursor_value = _parse_ts(record.get(stream.cursor_field))
            except (TypeError, ValueError):
                cursor_value = None
            if cursor_value is None:
                rejects.append(quarantine.Reject(stream.name, pk, "extract", stream.cursor_field,
                                                 f"cursor field is missing or not a timestamp: {record.get(stream.cursor_field)!r}",
                                                 record))
                continue
            previous = latest.get(pk)
            if previous is None or previous[0] <= cursor_value:
                latest[pk] = (cursor_value, record)
    if latest or rejects:
        check_schema(cfg, stream, seen_fields)
    rejects.extend(extra_rejects)
    with conn.cursor() as cur:
        staging.delete_run(cur, "stg.extracted", run_id, cfg.source, stream.name)
        quarantine.clear(cur, run_id, cfg.source, stream.name, stage="extract")
        rows = staging.copy_rows(
            cur, "stg.extracted", ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
            ((run_id, cfg.source, stream.name, pk, cv, staging.to_json(rec)) for pk, (cv, rec) in latest.items()),
        )
        quarantine.add(cur, run_id, cfg.source, rejects)
        staging.analyze(cur, "stg.extracted")
    return ExtractResult(rows=rows, rejected=len(rejects), since=window.since, until=window.until)


def expected_fields(stream: StreamConfig) -> set[str]:
    fields = {stream.primary_key, stream.cursor_field}.union(*(fm.source_fields for fm in stream.mapping.values()))
    if stream.identity is not None:
        ident = stream.identity
        fields |= {f for f in (ident.name, ident.email, ident.company, ident.city) if f} | set(ident.phones)
    return fields


def check_schema(cfg: SourceConfig, stream: StreamConfig, seen: set[str]) -> None:
    """Schema contract: every field the YAML reads must still exist in the source's records.

    A field no record of the batch carries means the source renamed or dropped it; loading on
    would quietly null a column of the CRM, so the extract fails naming the fields. New fields
    the YAML does not read are only logged (they evolve the raw payload, which keeps them).
    """
    from crm_sync.sources.sql_source import SchemaDriftError

    missing = sorted(expected_fields(stream) - seen)
    if missing:
        new = sorted(seen - expected_fields(stream))
        raise SchemaDriftError(
            f"source '{cfg.source}' stream '{stream.name}': fields {missing} are missing from every record "
            f"of the batch (fields not read by the config: {new[:10]}). The source schema changed; nothing "
            f"was loaded. Update include/sources/{cfg.source}.yaml, then clear the task."
        )
    extra = sorted(seen - expected_fields(stream))
    if extra:
        log.info("source %s stream %s: fields not mapped (kept in the raw payload): %s", cfg.source, stream.name,
                 extra[:20])


def record_extract(conn, run_id: str, cfg: SourceConfig) -> None:
    """Recompute the run's extracted/rejected counters from staging (streams extract separately)."""
    with conn.cursor() as cur:
        cur.execute("select count(*) from stg.extracted where run_id = %s and source = %s", (run_id, cfg.source))
        extracted = cur.fetchone()[0]
        cur.execute(
            "select count(*) from sync.quarantine where run_id = %s and source = %s and stage = 'extract'",
            (run_id, cfg.source),
        )
        rejected = cur.fetchone()[0]
        runlog.update(cur, run_id, cfg.source, rows_extracted=extracted + rejected)


