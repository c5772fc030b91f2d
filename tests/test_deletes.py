"""Deletes through the real stages (extract staging → resolve → map → load) against PostgreSQL.

A full snapshot soft-deletes the keys it no longer lists and recomputes the golden record; more than
`max_delete_share` missing stops the run before anything is written, unless the run allows it; a key
that comes back is revived; an incremental stream's tombstone deletes its key.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from crm_sync import load, mapping, watermark
from crm_sync.config import Tombstone, load_source
from crm_sync.deletes import DeleteBrakeError
from crm_sync.identity.resolve import resolve
from crm_sync.sources import extract as ex

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
UNTIL = T0 + timedelta(days=1)
SURNAMES = "赵钱孙李周吴郑王冯陈褚卫蒋沈韩杨朱秦尤许"


def _customer(i: int) -> dict:
    return {"customer_no": f"C{i:03d}", "name": SURNAMES[i % 20] + "伟芳娜敏静丽强磊军洋"[i // 20],
            "mobile": f"1390000{i:04d}", "phone": None, "email": f"c{i}@example.cn", "company": f"公司{i}",
            "city": "上海", "created_at": T0.isoformat(), "updated_at": (T0 + timedelta(minutes=i)).isoformat()}


def _run(conn, run_id: str, numbers, *, allow: bool = False, cfg=None):
    """One run of the ERP customers stream whose source holds the customers `numbers`."""
    cfg = cfg or load_source("erp")
    stream = cfg.stream("customers")
    window = watermark.Window(since=None, until=UNTIL)
    records = [_customer(i) for i in numbers]
    result = ex.stage_records(conn, run_id, cfg, stream, window, [records])
    with conn.cursor() as cur:
        listed = ex.stage_snapshot_keys(cur, run_id, cfg.source, stream.name, [[r["customer_no"] for r in records]])
        ex.write_account(cur, run_id, cfg, stream, window, result, source_total=None, source_checksum=None,
                         partial=False, snapshot_keys=listed)
    conn.commit()
    resolve(conn, run_id, cfg)
    conn.commit()
    mapping.map_stream(conn, run_id, cfg, stream)
    conn.commit()
    return load.load(conn, run_id, cfg, allow_deletes=allow)


def _state(conn) -> dict[str, tuple[bool, bool]]:
    """source_id -> (source record deleted, its golden record deleted)."""
    with conn.cursor() as cur:
        cur.execute("""select s.source_id, s.deleted_at is not null, c.deleted_at is not null
                       from crm.source_customer s join crm.customer c using (customer_id)
                       where s.source = 'erp'""")
        return {sid: (a, b) for sid, a, b in cur.fetchall()}


def test_a_snapshot_soft_deletes_what_it_no_longer_lists_and_brakes_a_mass_delete(conn):
    first = _run(conn, "r1", range(40))
    assert (first.customers, first.deleted) == (40, 0)

    # C007 is gone from the source: soft-deleted (2.5 % of the stream, under the 10 % brake)
    second = _run(conn, "r2", [i for i in range(40) if i != 7])
    assert second.deleted == 1
    state = _state(conn)
    assert state["C007"] == (True, True)           # its golden record had no other source record
    assert sum(d for d, _ in state.values()) == 1
    with conn.cursor() as cur:
        cur.execute("select deleted_run_id from crm.source_customer where source = 'erp' and source_id = 'C007'")
        assert cur.fetchone()[0] == "r2"

    # a snapshot missing 8 of the 39 live keys (21 %): nothing is written, the error says what to do
    with pytest.raises(DeleteBrakeError) as err:
        _run(conn, "r3", [i for i in range(40) if i not in (7, 1, 2, 3, 4, 5, 6, 8, 9)])
    message = str(err.value)
    assert "source 'erp'" in message and "stream 'customers'" in message and "8 of 39" in message
    assert "allow_deletes" in message and "Nothing was loaded or deleted" in message
    assert _state(conn) == state
    with conn.cursor() as cur:
        cur.execute("select count(*) from sync.watermark where source = 'erp' and run_id = 'r3'")
        assert cur.fetchone()[0] == 0

    # the operator checked the source and releases the brake for one run
    allowed = _run(conn, "r4", [i for i in range(40) if i not in (7, 1, 2, 3, 4, 5, 6, 8, 9)], allow=True)
    assert allowed.deleted == 8
    assert sum(d for d, _ in _state(conn).values()) == 9

    # C007 comes back: the same source record is revived, and so is its golden record
    back = _run(conn, "r5", [i for i in range(40) if i not in (1, 2, 3, 4, 5, 6, 8, 9)])
    assert back.deleted == 0
    assert _state(conn)["C007"] == (False, False)


def test_a_tombstone_deletes_its_key_and_the_golden_record_keeps_the_other_source(conn):
    erp = load_source("erp").model_copy(update={"source": "erp1"})  # this module's first test used 'erp'
    _run(conn, "t1", range(3), cfg=erp)
    # a second ERP-like source knows C001 too (same person: same phone, e-mail and name)
    other = erp.model_copy(update={"source": "erp2", "streams": [
        erp.stream("customers").model_copy(update={"tombstone": Tombstone(field="deleted")})]})
    _run(conn, "t2", [1], cfg=other)
    with conn.cursor() as cur:
        cur.execute("select count(distinct customer_id) from crm.source_customer where source_id = 'C001'")
        assert cur.fetchone()[0] == 1  # linked to one golden record

    stream = other.stream("customers")
    window = watermark.Window(since=None, until=UNTIL)
    gone = {**_customer(1), "deleted": "true", "updated_at": (T0 + timedelta(hours=2)).isoformat()}
    result = ex.stage_records(conn, "t3", other, stream, window, [[gone]])
    assert (result.rows, result.received) == (0, 1)
    with conn.cursor() as cur:
        ex.write_account(cur, "t3", other, stream, window, result, source_total=None, source_checksum=None,
                         partial=False)
    conn.commit()
    resolve(conn, "t3", other)
    mapping.map_stream(conn, "t3", other, stream)
    outcome = load.load(conn, "t3", other)
    assert outcome.deleted == 1
    with conn.cursor() as cur:
        cur.execute("""select s.source, s.deleted_at is not null, c.deleted_at is not null, c.provenance->'full_name'->>'source'
                       from crm.source_customer s join crm.customer c using (customer_id)
                       where s.source_id = 'C001' and s.source in ('erp1', 'erp2') order by s.source""")
        rows = cur.fetchall()
    # the golden record lives on with the ERP's record, its fields drawn only from what is left
    assert rows == [("erp1", False, False, "erp1"), ("erp2", True, False, "erp1")]
