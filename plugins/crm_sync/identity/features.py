"""Features: the normalised, derived columns every comparison level and blocking key reads.

`build(df, settings)` returns one row per input row (same order, fresh RangeIndex) with, per
configured field `f`, the columns `f.present` (bool: the field carries evidence) and `f.<attr>`
for each attribute of the field's normaliser (see `settings.ATTRIBUTES`; None when the record has
no such value), plus `f.weak` (person names: only a surname survived) and `f.strong_kind`
(phones: a mobile; e-mails: a personal, non-role mailbox). Guarantees:
- each *distinct* raw value is normalised once (factorise, normalise the uniques, take back by
  code); equal raw values always yield equal features;
- large inputs are normalised on several processes (`workers`), with identical results;
- the outputs a record's own columns need besides the comparison attributes (a name's reading
  even when only a surname survived, a phone's kind, the number of the field it was read from
  and its extension even when it does not validate, an e-mail as the source wrote it and whether
  it is valid) come from the same pass: the resolve stage normalises nothing a second time;
- `encode(features)` turns those columns into integer codes (-1 = none) so that equality tests,
  term frequencies and blocking are vectorised numpy operations.
"""
from __future__ import annotations

import gc
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from crm_sync.identity.settings import ATTRIBUTES, FieldSpec, Settings, SettingsError

# Below this many distinct values, starting worker processes costs more than it saves.
_PARALLEL_MIN_DISTINCT = 40_000


