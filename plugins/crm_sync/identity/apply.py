"""Apply a run's identity outcome to the master, inside the load's transaction.

`apply_identity(cur, run_id, source)` runs after the load has written the run's customers,
source records and links, and before orders and tickets. In order:
1. stores what the master must know about each accepted record for later runs: its identity
   input (`crm.source_identity`) and its blocking-key and term values (`crm.match_key`);
2. executes stewards' 'different' decisions whose two records still share a customer
   (`master.pending_splits`): the later record moves, with the facts that point at it by id (every
   entity of `crm_sync.entities`), to a customer of its own with a stable id;
3. merges existing customers found to be one person — by the engine (`stg.cluster_merge`) or by
   a steward's 'same' — never across a decided 'different' pair: the survivor is the smallest
   id, the absorbed customer keeps `merged_into` (and customers merged into it follow), its
   rows in every table of `entities.CUSTOMER_OWNED` and its overrides move, and `crm.customer_merge` records
   the run and the evidence;
4. raises the run's review pairs as `crm.review_item` rows (both records loaded, not already in
   one customer); a pair already asked — open or decided — is never asked again;
5. marks decisions the master now reflects as applied, and recomputes the golden record of
   every customer it touched (`survivorship.refresh`).
Everything is idempotent: a rerun of the same run finds nothing left to do.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from psycopg2.extras import execute_values

from crm_sync import entities, survivorship
from crm_sync.identity import master
from crm_sync.quarantine import ACCEPTED


@dataclass(frozen=True)
class ApplyResult:
    review_items: int
    merges: int
    splits: int
    golden_updated: int


def _store_identity(cur, run_id: str, source: str) -> None:
    """Identity input and match keys of the accepted records whose identity input the master does not
    hold yet (new records, changed ones, or stored under another `features.match_version`), with their
    engine features: keys and features are a function of the input and that version, so an unchanged
    record's stored ones are already right and are not touched. New records' keys are inserted in
    key order (local index inserts); only changed records have old keys to delete."""
    cur.execute("select exists (select 1 from stg.identity_input where run_id = %s and source = %s)", (run_id, source))
    if not cur.fetchone()[0]:
        return  # a run staged without the resolve stage (e.g. the load bench) has nothing to store
    cur.execute("drop table if exists pg_temp.identity_changed")
    cur.execute(
        f"""create temporary table identity_changed on commit drop as
            select i.source, i.stream, i.source_pk, i.name, i.phone, i.email, i.company, i.city, i.run_id,
                   i.match_version, i.match_features, t.source_id is null as is_new
            from stg.identity_input i
            join stg.mapped_customer m on m.run_id = i.run_id and m.source = i.source and m.stream = i.stream
                                      and m.source_pk = i.source_pk
            left join crm.source_identity t on t.source = i.source and t.source_id = i.source_pk
            where i.run_id = %s and i.source = %s and {ACCEPTED}
              and (t.source_id is null
                   or (t.stream, t.name, t.phone, t.email, t.company, t.city, t.match_version)
                      is distinct from (i.stream, i.name, i.phone, i.email, i.company, i.city, i.match_version))
            order by i.source_pk""",
        (run_id, source),
    )
    if not cur.rowcount:
        return
    cur.execute("create index on identity_changed (source, stream, source_pk)")
    cur.execute("analyze identity_changed")
    cur.execute(
        """
        insert into crm.source_identity as t (source, source_id, stream, name, phone, email, company, city, loaded_run_id,
                                              match_version, match_features)
        select i.source, i.source_pk, i.stream, i.name, i.phone, i.email, i.company, i.city, i.run_id,
               i.match_version, i.match_features
        from identity_changed i
        order by i.source_pk
        on conflict (source, source_id) do update set
            stream = excluded.stream, name = excluded.name, phone = excluded.phone, email = excluded.email,
            company = excluded.company, city = excluded.city, loaded_run_id = excluded.loaded_run_id,
            match_version = excluded.match_version, match_features = excluded.match_features
        where (t.stream, t.name, t.phone, t.email, t.company, t.city, t.match_version)
              is distinct from (excluded.stream, excluded.name, excluded.phone, excluded.email, excluded.company,
                                excluded.city, excluded.match_version)
        """
    )
    cur.execute(
        """
        delete from crm.match_key k using identity_changed a
        where not a.is_new and k.source = a.source and k.source_id = a.source_pk
          and not exists (select 1 from stg.match_key s
                          where s.run_id = %s and s.source = a.source and s.stream = a.stream
                            and s.source_pk = a.source_pk and s.key = k.key)
        """,
        (run_id,),
    )
    cur.execute(
        """
        insert into crm.match_key (key, source, source_id)
        select s.key, s.source, s.source_pk
        from stg.match_key s join identity_changed a using (source, stream, source_pk)
        where s.run_id = %s and s.source = %s
        order by s.key, s.source, s.source_pk
        on conflict do nothing
        """,
        (run_id, source),
    )


def _move_record(cur, run_id: str, split: master.Split) -> None:
    to, rec = str(split.to_customer), (split.source, split.source_id)
    cur.execute("""insert into crm.customer (customer_id, first_run_id, last_run_id) values (%s, %s, %s)
                   on conflict (customer_id) do nothing""", (to, run_id, run_id))
    cur.execute(
        """update crm.customer_link set customer_id = %s, match_rule = 'steward_split', match_score = null,
                  explanation = %s, linked_run_id = %s, linked_at = now()
           where source = %s and source_id = %s""",
        (to, json.dumps({"review_id": split.review_id, "decision": "different",
                         "from_customer": str(split.from_customer)}), run_id, *rec),
    )
    cur.execute("update crm.source_customer set customer_id = %s where source = %s and source_id = %s", (to, *rec))
    # the record's facts go with it: those that point at this record by its id, from any source
    for spec in entities.FACTS:
        cur.execute(f"""update {spec.target} set customer_id = %s
                        where ref_by = 'source_id' and ref_source = %s and source_customer_id = %s""", (to, *rec))


def _apply_splits(cur, run_id: str, touched: set[str]) -> int:
    moved: set[tuple[str, str]] = set()
    # one pass per round: a record split from two others moves once, then the plan is re-read
    for _ in range(100):
        plan = [s for s in master.pending_splits(cur) if s.from_customer != s.to_customer]
        plan = [s for s in plan if (s.source, s.source_id) not in moved]
        if not plan:
            break
        done: set[tuple[str, str]] = set()
        for split in plan:
            if (split.source, split.source_id) in done:
                continue
            _move_record(cur, run_id, split)
            done.add((split.source, split.source_id))
            touched.update({str(split.from_customer), str(split.to_customer)})
        moved |= done
    return len(moved)


class _Groups:
    """Union-find over customer ids that refuses to join customers a steward said are different."""

    def __init__(self, different: set[tuple[str, str]]) -> None:
        self.parent: dict[str, str] = {}
        self.members: dict[str, set[str]] = {}
        self.different = different

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        self.members.setdefault(x, {x})
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if any((x, y) in self.different or (y, x) in self.different
               for x in self.members[ra] for y in self.members[rb]):
            return False
        keep, gone = min(ra, rb), max(ra, rb)
        self.parent[gone] = keep
        self.members[keep] |= self.members.pop(gone)
        return True


# The live customer (text) of the record (source, source_id) in columns `src` / `sid` of the outer
# row: a scalar subquery is one primary-key lookup per row, never a scan of the master.
_LIVE_OF = """(select coalesce(c.merged_into, c.customer_id)::text
               from crm.customer_link l join crm.customer c on c.customer_id = l.customer_id
               where l.source = {src} and l.source_id = {sid})"""

# Review items with a record in the CTE `{records}` (source, source_id) and status `{status}`, found
# per record through the item's unique key (a side) and `review_item_b_idx` (b side). `offset 0`
# keeps each lookup a lookup: as a plain join the planner may hash the whole table instead.
_ITEMS_OF = """
    select x.review_id from {records} r cross join lateral (
        select i.review_id from crm.review_item i
        where i.source_a = r.source and i.source_id_a = r.source_id and i.status = '{status}'
        union all
        select i.review_id from crm.review_item i
        where i.source_b = r.source and i.source_id_b = r.source_id and i.status = '{status}'
        offset 0) x"""


def _steward_same(cur, run_id: str, source: str, touched: set[str]) -> list[tuple[str, str, dict]]:
    """Merge edges from stewards' 'same' decisions the master may not reflect: decisions not applied
    yet, and those of a record that moves this run — resolved to another customer than its own
    (any decision but 'linked'), or moved by a split (`touched`). An applied decision whose records
    stayed where they were is still reflected, so it is not read: the cost follows the run and the
    stewards' queue, not every decision ever made."""
    cur.execute(
        f"""
        with moved as (
            select r.source, r.source_pk as source_id from stg.resolved r
            where r.run_id = %(run)s and r.source = %(source)s and r.decision <> 'linked'
            union
            select l.source, l.source_id from crm.customer_link l where l.customer_id = any(%(touched)s::uuid[])
        ), item as (
            select i.review_id from crm.review_item i where i.applied_run_id is null and i.status = 'same'
            union
            {_ITEMS_OF.format(records="moved", status="same")}
        )
        select x.review_id, x.decided_by, x.ca, x.cb, x.ra, x.rb
        from (select i.review_id, i.decided_by, {_LIVE_OF.format(src="i.source_a", sid="i.source_id_a")} as ca,
                     {_LIVE_OF.format(src="i.source_b", sid="i.source_id_b")} as cb,
                     i.source_a || '/' || i.stream_a || '/' || i.source_id_a as ra,
                     i.source_b || '/' || i.stream_b || '/' || i.source_id_b as rb
              from crm.review_item i where i.review_id = any(array(select review_id from item))
              offset 0) x
        where x.ca <> x.cb
        order by x.review_id
        """,
        {"run": run_id, "source": source, "touched": sorted(touched)},
    )
    return [(ca, cb, {"rule": "steward", "review_id": review_id, "decided_by": by, "record_a": ra, "record_b": rb})
            for review_id, by, ca, cb, ra, rb in cur.fetchall()]


