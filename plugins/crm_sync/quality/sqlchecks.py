"""An expectation suite evaluated in PostgreSQL on one run's staged rows, with GX's verdicts.

`run_suite` judges the rows of `stg.mapped_<entity>` for one (run, source, stream) set-based:
one statement counts, per expectation, the rows, the missing values and the failing rows; only
when some row failed, a second statement fetches the failing rows (ordered by `source_pk`) with
the value each expectation judged, a flag per expectation and, for rows a critical expectation
failed, the whole mapped row (`to_jsonb`) as the quarantine payload. Nothing loads the batch
into Python, and Great Expectations is not imported.

Guarantees:
- every expectation type of `SUPPORTED` gives the result Great Expectations 1.x gives on the same
  rows (`success`, `element_count`, `unexpected_count`, missing counts and percentages, the
  partial lists, `unexpected_index_list` of `{column: value, "source_pk": key}` in key order) as
  a plain `ExpectationSuiteValidationResult`-shaped object (`CheckResult`, `SuiteResult`);
  `report.to_gx` turns it into GX's own classes for Data Docs;
- as in GX, a column-value expectation ignores missing (NULL) values and `mostly` is the share of
  the non-missing values that must pass, except `to_not_be_null` / `to_be_null`, which judge
  every row against the row count; unique flags every row whose non-missing value occurs twice;
- an expectation type (or argument) not in `SUPPORTED` is a `SuiteError` naming the suite, the
  position and the expectation: never skipped, never guessed;
- an expectation that cannot be evaluated on this table (a column it does not have, a bound or a
  set that cannot be compared with the column's type, a regex PostgreSQL rejects) gets GX's
  shape of an exception (`exception_info.raised_exception`, success false) and the others still
  run, as with GX's `catch_exceptions`;
- regexes run with PostgreSQL's `~` (GX's own SQL datasource does the same); Python's `\\b` /
  `\\B` / `(?P<name>` are translated. Text is compared by code point (`collate "C"`) as Python does.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

PARTIAL = 20  # GX's partial_unexpected_count
INDEX_COLUMN = "source_pk"


class SuiteError(ValueError):
    """An expectation suite file is missing or malformed, or uses an expectation this stage cannot evaluate."""


@dataclass(frozen=True)
class _Spec:
    level: str                    # "row": judges each row, its failing rows can be set aside; "batch": the whole batch
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    skips_missing: bool = True    # GX leaves NULLs out of a column-value expectation (not of not_null / be_null)


_BOUNDS = ("min_value", "max_value", "strict_min", "strict_max")

SUPPORTED: dict[str, _Spec] = {
    "expect_column_values_to_not_be_null": _Spec("row", ("column",), ("mostly",), skips_missing=False),
    "expect_column_values_to_be_null": _Spec("row", ("column",), ("mostly",), skips_missing=False),
    "expect_column_values_to_be_unique": _Spec("row", ("column",), ("mostly",)),
    "expect_column_values_to_be_in_set": _Spec("row", ("column", "value_set"), ("mostly",)),
    "expect_column_values_to_not_be_in_set": _Spec("row", ("column", "value_set"), ("mostly",)),
    "expect_column_values_to_be_between": _Spec("row", ("column",), _BOUNDS + ("mostly",)),
    "expect_column_value_lengths_to_be_between": _Spec("row", ("column",), _BOUNDS + ("mostly",)),
    "expect_column_value_lengths_to_equal": _Spec("row", ("column", "value"), ("mostly",)),
    "expect_column_values_to_match_regex": _Spec("row", ("column", "regex"), ("mostly",)),
    "expect_column_values_to_not_match_regex": _Spec("row", ("column", "regex"), ("mostly",)),
    "expect_table_row_count_to_be_between": _Spec("batch", (), _BOUNDS),
    "expect_table_row_count_to_equal": _Spec("batch", ("value",)),
}


def level_of(expectation_type: str) -> str | None:
    """'row' for an expectation that judges each row on its own (its failing rows can be set aside),
    'batch' for one that judges the batch as a whole; None when this stage does not know it."""
    spec = SUPPORTED.get(expectation_type)
    return spec.level if spec else None


@dataclass(frozen=True)
class Check:
    """One expectation of a suite, as the suite file declares it."""
    position: int
    type: str
    kwargs: dict
    meta: dict

    @property
    def level(self) -> str:
        return SUPPORTED[self.type].level

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")

    @property
    def label(self) -> str:
        return f"{self.type}({self.column})" if self.column else self.type


def _number(value) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def parse_suite(doc: dict, where: str) -> list[Check]:
    """The suite's expectations as `Check`s; `SuiteError` naming `where` (the suite file), the
    position and the expectation for any type, argument or value this stage cannot evaluate."""
    expectations = doc.get("expectations")
    if not isinstance(expectations, list):
        raise SuiteError(f"{where}: 'expectations' must be a list")
    checks = []
    for i, exp in enumerate(expectations):
        if not isinstance(exp, dict):
            raise SuiteError(f"{where}: expectations[{i}] must be an object")
        name = exp.get("type") or exp.get("expectation_type")
        kwargs = exp.get("kwargs") or {}
        spec = SUPPORTED.get(name)
        at = f"{where}: expectations[{i}] ({name})"
        if spec is None:
            raise SuiteError(f"{at}: expectation type not supported by the validate stage, which evaluates "
                             f"suites in PostgreSQL; supported: {', '.join(sorted(SUPPORTED))}")
        if not isinstance(kwargs, dict):
            raise SuiteError(f"{at}: kwargs must be an object")
        unknown = sorted(set(kwargs) - set(spec.required) - set(spec.optional) - {"batch_id"})
        if unknown:
            raise SuiteError(f"{at}: argument(s) {', '.join(unknown)} not supported; allowed: "
                             f"{', '.join(spec.required + spec.optional)}")
        missing = [k for k in spec.required if kwargs.get(k) is None and not (k == "value_set" and k in kwargs)]
        if missing:
            raise SuiteError(f"{at}: missing argument(s) {', '.join(missing)}")
        if "column" in spec.required and not isinstance(kwargs["column"], str):
            raise SuiteError(f"{at}: 'column' must be a column name")
        mostly = kwargs.get("mostly")
        if mostly is not None and not (_number(mostly) and 0 <= mostly <= 1):
            raise SuiteError(f"{at}: 'mostly' must be a number from 0 to 1, got {mostly!r}")
        if "min_value" in spec.optional and kwargs.get("min_value") is None and kwargs.get("max_value") is None:
            raise SuiteError(f"{at}: min_value and max_value cannot both be None")
        if (_number(kwargs.get("min_value")) and _number(kwargs.get("max_value"))
                and kwargs["min_value"] > kwargs["max_value"]):
            raise SuiteError(f"{at}: min_value cannot be greater than max_value")
        if name.startswith(("expect_column_value_lengths", "expect_table_row_count")):
            for key in ("min_value", "max_value", "value"):
                if kwargs.get(key) is not None and not _number(kwargs[key]):
                    raise SuiteError(f"{at}: '{key}' must be a number, got {kwargs[key]!r}")
        if "value_set" in spec.required and kwargs["value_set"] is not None \
                and not isinstance(kwargs["value_set"], (list, tuple)):
            raise SuiteError(f"{at}: 'value_set' must be a list")
        if "regex" in spec.required and not isinstance(kwargs["regex"], str):
            raise SuiteError(f"{at}: 'regex' must be a string")
        meta = exp.get("meta") or {}
        checks.append(Check(i, name, {k: v for k, v in kwargs.items() if k != "batch_id"}, dict(meta)))
    return checks


# --- results in GX's shape ------------------------------------------------------------------------

def _no_exception() -> dict:
    return {"raised_exception": False, "exception_traceback": None, "exception_message": None}


@dataclass
class CheckResult:
    """One expectation's result, shaped as GX's `ExpectationValidationResult` (COMPLETE format)."""
    check: Check
    success: bool
    result: dict
    exception_info: dict = field(default_factory=_no_exception)

    @property
    def error(self) -> str | None:
        info = self.exception_info or {}
        return str(info.get("exception_message")) if info.get("raised_exception") else None


@dataclass
class SuiteResult:
    """A suite's results on one batch, shaped as GX's `ExpectationSuiteValidationResult`."""
    suite_name: str
    results: list[CheckResult]
    element_count: int
    meta: dict = field(default_factory=dict)
    payloads: dict = field(default_factory=dict)  # source_pk -> its mapped row, for rows a critical check failed

    @property
    def success(self) -> bool:
        return all(r.success for r in self.results)

    @property
    def statistics(self) -> dict:
        evaluated = len(self.results)
        ok = sum(1 for r in self.results if r.success)
        return {"evaluated_expectations": evaluated, "successful_expectations": ok,
                "unsuccessful_expectations": evaluated - ok,
                "success_percent": ok / evaluated * 100 if evaluated else None}

    @property
    def clean(self) -> bool:
        """Every expectation passed without a single failing row or error (a `mostly` may let rows fail)."""
        return all(r.success and not r.error and not (r.result or {}).get("unexpected_count") for r in self.results)


def _mostly_success(considered: int, unexpected: int, mostly) -> bool:
    return (float(considered) - float(unexpected)) / float(considered) >= mostly


def _counts(values: list) -> list[dict] | None:
    """GX's partial_unexpected_counts: the 20 most common failing values, by count then value."""
    try:
        return [{"value": v, "count": c} for v, c in
                sorted(Counter(values).most_common(PARTIAL), key=lambda x: (-x[1], x[0]))]
    except TypeError:  # unhashable or unorderable values: GX leaves the counts out
        return None


