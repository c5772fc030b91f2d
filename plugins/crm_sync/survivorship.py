"""Golden-record survivorship: each golden field of a customer from its best source value.

`refresh(cur, run_id, source=..., customer_ids=...)` recomputes the golden fields (full_name,
phone, email, company, city) of the given customers — those a run's mapped rows point at, or an
explicit list — set-based: one UPDATE for the customers with a single source record and no override
(a plain join), one for the rest (candidates ordered per field). Guarantees:
- per field, the candidates are the customer's source records holding a value (plus a steward's
  `crm.golden_override` when the field's rules include `override`), ordered by the field's rule
  list from `include/survivorship.yaml`, then by (source, source_id): the same inputs always give
  the same golden record;
- phone number, kind and extension come from one record, never mixed;
- every golden field carries provenance {source, source_id, rule, at}: the winning record (or
  'override' and the steward), the first rule that told the winner from the runner-up
  ('only_value' when there was no runner-up, 'tiebreak' when no rule did) and the record's
  source_updated_at (or the override's time);
- customers merged into another one keep their last golden values; a row is written only when
  its values or provenance change, so a rerun writes nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from psycopg2 import sql
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crm_sync import paths

Rule = Literal["override", "source_priority", "recency", "completeness"]
GOLDEN = ("full_name", "phone", "email", "company", "city")

# field -> (value columns of crm.source_customer taken together, completeness key: higher is better)
_VALUES = {
    "full_name": ["full_name"],
    "phone": ["phone_e164", "phone_kind", "phone_ext"],
    "email": ["email"],
    "company": ["company"],
    "city": ["city"],
}
_COMPLETENESS = {
    # a name with a given name (its reading has two tokens) beats a bare surname (张先生); length is
    # no measure here: 'Zhang San' is not more complete than 张三
    "full_name": "(position(' ' in coalesce(c.name_key, '')) > 0)::int",
    "phone": "case c.phone_kind when 'mobile' then 3 when 'landline' then 2 when 'other' then 1 else 0 end",
    "email": r"(c.email ~ '^[^@\s]+@[^@\s]+\.[^@\s]+$')::int",
    "company": "char_length(c.company)",
    "city": "char_length(c.city)",
}


class SurvivorshipError(ValueError):
    """`include/survivorship.yaml` is missing or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldRules(_Strict):
    rules: list[Rule] = Field(min_length=1)
    source_priority: dict[str, int] | None = None

    @model_validator(mode="after")
    def _unique(self) -> "FieldRules":
        if len(set(self.rules)) != len(self.rules):
            raise ValueError(f"rules repeat: {self.rules}")
        return self


class SurvivorshipConfig(_Strict):
    source_priority: dict[str, int] = Field(default_factory=dict)
    fields: dict[Literal["full_name", "phone", "email", "company", "city"], FieldRules]

    @model_validator(mode="after")
    def _complete(self) -> "SurvivorshipConfig":
        missing = [f for f in GOLDEN if f not in self.fields]
        if missing:
            raise ValueError(f"no rules for golden field(s) {missing}")
        return self

    def priorities(self, field: str) -> dict[str, int]:
        return {**self.source_priority, **(self.fields[field].source_priority or {})}


def config_path() -> Path:
    return paths.include_dir() / "survivorship.yaml"


def load_config(path: Path | None = None) -> SurvivorshipConfig:
    path = path or config_path()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SurvivorshipError(f"{path}: survivorship config not found") from None
    except yaml.YAMLError as exc:
        raise SurvivorshipError(f"{path}: not valid YAML: {exc}") from None
    try:
        return SurvivorshipConfig.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SurvivorshipError(f"{path}: {problems}") from None


def _rule_key(rule: str, field: str, priorities: dict[str, int]) -> sql.Composable:
    if rule == "override":
        return sql.SQL("c.is_override")
    if rule == "recency":
        return sql.SQL("c.at")
    if rule == "completeness":
        return sql.SQL(_COMPLETENESS[field])
    cases = sql.SQL(" ").join(sql.SQL("when {} then {}").format(sql.Literal(s), sql.Literal(p))
                              for s, p in sorted(priorities.items()))
    # override rows have no source priority: they sort after every source under this rule
    fallback = sql.SQL("coalesce(c.yaml_priority, 0)")
    by_source = sql.SQL("case c.source {} else {} end").format(cases, fallback) if priorities else fallback
    return sql.SQL("case when c.is_override then null else {} end").format(by_source)


