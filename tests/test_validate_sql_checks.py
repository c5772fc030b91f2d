"""The validate stage's SQL checks: each expectation type finds its failing rows in PostgreSQL, passes
the others, treats NULLs as Great Expectations does, and gives GX's verdicts on the same rows.

Real PostgreSQL (a migrated database per module): orders are written to `stg.mapped_order` as the
map stage leaves them, then one suite is evaluated by `sqlchecks.run_suite`.
"""
from __future__ import annotations

import json
from decimal import Decimal

import pytest

from crm_sync import staging
from crm_sync.quality import sqlchecks
from crm_sync.quality.sqlchecks import SuiteError

TABLE = "stg.mapped_order"
COLUMNS = ["source_pk", "source_customer_id", "order_date", "amount", "currency", "status"]

# (source_pk, customer, order_date, amount, currency, status)
ROWS = [
    ("O1", "C1", "2026-01-05", Decimal("10.00"), "CNY", "paid"),
    ("O2", "C2", "2026-01-06", Decimal("-5.00"), "USD", "open"),
    ("O3", None, None, None, None, None),
    ("O4", "C1", "2026-02-01", Decimal("250.50"), "XXX", "paid"),
    ("O5", "C5", "2026-02-02", Decimal("99.99"), "cny", "a very long status text"),
]


def stage(conn, run_id: str, rows=ROWS) -> None:
    with conn.cursor() as cur:
        staging.copy_rows(cur, TABLE, ["run_id", "source", "stream", *COLUMNS, "row_hash"],
                          [(run_id, "erp", "orders", *r, "h") for r in rows])


def run(conn, run_id: str, *expectations, rows=ROWS):
    stage(conn, run_id, rows)
    doc = {"name": "t", "expectations": [{**e, "meta": {"severity": "critical"}} for e in expectations]}
    checks = sqlchecks.parse_suite(doc, "suite 't'")
    with conn.cursor() as cur:
        return sqlchecks.run_suite(cur, TABLE, run_id, "erp", "orders", "t", checks)


def failing(result, i=0) -> list[str]:
    return [item["source_pk"] for item in result.results[i].result["unexpected_index_list"]]


@pytest.mark.parametrize("expectation, bad, missing", [
    ({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "currency"}}, ["O3"], None),
    ({"type": "expect_column_values_to_be_null", "kwargs": {"column": "status"}}, ["O1", "O2", "O4", "O5"], None),
    ({"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "currency", "value_set": ["CNY", "USD"]}},
     ["O4", "O5"], 1),
    ({"type": "expect_column_values_to_not_be_in_set", "kwargs": {"column": "currency", "value_set": ["XXX"]}},
     ["O4"], 1),
    ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "amount", "min_value": 0,
                                                                "max_value": 100}}, ["O2", "O4"], 1),
    ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "amount", "min_value": 10,
                                                                "strict_min": True}}, ["O1", "O2"], 1),
    ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "order_date",
                                                                "max_value": "2026-01-31"}}, ["O4", "O5"], 1),
    ({"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "status", "min_value": 4,
                                                                       "max_value": 10}}, ["O5"], 1),
    ({"type": "expect_column_value_lengths_to_equal", "kwargs": {"column": "currency", "value": 3}}, [], 1),
    ({"type": "expect_column_values_to_match_regex", "kwargs": {"column": "currency", "regex": "^[A-Z]{3}$"}},
     ["O5"], 1),
    ({"type": "expect_column_values_to_not_match_regex", "kwargs": {"column": "status", "regex": r"\bvery\b"}},
     ["O5"], 1),
    ({"type": "expect_column_values_to_be_unique", "kwargs": {"column": "source_customer_id"}}, ["O1", "O4"], 1),
    ({"type": "expect_column_values_to_be_unique", "kwargs": {"column": "source_pk"}}, [], 0),
])
def test_each_expectation_finds_its_failing_rows_and_skips_nulls_as_gx_does(conn, expectation, bad, missing):
    run_id = "sql__" + json.dumps(expectation, sort_keys=True)  # one run per case
    result = run(conn, run_id, expectation)
    [r] = result.results
    assert failing(result) == bad  # in key order; O3 (all NULL) only where the check judges NULLs
    assert (r.result["element_count"], r.result["unexpected_count"]) == (5, len(bad))
    assert r.result.get("missing_count") == missing
    assert r.success is (not bad) and r.error is None
    column = expectation["kwargs"]["column"]
    assert all(set(item) == {column, "source_pk"} for item in r.result["unexpected_index_list"])


