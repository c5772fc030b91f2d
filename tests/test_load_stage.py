"""The load stage against a real PostgreSQL: COPY encoding round trips and `load.load` semantics.

`copy_rows` must bring any value back exactly as it went in (NULL vs empty, escapes, CJK, emoji,
Decimal scale, time zones); `load.load` must publish accepted rows with their links, change
nothing on a rerun, hold back quarantined keys and move the watermark only forward.
"""
from __future__ import annotations

import json
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from crm_sync import load, runlog, staging
from crm_sync.config import load_source

AWKWARD_TEXT = [
    None,
    "",
    " ",
    "\\N",
    "N",
    "tab\there",
    "line\nbreak",
    "carriage\rreturn\r\n",
    "back\\slash\\",
    "\\\\",
    "\\t not a tab",
    'double "quotes" and \'single\'',
    "comma, separated, value",
    "王伟 北京市朝阳区",
    "emoji 😀👍🏽 and zero-width\u200bjoiner",
    "trailing tab\t",
    "\t",
    "\n",
    "mixed\t\\\n\r,\"'",
]


@pytest.fixture()
def scratch(conn):
    with conn.cursor() as cur:
        cur.execute("""create temp table copy_probe (
            id int primary key, t text, n numeric, ts timestamptz, d date, j jsonb, b boolean, u uuid,
            i bigint, f double precision, raw bytea)""")
    return conn


def _copy_and_read(conn, rows):
    columns = ["id", "t", "n", "ts", "d", "j", "b", "u", "i", "f", "raw"]
    with conn.cursor() as cur:
        written = staging.copy_rows(cur, "pg_temp.copy_probe", columns, rows)
        cur.execute("select id, t, n, ts, d, j, b, u, i, f, raw from copy_probe order by id")
        return written, cur.fetchall()


def test_copy_rows_round_trips_awkward_text(scratch):
    rows = [(i, text, None, None, None, None, None, None, None, None, None) for i, text in enumerate(AWKWARD_TEXT)]
    written, back = _copy_and_read(scratch, rows)
    assert written == len(AWKWARD_TEXT)
    assert [r[1] for r in back] == AWKWARD_TEXT
    assert back[0][1] is None and back[1][1] == ""  # NULL and the empty string stay different