def _steward_different(cur, customers: list[str]) -> set[tuple[str, str]]:
    """(live customer, live customer) of every 'different' decision with a record in one of `customers`:
    the only ones that can stop a merge between them (`_Groups`), found through those customers' records."""
    cur.execute(
        f"""
        with record as (
            select l.source, l.source_id from crm.customer_link l where l.customer_id = any(%s::uuid[])
        ), item as (
            {_ITEMS_OF.format(records="record", status="different")}
        )
        select {_LIVE_OF.format(src="i.source_a", sid="i.source_id_a")},
               {_LIVE_OF.format(src="i.source_b", sid="i.source_id_b")}
        from crm.review_item i where i.review_id = any(array(select review_id from item))
        """,
        (customers,),
    )
    return {(ca, cb) for ca, cb in cur.fetchall() if ca is not None and cb is not None}


def _apply_merges(cur, run_id: str, source: str, touched: set[str]) -> int:
    edges: list[tuple[str, str, dict]] = []
    cur.execute(
        """select survivor::text, absorbed::text, record_a, record_b, probability, explanation
           from stg.cluster_merge where run_id = %s and source = %s order by absorbed""",
        (run_id, source),
    )
    for survivor, absorbed, ra, rb, p, ex in cur.fetchall():
        edges.append((survivor, absorbed, {"rule": "engine", "record_a": ra, "record_b": rb,
                                           "probability": float(p) if p is not None else None, "explanation": ex}))
    edges += _steward_same(cur, run_id, source, touched)
    if not edges:
        return 0
    groups = _Groups(_steward_different(cur, sorted({c for a, b, _ in edges for c in (a, b)})))
    evidence: dict[str, dict] = {}
    for a, b, ev in edges:
        if groups.union(a, b):
            for c in (a, b):
                evidence.setdefault(c, ev)
    absorbed, survivors, rules, proofs = [], [], [], []
    for root, members in groups.members.items():
        for m in sorted(members - {root}):
            absorbed.append(m)
            survivors.append(root)
            ev = evidence.get(m, {})
            rules.append(ev.get("rule", "engine"))
            proofs.append(json.dumps(ev, ensure_ascii=False, default=str))
        if len(members) > 1:
            touched.add(root)
    if not absorbed:
        return 0
    params = (absorbed, survivors)
    moves = "with m(absorbed, survivor) as (select * from unnest(%s::uuid[], %s::uuid[])) "
    # customers merged into an absorbed one follow it to the survivor: lineage stays one hop deep
    cur.execute(moves + "update crm.customer c set merged_into = m.survivor from m where c.merged_into = m.absorbed",
                params)
    cur.execute(moves + "update crm.customer c set merged_into = m.survivor, last_run_id = %s, updated_at = now()"
                        " from m where c.customer_id = m.absorbed", (*params, run_id))
    for table in entities.CUSTOMER_OWNED:
        cur.execute(moves + f"update {table} t set customer_id = m.survivor from m where t.customer_id = m.absorbed",
                    params)
    cur.execute(moves + """insert into crm.golden_override (customer_id, field, value, value_kind, set_by, set_at)
                           select m.survivor, o.field, o.value, o.value_kind, o.set_by, o.set_at
                           from crm.golden_override o join m on o.customer_id = m.absorbed
                           on conflict (customer_id, field) do nothing""", params)
    execute_values(cur, """insert into crm.customer_merge (survivor, absorbed, run_id, rule, evidence)
                           values %s on conflict do nothing""",
                   [(s, a, run_id, r, p) for a, s, r, p in zip(absorbed, survivors, rules, proofs)],
                   template="(%s::uuid, %s::uuid, %s, %s, %s::jsonb)")
    return len(absorbed)