def test_mostly_counts_only_the_non_missing_values_except_for_not_null(conn):
    # 1 bad currency of 4 present values (25 %) and 1 missing of 5 rows (20 %)
    result = run(conn, "sql__mostly",
                 {"type": "expect_column_values_to_be_in_set",
                  "kwargs": {"column": "currency", "value_set": ["CNY", "USD", "cny"], "mostly": 0.76}},
                 {"type": "expect_column_values_to_be_in_set",
                  "kwargs": {"column": "currency", "value_set": ["CNY", "USD", "cny"], "mostly": 0.75}},
                 {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "currency", "mostly": 0.8}},
                 {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "currency", "mostly": 0.81}})
    assert [r.success for r in result.results] == [False, True, True, False]
    assert result.results[0].result["unexpected_percent"] == 25.0
    assert result.results[2].result["unexpected_percent"] == 20.0
    assert result.results[0].result["partial_unexpected_counts"] == [{"value": "XXX", "count": 1}]


def test_a_value_missing_from_a_set_that_holds_a_null_still_fails(conn):
    result = run(conn, "sql__nullset", {"type": "expect_column_values_to_be_in_set",
                                        "kwargs": {"column": "currency", "value_set": ["CNY", None]}})
    assert failing(result) == ["O2", "O4", "O5"]


def test_the_row_count_is_a_batch_level_check(conn):
    result = run(conn, "sql__count", {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 6}},
                 {"type": "expect_table_row_count_to_equal", "kwargs": {"value": 5}})
    assert [(r.success, r.result) for r in result.results] == [(False, {"observed_value": 5}),
                                                                (True, {"observed_value": 5})]
    assert sqlchecks.level_of("expect_table_row_count_to_be_between") == "batch"


def test_only_rows_failing_a_critical_check_carry_their_mapped_row_with_exact_decimals(conn):
    stage(conn, "sql__payload")
    doc = {"name": "t", "expectations": [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "amount", "min_value": 0},
         "meta": {"severity": "critical"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "currency", "value_set": ["CNY"]},
         "meta": {"severity": "warning"}}]}
    checks = sqlchecks.parse_suite(doc, "t")
    with conn.cursor() as cur:
        result = sqlchecks.run_suite(cur, TABLE, "sql__payload", "erp", "orders", "t", checks,
                                     critical=lambda c: c.meta["severity"] == "critical")
    assert set(result.payloads) == {"O2"}  # O4, O5 fail only the warning
    assert result.payloads["O2"]["amount"] == Decimal("-5.00") and result.payloads["O2"]["source_pk"] == "O2"
    assert failing(result, 1) == ["O2", "O4", "O5"]


def test_a_check_that_cannot_run_on_this_table_is_an_error_result_and_the_others_still_run(conn):
    result = run(conn, "sql__errors",
                 {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "no_such_column"}},
                 {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "currency",
                                                                             "regex": "(?P<x>a)(?i)b"}},
                 {"type": "expect_column_values_to_be_between", "kwargs": {"column": "currency", "min_value": 1}},
                 {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "currency"}})
    errors = [r.error for r in result.results]
    assert 'The column "no_such_column"' in errors[0]
    assert "not valid in PostgreSQL" in errors[1]
    assert "must either be None or of the same type" in errors[2]
    assert errors[3] is None and failing(result, 3) == ["O3"]
    assert [r.success for r in result.results] == [False, False, False, False]


