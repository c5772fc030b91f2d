"""The map stage's set-based path (`crm_sync.mapsql`) maps exactly as the Python path does.

Each case stages the same records twice and maps one run set-based and the other with
`set_based=False` (every record through `mapping.cast`), then compares what each left: the staged
rows with their hashes, and the quarantine with its reasons. The records are the awkward ones — a
timestamp of 30 February, an amount with a thousands comma, a key `42.0`, a text with an
ideographic space around it — so a guard that lets a record through which the SQL maps differently
shows up as a difference here.
"""
from __future__ import annotations

from datetime import timedelta, timezone

import pytest

from crm_sync import mapping, mapsql
from crm_sync.config import load_source
from crm_sync.identity.resolve import resolve
from test_row_isolation import T0, customer, order, stage

AWKWARD_ORDERS = [
    # timestamps: the guarded ISO form, and everything that must go to Python (some accepted there, some not)
    {"updated_at": "2026-03-01T10:00:00Z"}, {"updated_at": "2026-03-01T10:00:00.123+08:00"},
    {"updated_at": "2026-03-01 10:00:00.5-05:30"}, {"updated_at": "2026-03-01T10:00+00:00"},
    {"updated_at": "2026-03-01T10:00:00"}, {"updated_at": "2026-02-30T10:00:00Z"},
    {"updated_at": "2024-02-29T10:00:00Z"}, {"updated_at": "2026-02-29T10:00:00Z"},
    {"updated_at": "2026-13-01T10:00:00Z"}, {"updated_at": "0000-01-01T10:00:00Z"},
    {"updated_at": "2026-03-01T24:00:00Z"}, {"updated_at": "2026-03-01T23:59:60Z"},
    {"updated_at": "2026-03-01T10:00:00.1234567Z"}, {"updated_at": "2026-03-31T10:00:00+14:00"},
    {"updated_at": "2026-04-31T10:00:00Z"}, {"updated_at": " 2026-03-01T10:00:00Z"}, {"updated_at": None},
    # dates: the first ten characters count
    {"order_date": "2026-02-28T23:00:00+08:00"}, {"order_date": "2026-02-30"}, {"order_date": "20260228"},
    {"order_date": "2026-2-28"}, {"order_date": "2024-02-29"}, {"order_date": "2026-02-28 and then some"},
    # amounts of numeric(18,2) with scale 2
    {"amount": "100.5"}, {"amount": "100.555"}, {"amount": "1,000.00"}, {"amount": "-0"}, {"amount": "00012.5"},
    {"amount": " 12.5 "}, {"amount": 12.5}, {"amount": 12}, {"amount": "1e3"}, {"amount": "9999999999999999.99"},
    {"amount": "99999999999999999"}, {"amount": "NaN"}, {"amount": ""}, {"amount": "12."}, {"amount": ".5"},
    # texts
    {"currency": " CNY"}, {"currency": "CNY\u3000"}, {"currency": "\u00a0"}, {"currency": ""},
    {"currency": "x" * 10_001}, {"currency": "a\u00a0b"}, {"currency": "\u2028"}, {"currency": None},
    {"status": {"code": "paid"}}, {"status": True}, {"status": 7}, {"status": "it's \"quoted\" \\ and \t tabbed"},
    # the customer reference is a record key
    {"customer_no": "42.0"}, {"customer_no": "42.00"}, {"customer_no": " 42 "}, {"customer_no": "0042"},
    {"customer_no": 42}, {"customer_no": 42.0}, {"customer_no": "--5.0"}, {"customer_no": "\uff15.0"},
    {"customer_no": "C1.5"}, {"customer_no": None}, {"customer_no": "张三"},
]


def left_behind(conn, run_id: str, table: str) -> tuple[list, list]:
    """(staged rows without the run id, quarantine rows without the run id), sorted."""
    with conn.cursor() as cur:
        cur.execute(f"select to_jsonb(m) - 'run_id' from {table} m where run_id = %s order by source_pk", (run_id,))
        staged = [r[0] for r in cur.fetchall()]
        cur.execute("select source_pk, stage, field, reason, payload from sync.quarantine where run_id = %s"
                    " order by source_pk, field", (run_id,))
        return staged, cur.fetchall()


@pytest.fixture(scope="module")
def erp():
    return load_source("erp")


def test_orders_map_alike_set_based_and_in_python(conn, erp):
    records = [order(i) for i in range(20)] + [order(100 + i, **o) for i, o in enumerate(AWKWARD_ORDERS)]
    stage(conn, erp, "sql__orders", "orders", records)
    stage(conn, erp, "py__orders", "orders", records)
    stream = erp.stream("orders")

    in_sql = mapping.map_stream(conn, "sql__orders", erp, stream)
    with conn.cursor() as cur:   # the Python path's COPY under another time zone: hashes do not move
        cur.execute("set local timezone = 'Asia/Shanghai'")
        in_python = mapping.map_stream(conn, "py__orders", erp, stream, set_based=False)
    conn.commit()

    sql_rows, sql_rejects = left_behind(conn, "sql__orders", "stg.mapped_order")
    py_rows, py_rejects = left_behind(conn, "py__orders", "stg.mapped_order")
    assert sql_rows == py_rows
    assert sql_rejects == py_rejects
    assert (in_sql.mapped, in_sql.rejected) == (in_python.mapped, in_python.rejected)
    assert in_python.in_sql == 0
    # the plain records and the awkward ones the guards let through went set-based; the rest through Python
    assert 20 + 12 <= in_sql.in_sql < in_sql.mapped
    assert in_sql.rejected >= 20   # the cases are not all accepted: the Python path did word reasons