def _raise_review_items(cur, run_id: str, source: str) -> int:
    cur.execute("""select record_a, record_b, probability, reason, explanation
                   from stg.review_pair where run_id = %s and source = %s""", (run_id, source))
    rows = []
    for ra, rb, p, reason, ex in cur.fetchall():
        a, b = sorted([master.split_record_id(ra), master.split_record_id(rb)], key=lambda r: (r[0], r[2]))
        rows.append((*a, *b, p, reason, json.dumps(ex, ensure_ascii=False) if ex is not None else "{}"))
    if not rows:
        return 0
    cur.execute("drop table if exists pg_temp.identity_review")
    cur.execute("""create temporary table identity_review (source_a text, stream_a text, source_id_a text,
                   source_b text, stream_b text, source_id_b text, probability numeric, reason text,
                   explanation jsonb) on commit drop""")
    execute_values(cur, "insert into identity_review values %s", rows)
    cur.execute("analyze identity_review")   # the joins below must know the pairs are few
    cur.execute(
        """
        insert into crm.review_item (source_a, stream_a, source_id_a, source_b, stream_b, source_id_b, customer_a,
            customer_b, probability, reason, explanation, created_run_id)
        select r.source_a, r.stream_a, r.source_id_a, r.source_b, r.stream_b, r.source_id_b,
               la.customer_id, lb.customer_id, r.probability, r.reason, r.explanation, %s
        from identity_review r
        join crm.customer_link la on la.source = r.source_a and la.source_id = r.source_id_a
        join crm.customer_link lb on lb.source = r.source_b and lb.source_id = r.source_id_b
        where la.customer_id <> lb.customer_id
        on conflict (source_a, source_id_a, source_b, source_id_b) do nothing
        """,
        (run_id,),
    )
    return cur.rowcount