def test_copy_rows_round_trips_typed_values(scratch):
    shanghai = timezone(timedelta(hours=8))
    ts = datetime(2026, 11, 1, 23, 59, 59, 123456, tzinfo=shanghai)
    payload = {"name": "王伟\t\"x\"\n", "amount": Decimal("0.10"), "tags": ["a\\b", None],
               "at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)}
    uid = uuid.UUID(int=42)
    rows = [
        (1, "a", Decimal("0.10"), ts, date(2026, 2, 28), payload, True, uid, 2**62, 0.5, b"\x00\\\t\n"),
        (2, "b", Decimal("-12345678901234567890.000"), datetime(2026, 3, 29, 1, 30, tzinfo=timezone.utc),
         None, [1, "two", {"three": None}], False, str(uid), -1, None, b""),
        (3, "c", Decimal("1E+2"), None, None, {}, None, None, 0, -0.0, None),
    ]
    written, back = _copy_and_read(scratch, rows)
    assert written == 3
    first, second, third = back
    assert first[2] == Decimal("0.10") and str(first[2]) == "0.10"  # scale kept, never a float
    assert first[3] == ts and first[3].utcoffset() is not None
    assert first[3].astimezone(timezone.utc) == datetime(2026, 11, 1, 15, 59, 59, 123456, tzinfo=timezone.utc)
    assert first[4] == date(2026, 2, 28)
    assert first[5] == json.loads(staging.to_json(payload))
    assert first[5]["amount"] == "0.10" and first[5]["name"] == "王伟\t\"x\"\n"
    assert first[6] is True and first[7] == str(uid) and first[8] == 2**62 and first[9] == 0.5
    assert bytes(first[10]) == b"\x00\\\t\n"
    assert str(second[2]) == "-12345678901234567890.000"
    assert second[5] == [1, "two", {"three": None}] and second[6] is False and bytes(second[10]) == b""
    assert third[2] == Decimal("100") and third[5] == {} and third[6] is None and third[10] is None


def test_copy_rows_streams_many_batches_and_takes_any_iterable(scratch):
    n = staging.BATCH_ROWS * 3 + 7
    rows = ((i, f"row {i}\twith tab" if i % 997 == 0 else f"row {i}", Decimal(i) / 100, None, None, None,
             None, None, None, None, None) for i in range(n))
    written, back = _copy_and_read(scratch, rows)
    assert written == n == len(back)
    assert back[997][1] == "row 997\twith tab" and back[998][1] == "row 998"
    assert str(back[-1][2]) == f"{Decimal(n - 1) / 100}"


def test_copy_rows_with_no_rows_writes_nothing(scratch):
    assert _copy_and_read(scratch, []) == (0, [])


def test_copy_rows_rejects_nul_instead_of_corrupting(scratch):
    with pytest.raises(ValueError, match="NUL"):
        _copy_and_read(scratch, [(1, "a\x00b", None, None, None, None, None, None, None, None, None)])


# ---------------------------------------------------------------- load.load semantics ----------
MAPPED = ["run_id", "source", "stream", "source_pk", "customer_id", "full_name", "name_key", "phone_raw",
          "phone_e164", "phone_kind", "phone_ext", "email", "company", "city", "source_created_at",
          "source_updated_at", "row_hash"]
RESOLVED = ["run_id", "source", "stream", "source_pk", "customer_id", "decision", "match_rule", "match_score",
            "explanation", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind", "phone_ext", "email",
            "email_valid"]
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def erp():
    return load_source("erp")


def _stage_run(conn, cfg, run_id: str, records: list[dict], quarantined: tuple[str, ...] = ()) -> None:
    """Leave staging as extract, resolve, map and validate would have for `records` of the customers stream."""
    stream = "customers"
    with conn.cursor() as cur:
        runlog.start(cur, run_id, cfg.source, cfg.dag_id, T0 - timedelta(days=1), T0)
        staging.copy_rows(cur, "stg.extracted", ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
                          [(run_id, cfg.source, stream, r["pk"], r["updated"], {"customer_no": r["pk"]})
                           for r in records])
        staging.copy_rows(cur, "stg.resolved", RESOLVED, [
            (run_id, cfg.source, stream, r["pk"], r["customer_id"], r.get("decision", "new"),
             r.get("rule", "new"), None, {"why": "test"}, r["name"], r["name"].lower(), r["phone"],
             r["phone"], "mobile", None, r.get("email"), r.get("email") is not None)
            for r in records])
        staging.copy_rows(cur, "stg.mapped_customer", MAPPED, [
            (run_id, cfg.source, stream, r["pk"], r["customer_id"], r["name"], r["name"].lower(), r["phone"],
             r["phone"], "mobile", None, r.get("email"), r.get("company"), r.get("city"), T0 - timedelta(days=9),
             r["updated"], f"hash-{r['name']}-{r.get('email')}-{r.get('city')}")
            for r in records])
        for pk in quarantined:
            cur.execute("""insert into sync.quarantine (run_id, source, stream, source_pk, stage, field, reason)
                           values (%s, %s, %s, %s, 'validate', 'email', 'test: rejected')""",
                        (run_id, cfg.source, stream, pk))
    conn.commit()


def _record(prefix: str, i: int, **overrides) -> dict:
    record = {"pk": f"{prefix}{i:04d}", "customer_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{prefix}{i}")),
              "name": f"Wang Wei {prefix}{i}", "phone": f"+86138{i:08d}", "email": f"{prefix.lower()}{i}@example.com",
              "company": "Acme 有限公司", "city": "Shanghai", "updated": T0 - timedelta(hours=i)}
    record.update(overrides)
    return record


def _snapshot(conn) -> dict:
    tables = {
        "customer": "select xmin::text, * from crm.customer order by customer_id",
        "source_customer": "select xmin::text, * from crm.source_customer order by source, source_id",
        "customer_link": "select xmin::text, * from crm.customer_link order by source, source_id",
        "watermark": "select xmin::text, * from sync.watermark order by source, stream",
    }
    with conn.cursor() as cur:
        result = {}
        for name, query in tables.items():
            cur.execute(query)
            result[name] = cur.fetchall()
    conn.commit()
    return result


def _one(conn, query, params=()):
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def test_load_publishes_customers_source_records_and_links(conn, erp):
    run_id = "test__publish"
    records = [_record("P", i) for i in range(5)]
    records.append(_record("P", 5, customer_id=records[0]["customer_id"], decision="linked", rule="phone_exact"))
    _stage_run(conn, erp, run_id, records)

    result = load.load(conn, run_id, erp)

    assert result.customers == 6 and result.rejected == 0
    pks = [r["pk"] for r in records]
    rows = _one(conn, "select source_id, customer_id::text, full_name, row_hash, loaded_run_id from crm.source_customer"
                      " where source = 'erp' and source_id = any(%s) order by source_id", (pks,))
    assert [r[0] for r in rows] == pks
    assert all(r[4] == run_id for r in rows)
    assert {r[1] for r in rows} == {r["customer_id"] for r in records}
    links = _one(conn, "select source_id, customer_id::text, match_rule from crm.customer_link"
                       " where source = 'erp' and source_id = any(%s) order by source_id", (pks,))
    assert [(pk, cid) for pk, cid, _ in links] == [(r["pk"], r["customer_id"]) for r in records]
    assert links[-1][2] == "phone_exact"
    customers = _one(conn, "select count(*) from crm.customer where customer_id = any(%s::uuid[])",
                     ([r["customer_id"] for r in records],))
    assert customers == [(5,)]  # the sixth record joined the first one's customer


