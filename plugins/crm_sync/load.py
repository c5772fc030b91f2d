"""Load stage: publish one run's accepted rows to the CRM tables in a single transaction.

In one transaction: customers (new golden records, source records, links, golden fields by
source priority then recency, with provenance), orders and tickets (with their customer id),
watermarks and the run log. Rows quarantined by any earlier stage are left out. Upserts only
touch rows whose content hash changed, so rerunning the same interval changes nothing.
Loads of different sources are serialised by an advisory lock because they share customers.
"""
from __future__ import annotations

from dataclasses import dataclass

from crm_sync import quarantine, runlog, staging, watermark
from crm_sync.config import SourceConfig

LOAD_LOCK_KEY = 7_311_002

ACCEPTED = quarantine.ACCEPTED


@dataclass(frozen=True)
class LoadResult:
    customers: int
    orders: int
    tickets: int
    rejected: int

    @property
    def rows(self) -> int:
        return self.customers + self.orders + self.tickets


def _load_customers(cur, run_id: str, source: str) -> int:
    # The run's accepted rows are computed once (one scan of staging, one anti-join with the
    # quarantine) and read by the three upserts below; sorted by key, so index inserts stay local.
    cur.execute(
        f"""
        create temp table load_accepted_customer on commit drop as
        select m.* from stg.mapped_customer m
        where m.run_id = %s and m.source = %s and {ACCEPTED}
        order by m.source_pk
        """,
        (run_id, source),
    )
    cur.execute(
        """
        insert into crm.customer (customer_id, first_run_id, last_run_id)
        select distinct m.customer_id, m.run_id, m.run_id
        from load_accepted_customer m
        order by m.customer_id
        on conflict (customer_id) do nothing
        """
    )
    cur.execute(
        """
        insert into crm.source_customer as t (source, source_id, customer_id, full_name, name_key, phone_raw,
            phone_e164, phone_kind, phone_ext, email, company, city, source_created_at, source_updated_at,
            row_hash, loaded_run_id)
        select m.source, m.source_pk, m.customer_id, m.full_name, m.name_key, m.phone_raw, m.phone_e164,
               m.phone_kind, m.phone_ext, m.email, m.company, m.city, m.source_created_at, m.source_updated_at,
               m.row_hash, m.run_id
        from load_accepted_customer m
        order by m.source_pk
        on conflict (source, source_id) do update set
            customer_id = excluded.customer_id, full_name = excluded.full_name, name_key = excluded.name_key,
            phone_raw = excluded.phone_raw, phone_e164 = excluded.phone_e164, phone_kind = excluded.phone_kind,
            phone_ext = excluded.phone_ext, email = excluded.email, company = excluded.company,
            city = excluded.city, source_created_at = excluded.source_created_at,
            source_updated_at = excluded.source_updated_at, row_hash = excluded.row_hash,
            loaded_run_id = excluded.loaded_run_id
        where (t.row_hash, t.customer_id) is distinct from (excluded.row_hash, excluded.customer_id)
        """
    )
    cur.execute(
        """
        insert into crm.customer_link as l (source, source_id, customer_id, match_rule, match_score,
            explanation, linked_run_id)
        select r.source, r.source_pk, r.customer_id, r.match_rule, r.match_score, r.explanation, r.run_id
        from stg.resolved r join load_accepted_customer m using (run_id, source, stream, source_pk)
        order by r.source_pk
        on conflict (source, source_id) do update set
            customer_id = excluded.customer_id, match_rule = excluded.match_rule,
            match_score = excluded.match_score, explanation = excluded.explanation,
            linked_run_id = excluded.linked_run_id, linked_at = now()
        where l.customer_id is distinct from excluded.customer_id
        """
    )
    _survivorship(cur, run_id, source)
    cur.execute("select count(*) from load_accepted_customer")
    return cur.fetchone()[0]


def _survivorship(cur, run_id: str, source: str) -> None:
    """Golden fields of the customers this run touched, by the rules of `include/survivorship.yaml`."""
    from crm_sync import survivorship

    survivorship.refresh(cur, run_id, source=source)


