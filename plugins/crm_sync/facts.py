"""Facts (orders, tickets, interactions, invoices, payments, contracts) into the CRM, never orphaned.

`load_stream(cur, run_id, cfg, stream)` runs inside the load transaction after the run's
customers are in. Each accepted row of the stream finds its customer as the stream's
`customer_ref` says — the id of a customer record of a source (`by: source_id`) or any customer
record with that phone number (`by: phone`, the customer whose golden phone it is first, then the
most recently updated record) — and is upserted into the entity's target table (unchanged rows
are not touched). A row whose customer is not known yet is never dropped:
- `orphans: hold` (default): the row is kept in `sync.held_fact` and quarantined for this run
  with the reason "customer not known yet"; `release(cur, run_id)`, called by every later load of
  any source, loads it as soon as a customer record it points at arrives;
- `orphans: stub`: the row is loaded onto a stub customer (`crm.customer.is_stub`, `stub_ref`)
  flagged for enrichment; when a real customer record with that reference arrives, the stub is
  merged into it and its facts move.
A newer version of a held row replaces the held one; a held row whose key is later loaded is
released. Everything is idempotent: rerunning the load changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from crm_sync import entities
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.entities import EntitySpec
from crm_sync.quarantine import ACCEPTED

NOT_KNOWN_YET = "customer not known yet"

# The live customer a reference points at; `h` has ref_by, ref_source and ref_value columns.
_LOOKUP = """
    left join lateral (
        select x.customer_id from (
            select l.customer_id, 0 as rank, null::timestamptz as at
            from crm.customer_link l
            where h.ref_by = 'source_id' and l.source = h.ref_source and l.source_id = h.ref_value
            union all
            select sc.customer_id, case when cu.phone_e164 = sc.phone_e164 then 0 else 1 end, sc.source_updated_at
            from crm.source_customer sc join crm.customer cu on cu.customer_id = sc.customer_id
            where h.ref_by = 'phone' and sc.phone_e164 = split_part(h.ref_value, ';ext=', 1)
              and coalesce(sc.phone_ext, '') = split_part(h.ref_value, ';ext=', 2)
        ) x order by x.rank, x.at desc nulls last, x.customer_id limit 1
    ) c on true
"""


@dataclass(frozen=True)
class FactResult:
    loaded: int
    held: int
    stubbed: int
    superseded: int = 0   # facts held by an earlier run that this run loaded in a newer version


def _ref(cfg: SourceConfig, stream: StreamConfig) -> tuple[str, str | None]:
    ref = stream.customer_ref
    return ref.by, (ref.source or cfg.source) if ref.by == "source_id" else None


def _column_exprs(spec: EntitySpec, alias: str) -> list[str]:
    return [f"coalesce({alias}.{c}, {spec.defaults[c]})" if c in spec.defaults else f"{alias}.{c}"
            for c in spec.columns]


# A stream whose rows all point at a source's customer record by its id: the customer is the record's
# link, at most one (the link's primary key). A bulk batch joins the links whole (a hash join);
# a small one looks each reference up by key (`limit 1` keeps the subquery a per-row lookup: as a
# plain join the planner may hash every link of the source for an hourly batch).
_LOOKUP_BY_SOURCE_ID = {
    True: """
    left join crm.customer_link c on c.source = h.ref_source and c.source_id = h.ref_value
""",
    False: """
    left join lateral (select l.customer_id from crm.customer_link l
                       where l.source = h.ref_source and l.source_id = h.ref_value limit 1) c on true