def test_rerunning_the_same_load_changes_nothing(conn, erp):
    run_id = "test__rerun"
    _stage_run(conn, erp, run_id, [_record("R", i) for i in range(8)])
    load.load(conn, run_id, erp)
    before = _snapshot(conn)

    again = load.load(conn, run_id, erp)

    assert again.customers == 8
    assert _snapshot(conn) == before  # contents and row versions (xmin): not even a no-op update


def test_quarantined_key_is_not_loaded(conn, erp):
    run_id = "test__quarantine"
    records = [_record("Q", i) for i in range(4)]
    _stage_run(conn, erp, run_id, records, quarantined=("Q0002",))

    result = load.load(conn, run_id, erp)

    assert result.customers == 3 and result.rejected == 1
    loaded = _one(conn, "select source_id from crm.source_customer where source_id like 'Q%%' order by 1")
    assert loaded == [("Q0000",), ("Q0001",), ("Q0003",)]
    assert _one(conn, "select count(*) from crm.customer_link where source_id = 'Q0002'") == [(0,)]
    assert _one(conn, "select count(*) from crm.customer where customer_id = %s", (records[2]["customer_id"],)) == [(0,)]
    assert _one(conn, "select rows_loaded, rows_rejected from sync.run_log where run_id = %s", (run_id,)) == [(3, 1)]


def test_watermark_moves_to_the_runs_max_cursor_and_never_back(conn, erp):
    def mark():
        return _one(conn, "select cursor_value, cursor_pk, run_id from sync.watermark"
                          " where source = 'erp' and stream = 'customers'")[0]

    late = datetime(2031, 5, 1, 12, tzinfo=timezone.utc)  # after every other test's cursors
    _stage_run(conn, erp, "test__wm1", [_record("W", i, updated=late - timedelta(minutes=i)) for i in range(3)])
    load.load(conn, "test__wm1", erp)
    assert mark() == (late, "W0000", "test__wm1")

    _stage_run(conn, erp, "test__wm2", [_record("X", i, updated=late - timedelta(days=30, minutes=i))
                                        for i in range(3)])
    load.load(conn, "test__wm2", erp)
    assert mark() == (late, "W0000", "test__wm1")  # an older run (a backfill) never moves it back

    later = late + timedelta(days=1)
    _stage_run(conn, erp, "test__wm3", [_record("Y", i, updated=later - timedelta(minutes=i)) for i in range(3)])
    load.load(conn, "test__wm3", erp)
    assert mark() == (later, "Y0000", "test__wm3")


def test_single_record_fast_path_matches_the_general_path(conn, erp):
    """A customer with one source record and no override takes survivorship's fast path; an override
    sends it down the general path: every field the override does not decide stays exactly the same."""
    from crm_sync.identity import apply as identity_apply

    run_id = "test__single_record"
    full = _record("F", 0, company="Acme 有限公司", city="Shanghai")
    sparse = _record("F", 1, email=None, city=None, updated=None)   # absent fields, no update time
    _stage_run(conn, erp, run_id, [full, sparse])
    load.load(conn, run_id, erp)
    query = ("select full_name, phone_e164, phone_kind, phone_ext, email, company, city, provenance"
             " from crm.customer where customer_id = %s")

    fast = _one(conn, query, (full["customer_id"],))[0]
    entry = {"source": "erp", "source_id": "F0000", "rule": "only_value"}
    assert fast[:7] == ("Wang Wei F0", "+8613800000000", "mobile", None, "f0@example.com", "Acme 有限公司",
                        "Shanghai")
    assert set(fast[7]) == {"full_name", "phone", "email", "company", "city"}
    for field, prov in fast[7].items():
        assert {k: v for k, v in prov.items() if k != "at"} == entry, field
        assert datetime.fromisoformat(prov["at"]) == full["updated"]
    sparse_fast = _one(conn, query, (sparse["customer_id"],))[0]
    assert sparse_fast[:7] == ("Wang Wei F1", "+8613800000001", "mobile", None, None, "Acme 有限公司", None)
    assert sparse_fast[7] == {f: {"source": "erp", "source_id": "F0001", "rule": "only_value"}
                              for f in ("full_name", "phone", "company")}   # no email/city, no 'at'

    with conn.cursor() as cur:
        for record in (full, sparse):
            identity_apply.set_override(cur, record["customer_id"], "company", "Override Co", by="steward.test")
    conn.commit()
    for before, record in ((fast, full), (sparse_fast, sparse)):
        general = _one(conn, query, (record["customer_id"],))[0]
        assert general[5] == "Override Co" and general[7]["company"]["rule"] == "override"
        assert general[:5] + general[6:7] == before[:5] + before[6:7]
        assert {f: p for f, p in general[7].items() if f != "company"} == \
               {f: p for f, p in before[7].items() if f != "company"}
