"""The map stage's set-based path: the field maps of a stream as one `insert … select` in PostgreSQL.

`mapping.map_stream` casts a record in Python when anything about it needs Python's judgement — a
phone, a money text, a `values:` map, a value of an unusual shape, a text with surrounding spaces,
a field that fails its cast and must be quarantined with a worded reason. Most records of a large
batch need none of that: their values are already clean texts, ISO timestamps, plain decimals. For
those, this module builds, per field, an SQL expression that gives exactly what `mapping.cast`
gives, and a guard that holds only when it does. Records whose every field passes its guard are
mapped by one statement; the others (the run's records that statement did not write, found by key)
go through the Python path, which words their rejections. A guard may be stricter than needed —
that costs speed, never correctness. PostgreSQL's regex engine costs microseconds a value, so the
guards test digits and separators position by position where they can.

`row_hash` is computed in SQL for both paths, from the typed staging columns
(`hash_sql`): the same values give the same hash whichever path mapped them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from crm_sync.config import FieldMap

MAX_TEXT = 10_000  # characters: longer is never a CRM value (`mapping.MAX_TEXT` is this one)


@lru_cache(maxsize=1)
def _space_class() -> str:
    """A regex bracket expression of every character `str.strip()` removes (Python's `isspace`)."""
    chars = [chr(c) for c in range(0x3001) if chr(c).isspace()]
    return "[" + "".join(chars) + "]"


_DIGITS = "'0123456789'"


def _c(expr: str) -> str:
    return f'{expr} collate "C"'


def _iso_head(t: str) -> str:
    """SQL: text `t` starts `YYYY-MM-DD` with a month and a day in range (digit by digit, without a regex:
    PostgreSQL's regex engine costs microseconds a value)."""
    return (f"(substr({t}, 5, 1) = '-' and substr({t}, 8, 1) = '-' and translate(left({t}, 10), {_DIGITS}, '') = '--'"
            f" and {_c(f'substr({t}, 6, 2)')} between '01' and '12' and {_c(f'substr({t}, 9, 2)')} between '01' and '31')")


def _iso_timestamp(t: str) -> str:
    """SQL: text `t` is `YYYY-MM-DD[T ]HH:MM:SS[.f{1,6}](Z|±HH:MM)` with every part in range: the one spelling
    Python's `fromisoformat` and PostgreSQL's `timestamptz` input read alike (no 24:00, no leap second)."""
    return (f"({_iso_head(t)} and substr({t}, 11, 1) in ('T', ' ') and substr({t}, 14, 1) = ':'"
            f" and substr({t}, 17, 1) = ':' and translate(substr({t}, 11, 9), {_DIGITS}, '') in ('T::', ' ::')"
            f" and {_c(f'substr({t}, 12, 2)')} <= '23' and {_c(f'substr({t}, 15, 2)')} <= '59'"
            f" and {_c(f'substr({t}, 18, 2)')} <= '59'"
            f" and substr({t}, 20) ~ '^([.][0-9]{{1,6}})?(Z|[+-](0[0-9]|1[0-4]):[0-5][0-9])$')")


def literal(text: str) -> str:
    """An SQL string literal of `text` (quotes doubled), for SQL built before any cursor exists."""
    return "'" + text.replace("'", "''") + "'"


def _real_day(t: str) -> str:
    """SQL: the `YYYY-MM-DD` head of text `t` names a day that exists (not 0000-…, not 02-30)."""
    return (f"(left({t}, 4) <> '0000' and ({_c(f'substr({t}, 9, 2)')} <= '28' or substr({t}, 9, 2)::int <= "
            f"extract(day from make_date(left({t}, 4)::int, substr({t}, 6, 2)::int, 1)"
            f" + interval '1 month' - interval '1 day')))")


@dataclass(frozen=True)
class Field:
    """One field map in SQL: the value expression and the guard under which it equals `mapping.cast`."""
    expr: str
    guard: str


def field_sql(j: str, t: str, fm: FieldMap, *, key: bool, limit: tuple[int, int] | None) -> Field | None:
    """The field map as SQL over its payload value — `j` the jsonb, `t` its text (`->>`) — or None when
    only Python can map it."""
    if not isinstance(fm.from_, str) or fm.type not in ("text", "timestamptz", "date", "numeric"):
        return None
    if fm.values is not None and (fm.type != "text" or key or not all(
            isinstance(v, str) and v.strip() == v != "" and len(v) <= (fm.max_length or MAX_TEXT)
            for v in fm.values.values())):
        return None
    absent = f"({j} is null or jsonb_typeof({j}) = 'null')"
    space = _space_class()
    # a text that `cast` keeps as it is: a string, not blank, nothing to strip, not too long
    clean = (f"(jsonb_typeof({j}) = 'string' and {t} <> '' and {t} !~ {literal('^' + space + '|' + space + '$')}"
             f" and length({t}) <= {min(MAX_TEXT, fm.max_length or MAX_TEXT) if fm.type == 'text' else MAX_TEXT})")
    if fm.values is not None:  # a text looked up in the `values:` map; one not in it goes to Python
        cases = " ".join(f"when {literal(k)} then {literal(v)}" for k, v in fm.values.items())
        expr = f"case {t} {cases} end"
        check = f"{t} in ({', '.join(literal(k) for k in fm.values)})" if fm.values else "false"
    elif fm.type == "text":
        expr, check = t, "true"
        if key:  # `keys.canonical_key` only changes a stripped text ending in `.0…`
            check = f"{t} !~ {literal(r'[.]0+$')}"
    elif fm.type == "timestamptz":
        expr, check = f"{t}::timestamptz", f"({_iso_timestamp(t)} and {_real_day(t)})"
    elif fm.type == "date":
        expr, check = f"left({t}, 10)::date", f"({_iso_head(t)} and {_real_day(t)})"
    else:  # numeric: plain decimal digits, within the field's scale and the column's integer digits
        whole = f"{{1,{limit[0] - limit[1]}}}" if limit is not None else "+"
        fraction = ("" if fm.scale == 0 else "([.][0-9]+)?" if fm.scale is None
                    else f"([.][0-9]{{1,{fm.scale}}})?")
        expr, check = f"{t}::numeric", f"{t} ~ {literal(f'^-?[0-9]{whole}{fraction}$')}"
    nullable = "false" if fm.required else absent
    return Field(expr=f"case when {absent} then null else {expr} end",
                 guard=f"({nullable} or ({clean} and {check}))")


def identity_guard(fields: list[tuple[str, str]]) -> str:
    """SQL: no identity field of a customer payload is quarantined by `mapping.identity_rejects`;
    `fields` holds each identity field's (jsonb, text) expressions."""
    parts = [f"({j} is null or jsonb_typeof({j}) = 'null' or (jsonb_typeof({j}) = 'string' and "
             f"length({t}) <= {MAX_TEXT}))" for j, t in fields]
    return " and ".join(parts) or "true"


def column_types(cur, table: str) -> dict[str, str]:
    """{column: SQL type} of a staging table, in column order."""
    cur.execute("""select attname, format_type(atttypid, atttypmod) from pg_attribute
                   where attrelid = %s::regclass and attnum > 0 and not attisdropped order by attnum""", (table,))
    return dict(cur.fetchall())


def hash_sql(alias: str, columns: list[str], types: dict[str, str]) -> str:
    """SQL of a row's hash over typed columns: the MD5 (32 hex digits) of their JSON array — a change
    detector, not a signature. Timestamps are hashed in UTC, so the session's time zone never changes a hash."""
    parts = []
    for c in columns:
        ref = f'{alias}."{c}"'
        parts.append(f"({ref} at time zone 'UTC')" if types[c] == "timestamp with time zone" else ref)
    return f"md5(json_build_array({', '.join(parts)})::text)"