def test_one_value_moves_the_hash_and_one_instant_does_not(conn, erp):
    records = [order(1), order(2), order(3, amount="100.01", updated_at=order(2)["updated_at"]),
               order(4, updated_at=(T0 + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=8))).isoformat()),
               order(5, status="paid ", updated_at=order(1)["updated_at"])]   # stripped: order 1's values
    stage(conn, erp, "hash__orders", "orders", records)
    mapping.map_stream(conn, "hash__orders", erp, erp.stream("orders"))
    with conn.cursor() as cur:
        cur.execute("select source_pk, row_hash from stg.mapped_order where run_id = 'hash__orders'")
        hashes = dict(cur.fetchall())
    assert len(hashes["SO0000001"]) == 32
    assert hashes["SO0000001"] != hashes["SO0000002"]          # another updated_at
    assert hashes["SO0000002"] != hashes["SO0000003"]          # another amount
    assert hashes["SO0000004"] == hashes["SO0000001"]          # the same instant at +08:00
    assert hashes["SO0000005"] == hashes["SO0000001"]          # mapped in Python, hashed alike


def test_customers_map_alike_set_based_and_in_python(conn, erp):
    records = [customer(f"C{i}", name) for i, name in enumerate(["张伟", "王芳", "張三先生", None, ""])]
    records += [customer("C10", "李娜", company="  华信  "), customer("C11", "刘洋", city={"name": "北京"}),
                customer("C12", "陈静", created_at="2026-03-01T10:00:00"), customer("C13", "杨磊", updated_at=None),
                customer("C14", "赵敏", email="x" * 10_001), customer("C15", "孙丽", mobile=["13800138000"])]
    stream = erp.stream("customers")
    results = {}
    for run_id, set_based in (("sql__customers", True), ("py__customers", False)):
        stage(conn, erp, run_id, "customers", records)
        resolve(conn, run_id, erp)
        conn.commit()
        results[run_id] = mapping.map_stream(conn, run_id, erp, stream, set_based=set_based)
        conn.commit()

    def comparable(run_id):
        staged, rejects = left_behind(conn, run_id, "stg.mapped_customer")
        return [{k: v for k, v in row.items() if k != "customer_id"} for row in staged], rejects

    assert comparable("sql__customers") == comparable("py__customers")
    # set-based: C0–C2 and C3 (no name at all); C4's blank name and C10's padded company need Python
    assert (results["sql__customers"].in_sql, results["py__customers"].in_sql) == (4, 0)
    assert results["sql__customers"].mapped == results["py__customers"].mapped == 6


def test_a_field_only_python_can_map_sends_the_whole_stream_there():
    calls = load_source("callcenter").stream("calls")
    fields = {t: mapsql.field_sql("j", "t", fm, key=False, limit=None) for t, fm in calls.mapping.items()}
    assert fields["duration_seconds"] is None and None in fields.values()   # an int, a picked phone
    invoices = load_source("finance").stream("invoices")
    assert mapsql.field_sql("j", "t", invoices.mapping["currency"], key=False, limit=None) is not None
    assert mapsql.field_sql("j", "t", invoices.mapping["amount"], key=False, limit=None) is None  # money
    assert mapsql.MAX_TEXT == mapping.MAX_TEXT


def test_the_space_class_is_what_str_strip_removes():
    import re

    space = re.compile(mapsql._space_class())
    for c in map(chr, range(0x3001)):
        assert bool(space.fullmatch(c)) == (c.strip() == "" and c != ""), repr(c)


def test_a_values_map_maps_alike_set_based_and_in_python(conn, erp):
    stream = erp.stream("orders")
    currency = stream.mapping["currency"].model_copy(
        update={"values": {"CNY": "CNY", "RMB": "CNY", "人民币": "CNY", "USD": "USD", "1": "USD"}})
    stream = stream.model_copy(update={"mapping": {**stream.mapping, "currency": currency}})
    records = [order(i, currency=c) for i, c in enumerate(["CNY", "RMB", "人民币", " RMB", "rmb", "XYZ", None, 1,
                                                           "1", True, "", "USD"])]
    results = {}
    for run_id, set_based in (("sql__values", True), ("py__values", False)):
        stage(conn, erp, run_id, "orders", records)
        results[run_id] = mapping.map_stream(conn, run_id, erp, stream, set_based=set_based)
    conn.commit()

    assert left_behind(conn, "sql__values", "stg.mapped_order") == left_behind(conn, "py__values", "stg.mapped_order")
    assert results["sql__values"].in_sql == 6   # CNY, RMB, 人民币, None, "1", USD
    with conn.cursor() as cur:
        cur.execute("select currency, count(*) from stg.mapped_order where run_id = 'sql__values' group by 1")
        assert dict(cur.fetchall()) == {"CNY": 4, "USD": 3, None: 2}