def map_result(check: Check, element_count: int, missing: int | None, values: list, index: list) -> CheckResult:
    """GX's `_format_map_output` for a column-map expectation (COMPLETE, index column source_pk).

    `missing` None: the expectation judges NULLs itself (not_null / be_null), so GX reports no
    missing counts and `mostly` applies to every row."""
    unexpected = len(values)
    mostly = check.kwargs.get("mostly", 1)
    n = element_count
    if missing is None:
        success = True if n == 0 else (n - unexpected) / n >= mostly
    else:
        nonnull = n - missing
        success = True if n == 0 or nonnull == 0 else _mostly_success(nonnull, unexpected, mostly)
    result: dict[str, Any] = {"element_count": n, "unexpected_count": unexpected}
    total_pct = nonmissing_pct = missing_pct = None
    if n > 0:
        total_pct = unexpected / n * 100
        if missing is None:
            nonmissing_pct = total_pct
        else:
            missing_pct = missing / n * 100
            nonmissing_pct = unexpected / (n - missing) * 100 if n - missing > 0 else None
    result["unexpected_percent"] = nonmissing_pct
    result["partial_unexpected_list"] = values[:PARTIAL]
    result["unexpected_index_column_names"] = [INDEX_COLUMN]
    if missing is not None:
        result.update({"missing_count": missing, "missing_percent": missing_pct,
                       "unexpected_percent_total": total_pct, "unexpected_percent_nonmissing": nonmissing_pct})
    counts = _counts(values)
    if counts is not None:
        result["partial_unexpected_counts"] = counts
    result["partial_unexpected_index_list"] = index[:PARTIAL]
    result["unexpected_list"] = values
    result["unexpected_index_list"] = index
    return CheckResult(check, bool(success), result)


