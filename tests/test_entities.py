"""The entity registry against a real PostgreSQL: tables match it, merges move every entity, orphans wait.

- every entity's staging and target tables have exactly the registry's columns and types;
- a merge of two customers that own one row of every entity leaves nothing on the absorbed one,
  in any crm table with a `customer_id` (so a table added without registering it fails here);
- a fact whose customer is unknown is held with the reason "customer not known yet" and loaded by
  a later run of another source once the customer arrives (by record id and by phone number);
- `orphans: stub` loads the fact onto a stub customer that is merged into the real one later.
"""
from __future__ import annotations

import uuid
from datetime import date, timedelta

import pytest
from test_load_stage import T0, _record, _stage_run

from crm_sync import entities, facts, load, runlog, staging
from crm_sync.config import SourceConfig
from crm_sync.identity.apply import apply_identity
from crm_sync.mapping import staging_columns


def _rows(conn, query, params=()):
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def _columns(conn, table: str) -> dict[str, str]:
    schema, name = table.split(".")
    return dict(_rows(conn, """select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a
                               where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped""",
                      (f"{schema}.{name}",)))


def _normal(sql_type: str) -> str:
    return {"numeric(18,2)": "numeric(18,2)", "timestamptz": "timestamp with time zone"}.get(sql_type, sql_type)


@pytest.mark.parametrize("spec", entities.FACTS, ids=lambda s: s.name)
def test_fact_tables_match_the_registry(conn, spec):
    target, stg = _columns(conn, spec.target), _columns(conn, spec.staging)
    for column, sql_type in spec.columns.items():
        assert _normal(target.get(column, "missing")) == _normal(sql_type), f"{spec.target}.{column}"
        assert _normal(stg.get(column, "missing")) == _normal(sql_type), f"{spec.staging}.{column}"
    keys = {"source", spec.key, "customer_id", "ref_by", "ref_source", "row_hash", "loaded_run_id",
            "deleted_at", "deleted_run_id"}  # soft deletes (deletes.py) are on every target
    assert set(target) == set(spec.columns) | keys
    assert set(stg) == set(staging_columns(spec.name)) | {"run_id", "source", "stream", "source_pk", "row_hash"}


def test_customer_owned_covers_every_crm_table_with_a_customer_id(conn):
    tables = {f"crm.{t}" for (t,) in _rows(conn, """select table_name from information_schema.columns
                                                  where table_schema = 'crm' and column_name = 'customer_id'""")}
    # the customer itself and the steward's overrides (moved field by field) are not plain owned rows
    assert tables - {"crm.customer", "crm.golden_override"} == set(entities.CUSTOMER_OWNED)


def _source(name: str, fact_streams: list[dict], orphans: str = "hold") -> SourceConfig:
    customers = {"name": "customers", "entity": "customer", "primary_key": "customer_no", "cursor_field": "updated_at",
                 "query": "select 1", "identity": {"name": "name", "phones": ["mobile"]},
                 "mapping": {"full_name": {"from": "name"}}, "expectation_suite": "customer"}
    return SourceConfig.model_validate({
        "source": name, "kind": "sql", "conn_id": "x", "schedule": "0 * * * *", "sync_mode": "full",
        "orphans": orphans, "streams": [customers, *fact_streams]})


def _fact_stream(entity: str, **extra) -> dict:
    spec = entities.get(entity)
    mapping = {c: {"from": c} for c in spec.columns if c in ("source_customer_id",)}
    return {"name": f"{entity}s", "entity": entity, "primary_key": "id", "cursor_field": "updated_at",
            "query": "select 1", "mapping": mapping, "expectation_suite": entity, **extra}


def _stage_fact(conn, cfg: SourceConfig, run_id: str, entity: str, pk: str, ref: str, **values) -> None:
    spec = entities.get(entity)
    stream = f"{entity}s"
    row = {c: None for c in spec.columns}
    row.update(source_customer_id=ref, **values)
    with conn.cursor() as cur:
        runlog.start(cur, run_id, cfg.source, cfg.dag_id, T0 - timedelta(days=1), T0)
        staging.copy_rows(cur, "stg.extracted", ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
                          [(run_id, cfg.source, stream, pk, T0, {"id": pk})])
        staging.copy_rows(cur, spec.staging, ["run_id", "source", "stream", "source_pk", *spec.columns, "row_hash"],
                          [(run_id, cfg.source, stream, pk, *row.values(), f"h-{pk}-{ref}")])
    conn.commit()


def test_a_merge_moves_a_row_of_every_entity(conn):
    cfg = _source("mergesrc", [])
    a, b = _record("MA", 0), _record("MB", 1)
    _stage_run(conn, cfg, "merge__r1", [a, b])
    load.load(conn, "merge__r1", cfg)
    with conn.cursor() as cur:
        for spec in entities.FACTS:
            defaults = {"currency": "CNY"} if "currency" in spec.columns else {}
            defaults.update({c: 1 for c in spec.money})
            cols = ["source", spec.key, "source_customer_id", "customer_id", "row_hash", "loaded_run_id", *defaults]
            cur.execute(f"insert into {spec.target} ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))})",
                        ("mergesrc", f"{spec.name}-1", b["pk"], b["customer_id"], "h", "merge__r1",
                         *defaults.values()))
        cur.execute("""insert into stg.cluster_merge (run_id, source, survivor, absorbed) values (%s, %s, %s, %s)""",
                    ("merge__r1", "mergesrc", a["customer_id"], b["customer_id"]))
        apply_identity(cur, "merge__r1", "mergesrc")
    conn.commit()

    owned = {f"crm.{t}" for (t,) in _rows(conn, """select table_name from information_schema.columns
                                                 where table_schema = 'crm' and column_name = 'customer_id'
                                                   and table_name <> 'customer'""")}
    for table in sorted(owned):
        left = _rows(conn, f"select count(*) from {table} where customer_id = %s", (b["customer_id"],))[0][0]
        assert left == 0, f"{table} still has rows on the merged-away customer"
    for spec in entities.FACTS:
        assert _rows(conn, f"select customer_id::text from {spec.target} where {spec.key} = %s",
                     (f"{spec.name}-1",)) == [(a["customer_id"],)], spec.name
    assert _rows(conn, "select merged_into::text from crm.customer where customer_id = %s",
                 (b["customer_id"],)) == [(a["customer_id"],)]


