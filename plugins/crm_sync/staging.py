"""Bulk movement of rows into PostgreSQL with COPY, and JSON that keeps exact decimals.

Row-by-row INSERT is never used for batches: `copy_rows` streams the rows through one
`COPY ... FROM STDIN` in PostgreSQL's text format, on the caller's (psycopg2) cursor and so inside
the caller's transaction. The text is encoded by psycopg 3's own COPY row formatter (its C
implementation from psycopg-binary, with a connection-less transformer), a batch at a time as
the server asks for more: memory stays bounded by the batch size and PostgreSQL parses one batch
while Python encodes the next.

Encoding guarantees: None is NULL and the empty string stays empty; dicts and lists are JSON
(`to_json`); Decimals keep their exact text (scale included); datetimes keep their UTC offset;
bytes are bytea hex; backslashes, tabs, newlines and carriage returns inside values are escaped, so
any text survives the trip; a text holding a NUL character is refused (ValueError) rather than cut.
"""
from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Iterable, Iterator, Sequence

from psycopg2 import sql

BATCH_ROWS = 2_000  # rows encoded per read of the COPY stream


def _json_default(value):
    if isinstance(value, Decimal):
        return str(value)  # never float: one lost decimal place breaks reconciliation
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    return str(value)


def to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=_json_default, separators=(",", ":"))