def batch_result(check: Check, observed) -> CheckResult:
    """GX's `_validate_metric_value_between` (and `_to_equal`) on the batch's row count."""
    kw = check.kwargs
    if check.type == "expect_table_row_count_to_equal":
        return CheckResult(check, observed == kw["value"], {"observed_value": observed})
    low, high = kw.get("min_value"), kw.get("max_value")
    above = low is None or (observed > low if kw.get("strict_min") else observed >= low)
    below = high is None or (observed < high if kw.get("strict_max") else observed <= high)
    return CheckResult(check, bool(above and below), {"observed_value": observed})


def error_result(check: Check, message: str) -> CheckResult:
    return CheckResult(check, False, {}, {"raised_exception": True, "exception_traceback": None,
                                          "exception_message": message})


# --- SQL ------------------------------------------------------------------------------------------

def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_TEXT_TYPES = ("text", "character varying", "character", "name", "citext")
_NUMERIC_TYPES = ("smallint", "integer", "bigint", "numeric", "real", "double precision")


def python_regex_to_postgres(regex: str) -> str:
    """Python's regex dialect where PostgreSQL's ARE differs in a way that would silently change a
    match: `\\b`/`\\B` (word boundary; backspace in PostgreSQL) and named groups."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        ch = regex[i]
        if ch == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if not in_class and nxt in "bB":
                out.append("\\y" if nxt == "b" else "\\Y")
            else:
                out.append(ch + nxt)
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            out.append(ch)
            i += 1
            if i < len(regex) and regex[i] == "^":
                out.append("^")
                i += 1
            if i < len(regex) and regex[i] == "]":  # a ']' first in a class is a literal
                out.append("]")
                i += 1
            continue
        elif regex.startswith("(?P<", i):
            end = regex.find(">", i)
            if end > 0:
                out.append("(")
                i = end + 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass
class _Plan:
    """What the statements compute for one row-level check."""
    check: Check
    flag: str            # SQL boolean: this row fails the check (false for a NULL the check ignores)
    column: str
    skips_missing: bool


class _Params:
    def __init__(self):
        self.values: dict[str, Any] = {}

    def add(self, value) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return f"%({name})s"


def _columns(cur, table: str) -> dict[str, str]:
    """column -> its base type (no typmod: `numeric`, `text`, `timestamp with time zone`, …)."""
    cur.execute("""select a.attname, format_type(a.atttypid, null) from pg_attribute a
                   where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped""", (table,))
    return dict(cur.fetchall())


def _unique_within_batch(cur, table: str) -> set[str]:
    """Columns a unique index makes unique within one (run_id, source, stream): their unique
    checks cannot fail and need no sort of the batch."""
    cur.execute("""select array(select a.attname from unnest(i.indkey) k
                                join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k)
                   from pg_index i
                   where i.indrelid = %s::regclass and i.indisunique and i.indpred is null
                     and i.indexprs is null""", (table,))
    scope = {"run_id", "source", "stream"}
    unique = set()
    for (cols,) in cur.fetchall():
        rest = set(cols) - scope
        if len(rest) == 1:
            unique |= rest
    return unique


def _try(cur, query: str, params: dict) -> str | None:
    """Run a probe under a savepoint; the database's error message, or None when it ran."""
    cur.execute("savepoint sqlchecks_probe")
    try:
        cur.execute(query, params)
    except Exception as exc:  # noqa: BLE001 - any error of the probe is the check's error
        cur.execute("rollback to savepoint sqlchecks_probe")
        return str(getattr(exc, "pgerror", None) or exc).strip().split("\n")[0]
    cur.execute("release savepoint sqlchecks_probe")
    return None


