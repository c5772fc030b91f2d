"""Load stage: publish one run's accepted rows to the CRM tables in a single transaction.

In one transaction: customers (new golden records, source records, links, golden fields by
source priority then recency, with provenance), the identity outcome (merges, splits, review
items), the facts of every entity in the registry (`crm_sync.entities`, loaded by
`crm_sync.facts` with their customer id, or held until their customer arrives), the release of
facts held by earlier runs of any source whose customer this run brought, watermarks and the run
log. Rows quarantined by any earlier stage are left out. Upserts only touch rows whose content
hash changed, so rerunning the same interval changes nothing. Loads of different sources are
serialised by an advisory lock because they share customers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from crm_sync import deletes, facts, quarantine, runlog, staging, watermark
from crm_sync.config import SourceConfig

LOAD_LOCK_KEY = 7_311_002

ACCEPTED = quarantine.ACCEPTED


@dataclass(frozen=True)
class LoadResult:
    customers: int
    rejected: int
    facts: dict[str, int] = field(default_factory=dict)   # entity -> rows loaded
    held: int = 0          # facts of this run waiting for their customer
    released: int = 0      # facts held earlier (any source) this run settled: their customer came, or a newer version loaded
    deleted: int = 0       # source records soft-deleted (gone from a full snapshot, or tombstoned)

    @property
    def rows(self) -> int:
        return self.customers + sum(self.facts.values())


CHANGED = "load_changed_customer"   # temp table: the run's accepted customer rows the master lacks


def _load_customers(cur, run_id: str, source: str) -> tuple[int, int]:
    """Publish the run's customer rows; returns (accepted rows, rows written).

    Only what changed is written. The accepted rows are compared with the master once (by primary
    key): a row whose (row_hash, customer_id) the master already holds, live, is not touched at all —
    not even locked, as `on conflict do update … where` would. Of the rest, customers the master does
    not have yet are inserted with their golden fields (one heap version each); the golden fields of
    existing customers are recomputed only for those whose records changed — the customer a changed
    record points at and the one it left."""
    cur.execute(f"select count(*) from stg.mapped_customer m where m.run_id = %s and m.source = %s and {ACCEPTED}",
                (run_id, source))
    accepted = cur.fetchone()[0]
    cur.execute(f"drop table if exists pg_temp.{CHANGED}")
    # a small batch looks its keys up one by one (the planner, with a master of stale statistics, may
    # otherwise hash the whole of crm.source_customer); a big one joins, as facts._bulk decides
    cur.execute("select reltuples from pg_class where oid = 'crm.source_customer'::regclass")
    master_rows = max(cur.fetchone()[0], 0)
    if accepted > facts.BULK_MIN and accepted > 0.2 * master_rows:
        master_row = "left join crm.source_customer s on s.source = m.source and s.source_id = m.source_pk"
    else:
        master_row = """left join lateral (
            select s.source_id, s.customer_id, s.row_hash, s.deleted_at from crm.source_customer s
            where s.source = m.source and s.source_id = m.source_pk offset 0) s on true"""
    # sorted by key, so index inserts stay local
    cur.execute(
        f"""
        create temp table {CHANGED} on commit drop as
        select m.*, s.customer_id as old_customer_id
        from stg.mapped_customer m
        {master_row}
        where m.run_id = %s and m.source = %s and {ACCEPTED}
          and (s.source_id is null or s.deleted_at is not null
               or (s.row_hash, s.customer_id) is distinct from (m.row_hash, m.customer_id))
        order by m.source_pk
        """,
        (run_id, source),
    )
    if not cur.rowcount:
        return accepted, 0
    cur.execute(f"analyze {CHANGED}")
    # existing customers whose records change: the one a changed record points at, the one it left
    cur.execute("drop table if exists pg_temp.load_refresh_customer")
    cur.execute(
        f"""create temp table load_refresh_customer on commit drop as
            select distinct m.customer_id from {CHANGED} m
            where exists (select 1 from crm.customer c where c.customer_id = m.customer_id)
            union
            select old_customer_id from {CHANGED}
            where old_customer_id is not null and old_customer_id <> customer_id"""
    )
    from crm_sync import survivorship

    survivorship.insert_new(cur, run_id, CHANGED)
    cur.execute(
        f"""
        insert into crm.source_customer as t (source, source_id, customer_id, full_name, name_key, phone_raw,
            phone_e164, phone_kind, phone_ext, email, company, city, source_created_at, source_updated_at,
            row_hash, loaded_run_id)
        select m.source, m.source_pk, m.customer_id, m.full_name, m.name_key, m.phone_raw, m.phone_e164,
               m.phone_kind, m.phone_ext, m.email, m.company, m.city, m.source_created_at, m.source_updated_at,
               m.row_hash, m.run_id
        from {CHANGED} m
        order by m.source_pk
        on conflict (source, source_id) do update set
            customer_id = excluded.customer_id, full_name = excluded.full_name, name_key = excluded.name_key,
            phone_raw = excluded.phone_raw, phone_e164 = excluded.phone_e164, phone_kind = excluded.phone_kind,
            phone_ext = excluded.phone_ext, email = excluded.email, company = excluded.company,
            city = excluded.city, source_created_at = excluded.source_created_at,
            source_updated_at = excluded.source_updated_at, row_hash = excluded.row_hash,
            loaded_run_id = excluded.loaded_run_id, deleted_at = null, deleted_run_id = null
        where (t.row_hash, t.customer_id) is distinct from (excluded.row_hash, excluded.customer_id)
           or t.deleted_at is not null
        """
    )
    written = cur.rowcount
    # a record keeps its link while it keeps its customer: only changed rows can need a new one
    cur.execute(
        f"""
        insert into crm.customer_link as l (source, source_id, customer_id, match_rule, match_score,
            explanation, linked_run_id)
        select r.source, r.source_pk, r.customer_id, r.match_rule, r.match_score, r.explanation, r.run_id
        from {CHANGED} m join stg.resolved r using (run_id, source, stream, source_pk)
        order by r.source_pk
        on conflict (source, source_id) do update set
            customer_id = excluded.customer_id, match_rule = excluded.match_rule,
            match_score = excluded.match_score, explanation = excluded.explanation,
            linked_run_id = excluded.linked_run_id, linked_at = now()
        where l.customer_id is distinct from excluded.customer_id
        """
    )
    _survivorship(cur, run_id, source)
    return accepted, written


def _survivorship(cur, run_id: str, source: str) -> None:
    """Golden fields of the existing customers whose records this run changed (`load_refresh_customer`;
    new customers were inserted complete)."""
    from crm_sync import survivorship

    cur.execute("select exists (select 1 from load_refresh_customer)")
    if cur.fetchone()[0]:
        survivorship.refresh(cur, run_id, customers_in="load_refresh_customer")


def load(conn, run_id: str, cfg: SourceConfig, *, allow_deletes: bool = False) -> LoadResult:
    """Publish the run. The caller's connection must not be in autocommit; this commits.

    Deletes are planned first and braked (`deletes.check_brake`) before anything is written;
    they are applied after the upserts, in the same transaction."""
    try:
        with conn.cursor() as cur:
            cur.execute("select pg_advisory_xact_lock(%s)", (LOAD_LOCK_KEY,))
            # set-based joins, sorts and aggregates of a whole run: keep them in memory, not on disk
            cur.execute("set local work_mem = '256MB'")
            cur.execute(
                """insert into sync.source_priority (source, priority) values (%s, %s)
                   on conflict (source) do update set priority = excluded.priority""",
                (cfg.source, cfg.priority),
            )
            planned = deletes.plan(cur, run_id, cfg)
            deletes.check_brake(cfg, planned, allowed=allow_deletes)
            for stream in cfg.streams:
                quarantine.clear(cur, run_id, cfg.source, stream.name, stage="load")
            customers, written = _load_customers(cur, run_id, cfg.source)
            from crm_sync.identity.apply import apply_identity

            apply_identity(cur, run_id, cfg.source)  # review items, merges, splits, match keys
            loaded: dict[str, int] = {}
            held = superseded = 0
            for stream in cfg.streams:
                if stream.entity == "customer":
                    continue
                outcome = facts.load_stream(cur, run_id, cfg, stream)
                loaded[stream.entity] = loaded.get(stream.entity, 0) + outcome.loaded
                held += outcome.held
                superseded += outcome.superseded
            # every held fact this run settled: its customer arrived, or its newer version loaded
            released = facts.release(cur, run_id) + superseded
            deleted = deletes.apply(cur, run_id, cfg)
            quarantine.settle(cur, run_id, cfg)  # earlier runs' quarantined keys this run answered
            for stream in cfg.streams:
                watermark.advance(cur, cfg.source, stream.name, run_id)
            # rows kept out of the CRM (a superseded older version of a loaded key is not one)
            cur.execute("select count(distinct (stream, coalesce(source_pk, quarantine_id::text)))"
                        " from sync.quarantine where run_id = %s and source = %s and blocks_key",
                        (run_id, cfg.source))
            rejected = cur.fetchone()[0]
            runlog.update(cur, run_id, cfg.source, rows_loaded=written + sum(loaded.values()),
                          rows_rejected=rejected, facts_held=held, facts_released=released, rows_deleted=deleted)
        conn.commit()
        with conn.cursor() as cur:   # after the commit: the statistics describe what was published
            staging.analyze_grown(cur)
        conn.commit()
    except Exception:
        if not conn.closed:  # a dropped connection must not replace the error that dropped it
            conn.rollback()
        raise
    return LoadResult(customers=customers, rejected=rejected, facts=loaded, held=held, released=released,
                      deleted=deleted)


def purge_staging(conn, source: str, keep_runs: int = 20) -> int:
    """Drop staging rows of all but the newest `keep_runs` runs of a source (housekeeping); commits."""
    removed = 0
    with conn.cursor() as cur:
        for table in staging.staging_tables():
            cur.execute(
                f"""delete from {table} t where t.source = %(source)s and t.run_id in (
                        select run_id from sync.run_log where source = %(source)s
                        order by started_at desc offset %(keep)s)""",
                {"source": source, "keep": keep_runs},
            )
            removed += cur.rowcount
    conn.commit()
    return removed