def _reject_orphans(cur, run_id: str, source: str, table: str, stream: str) -> int:
    """Orders/tickets whose customer was rejected in this run stay out, with the reason kept."""
    cur.execute(
        f"""
        insert into sync.quarantine (run_id, source, stream, source_pk, stage, field, reason, payload)
        select m.run_id, m.source, m.stream, m.source_pk, 'load', 'source_customer_id',
               'customer ' || m.source_customer_id || ' was rejected in this run, so this row is held back',
               to_jsonb(m) - 'run_id'
        from {table} m
        where m.run_id = %s and m.source = %s and m.stream = %s and {ACCEPTED}
          and not exists (select 1 from crm.customer_link l
                          where l.source = m.source and l.source_id = m.source_customer_id)
        """,
        (run_id, source, stream),
    )
    return cur.rowcount


# Facts that hang off a customer: target table, its key column, the staging table, and the
# target columns with the staging expression each takes (`m` = staging row).
FACTS = {
    "order": ("crm.sales_order", "order_id", "stg.mapped_order", {
        "source_customer_id": "m.source_customer_id", "order_date": "m.order_date", "amount": "m.amount",
        "currency": "coalesce(m.currency, 'CNY')", "status": "m.status", "source_updated_at": "m.source_updated_at",
    }),
    "ticket": ("crm.ticket", "ticket_id", "stg.mapped_ticket", {
        "source_customer_id": "m.source_customer_id", "subject": "m.subject", "status": "m.status",
        "priority": "m.priority", "source_created_at": "m.source_created_at",
        "source_updated_at": "m.source_updated_at",
    }),
}


def _load_facts(cur, run_id: str, source: str, entity: str) -> int:
    """Upsert one run's accepted orders or tickets with their customer id; unchanged rows are not touched."""
    table, key, staged, columns = FACTS[entity]
    names = [*columns, "row_hash", "loaded_run_id"]
    cur.execute(
        f"""
        insert into {table} as t (source, {key}, customer_id, {", ".join(names)})
        select m.source, m.source_pk, l.customer_id, {", ".join(columns.values())}, m.row_hash, m.run_id
        from {staged} m
        join crm.customer_link l on l.source = m.source and l.source_id = m.source_customer_id
        where m.run_id = %s and m.source = %s and {ACCEPTED}
        on conflict (source, {key}) do update set
            customer_id = excluded.customer_id, {", ".join(f"{c} = excluded.{c}" for c in names)}
        where (t.row_hash, t.customer_id) is distinct from (excluded.row_hash, excluded.customer_id)
        """,
        (run_id, source),
    )
    cur.execute(f"select count(*) from {staged} m where m.run_id = %s and m.source = %s and {ACCEPTED}",
                (run_id, source))
    return cur.fetchone()[0]


def load(conn, run_id: str, cfg: SourceConfig) -> LoadResult:
    """Publish the run. The caller's connection must not be in autocommit; this commits."""
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
            for stream in cfg.streams:
                quarantine.clear(cur, run_id, cfg.source, stream.name, stage="load")
            customers = _load_customers(cur, run_id, cfg.source)
            from crm_sync.identity.apply import apply_identity

            apply_identity(cur, run_id, cfg.source)  # review items, merges, splits, match keys
            for stream in cfg.streams:
                if stream.entity in FACTS:
                    _reject_orphans(cur, run_id, cfg.source, FACTS[stream.entity][2], stream.name)
            orders = _load_facts(cur, run_id, cfg.source, "order")
            tickets = _load_facts(cur, run_id, cfg.source, "ticket")
            for stream in cfg.streams:
                watermark.advance(cur, cfg.source, stream.name, run_id)
            cur.execute("select count(distinct (stream, coalesce(source_pk, quarantine_id::text)))"
                        " from sync.quarantine where run_id = %s and source = %s", (run_id, cfg.source))
            rejected = cur.fetchone()[0]
            runlog.update(cur, run_id, cfg.source, rows_loaded=customers + orders + tickets, rows_rejected=rejected)
        conn.commit()
    except Exception:
        conn.rollback()
        raise
    return LoadResult(customers=customers, orders=orders, tickets=tickets, rejected=rejected)


def purge_staging(conn, source: str, keep_runs: int = 20) -> int:
    """Drop staging rows of all but the newest `keep_runs` runs of a source (housekeeping); commits."""
    removed = 0
    with conn.cursor() as cur:
        for table in staging.STAGING_TABLES:
            cur.execute(
                f"""delete from {table} t where t.source = %(source)s and t.run_id in (
                        select run_id from sync.run_log where source = %(source)s
                        order by started_at desc offset %(keep)s)""",
                {"source": source, "keep": keep_runs},
            )
            removed += cur.rowcount
    conn.commit()
    return removed
