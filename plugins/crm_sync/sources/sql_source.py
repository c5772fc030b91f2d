"""Reads from a source database with a server-side cursor, so memory stays flat for big tables."""
from __future__ import annotations

from datetime import datetime
from typing import Iterator

FETCH_ROWS = 10_000


def fetch_batches(src_conn, query: str, *, since: datetime | None, until: datetime, name: str) -> Iterator[list[dict]]:
    from psycopg2.extras import RealDictCursor

    with src_conn.cursor(name=f"crm_sync_{name}", cursor_factory=RealDictCursor) as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(query, {"since": since, "until": until})
        while True:
            rows = cur.fetchmany(FETCH_ROWS)
            if not rows:
                return
            yield [dict(r) for r in rows]
