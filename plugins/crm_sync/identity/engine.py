"""The identity engine: a batch of records in, a customer (cluster) per record out. No database.

    resolve(batch_df, settings, master_df=None, must_link=(), cannot_link=(), tf_counts=None,
            estimate=True, params=None) -> Resolution

Pipeline: features (each distinct value normalised once) -> blocking -> Fellegi–Sunter scoring
(u by random sampling, m by EM, or fixed parameters) -> decision bands -> clustering that
refuses chains -> cluster ids. Guarantees:
- `batch_df` and `master_df` carry `settings.record_id` (read as strings) and the configured
  columns, or the pre-computed feature columns of `features.build`; `master_df` also carries
  `cluster_id`. A record id present in both is taken from the batch (a changed record);
- batch records are compared with each other and with master records, never master with
  master; master rows of one cluster start joined;
- every batch record gets exactly one assignment: `cluster_id` is the survivor existing id
  when its cluster holds master records (or batch records carrying a previous `cluster_id`),
  else the smallest record id of the new cluster — so a rerun of the same input yields the
  same ids; `decision` is `merged` (cluster of more than one record), `review` (alone, but in
  a review pair) or `new`;
- `review_pairs` lists pairs in the review band that ended in different clusters, and merge
  edges refused by the clustering (with the reason); pairs a steward already decided never
  appear; `cluster_merges` lists existing clusters found to be one person: survivor = the
  lexicographically smallest id, with the evidence pair;
- with `estimate=False` (or `params`), nothing is estimated: the config's (or the given)
  m/u/prior are used, which is what the resolve stage does on every run (it reads the estimate
  the operator stored, `crm-sync identity estimate`); estimation also falls back to them below
  `estimation.min_records` records, and `Resolution.params.origin` says so;
- `Resolution.explanations(start, stop)` builds the per-record explanations of a slice of the
  batch on demand (`explain=False` leaves the assignments' column empty), so a caller writing a
  million of them never holds them all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from crm_sync.identity import blocking, clustering, features, scoring
from crm_sync.identity.settings import Settings, SettingsError

ASSIGNMENT_COLUMNS = ["record_id", "cluster_id", "decision", "probability", "explanation"]
REVIEW_COLUMNS = ["record_a", "record_b", "probability", "reason", "explanation"]
MERGE_COLUMNS = ["survivor", "absorbed", "record_a", "record_b", "probability", "explanation"]

_STRONG_ATTRIBUTE = features.STRONG_ATTRIBUTE


@dataclass
class Resolution:
    assignments: pd.DataFrame        # one row per batch record: ASSIGNMENT_COLUMNS
    review_pairs: pd.DataFrame       # REVIEW_COLUMNS
    cluster_merges: pd.DataFrame     # MERGE_COLUMNS
    params: scoring.Params
    stats: dict[str, Any] = field(default_factory=dict)
    scores: scoring.Scores | None = None
    record_ids: np.ndarray | None = None   # position -> record id over batch + master
    roots: np.ndarray | None = None        # position -> cluster representative
    # per batch record: the pair row its explanation reads (-1: none), the other record's
    # position, and whether it joined its cluster only through a steward's must-link
    best_row: np.ndarray | None = None
    best_other: np.ndarray | None = None
    must_only: np.ndarray | None = None

    def explanations(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """The explanation of batch records `start:stop` (what `assignments.explanation` holds with
        `explain=True`), built on demand: a caller writing a million of them takes them in slices."""
        assert self.best_row is not None and self.scores is not None and self.record_ids is not None
        stop = len(self.best_row) if stop is None else min(stop, len(self.best_row))
        best_row, must_only = self.best_row[start:stop], self.must_only[start:stop]
        out: list[dict[str, Any]] = [{"rule": "no candidate pair", "fields": {}} for _ in range(len(best_row))]
        scored = np.flatnonzero(~must_only & (best_row >= 0))
        for r, ex in zip(scored.tolist(), self.scores.explain_many(best_row[scored])):
            ex["matched_record"] = self.record_ids[self.best_other[start + r]]
            out[r] = ex
        for r in np.flatnonzero(must_only).tolist():
            out[r] = {"rule": "must_link", "fields": {}}
        return out


def _record_ids(df: pd.DataFrame, settings: Settings, what: str) -> np.ndarray:
    if settings.record_id not in df.columns:
        raise SettingsError(f"{what}: no '{settings.record_id}' column (columns: {list(df.columns)})")
    ids = df[settings.record_id].astype("string")
    if ids.isna().any() or (ids.str.strip() == "").any():
        raise SettingsError(f"{what}: '{settings.record_id}' has empty values")
    return ids.to_numpy(dtype=object)


def _featurise(df: pd.DataFrame, settings: Settings, workers: int | None) -> pd.DataFrame:
    if features.has_features(df, settings):
        # as is: `features.encode` reads the feature columns by name and rows by position, and
        # a copy of a large master's feature columns would cost hundreds of MB
        return df
    return features.build(df, settings, workers=workers)


def _positions(pairs: Iterable[tuple[Any, Any]], index: Mapping[str, int]) -> tuple[list[tuple[int, int]], int]:
    found, unknown = [], 0
    for a, b in pairs:
        ia, ib = index.get(str(a)), index.get(str(b))
        if ia is None or ib is None or ia == ib:
            unknown += 1
            continue
        found.append((min(ia, ib), max(ia, ib)))
    return found, unknown


def _explain_many(scores: scoring.Scores, rows: np.ndarray) -> list[dict[str, Any]]:
    return scores.explain_many(rows)


def resolve(batch_df: pd.DataFrame, settings: Settings, master_df: pd.DataFrame | None = None, *,
            must_link: Iterable[tuple[Any, Any]] = (), cannot_link: Iterable[tuple[Any, Any]] = (),
            tf_counts: Mapping[str, Any] | None = None, estimate: bool = True,
            params: scoring.Params | None = None, workers: int | None = None,
            explain: bool = True) -> Resolution:
    """Resolve `batch_df` (against `master_df`); see the module docstring for the guarantees.

    `explain=False` leaves the per-record explanation empty (review pairs and merges keep
    theirs): for bulk loads where nobody reads a million explanations.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    batch_ids = _record_ids(batch_df, settings, "batch")
    if len(set(batch_ids)) != len(batch_ids):
        raise SettingsError(f"batch: duplicate values in '{settings.record_id}'")
    frames = [_featurise(batch_df, settings, workers)]
    ids = [batch_ids]
    existing_batch = (batch_df["cluster_id"].astype("string").to_numpy(dtype=object)
                      if "cluster_id" in batch_df.columns else np.full(len(batch_df), None, dtype=object))
    existing = [np.where(pd.isna(existing_batch), None, existing_batch)]
    n_batch = len(batch_ids)
    if master_df is not None and len(master_df):
        if "cluster_id" not in master_df.columns:
            raise SettingsError("master: no 'cluster_id' column")
        master_ids = _record_ids(master_df, settings, "master")
        keep = ~pd.Index(master_ids).isin(pd.Index(batch_ids))
        master_df = master_df.loc[keep] if not keep.all() else master_df
        frames.append(_featurise(master_df, settings, workers))
        ids.append(master_ids[keep])
        existing.append(master_df["cluster_id"].astype("string").to_numpy(dtype=object))
    record_ids = np.concatenate(ids)
    existing_ids = np.concatenate(existing)
    n = len(record_ids)
    is_master = np.zeros(n, dtype=bool)
    is_master[n_batch:] = True
    timings["features"] = time.perf_counter() - t0

    t = time.perf_counter()
    # encoded as if concatenated: a concatenation would copy every feature column of both frames
    enc = features.encode(frames, settings)
    del frames
    blocks = blocking.candidate_pairs(enc, settings, is_master if is_master.any() else None)
    timings["blocking"] = time.perf_counter() - t

    # ---- parameters
    t = time.perf_counter()
    levels = scoring.comparison_levels(enc, settings, blocks.i, blocks.j)
    em_info: dict[str, Any] = {}
    if params is not None:
        model = params
    else:
        model = scoring.Params.from_settings(settings)
        if settings.matches_per_record is not None:
            model.prior = settings.prior_for(n)
            model.origin["prior"] = (f"config: min(prior, matches_per_record {settings.matches_per_record:g}"
                                     f" / ({n} records - 1))")
        if estimate and n >= settings.estimation.min_records and len(blocks):
            sample = scoring.sample_u(enc, settings)
            model = scoring.estimate_u(sample, model)
            masks = []
            for rule in settings.blocking:
                key = blocking._key_codes(enc, rule)
                masks.append((rule.name, (key[blocks.i] >= 0) & (key[blocks.i] == key[blocks.j]),
                              {part.field for part in rule.keys}))
            comparable = _comparable(n_batch, n - n_batch)
            present = {spec.name: (int(enc.flags[f"{spec.name}.present"][:n_batch].sum()),
                                   int(enc.flags[f"{spec.name}.present"][n_batch:].sum()))
                       for spec in settings.fields}
            for _ in range(3):
                # u and m inform each other: the matches EM finds are taken out of the random
                # sample, then m is re-estimated against the cleaner u
                model, sessions = scoring.estimate_m(levels, masks, model, settings)
                lam_blocked, matches = scoring.match_rate(levels, model, settings)
                # matches expected among the blocked pairs, spread over every pair the blocking
                # could have proposed: the prior of a random pair (and per field, of a random
                # pair in which both records have the field)
                model.prior = float(np.clip(lam_blocked * len(blocks) / max(comparable, 1), 1e-12, 0.5))
                rates = {name: min(0.5, matches[name] / max(_comparable(*present[name]), 1)) for name in matches}
                model = scoring.estimate_u(sample, model, rates)
            model, sessions = scoring.estimate_m(levels, masks, model, settings)
            lam_blocked, _ = scoring.match_rate(levels, model, settings)
            model.prior = float(np.clip(lam_blocked * len(blocks) / max(comparable, 1), 1e-12, 0.5))
            sampled = sample.pairs
            # a level seen neither among random pairs nor among blocked pairs carries no
            # evidence either way (e.g. 'else' of a mobile-only field): weight 0, not a floor ratio
            for f, spec in enumerate(settings.fields):
                seen = sample.counts[spec.name] + np.bincount(
                    levels[:, f][levels[:, f] >= 0], minlength=len(spec.level_names))
                model.m[spec.name] = np.where(seen > 0, model.m[spec.name], model.u[spec.name])
            model.origin["prior"] = "EM match rate on blocked pairs / all pairs"
            em_info = {"u_pairs_sampled": sampled, "em_sessions": sessions,
                       "blocked_match_rate": lam_blocked}
        elif estimate:
            model.origin["note"] = (f"estimation skipped: {n} records < estimation.min_records "
                                    f"({settings.estimation.min_records}); config values used")
    tf = scoring.term_frequencies(enc, settings, tf_counts)
    scores = scoring.score_pairs(enc, settings, model, blocks.i, blocks.j, tf, blocks.rule,
                                 blocks.rule_names, levels)
    timings["scoring"] = time.perf_counter() - t

    # ---- steward decisions and clustering
    t = time.perf_counter()
    must_link, cannot_link = list(must_link), list(cannot_link)
    index: Mapping[str, int] = {}
    if must_link or cannot_link:
        wanted = pd.Index({str(x) for pair in must_link + cannot_link for x in pair})
        found = np.flatnonzero(pd.Index(record_ids).isin(wanted))
        index = {}
        for pos in found.tolist():
            index.setdefault(record_ids[pos], pos)
    must, must_unknown = _positions(must_link, index)
    cannot, cannot_unknown = _positions(cannot_link, index)
    prob = scores.probability
    decided = np.zeros(len(prob), dtype=bool)
    if must or cannot:
        pair_keys = blocks.i * n + blocks.j
        steward = np.array([a * n + b for a, b in must + cannot], dtype=np.int64)
        decided = np.isin(pair_keys, steward)
    merge_band = (prob >= settings.thresholds.merge) & ~decided
    review_band = (prob >= settings.thresholds.review) & ~merge_band & ~decided
    edges = np.flatnonzero(merge_band)
    strong_fields = [s for s in settings.fields if s.strong]
    strong = [enc.codes[f"{s.name}.{_STRONG_ATTRIBUTE[s.normaliser]}"] for s in strong_fields]
    initial = None
    if is_master.any():
        initial = np.full(n, -1, dtype=np.int64)
        codes, _ = pd.factorize(pd.Series(existing_ids[n_batch:], dtype=object), use_na_sentinel=True)
        initial[n_batch:] = codes
    has_existing = any(v is not None for v in existing_ids)
    result = clustering.cluster(
        n, blocks.i[edges], blocks.j[edges], prob[edges], strong, [s.name for s in strong_fields],
        must_link=must, cannot_link=cannot, initial=initial,
        existing=list(existing_ids) if has_existing else None,
        agrees=scores.agrees(edges, [settings.fields.index(s) for s in strong_fields]))
    root = result.root
    timings["clustering"] = time.perf_counter() - t

    # ---- outputs
    t = time.perf_counter()
    same = _same_root(root, blocks.i, blocks.j)
    review_rows = np.flatnonzero(review_band & ~same)
    refused_rows = np.array([edges[e] for e, _ in result.refused], dtype=np.int64)
    refused_reason = {int(edges[e]): reason for e, reason in result.refused}
    all_review = np.union1d(review_rows, refused_rows)
    all_review = all_review[root[blocks.i[all_review]] != root[blocks.j[all_review]]]
    review_pairs = pd.DataFrame({
        "record_a": record_ids[blocks.i[all_review]],
        "record_b": record_ids[blocks.j[all_review]],
        "probability": prob[all_review],
        "reason": [refused_reason.get(int(k), "review_band") for k in all_review],
        "explanation": _explain_many(scores, all_review),
    }, columns=REVIEW_COLUMNS)

    cluster_ids, merges = _name_clusters(root, record_ids, existing_ids, result, blocks, edges, scores, n_batch)

    # best pair per batch record: inside its cluster, else its best review pair, else any pair
    # (int8 and per-side row lists: on a bulk run these arrays have one entry per candidate pair)
    rank = np.zeros(len(prob), dtype=np.int8)
    rank[all_review] = 1
    rank[same] = 2
    del same
    # rank dominates (2 * rank > any probability), then probability; ties: the first pair row.
    # Taken a chunk of pairs at a time: on a nightly million records whole-length temporaries here
    # (scores, row numbers, gathers) were the run's peak memory
    best_score = np.full(n_batch, -np.inf)
    best_row = np.full(n_batch, np.iinfo(np.int64).max, dtype=np.int64)
    chunk = scoring.CHUNK_PAIRS

    def side_chunks():
        for side in (blocks.i, blocks.j):
            for start in range(0, len(side), chunk):
                stop = start + chunk
                rec = side[start:stop]
                batch_side = rec < n_batch
                yield start, rec[batch_side], (2.0 * rank[start:stop] + prob[start:stop])[batch_side], batch_side

    for _, rec, score, _ in side_chunks():
        np.maximum.at(best_score, rec, score)
    for start, rec, score, batch_side in side_chunks():
        hit = score == best_score[rec]
        np.minimum.at(best_row, rec[hit], np.flatnonzero(batch_side)[hit] + start)
    best_row[best_row == np.iinfo(np.int64).max] = -1
    has_pair = best_row >= 0
    best_rank = np.full(n_batch, -1, dtype=np.int64)
    best_rank[has_pair] = rank[best_row[has_pair]]
    best_other = np.full(n_batch, -1, dtype=np.int64)
    own = np.arange(n_batch)[has_pair]
    pi, pj = blocks.i[best_row[has_pair]], blocks.j[best_row[has_pair]]
    best_other[has_pair] = np.where(pi == own, pj, pi)
    del rank

    sizes = np.bincount(root, minlength=n)
    multi = sizes[root[:n_batch]] > 1
    reviewed = np.zeros(n, dtype=bool)
    reviewed[blocks.i[all_review]] = True
    reviewed[blocks.j[all_review]] = True
    decision = np.where(multi, "merged", np.where(reviewed[:n_batch], "review", "new"))
    probability = np.zeros(n_batch)
    probability[has_pair] = prob[best_row[has_pair]]
    # merged only through a steward's must-link: certain by decision, not by score
    must_only = multi & (best_rank < 2)
    probability = np.where(must_only, 1.0, probability)
    resolution = Resolution(pd.DataFrame(), review_pairs, merges, model, {}, scores, record_ids, root,
                            best_row, best_other, must_only)
    explanations: list[Any] = resolution.explanations() if explain else [None] * n_batch
    assignments = pd.DataFrame({
        "record_id": record_ids[:n_batch],
        "cluster_id": cluster_ids[:n_batch],
        "decision": decision,
        "probability": probability.astype(float),
        "explanation": explanations,
    }, columns=ASSIGNMENT_COLUMNS)
    timings["outputs"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    stats = {
        "records": n, "batch_records": n_batch, "master_records": n - n_batch,
        "candidate_pairs": len(blocks), "pairs_per_rule": blocks.pairs_per_rule,
        "skipped_blocks": blocks.skipped_blocks, "skipped_records": blocks.skipped_records,
        "merge_edges": int(len(edges)), "refused_edges": len(result.refused),
        "review_pairs": len(review_pairs), "cluster_merges": len(merges),
        "must_link_unknown": must_unknown, "cannot_link_unknown": cannot_unknown,
        "must_link_conflicts": result.must_link_conflicts,
        "prior": model.prior, "params_origin": dict(model.origin), **em_info,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    resolution.assignments, resolution.stats = assignments, stats
    return resolution


def _group_min(groups: np.ndarray, values: np.ndarray) -> pd.Series:
    """Lexicographically smallest non-null value per group (pandas' string min is a Python loop)."""
    ok = pd.notna(values)
    if not ok.any():
        return pd.Series(dtype=object)
    codes, uniques = pd.factorize(pd.Series(values[ok], dtype=object), sort=True)
    group_codes, group_uniques = pd.factorize(groups[ok])
    best = np.full(len(group_uniques), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, group_codes, codes)
    return pd.Series(np.asarray(uniques, dtype=object)[best], index=group_uniques)


def _same_root(root: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = scoring.CHUNK_PAIRS) -> np.ndarray:
    """root[i] == root[j] per pair, gathered in chunks (two int64 gathers per pair otherwise)."""
    out = np.empty(len(i), dtype=bool)
    for start in range(0, len(i), chunk):
        np.equal(root[i[start:start + chunk]], root[j[start:start + chunk]], out=out[start:start + chunk])
    return out


def _comparable(n_batch: int, n_master: int) -> int:
    """Pairs the engine may compare: batch x batch and batch x master."""
    return n_batch * (n_batch - 1) // 2 + n_batch * n_master


def _name_clusters(root: np.ndarray, record_ids: np.ndarray, existing_ids: np.ndarray,
                   result: clustering.ClusterResult, blocks: blocking.Blocking, edges: np.ndarray,
                   scores: scoring.Scores, n_batch: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Cluster id per record, and the existing clusters that were found to be one."""
    # only clusters that hold a batch record get (or change) a name
    relevant = np.isin(root, np.unique(root[:n_batch]))
    roots, rids, olds = root[relevant], record_ids[relevant], existing_ids[relevant]
    new_key = _group_min(roots, rids)
    survivor = _group_min(roots, olds)
    names = new_key.copy()
    names.loc[survivor.index] = survivor
    cluster_ids = np.full(len(root), None, dtype=object)
    cluster_ids[relevant] = names.reindex(roots).to_numpy(dtype=object)
    frame = pd.DataFrame({"root": roots, "old": olds})

    rows: list[dict[str, Any]] = []
    reported: set[str] = set()
    joined = set().union(*(a | b for a, b, _ in result.joins)) if result.joins else set()
    involved = frame[frame["old"].isin(joined)][["old", "root"]].drop_duplicates()
    final_survivor = {old: names[r] for old, r in involved.itertuples(index=False)}
    for ids_a, ids_b, e in result.joins:
        for absorbed in sorted(ids_a | ids_b):
            surv = final_survivor.get(absorbed)
            if surv is None or absorbed == surv or absorbed in reported:
                continue
            reported.add(absorbed)
            if e >= 0:
                k = int(edges[e])
                rows.append({"survivor": surv, "absorbed": absorbed,
                             "record_a": record_ids[blocks.i[k]], "record_b": record_ids[blocks.j[k]],
                             "probability": float(scores.probability[k]), "explanation": scores.explain(k)})
            else:
                rows.append({"survivor": surv, "absorbed": absorbed, "record_a": None, "record_b": None,
                             "probability": 1.0, "explanation": {"rule": "must_link", "fields": {}}})
    return cluster_ids, pd.DataFrame(rows, columns=MERGE_COLUMNS)
