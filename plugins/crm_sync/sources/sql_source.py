"""Reads from a source database with a server-side cursor, so memory stays flat for big tables.

A stream's `query` selects the stream's rows *without* a window (`select … from src.table`, joins
allowed). The extractor applies the run's window around it, in one read-only REPEATABLE READ
snapshot of the source:

    select * from (<query>) q
    where (q.<cursor> >= since and q.<cursor> < until)   -- the run's window (no lower bound: full)
       or q.<cursor> is null                              -- strays: quarantined with a reason,
       or q.<cursor> > source now() + future_skew         --   future cursors: clamped and flagged
    order by q.<cursor>, q.<key>

PostgreSQL flattens the subquery, so the window conditions reach the table's index. In the same
snapshot it counts the window's rows and sums a hash of their keys (`source_total`,
`source_checksum`), which the extract checks against what it received, and for a full snapshot
it streams every key the source holds (`snapshot_keys()`) so the load can soft-delete the ones
that disappeared.

A query still written with `%(since)s` / `%(until)s` placeholders (the older form) is run as
written: no strays, no snapshot keys.

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


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def is_legacy(query: str) -> bool:
    return "%(since)s" in query or "%(until)s" in query


def window_sql(query: str, cursor_field: str, primary_key: str, *, bounded_below: bool) -> str:
    """The stream query wrapped with the window, stray and future conditions (see the module doc)."""
    c, k = _ident(cursor_field), _ident(primary_key)
    window = (f"q.{c} >= %(since)s::timestamptz and " if bounded_below else "") + f"q.{c} < %(until)s::timestamptz"
    return (f"select * from ({query.rstrip().rstrip(';')}) q\n"
            f"where ({window}) or q.{c} is null\n"
            f"   or q.{c} > now() + make_interval(mins => %(skew)s)\n"
            f"order by q.{c}, q.{k}")


def count_sql(query: str, cursor_field: str, primary_key: str, *, bounded_below: bool) -> str:
    from crm_sync.keys import key_hash_sql

    inner = window_sql(query, cursor_field, primary_key, bounded_below=bounded_below).rsplit("\norder by", 1)[0]
    return (f"select count(*), coalesce(sum({key_hash_sql('btrim(w.' + _ident(primary_key) + '::text)')}), 0)"
            f" from ({inner}) w")


def _drift(exc, source: str, name: str) -> SchemaDriftError:
    detail = str(exc).splitlines()[0]
    return SchemaDriftError(
        f"source '{source}' stream '{name}': the source schema changed — {detail}. "
        f"Nothing was extracted or loaded. Update the stream's query and mapping in "
        f"include/sources/{source}.yaml to the new structure, then clear the task."
    )


def fetch_rows(src_conn, query: str, *, since: datetime | None, until: datetime | None, name: str,
               source: str = "?", params: dict | None = None) -> Iterator[tuple[list[str], list[tuple]]]:
    """The query's rows in batches of tuples, with the column names, through a server-side cursor."""
    import psycopg2

    with src_conn.cursor(name=f"crm_sync_{name}") as cur:
        cur.itersize = FETCH_ROWS
        try:
            cur.execute(query, {"since": since, "until": until, **(params or {})})
        except (psycopg2.errors.UndefinedColumn, psycopg2.errors.UndefinedTable) as exc:
            raise _drift(exc, source, name) from None
        names: list[str] | None = None
        while True:
            rows = cur.fetchmany(FETCH_ROWS)
            if not rows:
                return
            if names is None:  # a named cursor describes its columns after the first fetch
                names = [d[0] for d in cur.description]
            yield names, rows


def fetch_batches(src_conn, query: str, *, since: datetime | None, until: datetime, name: str,
                  source: str = "?", params: dict | None = None) -> Iterator[list[dict]]:
    """The query's rows in batches of plain dicts (column name -> value)."""
    for names, rows in fetch_rows(src_conn, query, since=since, until=until, name=name, source=source,
                                  params=params):
        yield [dict(zip(names, r)) for r in rows]


@register
class SqlExtractor(Extractor):
    """A stream of a source database: the stream's `query`, windowed by the extractor."""

    kind = "sql"

    def __init__(self, cfg, stream, src_conn) -> None:
        super().__init__(cfg, stream)
        self.src_conn = src_conn
        self.legacy = is_legacy(stream.query or "")
        if not self.legacy:
            # one consistent snapshot for the count, the rows and the keys; never a write to a source
            src_conn.set_session(isolation_level="REPEATABLE READ", readonly=True)

    @classmethod
    def open(cls, cfg, stream) -> "SqlExtractor":
        from crm_sync import db

        return cls(cfg, stream, db.task_connection(cfg.conn_id, system=f"source '{cfg.source}' database",
                                                  statement_timeout_s=cfg.statement_timeout_seconds))

    def _params(self, window) -> dict:
        return {"since": window.since, "until": window.until, "skew": self.cfg.future_skew_minutes}

    def count(self, window) -> None:
        """`source_total` / `source_checksum`: the window's rows as the source holds them."""
        import psycopg2

        if self.legacy:
            return
        sql = count_sql(self.stream.query, self.stream.cursor_field, self.stream.primary_key,
                        bounded_below=window.since is not None)
        with self.src_conn.cursor() as cur:
            try:
                cur.execute(sql, self._params(window))
            except (psycopg2.errors.UndefinedColumn, psycopg2.errors.UndefinedTable) as exc:
                raise _drift(exc, self.cfg.source, self.stream.name) from None
            total, checksum = cur.fetchone()
        self.source_total, self.source_checksum = int(total), int(checksum)

    def records(self, window) -> Iterator[list[dict]]:
        self.count(window)
        if self.legacy:
            return fetch_batches(self.src_conn, self.stream.query, since=window.since, until=window.until,
                                 name=self.stream.name, source=self.cfg.source)
        sql = window_sql(self.stream.query, self.stream.cursor_field, self.stream.primary_key,
                         bounded_below=window.since is not None)
        return fetch_batches(self.src_conn, sql, since=window.since, until=window.until, name=self.stream.name,
                             source=self.cfg.source, params={"skew": self.cfg.future_skew_minutes})

    def snapshot_keys(self) -> Iterator[list[str]] | None:
        """Every key the source holds (full snapshots only), in the same snapshot as `records()`."""
        if self.legacy or self.cfg.sync_mode != "full":
            return None
        from crm_sync.keys import canonical_key

        sql = (f"select q.{_ident(self.stream.primary_key)} as k from ({self.stream.query.rstrip().rstrip(';')}) q"
               f" where q.{_ident(self.stream.primary_key)} is not null")

        def batches():
            for _, rows in fetch_rows(self.src_conn, sql, since=None, until=None, name=self.stream.name + "_keys",
                                      source=self.cfg.source):
                yield [k for k in (canonical_key(r[0]) for r in rows) if k is not None]

        return batches()

    def close(self) -> None:
        self.src_conn.close()