def _mark_applied(cur, run_id: str) -> None:
    """Decided items the master now reflects are applied; only the stewards' queue is read
    (`review_item_pending_idx`), each item's two links by primary key."""
    cur.execute(
        """
        update crm.review_item i set applied_run_id = %s
        where i.applied_run_id is null and i.status <> 'open'
          and (i.status = 'same') = (
              (select la.customer_id from crm.customer_link la
               where la.source = i.source_a and la.source_id = i.source_id_a)
            = (select lb.customer_id from crm.customer_link lb
               where lb.source = i.source_b and lb.source_id = i.source_id_b))
        """,
        (run_id,),
    )


def apply_identity(cur, run_id: str, source: str) -> ApplyResult:
    """Apply the run's identity outcome (see the module docstring); the caller commits."""
    _store_identity(cur, run_id, source)
    touched: set[str] = set()
    splits = _apply_splits(cur, run_id, touched)
    merges = _apply_merges(cur, run_id, source, touched)
    reviews = _raise_review_items(cur, run_id, source)
    _mark_applied(cur, run_id)
    golden = survivorship.refresh(cur, run_id, customer_ids=sorted(touched)) if touched else 0
    return ApplyResult(review_items=reviews, merges=merges, splits=splits, golden_updated=golden)


def decide(cur, review_id: int, decision: str, by: str, note: str | None = None) -> dict:
    """Record a steward's decision on a review item; the next run applies it. Returns the item."""
    if decision not in ("same", "different"):
        raise ValueError(f"decision must be 'same' or 'different', not {decision!r}")
    if not by or not by.strip():
        raise ValueError("a decision needs the steward's name (--by)")
    cur.execute(
        """update crm.review_item set status = %s, decided_by = %s, decided_at = now(), note = %s,
                  applied_run_id = null
           where review_id = %s
           returning review_id, status, source_a, source_id_a, source_b, source_id_b""",
        (decision, by.strip(), note, review_id),
    )
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no review item {review_id}")
    return dict(zip(["review_id", "status", "source_a", "source_id_a", "source_b", "source_id_b"], row))