_TOUCHED = "surv_touched"      # customers to refresh (temp table)
_GENERAL = "surv_general"      # of those, the ones with >= 2 source records or an override
_CAND = "surv_cand"            # their candidates with the sort keys of every field, one row type
_COLUMNS = ("full_name", "phone_e164", "phone_kind", "phone_ext", "email", "company", "city")

# Up to this many touched customers (and while they are under a fifth of the master) every statement
# also addresses the master by key, `customer_id = any(<the touched ids>)`, which the planner prices
# per id. Joined with the temp table alone, an hourly batch (1 % of the master) is planned as a scan
# of the whole master: at the default random_page_cost that looks as cheap as the lookups. A bulk
# refresh (a nightly run touches every customer) keeps the plain joins, where a scan is right.
KEYED_MAX = 50_000


def _keys(cur) -> list[str] | None:
    """The touched ids when statements should look the master up by key (see `KEYED_MAX`), else None."""
    cur.execute(sql.SQL("select count(*), (select reltuples from pg_class where oid = 'crm.customer'::regclass)"
                        " from {}").format(sql.Identifier(_TOUCHED)))
    touched, master = cur.fetchone()
    if touched > KEYED_MAX or touched > 0.2 * max(master, 0):
        return None
    cur.execute(sql.SQL("select coalesce(array_agg(customer_id::text), '{{}}') from {}").format(
        sql.Identifier(_TOUCHED)))
    return cur.fetchone()[0]


def _by_key(alias: str, keyed: bool) -> sql.Composable:
    """`and <alias>.customer_id = any(%(keys)s)` when the statements go by key, else nothing."""
    if not keyed:
        return sql.SQL("")
    return sql.SQL("and {}.customer_id = any(%(keys)s::uuid[])").format(sql.Identifier(alias))


def _key_col(field: str, rule: str) -> sql.Identifier:
    return sql.Identifier(f"k_{field}_{rule}")


def _present_col(field: str) -> sql.Identifier:
    return sql.Identifier(f"p_{field}")