@pytest.mark.parametrize("expectation, message", [
    ({"type": "expect_column_kl_divergence_to_be_less_than", "kwargs": {"column": "amount"}},
     "expectations[1] (expect_column_kl_divergence_to_be_less_than): expectation type not supported"),
    ({"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "currency", "value_set": ["CNY"],
                                                               "row_condition": "amount > 0"}},
     "expectations[1] (expect_column_values_to_be_in_set): argument(s) row_condition not supported"),
    ({"type": "expect_column_values_to_match_regex", "kwargs": {"column": "currency"}},
     "expectations[1] (expect_column_values_to_match_regex): missing argument(s) regex"),
    ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "amount"}},
     "min_value and max_value cannot both be None"),
])
def test_an_expectation_the_stage_cannot_evaluate_fails_the_suite_loudly(tmp_path, monkeypatch, expectation, message):
    from crm_sync.quality.validate import load_suite_doc

    (tmp_path / "expectations").mkdir()
    monkeypatch.setenv("CRM_SYNC_INCLUDE_DIR", str(tmp_path))
    doc = {"name": "broken", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "source_pk"},
         "meta": {"severity": "critical"}}, {**expectation, "meta": {"severity": "critical"}}]}
    (tmp_path / "expectations" / "broken.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(SuiteError) as err:
        load_suite_doc("broken")
    assert "suite 'broken'" in str(err.value) and message in str(err.value)


def test_every_shipped_suite_is_evaluable():
    from crm_sync import paths
    from crm_sync.quality.validate import load_suite_doc

    names = sorted(p.stem for p in paths.expectations_dir().glob("*.json"))
    assert names and all(load_suite_doc(n)["expectations"] for n in names)


def test_python_regex_word_boundaries_and_named_groups_become_postgres_syntax():
    to_pg = sqlchecks.python_regex_to_postgres
    assert to_pg(r"\bab\B") == r"\yab\Y"
    assert to_pg(r"[\b]x") == r"[\b]x"  # inside a class it is not a boundary
    assert to_pg(r"(?P<year>\d{4})-") == r"(\d{4})-"
    assert to_pg(r"^[^@\s]+@[^@\s]+\.[^@\s]+$") == r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


def test_the_sql_checks_give_gx_pandas_verdicts_on_the_same_rows(conn):
    """The reference: Great Expectations' own pandas validation of the same rows (slow: imports GX)."""
    import pandas as pd

    from crm_sync.quality.validate import _run_gx

    suite = {"name": "parity", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "currency", "mostly": 0.8}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "currency", "value_set": ["CNY", "USD"]}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "amount", "min_value": 0,
                                                                  "max_value": 100, "mostly": 0.5}},
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "source_customer_id"}},
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "status", "regex": "^[a-z]+$"}},
        {"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "status", "max_value": 4}},
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 2, "max_value": 4}},
    ]}
    for e in suite["expectations"]:
        e["meta"] = {"severity": "critical"}
    stage(conn, "sql__parity")
    with conn.cursor() as cur:
        ours = sqlchecks.run_suite(cur, TABLE, "sql__parity", "erp", "orders", "parity",
                                   sqlchecks.parse_suite(suite, "parity"))
        cur.execute(f"select * from {TABLE} where run_id = 'sql__parity' order by source_pk")
        frame = pd.DataFrame.from_records(cur.fetchall(), columns=[d[0] for d in cur.description])
    theirs = _run_gx(frame, suite, "parity")
    by_type = {(r.expectation_config.type, r.expectation_config.kwargs.get("column")): r for r in theirs.results}
    keys = ("element_count", "unexpected_count", "missing_count", "unexpected_percent", "observed_value")
    for r in ours.results:
        gx = by_type[(r.check.type, r.check.column)]
        assert r.success == gx.success, r.check.label
        assert {k: r.result.get(k) for k in keys} == {k: gx.result.get(k) for k in keys}, r.check.label
        assert [i["source_pk"] for i in r.result.get("unexpected_index_list", [])] == \
            [i["source_pk"] for i in gx.result.get("unexpected_index_list", [])], r.check.label
