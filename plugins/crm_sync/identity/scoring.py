"""Scoring: Fellegi–Sunter match weights, estimated like Splink, explainable field by field.

For every candidate pair and every configured field the pair falls into exactly one comparison
level (the first whose predicate holds; `else` when none does; `missing` when either record has
no value, which weighs 0). Each level has m = P(level | same person) and u = P(level | different
people); the field's weight is log2(m/u); the pair's match weight is the prior's log-odds plus
the field weights, and its probability is the logistic (base 2) of that. Guarantees:
- `estimate_u` fixes u from uniformly sampled random record pairs (almost all non-matches);
  `estimate_m` runs EM on the blocked pairs with u held fixed, vectorised over an int8 level
  matrix (bincount per field); the prior is re-expressed for all pairs, so probabilities do
  not depend on how generous the blocking was;
- term-frequency adjustment (fields with `tf_adjust`): on an equality level the weight uses
  the agreed value's own frequency instead of the level's average u, smoothed by one
  pseudo-record per value so that small inputs fall back to the level's u: a switchboard, a
  role mailbox or 王伟 weighs little, a rare name or a unique mobile much;
- fields sharing a `group` are not independent evidence (colleagues share switchboard, role
  mailbox, company and city at once): a group contributes only its strongest agreement and its
  strongest disagreement, in EM and in scoring alike;
- fuzzy levels use rapidfuzz `process.cpdist` over the distinct value pairs, with all cores;
  there is no Python loop over pairs;
- `Scores.explain(k)` returns, for pair k, every field's level and weight, the group rule
  applied, the prior and the blocking rule: the sum of counted weights and the prior is the
  match weight.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from crm_sync.identity.features import Encoded
from crm_sync.identity.settings import FieldSpec, Settings

_EPS = 1e-6


# ----------------------------------------------------------------------------- parameters

@dataclass
class Params:
    """m and u per field and level (levels 0..K, K = else), and the prior for a random pair."""

    prior: float
    m: dict[str, np.ndarray]
    u: dict[str, np.ndarray]
    origin: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Params":
        m, u = {}, {}
        for spec in settings.fields:
            mm, uu = spec.starting_m_u()
            m[spec.name] = _normalised(np.array(mm, dtype=float))
            u[spec.name] = _normalised(np.array(uu, dtype=float))
        prior = settings.prior if settings.prior is not None else 1e-4
        return cap_disagreements(cls(prior, m, u, {"m": "config", "u": "config",
                                                   "prior": "config" if settings.prior is not None else "default"}),
                                 settings)

    def to_dict(self, settings: Settings) -> dict[str, Any]:
        """Plain data (for YAML/JSON), keyed by field and level name."""
        return {
            "prior": float(self.prior),
            "fields": {
                spec.name: {
                    name: {"m": float(self.m[spec.name][k]), "u": float(self.u[spec.name][k])}
                    for k, name in enumerate(spec.level_names)
                }
                for spec in settings.fields
            },
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], settings: Settings) -> "Params":
        base = cls.from_settings(settings)
        for spec in settings.fields:
            levels = doc.get("fields", {}).get(spec.name, {})
            for k, name in enumerate(spec.level_names):
                if name in levels:
                    base.m[spec.name][k] = levels[name]["m"]
                    base.u[spec.name][k] = levels[name]["u"]
        base.prior = float(doc.get("prior", base.prior))
        base.origin = {"m": "supplied", "u": "supplied", "prior": "supplied"}
        return cap_disagreements(base, settings)

    def weight_table(self, name: str) -> np.ndarray:
        """log2(m/u) per level, with a trailing 0 so that level -1 (missing) indexes to 0."""
        return np.append(np.log2(self.m[name] / self.u[name]), 0.0)


def _normalised(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, None)
    return p / p.sum()


def _floored(mass: np.ndarray, start: np.ndarray, floor: float) -> np.ndarray:
    # A level never seen among this sample's matches still happens in real data (a typo, a job
    # change): m is kept at or above `floor`, so one disagreement cannot veto a match alone.
    m = (mass + 1e-3 * start) / (mass.sum() + 1e-3)
    return _normalised(np.maximum(m, floor))


def prior_weight(prior: float) -> float:
    return float(np.log2(prior / (1 - prior)))


# ----------------------------------------------------------------------------- levels

class _Similarity:
    """Fuzzy similarities, computed once per distinct value pair and reused across levels."""

    def __init__(self, enc: Encoded) -> None:
        self.enc = enc
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    def get(self, column: str, scorer: str, n: int, rows: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        from rapidfuzz import process
        from rapidfuzz.distance import DamerauLevenshtein, Indel, JaroWinkler

        full = self.cache.setdefault((column, scorer), np.full(n, np.nan, dtype=np.float32))
        todo = rows[np.isnan(full[rows])]
        if len(todo):
            codes = self.enc.codes[column]
            ca, cb = codes[i[todo]].astype(np.int64), codes[j[todo]].astype(np.int64)
            valid = (ca >= 0) & (cb >= 0)
            sims = np.zeros(len(todo), dtype=np.float32)
            if valid.any():
                lo, hi = np.minimum(ca[valid], cb[valid]), np.maximum(ca[valid], cb[valid])
                width = len(self.enc.uniques[column]) + 1
                keys, inverse = np.unique(lo * width + hi, return_inverse=True)
                left = self.enc.strings(column, keys // width)
                right = self.enc.strings(column, keys % width)
                fn = {"jaro_winkler": JaroWinkler.normalized_similarity, "ratio": Indel.normalized_similarity,
                      "edits": DamerauLevenshtein.distance}[scorer]
                unique_sims = process.cpdist(left, right, scorer=fn, workers=-1, dtype=np.float32)
                sims[valid] = np.asarray(unique_sims, dtype=np.float32)[inverse]
            full[todo] = sims
        return full[rows]


def field_levels(enc: Encoded, spec: FieldSpec, i: np.ndarray, j: np.ndarray,
                 similarity: _Similarity | None = None) -> np.ndarray:
    """Level index per pair for one field: 0..K-1 configured levels, K = else, -1 = missing."""
    n = len(i)
    similarity = similarity or _Similarity(enc)
    present = enc.flags[f"{spec.name}.present"]
    levels = spec.levels
    out = np.full(n, len(levels), dtype=np.int8)
    both = present[i] & present[j]
    out[~both] = -1
    rows = np.flatnonzero(both)
    for k, level in enumerate(levels):
        if len(rows) == 0:
            break
        a, b = i[rows], j[rows]
        if level.when in ("exact", "pinyin"):
            codes = enc.codes[f"{spec.name}.{spec.attribute_of(level)}"]
            ca = codes[a]
            hit = (ca >= 0) & (ca == codes[b])
        elif level.when == "surname_only":
            weak = enc.flags[f"{spec.name}.weak"]
            surname = enc.codes[f"{spec.name}.surname"]
            sa = surname[a]
            hit = (weak[a] | weak[b]) & (sa >= 0) & (sa == surname[b])
        elif level.when in ("other_place", "other_extension"):
            # the same value, told apart by a qualifier both records state: the same trade name
            # in two named cities, the same switchboard with two extensions (two colleagues)
            key = enc.codes[f"{spec.name}.value"]
            qualifier = enc.codes[f"{spec.name}.{'place' if level.when == 'other_place' else 'extension'}"]
            qa, qb = qualifier[a], qualifier[b]
            hit = (key[a] >= 0) & (key[a] == key[b]) & (qa >= 0) & (qb >= 0) & (qa != qb)
        elif level.when == "conflict":
            strong = enc.flags[f"{spec.name}.strong_kind"]
            value = enc.codes[f"{spec.name}.value"]
            hit = strong[a] & strong[b] & (value[a] != value[b])
        else:
            sims = similarity.get(f"{spec.name}.{spec.attribute_of(level)}", level.when, n, rows, i, j)
            if level.when == "edits":
                # `sims` holds distances here; a missing attribute on either side never holds
                codes = enc.codes[f"{spec.name}.{spec.attribute_of(level)}"]
                hit = (sims <= level.max_edits) & (codes[a] >= 0) & (codes[b] >= 0)
            else:
                hit = sims >= np.float32(level.threshold) - np.float32(1e-6)
        out[rows[hit]] = k
        rows = rows[~hit]
    return out


# Pairs handled at once: bounds the temporaries (gathered codes, masks, weights) on big runs.
CHUNK_PAIRS = 2_000_000


def comparison_levels(enc: Encoded, settings: Settings, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(pairs x fields) int8 level matrix, computed in chunks of `CHUNK_PAIRS` pairs."""
    out = np.empty((len(i), len(settings.fields)), dtype=np.int8)
    for start in range(0, len(i), CHUNK_PAIRS):
        ci, cj = i[start:start + CHUNK_PAIRS], j[start:start + CHUNK_PAIRS]
        similarity = _Similarity(enc)
        for f, spec in enumerate(settings.fields):
            out[start:start + len(ci), f] = field_levels(enc, spec, ci, cj, similarity)
    return out


