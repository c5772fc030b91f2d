"""Bulk movement of rows into PostgreSQL with COPY, and JSON that keeps exact decimals.

Row-by-row INSERT is never used for batches: `copy_rows` streams the rows through one
`COPY ... FROM STDIN` in PostgreSQL's text format. Rows are encoded a batch at a time as the
server asks for more, so memory stays bounded by the batch size and PostgreSQL parses one batch
while Python encodes the next.

Encoding guarantees: None is NULL and the empty string stays empty; dicts and lists are JSON;
Decimals keep their exact text (scale included); datetimes keep their UTC offset; backslashes,
tabs, newlines and carriage returns inside values are escaped, so any text survives the trip.
"""
from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Iterable, Iterator, Sequence

from psycopg2 import sql

BATCH_ROWS = 2_000  # rows encoded per read of the COPY stream

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL = "\\N"
_NULL_MARK = "\x00"  # stands for NULL in the fast path: PostgreSQL text can never contain NUL


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


class _Converters(dict):
    """type -> callable giving the text of a value of that type; C-level callables for the usual
    types, `_text` (and a cached entry) for anything else, subclasses included."""

    def __missing__(self, kind):
        self[kind] = _text
        return _text


_TO_TEXT = _Converters({
    str: str, type(None): _NULL_MARK.format, int: int.__str__, Decimal: Decimal.__str__,
    datetime: datetime.isoformat, date: date.isoformat, bool: {True: "t", False: "f"}.__getitem__,
})


def _escaped(value) -> str:
    if value is None:
        return _NULL
    text = _text(value)
    if "\x00" in text:
        raise ValueError(f"PostgreSQL text cannot contain NUL characters: {text[:80]!r}")
    return text.translate(_ESCAPES)


def _encode_line(row: Sequence, separators: int) -> str:
    """One COPY text line without its newline; NULLs may still be NUL marks (see _RawStream)."""
    # Fast path: each value becomes text through a C-level converter and the joined line is
    # checked once; only a line with something to escape (rare in CRM data) is encoded per value.
    line = "\t".join([_TO_TEXT[type(v)](v) for v in row])
    if ("\\" not in line and "\n" not in line and "\r" not in line and line.count("\t") == separators
            and (_NULL_MARK not in line or line.count(_NULL_MARK) == row.count(None))):
        return line
    return "\t".join([_escaped(v) for v in row])


class _RawStream:
    """A read-only text file over the encoded rows for `copy_expert`: each read is one batch of lines."""

    def __init__(self, rows: Iterable[Sequence], width: int) -> None:
        self._rows: Iterator[Sequence] = iter(rows)
        self._width = width
        self.count = 0
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> str:
        try:
            return self._next_batch()
        except BaseException as exc:  # psycopg2 reports it only as text; copy_rows re-raises it
            self.error = exc
            raise

    def _next_batch(self) -> str:
        lines: list[str] = []
        width, separators = self._width, self._width - 1
        for row in self._rows:
            if len(row) != width:
                raise ValueError(f"row {self.count + len(lines) + 1} has {len(row)} values, expected {width}")
            lines.append(_encode_line(row, separators))
            if len(lines) >= BATCH_ROWS:
                break
        if not lines:
            return ""
        self.count += len(lines)
        lines.append("")
        # NUL marks come only from the fast path (escaped lines reject real NULs), so this is exact.
        return "\n".join(lines).replace(_NULL_MARK, _NULL)


def copy_rows(cur, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> int:
    """COPY `rows` into `schema.table`; return the number of rows written.

    `rows` is consumed while the COPY is in progress, so it must not use `cur`'s connection.
    """
    schema, name = table.split(".")
    statement = sql.SQL("copy {}.{} ({}) from stdin").format(
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



def analyze(cur, table: str) -> None:
    """Fresh planner statistics for a staging table a stage has just bulk-written.

    Autovacuum analyzes minutes later; until then the planner believes the run has a handful of
    rows and picks nested loops that are quadratic in the batch (measured: a reconcile count over
    100,000 spreadsheet rows took minutes). Per-run staging tables are small to sample.
    """
    schema, name = table.split(".")
    cur.execute(sql.SQL("analyze {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))


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
