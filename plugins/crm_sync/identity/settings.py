"""Match configuration: which fields to compare, how, which blocking keys, which thresholds.

A match config is one YAML file (see `include/match/customer.yaml` and `docs/identity.md`),
validated once by `load_settings(path)` / `parse_settings(doc, source)`. Guarantees:
- a config that loads is internally consistent: field names are unique, every column set is
  non-empty, every comparison level is one the field's normaliser can evaluate, every blocking
  key names a field and an attribute that field's normaliser produces, thresholds are
  probabilities with `review <= merge`, m/u starting values are probabilities;
- every error is a `SettingsError` whose message names the file and the field path
  (`customer.yaml: fields[1] (phone).comparator.levels[0]: ...`);
- defaults are filled in once here (levels per comparator type, m/u starting values), so the
  rest of the engine reads a fully explicit, frozen object.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Normaliser = Literal["person_name", "phone", "email", "company", "text", "exact"]
ComparatorType = Literal["name", "identifier", "company", "string", "exact"]
Predicate = Literal["exact", "pinyin", "surname_only", "conflict", "other_place", "other_extension",
                   "jaro_winkler", "ratio", "edits"]

# Attributes each normaliser derives (usable in blocking keys and as a level's `on`).
# `value` is always the field's comparison value.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "person_name": ("value", "full", "pinyin", "surname"),
    "phone": ("value", "mobile", "landline", "extension", "desk"),
    "email": ("value", "personal", "role", "domain"),
    "company": ("value", "pinyin", "place", "located"),
    "text": ("value",),
    "exact": ("value",),
}
ATTRIBUTE_ALIASES = {("company", "key"): "value", ("phone", "e164"): "value", ("email", "email"): "value"}

# Which predicates each normaliser can evaluate (beyond the universal exact/jaro_winkler/ratio).
_SPECIAL_PREDICATES: dict[str, set[str]] = {
    "person_name": {"pinyin", "surname_only"},
    "company": {"pinyin", "other_place"},
    "phone": {"conflict", "other_extension"},
    "email": {"conflict"},
}
_FUZZY = {"jaro_winkler", "ratio"}
# Predicates that compare two values by similarity (rapidfuzz), whatever the normaliser.
_SIMILARITY = _FUZZY | {"edits"}

# Default levels per comparator type, with starting m/u values for EM (or for estimate=False when
# the config gives none). They are deliberately generic: estimation replaces them on real data.
_DEFAULT_LEVELS: dict[str, list[dict[str, Any]]] = {
    "name": [
        {"name": "exact", "when": "exact", "m": 0.70, "u": 0.002},
        {"name": "pinyin", "when": "pinyin", "m": 0.15, "u": 0.002},
        {"name": "jaro_winkler_0.92", "when": "jaro_winkler", "threshold": 0.92, "m": 0.04, "u": 0.01},
        {"name": "surname_only", "when": "surname_only", "m": 0.08, "u": 0.01},
    ],
    "identifier": [
        {"name": "exact", "when": "exact", "m": 0.85, "u": 0.0001},
        {"name": "conflict", "when": "conflict", "m": 0.03, "u": 0.9},
    ],
    "company": [
        {"name": "exact", "when": "exact", "m": 0.85, "u": 0.01},
        {"name": "ratio_0.85", "when": "ratio", "threshold": 0.85, "m": 0.05, "u": 0.01},
    ],
    "string": [
        {"name": "exact", "when": "exact", "m": 0.85, "u": 0.01},
        {"name": "jaro_winkler_0.92", "when": "jaro_winkler", "threshold": 0.92, "m": 0.08, "u": 0.01},
        {"name": "jaro_winkler_0.80", "when": "jaro_winkler", "threshold": 0.80, "m": 0.03, "u": 0.05},
    ],
    "exact": [
        {"name": "exact", "when": "exact", "m": 0.9, "u": 0.05},
    ],
}
_DEFAULT_ELSE: dict[str, tuple[float, float]] = {
    "name": (0.03, 0.976), "identifier": (0.12, 0.0999), "company": (0.10, 0.98),
    "string": (0.04, 0.93), "exact": (0.1, 0.95),
}
# Starting m/u for levels the user adds without values, by predicate.
_PREDICATE_START: dict[str, tuple[float, float]] = {
    "exact": (0.8, 0.01), "pinyin": (0.1, 0.002), "surname_only": (0.08, 0.01),
    "conflict": (0.03, 0.5), "other_place": (0.01, 0.005), "other_extension": (0.01, 0.001),
    "jaro_winkler": (0.05, 0.02), "ratio": (0.05, 0.02), "edits": (0.03, 0.001),
}

_RE_KEY = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*)(?:\.(?P<attr>[A-Za-z_]+))?(?:\[:(?P<n>\d+)\])?$")


class SettingsError(ValueError):
    """A match config is missing, unreadable or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Level(_Strict):
    """One comparison level: the first level whose predicate holds wins."""

    name: str = Field(min_length=1)
    when: Predicate
    threshold: float | None = Field(default=None, gt=0, le=1)
    max_edits: int | None = Field(default=None, ge=1, le=3)   # `edits`: Damerau–Levenshtein distance
    attribute: str | None = None   # attribute compared; default per normaliser/predicate
    m: float | None = Field(default=None, gt=0, lt=1)
    u: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # "exact" | {jaro_winkler: 0.9} | {name: .., when: .., threshold: ..}
        if isinstance(data, str):
            return {"name": data, "when": data}
        if isinstance(data, dict) and "when" not in data and "edits" in data:
            data = dict(data)
            edits = data.pop("edits")
            data.setdefault("name", f"edits_{edits}")
            return {**data, "when": "edits", "max_edits": edits}
        if isinstance(data, dict) and "when" not in data:
            found = [k for k in ("jaro_winkler", "ratio") if k in data]
            if len(found) == 1:
                data = dict(data)
                threshold = data.pop(found[0])
                data.setdefault("name", f"{found[0]}_{threshold}")
                return {**data, "when": found[0], "threshold": threshold}
            for k in ("exact", "pinyin", "surname_only", "conflict", "other_place", "other_extension"):
                if data.get(k) is True:
                    data = {kk: vv for kk, vv in data.items() if kk != k}
                    data.setdefault("name", k)
                    return {**data, "when": k}
        return data

    @model_validator(mode="after")
    def _threshold_for_fuzzy(self) -> "Level":
        if self.when in _FUZZY and self.threshold is None:
            raise ValueError(f"level '{self.name}': {self.when} needs a threshold in (0, 1]")
        if self.when not in _FUZZY and self.threshold is not None:
            raise ValueError(f"level '{self.name}': {self.when} takes no threshold")
        if (self.when == "edits") != (self.max_edits is not None):
            raise ValueError(f"level '{self.name}': max_edits (1 to 3) goes with the 'edits' predicate only")
        return self