# ----------------------------------------------------------------------------- weights

def _groups(settings: Settings) -> tuple[list[int], dict[str, list[int]]]:
    single, grouped = [], {}
    for f, spec in enumerate(settings.fields):
        if spec.group:
            grouped.setdefault(spec.group, []).append(f)
        else:
            single.append(f)
    return single, grouped


def combine(weights: np.ndarray, settings: Settings) -> np.ndarray:
    """Sum of field weights, where a group counts only its max agreement and its min disagreement."""
    single, grouped = _groups(settings)
    total = weights[:, single].sum(axis=1, dtype=np.float64) if single else np.zeros(len(weights))
    for members in grouped.values():
        block = weights[:, members]
        total += np.clip(block, 0, None).max(axis=1) + np.clip(block, None, 0).min(axis=1)
    return total


def level_weights(levels: np.ndarray, params: Params, settings: Settings) -> np.ndarray:
    out = np.empty(levels.shape, dtype=np.float32)
    for f, spec in enumerate(settings.fields):
        out[:, f] = params.weight_table(spec.name)[levels[:, f]]
    return out


@dataclass
class TermFrequencies:
    """Per tf column ("field.attr"): count of each code's value and the population size."""

    counts: dict[str, np.ndarray]
    totals: dict[str, float]


def term_frequencies(enc: Encoded, settings: Settings,
                     tf_counts: Mapping[str, Any] | None = None) -> TermFrequencies:
    """Value counts on the frame, raised to the supplied counts (a big master's, from the DB).

    `tf_counts`: {"field" or "field.attr": {value: count}, "total": N}; a bare field name means
    its comparison value.
    """
    counts: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    given_total = float((tf_counts or {}).get("total", (tf_counts or {}).get("__total__", 0)) or 0)
    for column in settings.tf_columns():
        codes = enc.codes[column]
        present = codes[codes >= 0]
        local = np.bincount(present, minlength=len(enc.uniques[column])).astype(np.float64)
        total = float(len(present))
        supplied = None
        if tf_counts:
            supplied = tf_counts.get(column)
            if supplied is None and column.endswith(".value"):
                supplied = tf_counts.get(column.split(".", 1)[0])  # a bare field name means its value
        if supplied:
            mapped = pd.Series(enc.uniques[column], dtype=object).map(supplied).fillna(0).to_numpy(float)
            local = np.maximum(local, mapped)
            total = max(total, given_total)
        counts[column] = local
        totals[column] = total
    return TermFrequencies(counts, totals)