def _text(value) -> str:
    """A non-None value as the text PostgreSQL parses, before COPY escaping."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (dict, list)):
        return to_json(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()  # bytea hex input
    return str(value)  # int, float, Decimal (exact text, scale kept), date, UUID, ...


_TRANSFORMER = None


def _transformer():
    """psycopg 3's C transformer over its default adapters, with crm-sync's choices on top: dicts and
    lists are JSON (psycopg would make a list an array), bytes are bytea hex (psycopg's text bytea
    escaping needs a connection), datetimes their ISO text with offset, and any type psycopg cannot
    adapt is its text (`_text`)."""
    global _TRANSFORMER
    if _TRANSFORMER is None:
        import psycopg
        from psycopg.adapt import AdaptersMap, Dumper, Transformer

        class JsonText(Dumper):
            def dump(self, obj):
                return to_json(obj).encode()

        class ByteaHex(Dumper):
            def dump(self, obj):
                return b"\\x" + bytes(obj).hex().encode()

        class IsoTimestamp(Dumper):  # psycopg's own re-picks a tz/no-tz dumper per value: 2x slower
            def dump(self, obj):
                return obj.isoformat().encode()

        class AnyText(Dumper):
            def dump(self, obj):
                return _text(obj).encode()

        adapters = AdaptersMap(psycopg.adapters)
        for kind, dumper in ((dict, JsonText), (list, JsonText), (bytes, ByteaHex), (bytearray, ByteaHex),
                             (memoryview, ByteaHex), (datetime, IsoTimestamp), (object, AnyText)):
            adapters.register_dumper(kind, dumper)
        _TRANSFORMER = Transformer(adapters)
    return _TRANSFORMER


def _format_row():
    from psycopg._copy_base import format_row_text  # the C version when psycopg-binary is installed

    return format_row_text


def _nul_error(row: Sequence, cause: BaseException) -> ValueError:
    for value in row:
        if isinstance(value, str) and "\x00" in value:
            return ValueError(f"PostgreSQL text cannot contain NUL characters: {value[:80]!r}")
    return ValueError(f"a value cannot be written with COPY: {cause}")


class _RawStream:
    """A read-only binary file over the encoded rows for `copy_expert`: each read is one batch of lines."""

    def __init__(self, rows: Iterable[Sequence], width: int) -> None:
        self._rows: Iterator[Sequence] = iter(rows)
        self._width = width
        self._tx = _transformer()
        self._format = _format_row()
        self.count = 0
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self._next_batch()
        except BaseException as exc:  # psycopg2 reports it only as text; copy_rows re-raises it
            self.error = exc
            raise

    def _next_batch(self) -> bytes:
        from psycopg import DataError

        out = bytearray()
        width, tx, format_row, n = self._width, self._tx, self._format, 0
        for row in self._rows:
            n += 1
            if len(row) != width:
                raise ValueError(f"row {self.count + n} has {len(row)} values, expected {width}")
            try:
                format_row(row, tx, out)
            except DataError as exc:  # psycopg refuses a NUL character in text
                raise _nul_error(row, exc) from None
            if n >= BATCH_ROWS:
                break
        self.count += n
        return bytes(out)


def copy_rows(cur, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> int:
    """COPY `rows` into `schema.table`; return the number of rows written.

    `rows` is consumed while the COPY is in progress, so it must not use `cur`'s connection. An
    error raised by `rows` (or by encoding a value) is re-raised as itself.
    """
    schema, name = table.split(".")
    # the encoder writes UTF-8 whatever the session's client_encoding is
    statement = sql.SQL("copy {}.{} ({}) from stdin with (encoding 'utf8')").format(
        sql.Identifier(schema), sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
    ).as_string(cur)
    stream = _RawStream(rows, len(columns))
    try:
        cur.copy_expert(statement, stream, size=1 << 16)
    except Exception as exc:
        if stream.error is not None:  # the rows or their encoding failed, not PostgreSQL
            raise stream.error from exc
        raise
    return stream.count


def staging_tables() -> tuple[str, ...]:
    """Every per-run staging table (all keyed by run_id and source); housekeeping purges them together."""
    from crm_sync import entities

    return ("stg.extracted", "stg.resolved", *entities.staging_tables(), "stg.identity_input", "stg.match_key",
            "stg.review_pair", "stg.cluster_merge", "stg.snapshot_key", "stg.tombstone")



STATISTICS_TARGET = 20  # staging ANALYZE samples 300 × this many rows (PostgreSQL's default target is 100)


def analyze(cur, table: str) -> None:
    """Fresh planner statistics for a staging table a stage has just bulk-written.

    Autovacuum analyzes minutes later, if it runs at all; until then the planner believes the run has
    a handful of rows and picks nested loops that are quadratic in the batch (measured: a reconcile
    count over 100,000 spreadsheet rows took minutes). The plans need the run's share of the table
    and its columns' rough spread, not fine histograms: a sample of 6,000 rows (`STATISTICS_TARGET`)
    estimates an hourly run of 10,000 rows beside a nightly million within 10 %, and costs a tenth
    of the default 30,000 (1.5 s → 0.15 s per table at a million customers)."""
    schema, name = table.split(".")
    cur.execute("select current_setting('default_statistics_target')")
    previous = cur.fetchone()[0]
    cur.execute("select set_config('default_statistics_target', %s, true)", (str(STATISTICS_TARGET),))
    cur.execute(sql.SQL("analyze {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
    cur.execute("select set_config('default_statistics_target', %s, true)", (previous,))


def analyze_grown(cur, growth: float = 0.2) -> list[str]:
    """ANALYZE the crm tables never analysed or grown by more than `growth` since they were
    (`sync.analyze_grown`, migration 0016: it runs as the tables' owner, as ANALYZE requires on
    PostgreSQL 15 and 16): what a load leaves behind, whether or not autovacuum runs on the server.
    A first load's tables are then planned as the million rows they hold, not as empty tables; an
    hourly run's 1 % leaves them alone. Returns the tables analysed."""
    cur.execute("select sync.analyze_grown(%s)", (growth,))
    return [r[0] for r in cur.fetchall()]


def delete_run(cur, table: str, run_id: str, source: str, stream: str | None = None) -> int:
    """Remove one run's rows from a staging table, so a retried task starts clean."""
    schema, name = table.split(".")
    query = sql.SQL("delete from {}.{} where run_id = %s and source = %s").format(
        sql.Identifier(schema), sql.Identifier(name)
    )
    params: list = [run_id, source]
    if stream is not None:
        query += sql.SQL(" and stream = %s")
        params.append(stream)
    cur.execute(query, params)
    return cur.rowcount
