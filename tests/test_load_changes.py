"""The load writes what changed, once: unchanged rows are not touched, new customers are inserted
complete, and the golden record of every customer whose records changed is recomputed.

Uses the staging helpers of `tests/test_load_stage.py` (a run staged as extract, resolve, map and
validate would leave it).
"""
from __future__ import annotations

from datetime import timedelta

from crm_sync import load, survivorship
from tests.test_load_stage import _one, _record, _stage_run, erp  # noqa: F401  (erp is a fixture)


def _rows(conn, prefix: str) -> dict:
    return {pk: (xmin, run) for pk, xmin, run in _one(
        conn, "select source_id, xmin::text, loaded_run_id from crm.source_customer where source_id like %s",
        (f"{prefix}%",))}


def test_a_changed_row_is_the_only_one_written(conn, erp):
    records = [_record("U", i) for i in range(6)]
    _stage_run(conn, erp, "test__unchanged_1", records)
    load.load(conn, "test__unchanged_1", erp)
    before = _rows(conn, "U")
    customers_before = dict(_one(conn, "select customer_id::text, xmin::text from crm.customer"
                                       " where customer_id = any(%s::uuid[])", ([r["customer_id"] for r in records],)))

    records[2] = {**records[2], "city": "Hangzhou", "updated": records[2]["updated"] + timedelta(days=1)}
    _stage_run(conn, erp, "test__unchanged_2", records)
    result = load.load(conn, "test__unchanged_2", erp)

    after = _rows(conn, "U")
    assert result.customers == 6                                   # every accepted row was considered
    assert [pk for pk in after if after[pk] != before[pk]] == ["U0002"]
    assert after["U0002"][1] == "test__unchanged_2"
    assert _one(conn, "select rows_loaded from sync.run_log where run_id = 'test__unchanged_2'") == [(1,)]
    customers_after = dict(_one(conn, "select customer_id::text, xmin::text from crm.customer"
                                      " where customer_id = any(%s::uuid[])", ([r["customer_id"] for r in records],)))
    changed = [c for c in customers_after if customers_after[c] != customers_before[c]]
    assert changed == [records[2]["customer_id"]]                  # only its golden record was rewritten
    assert _one(conn, "select city, provenance->'city'->>'source_id' from crm.customer where customer_id = %s",
                (records[2]["customer_id"],)) == [("Hangzhou", "U0002")]


def test_a_new_customer_is_inserted_with_the_golden_record_refresh_would_give(conn, erp):
    first = _record("N", 0, name="Zhang", city="北京", updated=_record("N", 0)["updated"] - timedelta(days=3))
    second = _record("N", 1, customer_id=first["customer_id"], decision="linked", rule="phone_exact",
                     name="Zhang San", city="北京市", email=None)
    _stage_run(conn, erp, "test__new_complete", [first, second])

    load.load(conn, "test__new_complete", erp)

    row = _one(conn, "select full_name, city, email, provenance from crm.customer where customer_id = %s",
               (first["customer_id"],))
    assert row and row[0][0] == "Zhang San" and row[0][1] == "北京市" and row[0][2] == first["email"]
    assert row[0][3]["full_name"]["rule"] == "completeness" and row[0][3]["email"]["rule"] == "only_value"
    with conn.cursor() as cur:  # recomputing from the stored records changes nothing: the insert was final
        assert survivorship.refresh(cur, None, customer_ids=[first["customer_id"]]) == 0
    conn.rollback()


def test_a_record_that_moves_recomputes_the_customer_it_left(conn, erp):
    a = _record("M", 0)
    b = _record("M", 1, customer_id=a["customer_id"], decision="linked", rule="phone_exact", city="Chengdu",
                updated=a["updated"] + timedelta(hours=5))
    _stage_run(conn, erp, "test__move_1", [a, b])
    load.load(conn, "test__move_1", erp)
    assert _one(conn, "select city from crm.customer where customer_id = %s", (a["customer_id"],)) == [("Chengdu",)]

    moved = {**b, "customer_id": _record("M", 9)["customer_id"], "decision": "new", "rule": "new"}
    _stage_run(conn, erp, "test__move_2", [a, moved])
    load.load(conn, "test__move_2", erp)

    # the customer it left falls back to its remaining record; the new one is complete at once
    assert _one(conn, "select city, provenance->'city'->>'source_id' from crm.customer where customer_id = %s",
                (a["customer_id"],)) == [("Shanghai", "M0000")]
    assert _one(conn, "select city from crm.customer where customer_id = %s", (moved["customer_id"],)) == [("Chengdu",)]