def _update(source: sql.Composable, keyed: bool) -> sql.Composed:
    """UPDATE crm.customer from `source` (customer_id, the golden columns, provenance): changed rows only.
    `offset 0` keeps `source` a subquery, so its provenance is built once per row, not once for the
    comparison and again for the SET."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
    new = sql.SQL(", ").join(sql.SQL("f.{}").format(sql.Identifier(c)) for c in _COLUMNS)
    old = sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(c)) for c in _COLUMNS)
    return sql.SQL("""
        update crm.customer c set
            ({cols}) = ({new}),
            provenance = f.provenance,
            last_run_id = coalesce(%(run)s, c.last_run_id), updated_at = now()
        from ({source} offset 0) f
        where c.customer_id = f.customer_id {keyed} and c.merged_into is null
          and ({old}, c.provenance) is distinct from ({new}, f.provenance)
    """).format(cols=cols, new=new, old=old, source=source, keyed=_by_key("c", keyed))


def _provenance(entries: list[tuple[str, sql.Composable, sql.Composable, sql.Composable, sql.Composable,
                                    sql.Composable]]) -> sql.Composed:
    """jsonb provenance from (field, present, source, source_id, rule, at) per field; absent fields and
    null `at` are left out (jsonb_strip_nulls)."""
    parts = [sql.SQL("{}, case when {} then jsonb_build_object('source', {}, 'source_id', {}, 'rule', {},"
                     " 'at', {}) end").format(sql.Literal(field), present, src, sid, rule, at)
             for field, present, src, sid, rule, at in entries]
    return sql.SQL("jsonb_strip_nulls(jsonb_build_object({}))").format(sql.SQL(", ").join(parts))


# The source records survivorship reads: the master's by default; for customers the load is about to
# create, the run's own accepted rows (`insert_new`), which are all the records such a customer has.
_MASTER_RECORDS = sql.SQL("crm.source_customer")


def _fast_path(keyed: bool, records: sql.Composable = _MASTER_RECORDS) -> sql.Composed:
    """Customers with exactly one source record and no override: the record is the only candidate of
    every field it holds a value for (rule 'only_value'), so a plain join gives the golden record."""
    outs: list[sql.Composable] = []
    entries = []
    for field in GOLDEN:
        first = sql.SQL("s.{}").format(sql.Identifier(_VALUES[field][0]))
        for i, col in enumerate(_VALUES[field]):
            value = sql.SQL("s.{}").format(sql.Identifier(col))
            if i:  # the field's other columns come with its first one, never alone
                value = sql.SQL("case when {} is not null then {} end").format(first, value)
            outs.append(sql.SQL("{} as {}").format(value, sql.Identifier(col)))
        entries.append((field, sql.SQL("{} is not null").format(first), sql.SQL("s.source"), sql.SQL("s.source_id"),
                        sql.SQL("'only_value'::text"), sql.SQL("s.source_updated_at")))
    return sql.SQL("""
        select s.customer_id, {outs}, {prov} as provenance
        from {records} s
        join {touched} t on t.customer_id = s.customer_id
        where s.deleted_at is null {keyed}
          and not exists (select 1 from {general} g where g.customer_id = s.customer_id)
    """).format(outs=sql.SQL(", ").join(outs), prov=_provenance(entries), touched=sql.Identifier(_TOUCHED),
                general=sql.Identifier(_GENERAL), keyed=_by_key("s", keyed), records=records)


def _candidates(cfg: SurvivorshipConfig, keyed: bool, records: sql.Composable = _MASTER_RECORDS) -> sql.Composed:
    """The general path's candidates: source records and overrides of `surv_general`, with each field's
    rule keys and whether the row is a candidate of the field, computed once per row."""
    keys: list[sql.Composable] = []
    for field in GOLDEN:
        rules = cfg.fields[field].rules
        for r in rules:
            keys.append(sql.SQL("{} as {}").format(_rule_key(r, field, cfg.priorities(field)), _key_col(field, r)))
        present = sql.SQL("c.{} is not null").format(sql.Identifier(_VALUES[field][0]))
        if "override" not in rules:
            present = sql.SQL("{} and not c.is_override").format(present)
        keys.append(sql.SQL("{} as {}").format(present, _present_col(field)))
    override_value = {
        "full_name": "full_name", "email": "email", "company": "company", "city": "city", "phone": "phone_e164",
    }
    override_cols = sql.SQL(", ").join(
        [sql.SQL("case when o.field = {} then o.value end as {}").format(sql.Literal(f), sql.Identifier(col))
         for f, col in override_value.items()])
    return sql.SQL("""
        create temp table {cand} as
        select c.customer_id, c.source, c.source_id, c.at, c.is_override, c.full_name, c.phone_e164, c.phone_kind,
               c.phone_ext, c.email, c.company, c.city, {keys}
        from (
            select s.customer_id, s.source, s.source_id, s.source_updated_at as at, false as is_override,
                   p.priority as yaml_priority, s.full_name, s.name_key, s.phone_e164, s.phone_kind, s.phone_ext,
                   s.email, s.company, s.city
            from {records} s
            join {general} g on g.customer_id = s.customer_id
            left join sync.source_priority p on p.source = s.source
            where s.deleted_at is null {keyed_s}
            union all
            select o.customer_id, 'override', o.set_by, o.set_at, true, null, o.full_name, null,
                   o.phone_e164, o.phone_kind, null, o.email, o.company, o.city
            from (select o.customer_id, o.set_by, o.set_at, {override_cols},
                         case when o.field = 'phone' then coalesce(o.value_kind, 'other') end as phone_kind
                  from crm.golden_override o join {general} g on g.customer_id = o.customer_id
                  where true {keyed_o}) o
        ) c
    """).format(cand=sql.Identifier(_CAND), keys=sql.SQL(", ").join(keys), general=sql.Identifier(_GENERAL),
                override_cols=override_cols, keyed_s=_by_key("s", keyed), keyed_o=_by_key("o", keyed),
                records=records)


def _general_path(cfg: SurvivorshipConfig) -> sql.Composed:
    """Per field, the candidates ordered once (whole rows of `surv_cand`): the first wins, the second
    is the runner-up the rule is told from."""
    picks: list[sql.Composable] = []
    tops: list[sql.Composable] = []
    outs: list[sql.Composable] = []
    entries = []
    for field in GOLDEN:
        rules = cfg.fields[field].rules
        order = sql.SQL(", ").join([sql.SQL("x.{} desc nulls last").format(_key_col(field, r)) for r in rules]
                                   + [sql.SQL("x.source, x.source_id")])
        arr = sql.Identifier(f"a_{field}")
        picks.append(sql.SQL("array_agg(x order by {}) filter (where x.{}) as {}").format(
            order, _present_col(field), arr))
        win, second, count = (sql.Identifier(f"{p}_{field}") for p in ("w", "r", "n"))
        tops.append(sql.SQL("b.{a}[1] as {w}, b.{a}[2] as {r}, cardinality(b.{a}) as {n}").format(
            a=arr, w=win, r=second, n=count))
        win = sql.SQL("(t.{})").format(win)
        second = sql.SQL("(t.{})").format(second)
        for col in _VALUES[field]:
            outs.append(sql.SQL("{}.{} as {}").format(win, sql.Identifier(col), sql.Identifier(col)))
        rule_case = [sql.SQL("when {}.is_override then 'override'").format(win),
                     sql.SQL("when t.{} = 1 then 'only_value'").format(count)]
        for r in rules:
            if r == "override":
                continue
            k = _key_col(field, r)
            rule_case.append(sql.SQL("when {w}.{k} is distinct from {s}.{k} then {r}").format(
                w=win, s=second, k=k, r=sql.Literal(r)))
        rule = sql.SQL("case {} else 'tiebreak' end").format(sql.SQL(" ").join(rule_case))
        entries.append((field, sql.SQL("{}.source is not null").format(win), sql.SQL("{}.source").format(win),
                        sql.SQL("{}.source_id").format(win), rule, sql.SQL("{}.at").format(win)))
    return sql.SQL("""
        select t.customer_id, {outs}, {prov} as provenance
        from (select b.customer_id, {tops}
              from (select x.customer_id, {picks} from {cand} x group by x.customer_id) b
              offset 0) t
    """).format(outs=sql.SQL(", ").join(outs), prov=_provenance(entries), tops=sql.SQL(", ").join(tops),
                picks=sql.SQL(",\n").join(picks), cand=sql.Identifier(_CAND))


# a golden record lives while one of its source records does (or a steward override keeps it); one
# whose every source record was deleted keeps its last fields, marked deleted, until a record returns.
# Scalar subqueries, not EXISTS: an EXISTS may be planned as a hash of the whole table.
_LIFE = sql.SQL("""
    update crm.customer c set deleted_at = case when x.live then null else now() end, updated_at = now()
    from (select t.customer_id,
                 coalesce((select true from crm.source_customer s
                           where s.customer_id = t.customer_id and s.deleted_at is null limit 1), false)
                 or coalesce((select true from crm.golden_override o
                              where o.customer_id = t.customer_id limit 1), false) as live
          from {touched} t) x
    where c.customer_id = x.customer_id {keyed} and c.merged_into is null and c.stub_ref is null
      and (c.deleted_at is null) <> x.live