class ElseLevel(_Strict):
    m: float | None = Field(default=None, gt=0, lt=1)
    u: float | None = Field(default=None, gt=0, lt=1)


class Comparator(_Strict):
    type: ComparatorType
    levels: list[Level] | None = None
    else_: ElseLevel = Field(default_factory=ElseLevel, alias="else")


class FieldSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    column: str | None = None
    columns: list[str] | None = None
    normaliser: Normaliser
    comparator: Comparator
    tf_adjust: bool = False
    strong: bool = False
    group: str | None = None        # fields of one group are not independent evidence
    use: str | None = None          # compare only this attribute (phone: mobile; email: personal)
    city_column: str | None = None  # phone only: completes a bare local landline's area code

    @model_validator(mode="after")
    def _consistent(self) -> "FieldSpec":
        if (self.column is None) == (self.columns is None):
            raise ValueError("give exactly one of 'column' or 'columns'")
        if self.columns is not None and not self.columns:
            raise ValueError("'columns' must not be empty")
        if self.use is not None and (self.use == "value" or self.use not in ATTRIBUTES[self.normaliser]):
            raise ValueError(f"use '{self.use}' is not an attribute of '{self.normaliser}' "
                             f"(one of {[a for a in ATTRIBUTES[self.normaliser] if a != 'value']})")
        if self.city_column and self.normaliser != "phone":
            raise ValueError("'city_column' only applies to the phone normaliser")
        allowed = {"exact"} | _SIMILARITY | _SPECIAL_PREDICATES.get(self.normaliser, set())
        for level in self.levels:
            if level.when not in allowed:
                raise ValueError(
                    f"level '{level.name}': predicate '{level.when}' needs a normaliser in "
                    f"{sorted(n for n, p in _SPECIAL_PREDICATES.items() if level.when in p)}, "
                    f"this field uses '{self.normaliser}'")
            attr = self.attribute_of(level)
            if attr not in ATTRIBUTES[self.normaliser]:
                raise ValueError(f"level '{level.name}': attribute '{level.attribute}' is not an attribute of "
                                 f"'{self.normaliser}' (one of {list(ATTRIBUTES[self.normaliser])})")
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names) or "else" in names or "missing" in names:
            raise ValueError(f"level names must be unique and not 'else'/'missing': {names}")
        return self

    @property
    def source_columns(self) -> list[str]:
        return list(self.columns) if self.columns is not None else [self.column]  # type: ignore[list-item]

    @property
    def levels(self) -> list[Level]:
        if self.comparator.levels is not None:
            return self.comparator.levels
        return [Level(**d) for d in _DEFAULT_LEVELS[self.comparator.type]]

    @property
    def level_names(self) -> list[str]:
        """Names of levels 0..K, the last one being the implicit `else`."""
        return [lv.name for lv in self.levels] + ["else"]

    def attribute_of(self, level: Level) -> str:
        if level.attribute:
            return ATTRIBUTE_ALIASES.get((self.normaliser, level.attribute), level.attribute)
        if level.when == "pinyin":
            return "pinyin"
        if level.when in _SIMILARITY and self.normaliser == "person_name":
            return "pinyin"  # fuzzy on readings, so 'Zhang Shan' ~ 张三 and 王伟 ~ 王玮 meet
        return "value"

    def tf_level(self, level: Level) -> bool:
        """Term-frequency adjustment applies to the field's equality levels only."""
        return self.tf_adjust and level.when in ("exact", "pinyin")

    def starting_m_u(self) -> tuple[list[float], list[float]]:
        defaults = {d["name"]: d for d in _DEFAULT_LEVELS[self.comparator.type]}
        m: list[float] = []
        u: list[float] = []
        for level in self.levels:
            fallback = defaults.get(level.name) if defaults.get(level.name, {}).get("when") == level.when else None
            dm, du = (fallback["m"], fallback["u"]) if fallback else _PREDICATE_START[level.when]
            m.append(level.m if level.m is not None else dm)
            u.append(level.u if level.u is not None else du)
        em, eu = _DEFAULT_ELSE[self.comparator.type]
        m.append(self.comparator.else_.m if self.comparator.else_.m is not None else max(1e-4, 1 - sum(m)) if
                 self.comparator.levels is not None else em)
        u.append(self.comparator.else_.u if self.comparator.else_.u is not None else max(1e-4, 1 - sum(u)) if
                 self.comparator.levels is not None else eu)
        return m, u


