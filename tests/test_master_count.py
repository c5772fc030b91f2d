"""The master's size is data (migration 0013): exact after inserts, upserts, deletes and truncates,
so term-frequency weights do not depend on when autovacuum last ran."""
from __future__ import annotations

from crm_sync import db
from crm_sync.identity import master


def _count(cur) -> tuple[int, int]:
    cur.execute("select count(*) from crm.source_identity")
    counted = cur.fetchone()[0]
    return master.master_records(cur), counted


def test_the_counter_follows_every_write(fresh_dsn):
    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            assert _count(cur) == (0, 0)
            cur.execute("""insert into crm.source_identity (source, source_id, stream, name, loaded_run_id)
                           select 'erp', 'C' || g, 'customers', 'n' || g, 'r1' from generate_series(1, 50) g""")
            assert _count(cur) == (50, 50)
            # an upsert that updates 20 and inserts 10 counts only the 10
            cur.execute("""insert into crm.source_identity as t (source, source_id, stream, name, loaded_run_id)
                           select 'erp', 'C' || g, 'customers', 'm' || g, 'r2' from generate_series(31, 60) g
                           on conflict (source, source_id) do update set name = excluded.name""")
            assert _count(cur) == (60, 60)
            cur.execute("delete from crm.source_identity where source_id in ('C1', 'C2', 'C3')")
            assert _count(cur) == (57, 57)
            conn.rollback()
            assert _count(cur) == (0, 0)   # the counter is transactional with the rows
            cur.execute("""insert into crm.source_identity (source, source_id, stream, name, loaded_run_id)
                           values ('erp', 'X', 'customers', 'x', 'r3')""")
            cur.execute("truncate crm.source_identity cascade")
            assert _count(cur) == (0, 0)
    finally:
        conn.rollback()
        conn.close()