def set_override(cur, customer_id: str, field: str, value: str, by: str) -> dict:
    """A steward's value for a golden field; applied to the golden record at once."""
    from crm_sync.identity import normalize

    if field not in survivorship.GOLDEN:
        raise ValueError(f"field must be one of {list(survivorship.GOLDEN)}, not {field!r}")
    if not by or not by.strip():
        raise ValueError("an override needs the steward's name (--by)")
    cid = str(uuid.UUID(customer_id))
    cur.execute("select coalesce(merged_into, customer_id)::text from crm.customer where customer_id = %s", (cid,))
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no customer {cid}")
    cid = row[0]   # an override on a merged-away customer belongs to its survivor
    kind = None
    if field == "phone":
        phone = normalize.normalize_phone(value)
        if not phone.e164 or phone.kind == "invalid":
            raise ValueError(f"{value!r} is not a valid phone number")
        value, kind = phone.e164, phone.kind
    elif field == "email":
        email = normalize.normalize_email(value)
        if not email.valid:
            raise ValueError(f"{value!r} is not a valid e-mail address")
        value = email.email
    cur.execute(
        """insert into crm.golden_override (customer_id, field, value, value_kind, set_by)
           values (%s, %s, %s, %s, %s)
           on conflict (customer_id, field) do update set value = excluded.value, value_kind = excluded.value_kind,
               set_by = excluded.set_by, set_at = now()""",
        (cid, field, value, kind, by.strip()),
    )
    survivorship.refresh(cur, None, customer_ids=[cid])
    return {"customer_id": cid, "field": field, "value": value}