class KeyPart(_Strict):
    field: str
    attr: str
    prefix: int | None = None

    @property
    def column(self) -> str:
        return f"{self.field}.{self.attr}"

    def __str__(self) -> str:
        return self.column + (f"[:{self.prefix}]" if self.prefix else "")


class BlockingRule(_Strict):
    name: str
    keys: list[KeyPart] = Field(min_length=1)
    max_block_size: int | None = Field(default=None, ge=2)


class Thresholds(_Strict):
    merge: float = Field(gt=0, lt=1)
    review: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "Thresholds":
        if self.review > self.merge:
            raise ValueError(f"review ({self.review}) must not exceed merge ({self.merge})")
        return self


class Estimation(_Strict):
    u_sample_pairs: int = Field(default=1_000_000, ge=1000)
    em_max_pairs: int = Field(default=2_000_000, ge=1000)
    em_iterations: int = Field(default=25, ge=1, le=500)
    em_tolerance: float = Field(default=1e-4, gt=0)
    min_m: float = Field(default=1e-3, gt=0, lt=0.5)     # floor for estimated m values
    # Below this many records u and m cannot be estimated meaningfully (random pairs would be
    # mostly true matches); the config's starting values are used instead.
    min_records: int = Field(default=1000, ge=2)
    # When the `crm_sync__identity_estimate` DAG re-estimates m/u over the master (cron, UTC): weekly by
    # default. Runs never estimate on their own; `crm-sync identity estimate` does it on demand.
    schedule: str = "0 3 * * 0"


