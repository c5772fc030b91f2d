"""Golden-record survivorship: each golden field of a customer from its best source value.

`refresh(cur, run_id, source=..., customer_ids=...)` recomputes the golden fields (full_name,
phone, email, company, city) of the given customers — those a run's mapped rows point at, or an
explicit list — in one set-based UPDATE. Guarantees:
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


def _statement(cfg: SurvivorshipConfig) -> sql.Composed:
    picks: list[sql.Composable] = []
    outs: list[sql.Composable] = []
    sets: list[sql.Composable] = []
    provenance: list[sql.Composable] = []
    for field in GOLDEN:
        rules = cfg.fields[field].rules
        keys = [_rule_key(r, field, cfg.priorities(field)) for r in rules]
        order = sql.SQL(", ").join([sql.SQL("{} desc nulls last").format(k) for k in keys]
                                   + [sql.SQL("c.source, c.source_id")])
        first_col = _VALUES[field][0]
        present = sql.SQL("c.{} is not null").format(sql.Identifier(first_col))
        if "override" not in rules:
            present = sql.SQL("{} and not c.is_override").format(present)

        def agg(expr: sql.Composable, alias: str) -> None:
            picks.append(sql.SQL("array_agg({} order by {}) filter (where {}) as {}").format(
                expr, order, present, sql.Identifier(alias)))

        for col in _VALUES[field]:
            agg(sql.SQL("c.{}").format(sql.Identifier(col)), f"{field}__{col}")
            outs.append(sql.SQL("b.{}[1] as {}").format(sql.Identifier(f"{field}__{col}"), sql.Identifier(col)))
        for meta in ("source", "source_id", "at", "is_override"):
            agg(sql.SQL("c.{}").format(sql.Identifier(meta)), f"{field}__{meta}")
        for r, key in zip(rules, keys):
            agg(key, f"{field}__k_{r}")
        rule_case = [sql.SQL("when b.{a}[1] then 'override'").format(a=sql.Identifier(f"{field}__is_override")),
                     sql.SQL("when cardinality(b.{a}) = 1 then 'only_value'").format(
                         a=sql.Identifier(f"{field}__source"))]
        for r in rules:
            if r == "override":
                continue
            k = sql.Identifier(f"{field}__k_{r}")
            rule_case.append(sql.SQL("when b.{k}[1] is distinct from b.{k}[2] then {r}").format(k=k, r=sql.Literal(r)))
        src = sql.Identifier(f"{field}__source")
        outs.append(sql.SQL(
            "case when b.{src}[1] is not null then jsonb_build_object('source', b.{src}[1], 'source_id', b.{sid}[1],"
            " 'rule', case {cases} else 'tiebreak' end, 'at', b.{at}[1]) end as {alias}").format(
            src=src, sid=sql.Identifier(f"{field}__source_id"), at=sql.Identifier(f"{field}__at"),
            cases=sql.SQL(" ").join(rule_case), alias=sql.Identifier(f"{field}__prov")))
        provenance.append(sql.SQL("{}, f.{}").format(sql.Literal(field), sql.Identifier(f"{field}__prov")))
    for col in ("full_name", "phone_e164", "phone_kind", "phone_ext", "email", "company", "city"):
        sets.append(sql.Identifier(col))
    override_value = {
        "full_name": "full_name", "email": "email", "company": "company", "city": "city", "phone": "phone_e164",
    }
    override_cols = sql.SQL(", ").join(
        [sql.SQL("case when o.field = {} then o.value end as {}").format(sql.Literal(f), sql.Identifier(col))
         for f, col in override_value.items()])
    return sql.SQL("""
        with touched as ({touched}),
        cand as (
            select s.customer_id, s.source, s.source_id, s.source_updated_at as at, false as is_override,
                   p.priority as yaml_priority, s.full_name, s.name_key, s.phone_e164, s.phone_kind, s.phone_ext,
                   s.email, s.company, s.city
            from crm.source_customer s
            join touched t using (customer_id)
            left join sync.source_priority p on p.source = s.source
            union all
            select o.customer_id, 'override', o.set_by, o.set_at, true, null, o.full_name, null,
                   o.phone_e164, o.phone_kind, null, o.email, o.company, o.city
            from (select o.customer_id, o.set_by, o.set_at, {override_cols},
                         case when o.field = 'phone' then coalesce(o.value_kind, 'other') end as phone_kind
                  from crm.golden_override o join touched t using (customer_id)) o
        ),
        b as (
            select c.customer_id, {picks} from cand c group by c.customer_id
        ),
        f as (
            select b.customer_id, {outs} from b
        )
        update crm.customer c set
            ({sets}) = (f.full_name, f.phone_e164, f.phone_kind, f.phone_ext, f.email, f.company, f.city),
            provenance = jsonb_strip_nulls(jsonb_build_object({provenance})),
            last_run_id = coalesce(%(run)s, c.last_run_id), updated_at = now()
        from f
        where c.customer_id = f.customer_id and c.merged_into is null
          and (c.full_name, c.phone_e164, c.phone_kind, c.phone_ext, c.email, c.company, c.city, c.provenance)
              is distinct from (f.full_name, f.phone_e164, f.phone_kind, f.phone_ext, f.email, f.company, f.city,
                                jsonb_strip_nulls(jsonb_build_object({provenance})))
    """).format(
        touched=sql.SQL("{touched}"), override_cols=override_cols, picks=sql.SQL(",\n").join(picks),
        outs=sql.SQL(",\n").join(outs), sets=sql.SQL(", ").join(sets),
        provenance=sql.SQL(", ").join(provenance))


_BY_RUN = sql.SQL("select distinct customer_id from stg.mapped_customer where run_id = %(run)s and source = %(source)s")
_BY_IDS = sql.SQL("select distinct unnest(%(ids)s::uuid[]) as customer_id")


def refresh(cur, run_id: str | None, *, source: str | None = None, customer_ids=None,
            cfg: SurvivorshipConfig | None = None) -> int:
    """Recompute the golden fields of a run's customers (`source`) or of `customer_ids`; rows changed."""
    if (source is None) == (customer_ids is None):
        raise ValueError("give exactly one of source or customer_ids")
    cfg = cfg or load_config()
    template = _statement(cfg)
    touched = _BY_RUN if source is not None else _BY_IDS
    ids = [str(c) for c in customer_ids] if customer_ids is not None else None
    if ids is not None and not ids:
        return 0
    statement = sql.SQL(template.as_string(cur).replace("{touched}", touched.as_string(cur)))
    cur.execute(statement, {"run": run_id, "source": source, "ids": ids})
    return cur.rowcount
