"""Reads from a source database with a server-side cursor, so memory stays flat for big tables.

A query that names a column the source no longer has (an ERP upgrade renamed it) raises
`SchemaDriftError` naming the source, stream and column: retrying cannot fix it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterator

from crm_sync.sources.base import Extractor, register

FETCH_ROWS = 10_000


class SchemaDriftError(RuntimeError):
    """The source's structure no longer matches what the source YAML reads."""


def fetch_batches(src_conn, query: str, *, since: datetime | None, until: datetime, name: str,
                  source: str = "?") -> Iterator[list[dict]]:
    import psycopg2
    from psycopg2.extras import RealDictCursor

    with src_conn.cursor(name=f"crm_sync_{name}", cursor_factory=RealDictCursor) as cur:
        cur.itersize = FETCH_ROWS
        try:
            cur.execute(query, {"since": since, "until": until})
        except (psycopg2.errors.UndefinedColumn, psycopg2.errors.UndefinedTable) as exc:
            detail = str(exc).splitlines()[0]
            raise SchemaDriftError(
                f"source '{source}' stream '{name}': the source schema changed — {detail}. "
                f"Nothing was extracted or loaded. Update the stream's query and mapping in "
                f"include/sources/{source}.yaml to the new structure, then clear the task."
            ) from None
        while True:
            rows = cur.fetchmany(FETCH_ROWS)
            if not rows:
                return
            yield [dict(r) for r in rows]


@register
class SqlExtractor(Extractor):
    """A stream of a source database: the stream's `query` with `%(since)s` and `%(until)s`."""

    kind = "sql"

    def __init__(self, cfg, stream, src_conn) -> None:
        super().__init__(cfg, stream)
        self.src_conn = src_conn

    @classmethod
    def open(cls, cfg, stream) -> "SqlExtractor":
        from crm_sync import db

        return cls(cfg, stream, db.task_connection(cfg.conn_id))

    def records(self, window) -> Iterator[list[dict]]:
        return fetch_batches(self.src_conn, self.stream.query, since=window.since, until=window.until,
                             name=self.stream.name, source=self.cfg.source)

    def close(self) -> None:
        self.src_conn.close()
