"""Reads from a source database with a server-side cursor, so memory stays flat for big tables.

A query that names a column the source no longer has (an ERP upgrade renamed it) raises
`SchemaDriftError` naming the source, stream and column: retrying cannot fix it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterator

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