class Settings(_Strict):
    name: str = "match"
    record_id: str = "record_id"
    fields: list[FieldSpec] = Field(min_length=1)
    blocking: list[BlockingRule] = Field(min_length=1)
    max_block_size: int = Field(default=200, ge=2)
    thresholds: Thresholds
    prior: float | None = Field(default=None, gt=0, lt=1)
    # Other records of the same person per record. A random pair's chance of being a match falls
    # as the population grows (one person's few records among ever more others), so without
    # estimation the prior is min(prior, matches_per_record / (records - 1)): a fixed prior taken
    # from a 20k sample would let a rare name alone merge against a master of millions.
    matches_per_record: float | None = Field(default=None, gt=0)
    estimation: Estimation = Field(default_factory=Estimation)
    source: str | None = Field(default=None, exclude=True)

    def prior_for(self, records: int) -> float | None:
        """The prior for a run over `records` records (batch and master) when nothing is estimated."""
        if self.matches_per_record is None:
            return self.prior
        scaled = min(0.5, self.matches_per_record / max(records - 1, 1))
        return scaled if self.prior is None else min(self.prior, scaled)

    def tf_columns(self) -> list[str]:
        """Feature columns (`field.attribute`) whose values carry term frequencies, each once, in field order."""
        columns: dict[str, None] = {}
        for spec in self.fields:
            for level in spec.levels:
                if spec.tf_level(level):
                    columns.setdefault(f"{spec.name}.{spec.attribute_of(level)}")
        return list(columns)

    @field_validator("blocking", mode="before")
    @classmethod
    def _parse_rules(cls, rules: Any) -> Any:
        if not isinstance(rules, list):
            return rules
        parsed = []
        for rule in rules:
            if isinstance(rule, (str, list)):
                rule = {"keys": rule}
            if isinstance(rule, dict):
                keys = rule.get("keys")
                if isinstance(keys, str):
                    keys = [k.strip() for k in keys.split("+")]
                if isinstance(keys, list):
                    keys = [_parse_key(k) if isinstance(k, str) else k for k in keys]
                    rule = {**rule, "keys": keys}
                    rule.setdefault("name", " + ".join(_key_text(k) for k in keys))
            parsed.append(rule)
        return parsed

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"field names must be unique, repeated: {dupes}")
        by_name = {f.name: f for f in self.fields}
        for r, rule in enumerate(self.blocking):
            for part in rule.keys:
                spec = by_name.get(part.field)
                if spec is None:
                    raise ValueError(f"blocking[{r}] ({rule.name}): unknown field '{part.field}' "
                                     f"(fields: {names})")
                if part.attr not in ATTRIBUTES[spec.normaliser]:
                    raise ValueError(f"blocking[{r}] ({rule.name}): '{part.field}' ({spec.normaliser}) has no "
                                     f"attribute '{part.attr}' (one of {list(ATTRIBUTES[spec.normaliser])})")
        return self

    def field(self, name: str) -> FieldSpec:
        return next(f for f in self.fields if f.name == name)

    @property
    def input_columns(self) -> list[str]:
        cols: list[str] = []
        for f in self.fields:
            for c in f.source_columns + ([f.city_column] if f.city_column else []):
                if c not in cols:
                    cols.append(c)
        return cols


def _parse_key(text: str) -> dict[str, Any]:
    found = _RE_KEY.match(text.strip())
    if not found:
        raise ValueError(f"blocking key '{text}' is not of the form field[.attribute][[:N]]")
    return {"field": found["field"], "attr": found["attr"] or "value",
            "prefix": int(found["n"]) if found["n"] else None}


def _key_text(key: Any) -> str:
    if isinstance(key, dict):
        return f"{key['field']}.{key['attr']}" + (f"[:{key['prefix']}]" if key.get("prefix") else "")
    return str(key)


def _normalise_aliases(doc: Any) -> Any:
    # Blocking keys may use the normaliser's own vocabulary (company.key, phone.e164, email.email).
    if isinstance(doc, dict) and isinstance(doc.get("fields"), list) and isinstance(doc.get("blocking"), list):
        kinds = {f.get("name"): f.get("normaliser") for f in doc["fields"] if isinstance(f, dict)}

        def fix(key: Any) -> Any:
            if isinstance(key, str):
                parts = [p.strip() for p in key.split("+")]
                out = []
                for p in parts:
                    found = _RE_KEY.match(p)
                    if found and found["attr"] and (kinds.get(found["field"]), found["attr"]) in ATTRIBUTE_ALIASES:
                        alias = ATTRIBUTE_ALIASES[(kinds[found["field"]], found["attr"])]
                        p = f"{found['field']}.{alias}" + (f"[:{found['n']}]" if found["n"] else "")
                    out.append(p)
                return " + ".join(out)
            if isinstance(key, list):
                return [fix(k) for k in key]
            if isinstance(key, dict) and "keys" in key:
                return {**key, "keys": fix(key["keys"])}
            return key

        doc = {**doc, "blocking": [fix(rule) for rule in doc["blocking"]]}
    return doc


def _where(loc: tuple[Any, ...], doc: Any) -> str:
    """'fields[1] (phone).comparator.levels[0]' from a pydantic error location."""
    out: list[str] = []
    node = doc
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            item = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(item, dict) and item.get("name"):
                label += f" ({item['name']})"
            out.append(label)
            node = item
        else:
            if part in ("function-after[_consistent(), FieldSpec]",) or str(part).startswith(("function-", "str", "list[")):
                continue
            out.append(("." if out else "") + str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return "".join(out) or "(top level)"


def parse_settings(doc: Any, source: str = "<match config>") -> Settings:
    """Validate a parsed YAML document; errors name `source` and the field."""
    if not isinstance(doc, dict):
        raise SettingsError(f"{source}: a match config is a mapping with fields, blocking and thresholds")
    try:
        doc = _normalise_aliases(doc)
        return Settings.model_validate({**doc, "source": source})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{_where(tuple(err['loc']), doc)}: {msg}")
        raise SettingsError(f"{source}: " + "; ".join(problems)) from None
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None


def load_settings(path: str | Path) -> Settings:
    """Read and validate a match config YAML."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{path}: match config not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: cannot read match config: {exc}") from None
    return parse_settings(doc, str(path))