def _clean_raw(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    # None, not pd.NA, for blanks: multi-column fields join their parts with `v is not None`
    return text.astype(object).where(text.notna() & (text != ""), None)


def _raw_values(df: pd.DataFrame, spec: FieldSpec) -> pd.Series:
    cols = spec.source_columns
    missing = [c for c in cols + ([spec.city_column] if spec.city_column else []) if c not in df.columns]
    if missing:
        raise SettingsError(f"field '{spec.name}': column(s) {missing} not in the input "
                            f"(columns: {list(df.columns)})")
    parts = [_clean_raw(df[c]) for c in cols]
    if len(parts) == 1:
        return parts[0].reset_index(drop=True)
    # A phone field over several columns is one field holding several numbers (the normaliser
    # splits on '/'); names and text over several columns read as one value (given + surname).
    sep = " / " if spec.normaliser == "phone" else " "
    frame = pd.concat([p.reset_index(drop=True) for p in parts], axis=1)
    joined = frame.apply(lambda row: sep.join(v for v in row if v is not None), axis=1, result_type="reduce")
    return joined.mask(joined == "", None).astype(object)


# ---------------------------------------------------------------- per-value normalisers
# Each returns a tuple aligned with `_OUTPUTS[normaliser]`; they run on distinct values only.

_OUTPUTS: dict[str, tuple[str, ...]] = {
    "person_name": ("present", "weak", "value", "full", "pinyin", "surname", "key"),
    "phone": ("present", "strong_kind", "value", "mobile", "landline", "extension", "desk",
              "kind", "part", "ext", "e164"),
    "email": ("present", "strong_kind", "value", "personal", "role", "domain", "text", "valid"),
    "company": ("present", "value", "pinyin", "place", "located"),
    "text": ("present", "value"),
    "exact": ("present", "value"),
}


def _person_name(raw: str) -> tuple:
    from crm_sync.identity.normalize import normalize_person_name

    n = normalize_person_name(raw)
    if not n.full:
        return (False, False, None, None, None, None, n.pinyin or None)
    surname = None
    if n.surname:
        if n.surname.isascii():
            surname = n.surname.lower()
        else:
            # The surname's reading, so a Han '王先生' and a Latin 'Wang Wei' can meet.
            k = len(n.surname)
            surname = "".join(n.pinyin_tokens[:k]) or n.surname
        # few distinct surnames, domains and places over millions of values: one string each
        surname = sys.intern(surname)
    weak = bool(n.surname_only)
    key = n.pinyin or None
    # A surname-only name is a hint, not a name: it takes part only in the surname_only level.
    return (True, weak, None if weak else n.full, n.full, None if weak else key, surname, key)


def _phone(raw: str, city: str | None = None) -> tuple:
    from crm_sync.identity.normalize import best_phone_part, normalize_phone

    p = normalize_phone(raw, city)
    # what the record's own columns keep (stg.resolved): its kind, which number of the field was
    # taken and that number's extension, also for a number that does not validate
    kind, part = sys.intern(p.kind), best_phone_part(raw, city)
    if not p.e164:
        return (False, False, None, None, None, None, None, kind, part, p.extension, None)
    mobile = p.kind == "mobile"
    landline = p.e164 if p.kind == "landline" else None
    # a switchboard plus an extension is one desk: near-personal evidence a bare switchboard is not
    desk = f"{landline};ext={p.extension}" if landline and p.extension else None
    return (True, mobile, p.e164, p.e164 if mobile else None, landline, p.extension, desk, kind, part, p.extension,
            p.e164)


def _email(raw: str) -> tuple:
    from crm_sync.identity.normalize import nfkc, normalize_email

    e = normalize_email(raw)
    # the record's own e-mail column: what the source said when it does not parse, so that
    # validation can see and reject it
    text = e.email if e.email else (nfkc(e.raw) or None)
    if not (e.valid and e.email):
        return (False, False, None, None, None, None, text, bool(e.valid))
    personal = not e.generic
    return (True, personal, e.email, e.email if personal else None, None if personal else e.email,
            sys.intern(e.email.rsplit("@", 1)[1]), text, True)


def _company(raw: str) -> tuple:
    from crm_sync.identity.normalize import normalize_company

    c = normalize_company(raw)
    if not c.key:
        return (False, None, None, None, None)
    # The key drops the city ('北京华信科技' -> '华信科技') so that spellings meet; `located` keeps
    # it when the name states one, because the same trade name in two cities is often two firms.
    return (True, c.key, c.pinyin or None, sys.intern(c.city) if c.city else c.city,
            f"{c.key}@{c.city}" if c.city else None)


def _text(raw: str) -> tuple:
    from crm_sync.identity.normalize import nfkc

    value = " ".join(nfkc(raw).casefold().split())
    return (bool(value), value or None)


def _exact(raw: str) -> tuple:
    value = str(raw).strip()
    return (bool(value), value or None)


_NORMALISE: dict[str, Callable[..., tuple]] = {
    "person_name": _person_name, "phone": _phone, "email": _email,
    "company": _company, "text": _text, "exact": _exact,
}


def _normalise_values(kind: str, values: Any, cities: Any = None) -> list[tuple]:
    """Normalised attributes of `values`, column-wise: one tuple per `_OUTPUTS[kind]` entry."""
    fn = _NORMALISE[kind]
    if kind == "phone":
        rows = [fn(raw, city) for raw, city in zip(values, cities)]
    else:
        rows = [fn(v) for v in values]
    if not rows:
        return [() for _ in _OUTPUTS[kind]]
    return list(zip(*rows))


def _worker_chunk(args: tuple[str, Any, Any]) -> list[tuple]:
    out = _normalise_values(*args)
    # The values sent to workers are distinct, so entries the normaliser's whole-value caches
    # keep from one chunk are not asked for again; left alone, those caches fill to their
    # maxsize in every worker (hundreds of MB each).
    _clear_value_caches()
    return out


def _clear_value_caches() -> None:
    from crm_sync.identity import normalize

    for obj in vars(normalize).values():
        info = getattr(obj, "cache_info", None)
        # the large caches hold whole values; the small ones (given names, company words,
        # loaded tables) repeat across values and stay warm
        if info is not None and (info().maxsize or 0) > 2**16:
            obj.cache_clear()


# Values per task sent to a worker: bounds what a worker holds (its input, its results, its
# caches) and what waits in the parent, while keeping the per-task overhead negligible.
_CHUNK_VALUES = 20_000


class _Normaliser:
    """Normalises distinct values, on worker processes when there are many.

    The workers are forked once, on first need, and serve every field of one `build`. Before
    forking, the parent's objects are moved out of the garbage collector's sight
    (`gc.freeze`): a collection in a worker would otherwise write to every inherited container
    object and so copy most of the parent's heap into each worker.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.unfreeze = False

    def __enter__(self) -> "_Normaliser":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
            if self.unfreeze:
                gc.unfreeze()

    def run(self, kind: str, values: Any, cities: Any = None) -> list[tuple]:
        if self.workers <= 1 or len(values) < _PARALLEL_MIN_DISTINCT:
            return _normalise_values(kind, values, cities)
        if self.pool is None:
            import multiprocessing as mp

            # a caller that froze objects itself (a forking task runner) keeps them frozen
            self.unfreeze = gc.get_freeze_count() == 0
            gc.freeze()
            # fork: workers inherit the loaded normalisers (phone metadata, pinyin tables)
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("fork"))
        size = min(_CHUNK_VALUES, -(-len(values) // self.workers))
        chunks = ((kind, values[i:i + size], None if cities is None else cities[i:i + size])
                  for i in range(0, len(values), size))
        columns: list[list] = [[] for _ in _OUTPUTS[kind]]
        for part in self.pool.map(_worker_chunk, chunks):
            for column, values_part in zip(columns, part):
                column.extend(values_part)
        return columns


def build(df: pd.DataFrame, settings: Settings, *, workers: int | None = None) -> pd.DataFrame:
    """Derived feature columns for `df` (see module docstring), one row per input row."""
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    out: dict[str, Any] = {}
    n = len(df)
    done: dict[tuple, tuple[np.ndarray, list[Any]]] = {}
    with _Normaliser(workers) as normaliser:
        for spec in settings.fields:
            # two fields reading the same columns with the same normaliser (mobile / landline of
            # one phone column) share one normalisation pass
            source = (spec.normaliser, tuple(spec.source_columns), spec.city_column)
            if source in done:
                codes, columns = done[source]
                _store(out, spec, codes, columns, n)
                continue
            raw = _raw_values(df, spec)
            cities = None
            if spec.normaliser == "phone" and spec.city_column:
                city = _clean_raw(df[spec.city_column]).reset_index(drop=True)
                keyed = (raw + "\x1f" + city.fillna("")).where(raw.notna(), None)
                del raw, city
                codes, uniques = pd.factorize(keyed, use_na_sentinel=True)
                del keyed
                split = [k.split("\x1f", 1) for k in uniques]
                del uniques
                uniques = [k[0] for k in split]
                cities = [k[1] or None for k in split]
                del split
            else:
                codes, uniques = pd.factorize(raw, use_na_sentinel=True)
                uniques = np.asarray(uniques, dtype=object)
                del raw
                if spec.normaliser == "phone":
                    cities = [None] * len(uniques)
            columns = normaliser.run(spec.normaliser, uniques, cities)
            del uniques, cities
            done[source] = (codes, columns)
            _store(out, spec, codes, columns, n)
    return pd.DataFrame(out, index=pd.RangeIndex(n))


def _store(out: dict[str, Any], spec: FieldSpec, codes: np.ndarray, columns: list[Any], n: int) -> None:
    names = _OUTPUTS[spec.normaliser]
    per_unique: dict[str, np.ndarray] = {}
    for attr, column in zip(names, columns):
        if attr in ("present", "weak", "strong_kind", "valid"):
            arr = np.append(np.array(column, dtype=bool), False)
        else:
            arr = np.empty(len(column) + 1, dtype=object)
            arr[:-1] = column
            arr[-1] = None
        per_unique[attr] = arr
    if spec.use:
        # the field is this attribute alone: a landline-only field is missing for a mobile
        per_unique["value"] = per_unique[spec.use]
        per_unique["present"] = np.array([v is not None for v in per_unique["value"]], dtype=bool)
        if "strong_kind" in per_unique:
            per_unique["strong_kind"] = per_unique["strong_kind"] & per_unique["present"]
    for attr, arr in per_unique.items():
        out[f"{spec.name}.{attr}"] = arr[codes] if n else arr[:0]
    if spec.normaliser != "person_name":
        out[f"{spec.name}.weak"] = np.zeros(n, dtype=bool)
    if "strong_kind" not in names:
        out[f"{spec.name}.strong_kind"] = out[f"{spec.name}.present"].copy()


def normalise_column(kind: str, raw: pd.Series, cities: pd.Series | None = None) -> dict[str, np.ndarray]:
    """Per row of `raw`: every output of the `kind` normaliser (`_OUTPUTS`), each distinct
    (value, city) normalised once, in this process. For a record column no configured field reads."""
    raw = _clean_raw(raw).reset_index(drop=True)
    city = None if cities is None else _clean_raw(cities).reset_index(drop=True)
    keyed = raw if city is None else (raw + "\x1f" + city.fillna("")).where(raw.notna(), None)
    codes, uniques = pd.factorize(keyed, use_na_sentinel=True)
    split = [str(k).split("\x1f", 1) for k in uniques] if city is not None else None
    values = [k[0] for k in split] if split is not None else list(uniques)
    towns = [k[1] or None for k in split] if split is not None else [None] * len(values)
    columns = _normalise_values(kind, values, towns if kind == "phone" else None)
    out = {}
    for attr, column in zip(_OUTPUTS[kind], columns):
        arr = np.empty(len(values) + 1, dtype=object)
        arr[:-1] = column
        arr[-1] = False if attr in ("present", "weak", "strong_kind", "valid") else None
        out[attr] = arr[codes]
    return out


def feature_columns(settings: Settings) -> list[str]:
    cols: list[str] = []
    for spec in settings.fields:
        cols += [f"{spec.name}.{a}" for a in _OUTPUTS[spec.normaliser]]
        if spec.normaliser != "person_name":
            cols.append(f"{spec.name}.weak")
        if "strong_kind" not in _OUTPUTS[spec.normaliser]:
            cols.append(f"{spec.name}.strong_kind")
    return cols


def engine_columns(settings: Settings) -> list[str]:
    """The feature columns the engine reads (`encode`): every field's flags and the attributes some
    level, blocking key or the clustering uses. What the master stores per record."""
    used = used_attributes(settings)
    cols = [f"{spec.name}.{flag}" for spec in settings.fields for flag in ("present", "weak", "strong_kind")]
    return cols + [c for c in feature_columns(settings) if c in used and c not in cols]


# Bump when a normaliser's output changes for the same input: stored master features made by an
# older normaliser then stop matching `match_version` and are rebuilt (see `match_version`).
NORMALISERS_VERSION = 1
_FLAGS = ("present", "weak", "strong_kind")
_TF = np.array(["f", "t"], dtype=object)


def match_version(settings: Settings) -> str:
    """What a record's stored features and match keys are a function of, besides its identity input:
    the fields' normalisers and columns, the engine's columns, the blocking rules and term columns,
    the normalisers' own version and the libraries they stand on. Equal versions, equal outputs."""
    import hashlib
    import json
    from importlib.metadata import PackageNotFoundError, version

    def lib(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    doc = {
        "normalisers": NORMALISERS_VERSION,
        "keys": 2,    # 2: no term key where a blocking key holds the same value (`resolve.term_aliases`)
        "libraries": {name: lib(name) for name in ("phonenumbers", "opencc", "pypinyin")},
        "fields": [[s.name, s.normaliser, s.source_columns, s.city_column, s.use] for s in settings.fields],
        "columns": engine_columns(settings),
        "blocking": [[r.name, [str(k) for k in r.keys]] for r in settings.blocking],
        "terms": settings.tf_columns(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# `match_features` is one text per record: the engine columns joined by a unit separator, an absent
# value written as a record separator. (A text[] costs three times as much to encode and decode.)
_SEP, _NONE = "\x1f", "\x1e"


def stored_features(feats: pd.DataFrame, settings: Settings) -> list[str | None]:
    """Per row of `feats` (from `build`): its engine columns (`engine_columns`) as the text
    `crm.source_identity.match_features` stores — flags as 't'/'f'. A record with a value holding
    one of the two separator characters gets None: it is normalised again when it is a candidate."""
    columns = []
    unstorable = np.zeros(len(feats), dtype=bool)
    for column in engine_columns(settings):
        series = feats[column]
        if column.rsplit(".", 1)[1] in _FLAGS:
            # the two strings shared by every row, not one object per row and flag
            columns.append(_TF[series.to_numpy(dtype=bool).astype(np.intp)].tolist())
            continue
        missing = series.isna().to_numpy()
        values = series.to_numpy(dtype=object)
        text = [_NONE if m else str(v) for v, m in zip(values.tolist(), missing)]
        unstorable |= np.fromiter((_SEP in t or (_NONE in t and t != _NONE) for t in text), dtype=bool,
                                  count=len(text)) if text else unstorable
        columns.append(text)
    if not columns:
        return [None] * len(feats)
    out: list[str | None] = [_SEP.join(row) for row in zip(*columns)]
    for k in np.flatnonzero(unstorable):
        out[k] = None
    return out


def from_stored(texts: list[str], settings: Settings) -> pd.DataFrame:
    """The engine columns back from `stored_features` texts, as `build` gives them (bool flags,
    object values): what the engine reads of a master record stored pre-normalised."""
    columns = engine_columns(settings)
    table = np.empty((len(texts), len(columns)), dtype=object)
    if texts:
        table[:] = [t.split(_SEP) for t in texts]
    out: dict[str, np.ndarray] = {}
    for k, column in enumerate(columns):
        values = table[:, k]
        if column.rsplit(".", 1)[1] in _FLAGS:
            out[column] = values == "t"
        else:
            values = values.copy()
            values[values == _NONE] = None
            out[column] = values
    return pd.DataFrame(out, index=pd.RangeIndex(len(texts)))


def has_features(df: pd.DataFrame, settings: Settings) -> bool:
    """True when `df` already carries the feature columns the engine reads (e.g. a master stored
    pre-normalised)."""
    return all(c in df.columns for c in engine_columns(settings))


@dataclass
class Encoded:
    """Integer-coded features of one frame: equality is code equality, -1 means none."""

    n: int
    codes: dict[str, np.ndarray]          # "field.attr" -> int32 codes
    uniques: dict[str, np.ndarray]        # "field.attr" -> object array of distinct values
    flags: dict[str, np.ndarray]          # "field.present" / ".weak" / ".strong_kind" -> bool

    def strings(self, column: str, codes: np.ndarray) -> list[str]:
        return self.uniques[column][codes].tolist()


def used_attributes(settings: Settings) -> set[str]:
    """The "field.attr" columns some level, blocking key or the clustering reads."""
    used: set[str] = set()
    for spec in settings.fields:
        used.add(f"{spec.name}.value")
        if spec.strong:
            used.add(f"{spec.name}.{STRONG_ATTRIBUTE[spec.normaliser]}")
        for level in spec.levels:
            used.add(f"{spec.name}.{spec.attribute_of(level)}")
            used.update(f"{spec.name}.{a}" for a in _LEVEL_READS.get(level.when, ()))
    for rule in settings.blocking:
        used.update(part.column for part in rule.keys)
    return used


# Attributes a predicate reads besides its compared attribute.
_LEVEL_READS = {"surname_only": ("surname",), "other_place": ("place",), "other_extension": ("extension",)}
# Strong identity values per normaliser (see clustering): the attribute whose distinct values
# mean distinct people. Weak kinds (landline, role mailbox, surname-only) have none.
STRONG_ATTRIBUTE = {"person_name": "pinyin", "phone": "mobile", "email": "personal",
                    "company": "value", "text": "value", "exact": "value"}


def encode(features: pd.DataFrame | list[pd.DataFrame], settings: Settings) -> Encoded:
    """Integer codes for the attributes the settings use. `features` may be several frames
    (a batch and a master), encoded as if concatenated, without building the concatenation."""
    frames = features if isinstance(features, list) else [features]
    used = used_attributes(settings)
    codes: dict[str, np.ndarray] = {}
    uniques: dict[str, np.ndarray] = {}
    flags: dict[str, np.ndarray] = {}

    def column(col: str, dtype: Any = None) -> np.ndarray:
        parts = [f[col].to_numpy(dtype=dtype) for f in frames]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    for spec in settings.fields:
        for attr in ("present", "weak", "strong_kind"):
            col = f"{spec.name}.{attr}"
            flags[col] = column(col, bool)
        for attr in ATTRIBUTES[spec.normaliser]:
            col = f"{spec.name}.{attr}"
            if col not in used:
                continue
            if attr == spec.use:
                # a `use` field's value *is* that attribute: same column, same codes
                codes[col], uniques[col] = codes[f"{spec.name}.value"], uniques[f"{spec.name}.value"]
                continue
            c, u = pd.factorize(column(col, object), use_na_sentinel=True)
            codes[col] = c.astype(np.int32, copy=False)
            uniques[col] = np.asarray(u, dtype=object)
    return Encoded(sum(len(f) for f in frames), codes, uniques, flags)
