"""Bulk movement of rows into PostgreSQL with COPY, and JSON that keeps exact decimals.

Row-by-row INSERT is never used for batches: `copy_rows` streams CSV through `COPY ... FROM
STDIN` in chunks, so memory stays bounded by the chunk size.
"""
from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime
from decimal import Decimal
from typing import Iterable, Sequence

from psycopg2 import sql

CHUNK_ROWS = 50_000


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


def _csv_value(value):
    if value is None:
        return r"\N"
    if isinstance(value, (dict, list)):
        return to_json(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def copy_rows(cur, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> int:
    """COPY `rows` into `schema.table`; return the number of rows written."""
    schema, name = table.split(".")
    statement = sql.SQL("copy {}.{} ({}) from stdin with (format csv, null '\\N')").format(
        sql.Identifier(schema), sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
    ).as_string(cur)
    total = 0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    pending = 0
    for row in rows:
        writer.writerow([_csv_value(v) for v in row])
        pending += 1
        if pending >= CHUNK_ROWS:
            buffer.seek(0)
            cur.copy_expert(statement, buffer)
            total += pending
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            pending = 0
    if pending:
        buffer.seek(0)
        cur.copy_expert(statement, buffer)
        total += pending
    return total


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