_SAME_TYPE = "Column values, min_value, and max_value must either be None or of the same type."


def _plan(cur, check: Check, columns: dict[str, str], unique_cols: set[str], params: _Params,
          table: str) -> _Plan | str:
    """The SQL flag of a row-level check, or why it cannot be evaluated on this table."""
    kw = check.kwargs
    name = kw["column"]
    if name not in columns:
        return f'The column "{name}" in BatchData does not exist (table {table}).'
    col_type = columns[name]
    c = f"m.{quote_ident(name)}"
    text = c if col_type in _TEXT_TYPES else f"{c}::text"
    kind = check.type
    spec = SUPPORTED[kind]

    def cast(value, type_: str) -> str:
        return f"{params.add(value)}::{type_}"

    def probe(expr_params: list[tuple[Any, str]]) -> str | None:
        local = _Params()
        sql_ = ", ".join(f"{local.add(v)}::{t}" for v, t in expr_params)
        return _try(cur, f"select {sql_}", local.values) if expr_params else None

    if kind == "expect_column_values_to_not_be_null":
        flag = f"{c} is null"
    elif kind == "expect_column_values_to_be_null":
        flag = f"{c} is not null"
    elif kind == "expect_column_values_to_be_unique":
        flag = "false" if name in unique_cols else None  # None: a window count, see _row_statements
    elif kind in ("expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"):
        values = kw["value_set"]
        if values is None:  # GX: vacuously true
            flag = "false"
        else:
            values = list(values)
            compare_type = col_type
            if col_type in _TEXT_TYPES:
                compare_type = "text"
            error = probe([(values, f"{compare_type}[]")])
            if error:
                return f"value_set {values!r} cannot be compared with column {name!r} of type {col_type}: {error}"
            # `= any` is NULL, not false, for a value missing from a set that holds a null
            member = f"coalesce({c if compare_type != 'text' else text} = any({cast(values, compare_type + '[]')}), false)"
            flag = f"not {member}" if kind == "expect_column_values_to_be_in_set" else member
    elif kind in ("expect_column_values_to_be_between", "expect_column_value_lengths_to_be_between"):
        lengths = kind == "expect_column_value_lengths_to_be_between"
        subject = f"char_length({text})" if lengths else c
        bound_type = "bigint" if lengths else col_type
        conds, probes = [], []
        for key, op, strict in (("min_value", ">", "strict_min"), ("max_value", "<", "strict_max")):
            value = kw.get(key)
            if value is None:
                continue
            if not lengths:
                if col_type in _TEXT_TYPES and not isinstance(value, str):
                    return _SAME_TYPE
                if col_type in _NUMERIC_TYPES and not _number(value):
                    return _SAME_TYPE
            probes.append((value, bound_type))
            comparison = op if kw.get(strict) else op + "="
            collate = ' collate "C"' if not lengths and col_type in _TEXT_TYPES else ""
            conds.append(f"{subject}{collate} {comparison} {cast(value, bound_type)}")
        error = probe(probes)
        if error:
            return f"bounds of {check.label} cannot be compared with column {name!r} of type {col_type}: {error}"
        flag = f"not ({' and '.join(conds)})"
    elif kind == "expect_column_value_lengths_to_equal":
        flag = f"char_length({text}) <> {cast(kw['value'], 'numeric')}"
    elif kind in ("expect_column_values_to_match_regex", "expect_column_values_to_not_match_regex"):
        regex = python_regex_to_postgres(kw["regex"])
        error = _try(cur, "select ''::text ~ %(r)s", {"r": regex})
        if error:
            return f"regex {kw['regex']!r} is not valid in PostgreSQL: {error}"
        match = f"{text} ~ {cast(regex, 'text')}"
        flag = f"not ({match})" if kind == "expect_column_values_to_match_regex" else f"({match})"
    else:  # parse_suite admits only SUPPORTED types; a new entry there needs its flag here
        raise SuiteError(f"expectation {kind} has no SQL in sqlchecks")
    if flag is not None and flag != "false":
        # a flag is never NULL (a NULL in a count's filter or the OR of the row query would drop the row)
        flag = f"coalesce({c} is not null and {flag}, false)" if spec.skips_missing else f"coalesce({flag}, false)"
    return _Plan(check, flag, name, spec.skips_missing)


