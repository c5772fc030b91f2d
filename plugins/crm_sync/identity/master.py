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

import uuid
from dataclasses import dataclass
from typing import Iterable

import pandas as pd

NAMESPACE = uuid.UUID("6f1d3c3e-5a0b-4a57-9d0e-43a1c0c8a001")   # the same namespace as the first matcher
ENGINE_COLUMNS = ["record_id", "cluster_id", "name", "phone", "email", "company", "city"]


def record_id(source: str, stream: str, source_id: str) -> str:
    return f"{source}/{stream}/{source_id}"


def split_record_id(rid: str) -> tuple[str, str, str]:
    source, stream, source_id = rid.split("/", 2)
    return source, stream, source_id


def new_customer_id(rid: str) -> uuid.UUID:
    """A new cluster's id: from its smallest record id, so a rerun of the same batch gives the same ids."""
    return uuid.uuid5(NAMESPACE, rid)


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


def current_customers(cur, records: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(source, source_id) -> the live customer id (text) of the records already linked."""
    records = list(records)
    if not records:
        return {}
    sources = [r[0] for r in records]
    ids = [r[1] for r in records]
    cur.execute(
        f"""select l.source, l.source_id, {_LIVE}::text
            from unnest(%s::text[], %s::text[]) as r(source, source_id)
            join crm.customer_link l using (source, source_id)
            join crm.customer c on c.customer_id = l.customer_id""",
        (sources, ids),
    )
    return {(s, i): cid for s, i, cid in cur.fetchall()}


def candidates(cur, keys: list[str], cap: int, extra: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """Master records sharing one of the blocking `keys` (plus the `extra` records), engine-ready."""
    extra = list(extra)
    cur.execute(
        f"""
        with k as (
            select key from crm.match_key where key = any(%(keys)s)
            group by key having count(*) <= %(cap)s
        ), r as (
            select m.source, m.source_id from crm.match_key m join k using (key)
            union
            select * from unnest(%(xs)s::text[], %(xi)s::text[])
        )
        select i.source || '/' || i.stream || '/' || i.source_id, {_LIVE}::text,
               i.name, i.phone, i.email, i.company, i.city
        from r
        join crm.source_identity i using (source, source_id)
        join crm.customer_link l using (source, source_id)
        join crm.customer c on c.customer_id = l.customer_id
        """,
        {"keys": keys, "cap": cap, "xs": [x[0] for x in extra], "xi": [x[1] for x in extra]},
    )
    return pd.DataFrame(cur.fetchall(), columns=ENGINE_COLUMNS)


def term_counts(cur, terms: list[str]) -> dict:
    """Term frequencies over the master for the batch's values, as `engine.resolve(tf_counts=)` reads them."""
    if not terms:
        return {}
    cur.execute("select count(*) from crm.source_identity")
    total = cur.fetchone()[0]
    cur.execute("select key, count(*) from crm.match_key where key = any(%s) group by key", (terms,))
    counts: dict = {"total": total}
    for key, n in cur.fetchall():
        column, value = key[2:].split("=", 1)
        counts.setdefault(column, {})[value] = n
    return counts


def decisions(cur, records: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Steward decisions touching `records`: (must_link, cannot_link) as engine record-id pairs."""
    records = list(records)
    if not records:
        return [], []
    cur.execute(
        """
        with r as (select * from unnest(%s::text[], %s::text[]) as r(source, source_id))
        select status, source_a || '/' || stream_a || '/' || source_id_a,
               source_b || '/' || stream_b || '/' || source_id_b
        from crm.review_item i
        where status <> 'open'
          and (exists (select 1 from r where r.source = i.source_a and r.source_id = i.source_id_a)
               or exists (select 1 from r where r.source = i.source_b and r.source_id = i.source_id_b))
        """,
        ([r[0] for r in records], [r[1] for r in records]),
    )
    must, cannot = [], []
    for status, a, b in cur.fetchall():
        (must if status == "same" else cannot).append((a, b))
    return must, cannot


def decided_partners(cur, records: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The other record of every decided pair one of `records` is in: the engine must see both."""
    records = list(records)
    if not records:
        return []
    cur.execute(
        """
        with r as (select * from unnest(%s::text[], %s::text[]) as r(source, source_id))
        select i.source_b, i.source_id_b from crm.review_item i join r
          on r.source = i.source_a and r.source_id = i.source_id_a where i.status <> 'open'
        union
        select i.source_a, i.source_id_a from crm.review_item i join r
          on r.source = i.source_b and r.source_id = i.source_id_b where i.status <> 'open'
        """,
        ([r[0] for r in records], [r[1] for r in records]),
    )
    return [tuple(row) for row in cur.fetchall()]


def pending_splits(cur) -> list[Split]:
    """'different' decisions whose two records are still in one customer, and how to split them."""
    cur.execute(
        f"""
        select i.review_id, {_LIVE}::text,
               la.source, i.stream_a, la.source_id, la.linked_at,
               lb.source, i.stream_b, lb.source_id, lb.linked_at
        from crm.review_item i
        join crm.customer_link la on la.source = i.source_a and la.source_id = i.source_id_a
        join crm.customer_link lb on lb.source = i.source_b and lb.source_id = i.source_id_b
        join crm.customer c on c.customer_id = la.customer_id
        join crm.customer cb on cb.customer_id = lb.customer_id
        where i.status = 'different' and {_LIVE} = coalesce(cb.merged_into, cb.customer_id)
        order by i.review_id
        """
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
