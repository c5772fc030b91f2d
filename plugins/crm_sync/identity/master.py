"""The live master as the identity engine needs it: candidates, term counts, steward decisions.

Read-only helpers over `crm.*` for the resolve stage, plus the split plan the load executes.
Guarantees:
- a source record's id for the engine is `source/stream/source_id` (`record_id`), and every
  customer id returned is the live one (a merged customer is followed to its survivor);
- `candidates` returns the master records sharing a blocking key with the batch, skipping key
  values shared by more records than the block cap (a switchboard, `info@`: no evidence, and the
  engine would skip that block too), so the candidate set grows with the batch, not the master;
- `pending_splits` is the one place that decides how a steward's 'different' is executed: the
  record of the pair that joined the customer later moves to a customer of its own whose id is
  derived from the review item, so a rerun plans the same ids.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping

import pandas as pd

NAMESPACE = uuid.UUID("6f1d3c3e-5a0b-4a57-9d0e-43a1c0c8a001")   # the same namespace as the first matcher
_NAMESPACE_BYTES = NAMESPACE.bytes
# what `candidates` returns per master record: its ids, its identity input, and the engine features
# stored with that input (migration 0014; `match_version` says what made them)
ENGINE_COLUMNS = ["record_id", "cluster_id", "name", "phone", "email", "company", "city", "match_version",
                  "match_features"]


def record_id(source: str, stream: str, source_id: str) -> str:
    return f"{source}/{stream}/{source_id}"


def split_record_id(rid: str) -> tuple[str, str, str]:
    source, stream, source_id = rid.split("/", 2)
    return source, stream, source_id


def new_customer_id(rid: str) -> uuid.UUID:
    """A new cluster's id: from its smallest record id, so a rerun of the same batch gives the same ids."""
    return uuid.uuid5(NAMESPACE, rid)


def new_customer_id_text(rid: str) -> str:
    """`str(new_customer_id(rid))` without the UUID object (a nightly run names a million clusters):
    the same SHA-1 name-based uuid, version 5, RFC 4122 variant."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + rid.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def split_customer_id(review_id: int, rid: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"split/{review_id}/{rid}")


@dataclass(frozen=True)
class Split:
    review_id: int
    source: str
    stream: str
    source_id: str
    from_customer: uuid.UUID
    to_customer: uuid.UUID


_LIVE = "coalesce(c.merged_into, c.customer_id)"
# the live customer of a link `l`, without reading its customer row: the merged ones are found
# through `customer_merged_idx` (migration 0017), which holds them only
_LINK_LIVE = """coalesce((select c.merged_into from crm.customer c
                         where c.customer_id = l.customer_id and c.merged_into is not null), l.customer_id)"""

# The records of a run are looked up in the master one by one, by key (a lateral subquery kept
# apart by `offset 0`): as a plain join the planner may hash a whole crm table, and an hourly run
# would cost O(master). When the run's records are not few against the master (a nightly full
# refresh, a first load), the planner is free to join them wholesale instead.
KEYED_RATIO = 8
_ROWS_PER_PAGE = 27       # a source_identity row is about 300 bytes with its stored features (0014)


def _lookup(cur, records: int) -> str:
    """'offset 0' (one key lookup per record) unless `records` are many against the master."""
    return "offset 0" if records * KEYED_RATIO <= master_size(cur, exact_if_unknown=False) else ""


_RECORDS = "unnest(%(rs)s::text[], %(ri)s::text[]) as r(source, source_id)"


def _decided_of(lookup: str) -> str:
    """Decided review items with a record in `r` (source, source_id): each found through the item's
    unique key (a side) or `review_item_b_idx` (b side)."""
    return f"""
    cross join lateral (
        select i.review_id, i.status, i.source_b as other_source, i.source_id_b as other_id,
               i.source_a || '/' || i.stream_a || '/' || i.source_id_a as ra,
               i.source_b || '/' || i.stream_b || '/' || i.source_id_b as rb
        from crm.review_item i
        where i.source_a = r.source and i.source_id_a = r.source_id and i.status <> 'open'
        union all
        select i.review_id, i.status, i.source_a, i.source_id_a,
               i.source_a || '/' || i.stream_a || '/' || i.source_id_a,
               i.source_b || '/' || i.stream_b || '/' || i.source_id_b
        from crm.review_item i
        where i.source_b = r.source and i.source_id_b = r.source_id and i.status <> 'open'
        {lookup}) x"""


def _record_params(records: list[tuple[str, str]]) -> dict:
    return {"rs": [r[0] for r in records], "ri": [r[1] for r in records]}


def current_customers(cur, records: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(source, source_id) -> the live customer id (text) of the records already linked."""
    records = list(records)
    if not records:
        return {}
    cur.execute(
        f"""select r.source, r.source_id, x.customer_id
            from {_RECORDS}
            cross join lateral (
                select {_LINK_LIVE}::text as customer_id
                from crm.customer_link l
                where l.source = r.source and l.source_id = r.source_id
                {_lookup(cur, len(records))}) x""",
        _record_params(records),
    )
    return {(s, i): cid for s, i, cid in cur.fetchall()}