def run_suite(cur, table: str, run_id: str, source: str, stream: str, suite_name: str,
              checks: list[Check], critical=lambda check: True) -> SuiteResult:
    """Evaluate `checks` on the rows of `table` for (run_id, source, stream), in PostgreSQL.

    `critical(check)` says which checks quarantine: only rows failing one of those carry their
    mapped row (`payloads`)."""
    columns = _columns(cur, table)
    unique_cols = _unique_within_batch(cur, table)
    params = _Params()
    key = {"run_id": run_id, "source": source, "stream": stream}
    where = "m.run_id = %(run_id)s and m.source = %(source)s and m.stream = %(stream)s"
    plans: list[_Plan] = []
    errors: dict[int, str] = {}
    for check in checks:
        if check.level != "row":
            continue
        planned = _plan(cur, check, columns, unique_cols, params, table)
        if isinstance(planned, str):
            errors[check.position] = planned
        else:
            plans.append(planned)

    # a unique check not guaranteed by an index: a window count per value (a sort, whatever the
    # statistics say; a hashed subplan would turn quadratic on a stale estimate)
    windows = {}
    for i, p in enumerate(plans):
        if p.flag is None:
            alias, col = f"crm_sync_count_{i}", f"m.{quote_ident(p.column)}"
            windows[alias] = f"count({col}) over (partition by {col})"
            p.flag = f"({col} is not null and m.{alias} > 1)"
    rows = f"{table} m"
    row_json = "to_jsonb(m)"
    if windows:
        rows = (f"(select m.*, {', '.join(f'{expr} as {alias}' for alias, expr in windows.items())}"
                f" from {table} m where {where}) m")
        row_json = f"(to_jsonb(m) - array[{', '.join(repr(a) for a in windows)}]::text[])"
    missing_cols = sorted({p.column for p in plans if p.skips_missing})
    select = ["count(*)"] + [f"count(*) filter (where m.{quote_ident(col)} is null)" for col in missing_cols] \
        + [f"count(*) filter (where {p.flag})" for p in plans]
    cur.execute(f"select {', '.join(select)} from {rows} where {where}", {**key, **params.values})
    row = cur.fetchone()
    element_count = row[0]
    missing = dict(zip(missing_cols, row[1:1 + len(missing_cols)]))
    failing = list(row[1 + len(missing_cols):])

    values: dict[int, list] = {p.check.position: [] for p in plans}
    index: dict[int, list] = {p.check.position: [] for p in plans}
    payloads: dict = {}
    failed = [p for p, n in zip(plans, failing) if n]
    if failed:
        judged = sorted({p.column for p in failed})
        crit = [p.flag for p in failed if critical(p.check)]
        payload = f"case when {' or '.join(crit)} then {row_json}::text end" if crit else "null::text"
        cur.execute(f"select m.source_pk, array[{', '.join(p.flag for p in failed)}]::boolean[], {payload}"
                    + "".join(f", m.{quote_ident(col)}" for col in judged)
                    + f" from {rows} where {where} and ({' or '.join(p.flag for p in failed)})"
                    + " order by m.source_pk", {**key, **params.values})
        positions = [p.check.position for p in failed]
        at = [judged.index(p.column) for p in failed]
        for pk, flags, payload_text, *judged_values in cur:
            if payload_text is not None:
                payloads[pk] = json.loads(payload_text, parse_float=Decimal)
            for position, col_at, flag in zip(positions, at, flags):
                if flag:
                    value = judged_values[col_at]
                    values[position].append(value)
                    index[position].append({judged[col_at]: value, INDEX_COLUMN: pk})

    planned_at = {p.check.position: p for p in plans}
    results = []
    for check in checks:
        if check.position in errors:
            results.append(error_result(check, errors[check.position]))
        elif check.level == "batch":
            results.append(batch_result(check, element_count))
        else:
            plan = planned_at[check.position]
            results.append(map_result(check, element_count,
                                      missing[plan.column] if plan.skips_missing else None,
                                      values[check.position], index[check.position]))
    return SuiteResult(suite_name, results, element_count, payloads=payloads,
                       meta={"batch_spec": {"table": table, "run_id": run_id, "source": source, "stream": stream},
                             "active_batch_definition": {"datasource_name": "crm_sync",
                                                         "data_connector_name": "postgresql",
                                                         "data_asset_name": f"{source}_{stream}",
                                                         "batch_identifiers": {"run_id": run_id}}})


def is_missing(value) -> bool:
    """None, or a float / Decimal NaN (what pandas would call missing)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, Decimal):
        return value.is_nan()
    return False