""")

_BY_RUN = sql.SQL("select distinct customer_id from stg.mapped_customer where run_id = %(run)s and source = %(source)s")
_BY_IDS = sql.SQL("select distinct unnest(%(ids)s::uuid[]) as customer_id")


def _drop(cur) -> None:
    cur.execute(sql.SQL("drop table if exists {}, {}, {}").format(
        *(sql.SQL("pg_temp.{}").format(sql.Identifier(t)) for t in (_CAND, _GENERAL, _TOUCHED))))


def refresh(cur, run_id: str | None, *, source: str | None = None, customer_ids=None,
            customers_in: str | None = None, cfg: SurvivorshipConfig | None = None) -> int:
    """Recompute the golden fields of a run's customers (`source`), of `customer_ids`, or of the
    customers of the temp table `customers_in` (column customer_id); rows changed.

    The touched customers are collected once into a temp table. Those with one source record and no
    override take the fast path (a plain join, rule 'only_value'); the rest the general path (all
    candidates ordered per field). Both give what ordering every customer's candidates would give.
    A few touched customers (an incremental run) are also looked up by key (`KEYED_MAX`): the cost
    follows them, not the master.
    """
    if sum(x is not None for x in (source, customer_ids, customers_in)) != 1:
        raise ValueError("give exactly one of source, customer_ids or customers_in")
    cfg = cfg or load_config()
    if customers_in is not None:
        touched = sql.SQL("select distinct customer_id from {} where customer_id is not null").format(
            sql.Identifier(customers_in))
    else:
        touched = _BY_RUN if source is not None else _BY_IDS
    ids = [str(c) for c in customer_ids] if customer_ids is not None else None
    if ids is not None and not ids:
        return 0
    params = {"run": run_id, "source": source, "ids": ids}
    _drop(cur)
    cur.execute(sql.SQL("create temp table {} as {}").format(sql.Identifier(_TOUCHED), touched), params)
    cur.execute(sql.SQL("analyze {}").format(sql.Identifier(_TOUCHED)))
    params["keys"] = _keys(cur)
    keyed = params["keys"] is not None
    cur.execute(sql.SQL("""
        create temp table {general} as
        select s.customer_id from crm.source_customer s join {touched} t on t.customer_id = s.customer_id
        where s.deleted_at is null {keyed_s}
        group by s.customer_id having count(*) > 1
        union
        select o.customer_id from crm.golden_override o join {touched} t on t.customer_id = o.customer_id
        where true {keyed_o}
    """).format(general=sql.Identifier(_GENERAL), touched=sql.Identifier(_TOUCHED), keyed_s=_by_key("s", keyed),
                keyed_o=_by_key("o", keyed)), params)
    cur.execute(sql.SQL("analyze {}").format(sql.Identifier(_GENERAL)))
    cur.execute(_update(_fast_path(keyed), keyed), params)
    changed = cur.rowcount
    cur.execute(_candidates(cfg, keyed), {"keys": params["keys"]} if keyed else None)
    cur.execute(sql.SQL("analyze {}").format(sql.Identifier(_CAND)))
    cur.execute(_update(_general_path(cfg), keyed), params)
    changed += cur.rowcount
    cur.execute(_LIFE.format(touched=sql.Identifier(_TOUCHED), keyed=_by_key("c", keyed)), params)
    changed += cur.rowcount
    _drop(cur)
    return changed


# a run's accepted rows shaped as `crm.source_customer` (what the candidates read)
_RUN_RECORDS = """(select r.customer_id, r.source, r.source_pk as source_id, r.source_updated_at, r.full_name,
                          r.name_key, r.phone_e164, r.phone_kind, r.phone_ext, r.email, r.company, r.city,
                          null::timestamptz as deleted_at
                   from {} r)"""


def insert_new(cur, run_id: str, records: str, cfg: SurvivorshipConfig | None = None) -> int:
    """Insert the customers of the temp table `records` (a run's accepted customer rows, columns of
    `stg.mapped_customer`) that `crm.customer` does not hold yet, each with its golden fields and
    provenance already computed: one heap version per new customer, never a bare row updated later.

    A customer that does not exist yet has no source record, link or override in the master (they all
    reference it), so its candidates are exactly its rows in `records`; ordered by the same rules as
    `refresh`, they give the golden record `refresh` would give after the rows were stored.
    Returns the customers inserted."""
    cfg = cfg or load_config()
    _drop(cur)
    table = sql.Identifier(records)
    cur.execute(sql.SQL("""
        create temp table {touched} as
        select distinct r.customer_id from {records} r
        where not exists (select 1 from crm.customer c where c.customer_id = r.customer_id)
    """).format(touched=sql.Identifier(_TOUCHED), records=table))
    if not cur.rowcount:
        _drop(cur)
        return 0
    cur.execute(sql.SQL("analyze {}").format(sql.Identifier(_TOUCHED)))
    run_records = sql.SQL(_RUN_RECORDS).format(table)
    cur.execute(sql.SQL("""
        create temp table {general} as
        select r.customer_id from {records} r join {touched} t on t.customer_id = r.customer_id
        group by r.customer_id having count(*) > 1
    """).format(general=sql.Identifier(_GENERAL), touched=sql.Identifier(_TOUCHED), records=table))
    cur.execute(sql.SQL("analyze {}").format(sql.Identifier(_GENERAL)))
    cur.execute(_candidates(cfg, False, run_records))
    cur.execute(sql.SQL("analyze {}").format(sql.Identifier(_CAND)))
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
    new = sql.SQL(", ").join(sql.SQL("f.{}").format(sql.Identifier(c)) for c in _COLUMNS)
    cur.execute(sql.SQL("""
        insert into crm.customer (customer_id, {cols}, provenance, first_run_id, last_run_id)
        select f.customer_id, {new}, f.provenance, %(run)s, %(run)s
        from ({fast} union all {general}) f
        order by f.customer_id
        on conflict (customer_id) do nothing
    """).format(cols=cols, new=new, fast=_fast_path(False, run_records), general=_general_path(cfg)),
        {"run": run_id})
    inserted = cur.rowcount
    _drop(cur)
    return inserted