def tf_weights(levels: np.ndarray, weights: np.ndarray, enc: Encoded, settings: Settings, params: Params,
               tf: TermFrequencies, i: np.ndarray) -> np.ndarray:
    """Replace equality-level weights by value-specific ones: log2(m / p(value)).

    p(value) = (count + 1) / (N + 1/u): one pseudo-record at the level's average u, so a value
    seen a handful of times in a small input is not mistaken for a rare one.
    """
    for f, spec in enumerate(settings.fields):
        for k, level in enumerate(spec.levels):
            if not spec.tf_level(level):
                continue
            rows = np.flatnonzero(levels[:, f] == k)
            if not len(rows):
                continue
            column = f"{spec.name}.{spec.attribute_of(level)}"
            m_k, u_k = params.m[spec.name][k], params.u[spec.name][k]
            codes = enc.codes[column][i[rows]]
            p_value = (tf.counts[column][codes] + 1.0) / (tf.totals[column] + 1.0 / u_k)
            weights[rows, f] = np.log2(m_k / p_value)
    return weights


# ----------------------------------------------------------------------------- estimation

def _sample_pairs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n * (n - 1) // 2 <= size:
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size)
    j = rng.integers(0, n, size)
    keep = i != j
    return np.minimum(i, j)[keep], np.maximum(i, j)[keep]