def test_orphan_is_held_then_loaded_when_its_customer_arrives(conn):
    cfg = _source("orph", [_fact_stream("invoice")])
    _stage_fact(conn, cfg, "orph__r1", "invoice", "INV-1", "C-LATE", amount=None, issued_on=date(2026, 1, 2))
    result = load.load(conn, "orph__r1", cfg)

    assert result.held == 1 and result.facts.get("invoice", 0) == 0
    assert _rows(conn, "select stage, field, reason from sync.quarantine where run_id = 'orph__r1'") == [
        ("load", "source_customer_id", facts.NOT_KNOWN_YET)]
    assert _rows(conn, "select count(*) from crm.invoice where source = 'orph'") == [(0,)]
    assert _rows(conn, "select facts_held from sync.run_log where run_id = 'orph__r1'") == [(1,)]

    # a later run of the same source brings the customer C-LATE: the held invoice is loaded then
    late = _record("C-LATE", 0, pk="C-LATE")
    _stage_run(conn, cfg, "orph__r2", [late])
    second = load.load(conn, "orph__r2", cfg)

    assert second.released == 1
    assert _rows(conn, "select customer_id::text, loaded_run_id from crm.invoice where invoice_id = 'INV-1'") == [
        (late["customer_id"], "orph__r1")]
    assert _rows(conn, "select released_run_id from sync.held_fact where source_pk = 'INV-1'") == [("orph__r2",)]
    assert load.load(conn, "orph__r2", cfg).released == 0  # a rerun finds nothing left to release


def test_call_found_by_phone_number_of_any_source(conn):
    crm_src = _source("phonebook", [])
    calls = _source("calls", [_fact_stream("interaction", customer_ref={"by": "phone"})])
    known = _record("PB", 0, phone="+8613900000001")
    _stage_run(conn, crm_src, "phone__r1", [known])
    load.load(conn, "phone__r1", crm_src)

    _stage_fact(conn, calls, "phone__r2", "interaction", "CALL-1", "+8613900000001", channel="phone")
    _stage_fact(conn, calls, "phone__r2", "interaction", "CALL-2", "+8613900000002", channel="phone")
    result = load.load(conn, "phone__r2", calls)

    assert result.facts == {"interaction": 1} and result.held == 1
    assert _rows(conn, "select interaction_id, customer_id::text, ref_by from crm.interaction where source = 'calls'") == [
        ("CALL-1", known["customer_id"], "phone")]

    # another source learns the second number: the held call follows in that source's load
    newcomer = _record("PB", 1, phone="+8613900000002")
    _stage_run(conn, crm_src, "phone__r3", [newcomer])
    assert load.load(conn, "phone__r3", crm_src).released == 1
    assert _rows(conn, "select customer_id::text from crm.interaction where interaction_id = 'CALL-2'") == [
        (newcomer["customer_id"],)]


def test_stub_customer_is_merged_into_the_real_one(conn):
    calls = _source("stubcalls", [_fact_stream("interaction", customer_ref={"by": "phone"})], orphans="stub")
    _stage_fact(conn, calls, "stub__r1", "interaction", "S-1", "+8613700000009", channel="phone")
    result = load.load(conn, "stub__r1", calls)

    assert result.facts == {"interaction": 1} and result.held == 0
    stub = _rows(conn, """select c.customer_id::text, c.is_stub, c.stub_ref from crm.interaction i
                          join crm.customer c using (customer_id) where i.interaction_id = 'S-1'""")[0]
    assert stub[1:] == (True, "phone:+8613700000009")

    book = _source("stubbook", [])
    real = _record("SB", 0, phone="+8613700000009", customer_id=str(uuid.uuid4()))
    _stage_run(conn, book, "stub__r2", [real])
    load.load(conn, "stub__r2", book)

    assert _rows(conn, "select customer_id::text from crm.interaction where interaction_id = 'S-1'") == [
        (real["customer_id"],)]
    assert _rows(conn, "select merged_into::text from crm.customer where customer_id = %s", (stub[0],)) == [
        (real["customer_id"],)]


def test_a_ticket_held_back_with_its_rejected_requester_loads_once_the_requester_is_fixed(conn):
    cfg = _source("desk", [_fact_stream("ticket")])
    requester = _record("RQ", 0)
    _stage_run(conn, cfg, "desk__r1", [requester], quarantined=(requester["pk"],))  # the user failed validation
    _stage_fact(conn, cfg, "desk__r1", "ticket", "T-1", requester["pk"], subject="发票开错了")
    first = load.load(conn, "desk__r1", cfg)

    assert first.customers == 0 and first.held == 1
    assert _rows(conn, "select count(*) from crm.ticket where source = 'desk'") == [(0,)]

    _stage_run(conn, cfg, "desk__r2", [requester])  # the source fixed the user; the ticket did not change
    second = load.load(conn, "desk__r2", cfg)

    assert second.released == 1
    assert _rows(conn, "select ticket_id, subject, customer_id::text from crm.ticket where source = 'desk'") == [
        ("T-1", "发票开错了", requester["customer_id"])]