def candidates(cur, run_id: str, source: str, records: int, cap: int,
               extra: Iterable[tuple[str, str]] = (), streams: Iterable[str] = (),
               rule_caps: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Master records sharing one of the run's blocking keys (its 'b:' rows of `stg.match_key`, staged
    by the resolve stage), plus the `extra` records, engine-ready.

    A key value held by more master records than its rule's cap (`rule_caps`, rule name -> the
    rule's `max_block_size`; `cap` for a rule not named) is skipped, counted up to the cap + 1 only:
    the engine would skip that block anyway, so its records would only be read to be dropped.
    Records the run itself brings (`stg.extracted`) are left out: the engine takes them from the
    batch, and a full refresh would otherwise read the master whole.
    """
    extra = list(extra)
    rule_caps = dict(rule_caps or {})
    lookup = _lookup(cur, records)
    if lookup:
        keys = f"""select b.key from b cross join lateral (
                      select count(*) as n from (select 1 from crm.match_key m where m.key = b.key
                                                 limit b.cap + 1) x
                      {lookup}) c
                  where c.n between 1 and b.cap"""
        records = f"""select m.source, m.source_id from k cross join lateral (
                         select m.source, m.source_id from crm.match_key m where m.key = k.key {lookup}) m"""
    else:
        keys = ("select m.key from crm.match_key m join b using (key) group by m.key, b.cap"
                " having count(*) <= b.cap")
        records = "select m.source, m.source_id from crm.match_key m join k using (key)"
    cur.execute(
        f"""
        with b as (
            select s.key, coalesce(min(c.cap), %(cap)s) as cap from stg.match_key s
            left join unnest(%(prefixes)s::text[], %(caps)s::int[]) c(prefix, cap) on starts_with(s.key, c.prefix)
            where s.run_id = %(run)s and s.source = %(source)s and s.key like 'b:%%'
            group by s.key
        ), k as ({keys}
        ), r as (
            ({records}
             union
             select * from unnest(%(xs)s::text[], %(xi)s::text[]))
            -- less the run's own customer records, as a set (one hash of the run's keys, not a probe per
            -- candidate); only this source's: DAGs of other sources may share the run id
            except
            select e.source, e.source_pk from stg.extracted e
            where e.run_id = %(run)s and e.source = %(source)s and e.stream = any(%(streams)s)
        )
        select x.*
        from r cross join lateral (
            select i.source || '/' || i.stream || '/' || i.source_id, {_LINK_LIVE}::text,
                   i.name, i.phone, i.email, i.company, i.city, i.match_version, i.match_features
            from crm.source_identity i
            join crm.customer_link l on l.source = i.source and l.source_id = i.source_id
            where i.source = r.source and i.source_id = r.source_id
            {lookup}) x
        order by 1   -- ties between equally good candidates resolve the same way whatever the plan
        """,
        {"run": run_id, "source": source, "cap": cap, "xs": [x[0] for x in extra], "xi": [x[1] for x in extra],
         "streams": list(streams), "prefixes": [f"b:{rule}=" for rule in rule_caps],
         "caps": list(rule_caps.values())},
    )
    return pd.DataFrame(cur.fetchall(), columns=ENGINE_COLUMNS)


def master_size(cur, *, exact_if_unknown: bool = True) -> int:
    """Source records in the master, as the planner estimates them (`pg_class`: no scan).

    The statistics' rows per page times the table's pages now: within a few per cent once the
    table has been analysed or vacuumed. Before that (right after a first load) the table is
    counted, or with `exact_if_unknown=False` guessed from its size.
    """
    cur.execute("""select c.reltuples, c.relpages, pg_relation_size(c.oid) / current_setting('block_size')::int
                   from pg_class c where c.oid = 'crm.source_identity'::regclass""")
    tuples, pages, now = cur.fetchone()
    if tuples > 0 and pages > 0:
        return int(tuples / pages * now)
    if not exact_if_unknown:
        return int(now * _ROWS_PER_PAGE)
    cur.execute("select count(*) from crm.source_identity")
    return int(cur.fetchone()[0])


def master_records(cur) -> int:
    """Source records in the master, exactly: the counter migration 0013's triggers keep (no scan).
    Term-frequency weights divide by it, so the same data scores the same whenever it runs."""
    cur.execute("select source_identities from crm.master_count")
    row = cur.fetchone()
    return int(row[0]) if row else 0


def term_counts(cur, run_id: str, source: str, records: int, aliases: dict[str, str] | None = None) -> dict:
    """Term frequencies over the master for the run's values (its 't:' rows of `stg.match_key`, and
    the 'b:' rows of the rules in `aliases`, rule name -> the term column its key is), as
    `engine.resolve(tf_counts=)` reads them."""
    aliases = aliases or {}
    total = master_records(cur)
    terms = """select distinct s.key from stg.match_key s
               where s.run_id = %(run)s and s.source = %(source)s
                 and (s.key like 't:%%' or split_part(s.key, '=', 1) = any(%(aliased)s))"""
    args = {"run": run_id, "source": source, "aliased": [f"b:{rule}" for rule in aliases]}
    if _lookup(cur, records):
        cur.execute(f"""with t as ({terms})
                        select t.key, c.n from t cross join lateral (
                            select count(*) as n from crm.match_key m where m.key = t.key offset 0) c
                        where c.n > 0""", args)
    else:
        cur.execute(f"with t as ({terms}) select m.key, count(*) from crm.match_key m join t using (key)"
                    " group by m.key", args)
    counts: dict = {"total": total}
    for key, n in cur.fetchall():
        column, value = key[2:].split("=", 1)
        if key.startswith("b:"):
            column = aliases[column]
        counts.setdefault(column, {})[value] = n
    return counts


_ITEM = "review_id, status, source_a, stream_a, source_id_a, source_b, stream_b, source_id_b"


def _decided_items(cur, records: list[tuple[str, str]]) -> list[tuple]:
    """Decided (not open) review items with a record in `records`, by review id: (review_id, status,
    source_a, stream_a, source_id_a, source_b, stream_b, source_id_b).

    Decided items are the stewards' work, few against an hourly run's records and their master
    candidates (half a million at a million customers): when there are no more of them than records,
    all are read (`review_item_decided_idx`, migration 0015) and matched here; otherwise each record
    looks its items up by key."""
    if not records:
        return []
    cur.execute("select count(*) from crm.review_item where status <> 'open'")
    if cur.fetchone()[0] <= len(records):
        cur.execute(f"select {_ITEM} from crm.review_item where status <> 'open' order by review_id")
        wanted = set(records)
        return [row for row in cur.fetchall() if (row[2], row[4]) in wanted or (row[5], row[7]) in wanted]
    cur.execute(f"""select {_ITEM} from crm.review_item where review_id = any(array(
                        select x.review_id from {_RECORDS} {_decided_of(_lookup(cur, len(records)))}))
                    order by review_id""", _record_params(records))
    return cur.fetchall()


def decisions(cur, records: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Steward decisions touching `records`: (must_link, cannot_link) as engine record-id pairs."""
    must, cannot = [], []
    for _, status, sa, sta, ia, sb, stb, ib in _decided_items(cur, list(records)):
        (must if status == "same" else cannot).append((record_id(sa, sta, ia), record_id(sb, stb, ib)))
    return must, cannot