@dataclass
class USample:
    """Level counts per field over uniformly sampled random record pairs."""

    counts: dict[str, np.ndarray]
    pairs: int


def sample_u(enc: Encoded, settings: Settings, *, seed: int = 20240601) -> USample:
    i, j = _sample_pairs(enc.n, settings.estimation.u_sample_pairs, seed)
    levels = comparison_levels(enc, settings, i, j)
    counts = {}
    for f, spec in enumerate(settings.fields):
        lv = levels[:, f]
        counts[spec.name] = np.bincount(lv[lv >= 0], minlength=len(spec.level_names)).astype(float)
    return USample(counts, len(i))


def estimate_u(sample: USample, params: Params, rates: Mapping[str, float] | None = None) -> Params:
    """u from random record pairs (Splink's `estimate_u_using_random_sampling`).

    With `rates` (per field, the match rate among pairs where both records have the field) and
    the current m, the true matches expected among the sampled pairs are taken out first: for a unique identifier such as a mobile, the few random pairs that agree
    are mostly the same person, and counting them as non-matches would make a shared mobile look
    like a coincidence that happens every few thousand pairs. What cannot be resolved by the
    sample is floored at half a pair.
    """
    u = {}
    for name, counts in sample.counts.items():
        total = counts.sum()
        if total == 0:
            u[name] = params.u[name]
            continue
        if rates is not None and name in rates:
            counts = np.maximum(counts - rates[name] * total * params.m[name], 0.5)
        # one pseudo-pair spread as the starting values: never a zero u
        u[name] = _normalised((counts + params.u[name]) / (counts.sum() + 1.0))
    origin = f"random sampling ({sample.pairs} pairs)" + (", expected matches removed" if rates else "")
    return Params(params.prior, dict(params.m), u, {**params.origin, "u": origin})


def _em(levels: np.ndarray, params: Params, settings: Settings, active: np.ndarray,
        lam: float = 0.5) -> tuple[dict[str, np.ndarray], float, int]:
    """EM with u fixed over the `active` fields; returns expected level counts per field."""
    est = settings.estimation
    m = {k: v.copy() for k, v in params.m.items()}
    mass_out: dict[str, np.ndarray] = {}
    iterations = 0
    for iterations in range(1, est.em_iterations + 1):
        weights = level_weights(levels, Params(params.prior, m, params.u), settings)
        weights[:, ~active] = 0.0
        logit = np.log2(lam / (1 - lam)) + combine(weights, settings)
        p = 1.0 / (1.0 + np.exp2(-np.clip(logit, -60, 60)))
        shift = 0.0
        for f, spec in enumerate(settings.fields):
            if not active[f]:
                continue
            lv = levels[:, f]
            seen = lv >= 0
            mass = np.bincount(lv[seen], weights=p[seen], minlength=len(spec.level_names))
            new = _floored(mass, params.m[spec.name], est.min_m)
            shift = max(shift, float(np.abs(new - m[spec.name]).max()))
            m[spec.name] = new
            mass_out[spec.name] = mass
        lam = float(np.clip(p.mean(), 1e-6, 1 - 1e-6))
        if shift < est.em_tolerance:
            break
    return mass_out, lam, iterations


def estimate_m(levels: np.ndarray, rule_masks: list[tuple[str, np.ndarray, set[str]]], params: Params,
               settings: Settings, *, seed: int = 7) -> tuple[Params, dict[str, Any]]:
    """m by EM with u fixed, one session per blocking rule, as Splink trains.

    Within the pairs a rule proposes, the fields the rule's key reads are constant evidence, so
    each session estimates only the other fields; the sessions' expected counts are pooled.
    Training on the union of all blocked pairs instead lets EM settle on a "same company" or
    "same name" class rather than "same person".
    """
    est = settings.estimation
    rng = np.random.default_rng(seed)
    pooled = {spec.name: np.zeros(len(spec.level_names)) for spec in settings.fields}
    sessions: dict[str, Any] = {}
    names = [spec.name for spec in settings.fields]
    for rule_name, mask, used in rule_masks:
        rows = np.flatnonzero(mask)
        if len(rows) < 50:
            sessions[rule_name] = {"pairs": int(len(rows)), "skipped": "too few pairs"}
            continue
        if len(rows) > est.em_max_pairs:
            rows = rng.choice(rows, est.em_max_pairs, replace=False)
        active = np.array([name not in used for name in names])
        mass, lam, iterations = _em(levels[rows], params, settings, active)
        for name, counts in mass.items():
            pooled[name] += counts
        sessions[rule_name] = {"pairs": int(len(rows)), "match_rate": round(lam, 4), "iterations": iterations}
    m = {}
    for spec in settings.fields:
        counts = pooled[spec.name]
        m[spec.name] = _floored(counts, params.m[spec.name], est.min_m) if counts.sum() > 0 else params.m[spec.name]
    model = Params(params.prior, m, params.u, {**params.origin, "m": "EM per blocking rule"})
    return cap_disagreements(model, settings), sessions