""",
}
# a batch joins the master whole when it is this big and over a fifth of the links (as `survivorship.KEYED_MAX`)
BULK_MIN = 50_000


def _bulk(cur, spec: EntitySpec, params: dict) -> bool:
    cur.execute(f"""select count(*), (select reltuples from pg_class where oid = 'crm.customer_link'::regclass)
                    from {spec.staging} m
                    where m.run_id = %(run)s and m.source = %(source)s and m.stream = %(stream)s""", params)
    rows, links = cur.fetchone()
    return rows > BULK_MIN and rows > 0.2 * max(links, 0)


def _upsert(spec: EntitySpec, select_from: str, where: str = "true") -> str:
    """Upsert rows of `select_from` (staging-shaped, plus customer_id, ref_by, ref_source) into the target."""
    names = [*spec.columns, "row_hash", "loaded_run_id"]
    return f"""
        insert into {spec.target} as t (source, {spec.key}, customer_id, ref_by, ref_source, {", ".join(names)})
        select f.source, f.source_pk, f.customer_id, f.ref_by, f.ref_source, {", ".join(_column_exprs(spec, "f"))},
               f.row_hash, f.run_id
        from {select_from} f
        where f.customer_id is not null and {where}
        order by f.source_pk
        on conflict (source, {spec.key}) do update set
            customer_id = excluded.customer_id, ref_by = excluded.ref_by, ref_source = excluded.ref_source,
            {", ".join(f"{c} = excluded.{c}" for c in names)}, deleted_at = null, deleted_run_id = null
        where (t.row_hash, t.customer_id) is distinct from (excluded.row_hash, excluded.customer_id)
           or t.deleted_at is not null
    """


def _stub_ref(ref_by_col: str, ref_source_col: str, ref_value_col: str) -> str:
    return f"{ref_by_col} || ':' || coalesce({ref_source_col} || ':', '') || {ref_value_col}"


def _create_stubs(cur, run_id: str) -> int:
    """Stub customers for the unresolved rows of `load_fact` (md5 of the reference: stable ids)."""
    ref = _stub_ref("f.ref_by", "f.ref_source", "f.source_customer_id")
    cur.execute(
        f"""insert into crm.customer (customer_id, is_stub, stub_ref, first_run_id, last_run_id)
            select distinct md5({ref})::uuid, true, {ref}, %s, %s
            from load_fact f where f.customer_id is null
            on conflict do nothing""",
        (run_id, run_id),
    )
    created = cur.rowcount
    cur.execute(
        f"""update load_fact f set customer_id = c.customer_id
            from crm.customer c where f.customer_id is null and c.stub_ref = {ref}
              and c.merged_into is null"""
    )
    return created


def load_stream(cur, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> FactResult:
    spec = entities.get(stream.entity)
    ref_by, ref_source = _ref(cfg, stream)
    params = {"run": run_id, "source": cfg.source, "stream": stream.name, "ref_by": ref_by, "ref_source": ref_source}
    lookup = _LOOKUP_BY_SOURCE_ID[_bulk(cur, spec, params)] if ref_by == "source_id" else _LOOKUP
    cur.execute("drop table if exists pg_temp.load_fact")
    # `unchanged`: the target already holds this version on this customer, live — the upsert skips the
    # row instead of locking it (`on conflict do update … where` locks the rows it then leaves alone)
    cur.execute(
        f"""
        create temp table load_fact on commit drop as
        select x.*, coalesce(t.deleted_at is null and t.row_hash = x.row_hash and t.customer_id = x.customer_id,
                             false) as unchanged
        from (select h.*, c.customer_id
              from (select m.*, m.source_customer_id as ref_value, %(ref_by)s::text as ref_by,
                           %(ref_source)s::text as ref_source
                    from {spec.staging} m
                    where m.run_id = %(run)s and m.source = %(source)s and m.stream = %(stream)s and {ACCEPTED}) h
              {lookup}) x
        left join {spec.target} t on t.source = x.source and t.{spec.key} = x.source_pk
        """,
        params,
    )
    stubbed = _create_stubs(cur, run_id) if cfg.orphans == "stub" else 0
    cur.execute(_upsert(spec, "load_fact", "not f.unchanged"))
    cur.execute("select count(*) filter (where customer_id is not null), count(*) filter (where customer_id is null)"
                " from load_fact")
    loaded, held = cur.fetchone()
    # a loaded key supersedes any held version of it
    cur.execute(
        """update sync.held_fact h set released_run_id = %s, released_at = now()
           from load_fact f
           where f.customer_id is not null and h.released_run_id is null
             and h.source = f.source and h.stream = f.stream and h.source_pk = f.source_pk""",
        (run_id,),
    )
    superseded = cur.rowcount
    if held:
        cur.execute(
            """
            insert into sync.held_fact as h (source, stream, entity, source_pk, ref_by, ref_source, ref_value,
                row_data, row_hash, held_run_id)
            select f.source, f.stream, %(entity)s, f.source_pk, f.ref_by, f.ref_source,
                   coalesce(f.source_customer_id, ''),
                   to_jsonb(f) - 'customer_id' - 'ref_by' - 'ref_source' - 'ref_value' - 'unchanged',
                   f.row_hash, f.run_id
            from load_fact f where f.customer_id is null
            on conflict (source, stream, source_pk) do update set
                entity = excluded.entity, ref_by = excluded.ref_by, ref_source = excluded.ref_source,
                ref_value = excluded.ref_value, row_data = excluded.row_data, row_hash = excluded.row_hash,
                held_run_id = excluded.held_run_id, held_since = case when h.released_run_id is null
                    then h.held_since else now() end,
                released_run_id = null, released_at = null
            """,
            {"entity": spec.name},
        )
        cur.execute(
            """
            insert into sync.quarantine (run_id, source, stream, source_pk, stage, field, reason, payload)
            select f.run_id, f.source, f.stream, f.source_pk, 'load', 'source_customer_id', %(reason)s,
                   jsonb_build_object('ref_by', f.ref_by, 'ref_source', f.ref_source, 'entity', %(entity)s)
            from load_fact f where f.customer_id is null
            """,
            {"reason": NOT_KNOWN_YET, "entity": spec.name},
        )
    return FactResult(loaded=loaded, held=held, stubbed=stubbed, superseded=superseded)


def release(cur, run_id: str) -> int:
    """Load held facts (of any source) whose customer arrived with this run; merge stubs it resolves.

    Only references this run's customers can satisfy are looked at — the ids and phone numbers of the
    customer records it wrote (`load_changed_customer`, written by the load: a record the master
    already held unchanged satisfied its references when it was loaded) — so the cost follows the
    batch, not the number of facts held.
    """
    cur.execute("drop table if exists pg_temp.arrived_ref")
    cur.execute(
        """create temp table arrived_ref on commit drop as
           select distinct 'source_id'::text as ref_by, a.source as ref_source, a.source_pk as ref_value
           from load_changed_customer a
           union
           select distinct 'phone', null::text, a.phone_e164 || coalesce(';ext=' || a.phone_ext, '')
           from load_changed_customer a
           where a.phone_e164 is not null"""
    )
    released = 0
    for spec in entities.FACTS:
        cur.execute("drop table if exists pg_temp.release_fact")
        cur.execute(
            f"""
            create temp table release_fact on commit drop as
            select r.*, h.ref_by, h.ref_source, c.customer_id
            from sync.held_fact h
            join arrived_ref a on a.ref_by = h.ref_by and a.ref_value = h.ref_value
                              and a.ref_source is not distinct from h.ref_source
            cross join lateral jsonb_populate_record(null::{spec.staging}, h.row_data) r
            {_LOOKUP}
            where h.entity = %s and h.released_run_id is null
            """,
            (spec.name,),
        )
        cur.execute(_upsert(spec, "release_fact"))
        cur.execute(
            """update sync.held_fact h set released_run_id = %s, released_at = now()
               from release_fact f
               where f.customer_id is not null and h.source = f.source and h.stream = f.stream
                 and h.source_pk = f.source_pk""",
            (run_id,),
        )
        released += cur.rowcount
    _merge_resolved_stubs(cur, run_id)
    return released


def _merge_resolved_stubs(cur, run_id: str) -> int:
    """A stub whose reference now has a real customer is merged into it; its facts move there."""
    ref = _stub_ref("a.ref_by", "a.ref_source", "a.ref_value")
    cur.execute("drop table if exists pg_temp.stub_merge")
    cur.execute(
        f"""
        create temp table stub_merge on commit drop as
        select s.customer_id as absorbed, c.customer_id as survivor
        from arrived_ref a
        join crm.customer s on s.stub_ref = {ref} and s.is_stub and s.merged_into is null
        cross join lateral (select a.ref_by, a.ref_source, a.ref_value) h
        {_LOOKUP}
        where c.customer_id is not null and c.customer_id <> s.customer_id
        """
    )
    cur.execute("select count(*) from stub_merge")
    if not cur.fetchone()[0]:
        return 0
    for spec in entities.FACTS:
        cur.execute(f"update {spec.target} t set customer_id = m.survivor from stub_merge m"
                    f" where t.customer_id = m.absorbed")
    cur.execute("""update crm.customer c set merged_into = m.survivor, last_run_id = %s, updated_at = now()
                   from stub_merge m where c.customer_id = m.absorbed""", (run_id,))
    cur.execute("""insert into crm.customer_merge (survivor, absorbed, run_id, rule, evidence)
                   select survivor, absorbed, %s, 'stub', '{}'::jsonb from stub_merge on conflict do nothing""",
                (run_id,))
    return cur.rowcount