def decided_partners(cur, records: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The other record of every decided pair one of `records` is in: the engine must see both."""
    records = list(records)
    wanted = set(records)
    partners: dict[tuple[str, str], None] = {}
    for _, _, sa, _, ia, sb, _, ib in _decided_items(cur, records):
        if (sa, ia) in wanted:
            partners.setdefault((sb, ib))
        if (sb, ib) in wanted:
            partners.setdefault((sa, ia))
    return list(partners)


def pending_splits(cur, records: Iterable[tuple[str, str]] = ()) -> list[Split]:
    """'different' decisions whose two records are still in one customer, and how to split them.

    Read: the decisions not applied yet (the stewards' queue, `review_item_pending_idx`) and those
    with a record in `records` (the run's records and candidates); an applied decision stays
    applied — the engine and the load's merges never join its two records again — so the rest
    need not be read. Each item's two links are looked up by primary key.
    """
    decided = [row[0] for row in _decided_items(cur, list(records)) if row[1] == "different"]
    cur.execute(
        f"""
        with item as (
            select i.review_id from crm.review_item i
            where i.applied_run_id is null and i.status <> 'open' and i.status = 'different'
            union
            select unnest(%(decided)s::bigint[])
        )
        select y.*
        from crm.review_item i
        cross join lateral (
            select i.review_id, {_LIVE}::text,
                   la.source, i.stream_a, la.source_id, la.linked_at,
                   lb.source, i.stream_b, lb.source_id, lb.linked_at
            from crm.customer_link la
            join crm.customer c on c.customer_id = la.customer_id
            join crm.customer_link lb on lb.source = i.source_b and lb.source_id = i.source_id_b
            join crm.customer cb on cb.customer_id = lb.customer_id
            where la.source = i.source_a and la.source_id = i.source_id_a
              and {_LIVE} = coalesce(cb.merged_into, cb.customer_id)
            offset 0) y
        where i.review_id = any(array(select review_id from item))
        order by i.review_id
        """,
        {"decided": decided},
    )
    splits = []
    for review_id, customer, sa, sta, ida, ta, sb, stb, idb, tb in cur.fetchall():
        # the record that joined later leaves; on equal times the larger record id
        a_later = (ta, (sa, ida)) > (tb, (sb, idb))
        source, stream, source_id = (sa, sta, ida) if a_later else (sb, stb, idb)
        rid = record_id(source, stream, source_id)
        splits.append(Split(review_id, source, stream, source_id, uuid.UUID(customer),
                            split_customer_id(review_id, rid)))
    return splits