DISAGREEMENT_LEVELS = ("conflict", "other_place", "other_extension")


def cap_disagreements(params: Params, settings: Settings) -> Params:
    """A disagreement level (two mobiles, another city, another extension) never counts *for* a
    match: its m is capped at its u, the excess shared by the other levels.

    EM cannot always tell a person from a same-named colleague: both agree on name and company,
    and colleagues at one switchboard have different extensions, so an unconstrained EM can give
    "another extension" a positive weight. The constraint is a fact about the levels' meaning,
    not about one dataset.
    """
    for spec in settings.fields:
        m, u = params.m[spec.name].copy(), params.u[spec.name]
        capped = np.zeros(len(m), dtype=bool)
        for k, level in enumerate(spec.levels):
            if level.when in DISAGREEMENT_LEVELS and m[k] > u[k]:
                capped[k] = True
        if not capped.any():
            continue
        excess = float((m[capped] - u[capped]).sum())
        m[capped] = u[capped]
        rest = ~capped
        m[rest] += excess * m[rest] / m[rest].sum()
        params.m[spec.name] = m
    return params


def match_rate(levels: np.ndarray, params: Params, settings: Settings, *,
               seed: int = 7) -> tuple[float, dict[str, float]]:
    """Share of matches among the blocked pairs under the final m/u (EM on the rate alone), and
    per field the expected number of matching pairs in which both records have the field."""
    est = settings.estimation
    scale = 1.0
    if len(levels) > est.em_max_pairs:
        scale = len(levels) / est.em_max_pairs
        levels = levels[np.random.default_rng(seed).choice(len(levels), est.em_max_pairs, replace=False)]
    total = combine(level_weights(levels, params, settings), settings)
    lam = 0.5
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp2(-np.clip(np.log2(lam / (1 - lam)) + total, -60, 60)))
        new = float(np.clip(p.mean(), 1e-9, 1 - 1e-9))
        if abs(new - lam) < 1e-7:
            break
        lam = new
    per_field = {spec.name: float(p[levels[:, f] >= 0].sum() * scale) for f, spec in enumerate(settings.fields)}
    return lam, per_field


# ----------------------------------------------------------------------------- scoring

@dataclass
class Scores:
    """Scored candidate pairs; row k is the pair (i[k], j[k]).

    Per pair only the levels, the match weight and the probability are kept; the field weights
    are recomputed from the levels when asked for (`weights`, `explain`), so that tens of
    millions of pairs cost a byte per field rather than a float matrix.
    """

    i: np.ndarray
    j: np.ndarray
    rule: np.ndarray
    levels: np.ndarray
    total: np.ndarray
    probability: np.ndarray
    settings: Settings
    params: Params
    rule_names: list[str]
    enc: Encoded | None = None
    tf: "TermFrequencies | None" = None
    _weights: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.i)

    def field_weights(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights, tf_adjusted) matrices for the given pair rows."""
        levels = self.levels[rows]
        weights = level_weights(levels, self.params, self.settings)
        tf_mask = np.zeros(levels.shape, dtype=bool)
        if self.tf is not None and self.enc is not None:
            for f, spec in enumerate(self.settings.fields):
                for k, level in enumerate(spec.levels):
                    if spec.tf_level(level):
                        tf_mask[:, f] |= levels[:, f] == k
            weights = tf_weights(levels, weights, self.enc, self.settings, self.params, self.tf, self.i[rows])
        return weights, tf_mask

    @property
    def weights(self) -> np.ndarray:
        """(pairs x fields) weight of each field's level (TF-adjusted where it applies)."""
        if self._weights is None:
            self._weights = self.field_weights(np.arange(len(self.i)))[0]
        return self._weights

    @property
    def tf_adjusted(self) -> np.ndarray:
        return self.field_weights(np.arange(len(self.i)))[1]

    def agrees(self, rows: np.ndarray, fields: list[int]) -> np.ndarray:
        """(rows x fields) bool: the pair's level for the field weighs for a match (m > u).

        Clustering uses it to tell a typo (张三/张叁 on the same mobile, a mobile one digit off)
        from two different values of a strong field.
        """
        out = np.zeros((len(rows), len(fields)), dtype=bool)
        for c, f in enumerate(fields):
            spec = self.settings.fields[f]
            positive = self.params.weight_table(spec.name) > 0   # trailing entry: missing -> False
            out[:, c] = positive[self.levels[rows, f]]
        return out

    def explain(self, k: int) -> dict[str, Any]:
        """Every field's level and weight for pair k, and how they add up."""
        return self.explain_many(np.array([k]))[0]

    def explain_many(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """`explain` for many pairs: weights, levels and the groups' counted members are worked out
        for all rows at once, then only the dictionaries are built per row (a nightly run explains
        most of a million records)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        settings = self.settings
        weights, tf_mask = self.field_weights(rows)
        levels = self.levels[rows]
        n = len(rows)
        counted = np.ones(levels.shape, dtype=bool)
        at = np.arange(n)
        for members in _groups(settings)[1].values():
            ws = weights[:, members]
            counted[:, members] = False
            cols = np.asarray(members)
            positive, negative = (ws > 0).any(axis=1), (ws < 0).any(axis=1)
            counted[at[positive], cols[np.argmax(ws, axis=1)[positive]]] = True
            counted[at[negative], cols[np.argmin(ws, axis=1)[negative]]] = True
        names = [[*spec.level_names, "missing"] for spec in settings.fields]   # level -1: the last
        groups = [spec.group for spec in settings.fields]
        prior = round(prior_weight(self.params.prior), 3)
        rules = self.rule[rows].tolist() if len(self.rule_names) else [None] * n
        columns = zip(levels.tolist(), weights.tolist(), tf_mask.tolist(), counted.tolist(),
                      self.probability[rows].tolist(), self.total[rows].tolist(), rules)
        out: list[dict[str, Any]] = []
        # hundreds of thousands of acyclic dicts: the cyclic collector would only rescan them
        collecting = gc.isenabled()
        gc.disable()
        try:
            for level_row, weight_row, tf_row, counted_row, probability, total, rule in columns:
                fields: dict[str, Any] = {}
                for f, spec in enumerate(settings.fields):
                    entry: dict[str, Any] = {"level": names[f][level_row[f]], "weight": round(weight_row[f], 3)}
                    if tf_row[f]:
                        entry["tf_adjusted"] = True
                    if groups[f]:
                        entry["group"] = groups[f]
                        entry["counted"] = counted_row[f]
                    fields[spec.name] = entry
                out.append({
                    "probability": round(probability, 6),
                    "match_weight": round(total, 3),
                    "prior_weight": prior,
                    "blocking_rule": self.rule_names[rule] if rule is not None else None,
                    "fields": fields,
                })
        finally:
            if collecting:
                gc.enable()
        return out


def score_pairs(enc: Encoded, settings: Settings, params: Params, i: np.ndarray, j: np.ndarray,
                tf: TermFrequencies | None = None, rule: np.ndarray | None = None,
                rule_names: list[str] | None = None, levels: np.ndarray | None = None) -> Scores:
    if levels is None:
        levels = comparison_levels(enc, settings, i, j)
    total = np.empty(len(i), dtype=np.float64)
    base = prior_weight(params.prior)
    for start in range(0, len(i), CHUNK_PAIRS):
        rows = slice(start, start + CHUNK_PAIRS)
        weights = level_weights(levels[rows], params, settings)
        if tf is not None:
            weights = tf_weights(levels[rows], weights, enc, settings, params, tf, i[rows])
        total[rows] = base + combine(weights, settings)
    probability = 1.0 / (1.0 + np.exp2(-np.clip(total, -200, 200)))
    return Scores(i, j, rule if rule is not None else np.zeros(len(i), np.int16), levels, total, probability,
                  settings, params, rule_names or [], enc, tf)
