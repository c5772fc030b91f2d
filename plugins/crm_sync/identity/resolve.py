"""Resolve stage: assign a customer id to every customer record of a run, against the live master.

Reads the run's `stg.extracted` rows of the source's customer streams (identity fields as the
stream's `identity:` keys say), looks up the master records that share a blocking key with them
(`crm.match_key`), the master's term frequencies for their values and the stewards' decisions,
and runs the identity engine (`identity/engine.py`) over batch + candidates. Writes
`stg.resolved` (one row per record), and for the load: `stg.identity_input` and `stg.match_key`
(what the master will store about each record), `stg.review_pair` and `stg.cluster_merge`.

Guarantees:
- nothing in `crm.*` changes here: ids, merges, splits and review items become real only when
  the load commits, in its transaction;
- a record already linked keeps its live customer, unless the engine finds its customer and
  another existing one to be one person (the survivor is the smaller id; the load records the
  merge) or a steward's 'different' splits it off (`master.pending_splits`);
- a new customer's id is the uuid5 of its cluster's smallest `source/stream/source_id`, so a
  rerun of the same run gives the same ids;
- decisions: `linked` (keeps its customer), `merged` (joins a customer holding other records),
  `review` (a new customer, with an open question to a steward), `new`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from crm_sync import paths, runlog, staging
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.identity import engine, features, master, normalize
from crm_sync.identity.settings import Settings, load_settings

log = logging.getLogger(__name__)

# Below this many batch records m/u are not estimated: the match config's parameters are used.
ESTIMATE_MIN_BATCH = 5_000
IDENTITY_COLUMNS = ["name", "phone", "email", "company", "city"]


@dataclass(frozen=True)
class ResolveResult:
    records: int
    linked: int
    merged: int
    new: int
    review: int = 0
    cluster_merges: int = 0


@lru_cache(maxsize=1)
def match_settings() -> Settings:
    return load_settings(paths.include_dir() / "match" / "customer.yaml")


def _json(value) -> str:
    def default(v):
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return v.tolist()
        return str(v)

    return json.dumps(value, ensure_ascii=False, default=default, separators=(",", ":"))


def _first_phone(payload: dict, fields: list[str], city) -> tuple[str | None, normalize.Phone | None]:
    """The best phone among the configured fields: a mobile beats a landline beats invalid."""
    best: tuple[int, str | None, normalize.Phone | None] = (99, None, None)
    rank = {"mobile": 0, "landline": 1, "other": 2, "invalid": 3}
    for name in fields:
        raw = payload.get(name)
        if _text(raw) is None:
            continue
        phone = normalize.normalize_phone(str(raw), city=city)
        r = rank.get(phone.kind, 4)
        if r < best[0]:
            best = (r, str(raw), phone)
    return best[1], best[2]


def _text(value) -> str | None:
    """A payload's identity value as text; None when absent or of a shape no identity can be read
    from (an object, a list, a boolean): the map stage quarantines such a record, naming the field."""
    if value is None or isinstance(value, (dict, list, tuple, bool)):
        return None
    text = str(value).strip()
    return text or None


def _records(cur, run_id: str, cfg: SourceConfig, streams: list[StreamConfig]) -> tuple[pd.DataFrame, list[dict]]:
    """The run's customer records: engine input columns, and the normalised columns of stg.resolved."""
    rows: list[dict] = []
    resolved: list[dict] = []
    for stream in streams:
        keys = stream.identity
        cur.execute("select source_pk, payload from stg.extracted where run_id = %s and source = %s and stream = %s"
                    " order by source_pk", (run_id, cfg.source, stream.name))
        for source_pk, payload in cur.fetchall():
            def get(key):
                return _text(payload.get(key)) if key else None

            phones = [p for p in (_text(payload.get(f)) for f in keys.phones) if p]
            city = get(keys.city)
            row = {"record_id": master.record_id(cfg.source, stream.name, source_pk), "source": cfg.source,
                   "stream": stream.name, "source_pk": source_pk, "name": get(keys.name),
                   "phone": " / ".join(phones) or None, "email": get(keys.email), "company": get(keys.company),
                   "city": city}
            rows.append(row)
            name = normalize.normalize_person_name(row["name"])
            phone_raw, phone = _first_phone(payload, keys.phones, city)
            email = normalize.normalize_email(row["email"])
            resolved.append({
                "full_name": name.full or None, "name_key": name.pinyin or None, "phone_raw": phone_raw,
                "phone_e164": phone.e164 if phone else None, "phone_kind": phone.kind if phone else "empty",
                "phone_ext": phone.extension if phone else None,
                # keep what the source said when it does not parse, so validation can see and reject it
                "email": email.email if email.email else (normalize.nfkc(email.raw) or None),
                "email_valid": email.valid,
            })
    # object dtype: pandas' string dtype would turn a missing value into NaN, stored as the text 'nan'
    return pd.DataFrame(rows, columns=["record_id", "source", "stream", "source_pk", *IDENTITY_COLUMNS],
                        dtype=object), resolved


def record_keys(feats: pd.DataFrame, settings: Settings) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per record (row of `feats`): its blocking-key values ('b:<rule>=<v>') and term values ('t:<col>=<v>').

    Returned as parallel (row positions, keys) arrays, so 1M records need no Python loop.
    """
    rows: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    n = len(feats)
    for rule in settings.blocking:
        ok = np.ones(n, dtype=bool)
        joined: pd.Series | None = None
        for part in rule.keys:
            values = pd.Series(feats[part.column].to_numpy(dtype=object), dtype=object)
            ok &= values.notna().to_numpy()
            text = values.fillna("").astype(str)
            if part.prefix:
                text = text.str[: part.prefix]
            joined = text if joined is None else joined + "|" + text
        pos = np.flatnonzero(ok)
        rows.append(pos)
        keys.append((f"b:{rule.name}=" + joined.iloc[pos]).to_numpy(dtype=object))
    for column in settings.tf_columns():
        values = pd.Series(feats[column].to_numpy(dtype=object), dtype=object)
        pos = np.flatnonzero(values.notna().to_numpy())
        rows.append(pos)
        keys.append((f"t:{column}=" + values.iloc[pos].astype(str)).to_numpy(dtype=object))
    return rows, keys


def _decision(rid: str, engine_decision: str, cluster: str, previous: str | None, existing: set[str]) -> tuple[str, str]:
    """(decision, match_rule) of one record from the engine's outcome and its previous customer."""
    if previous is not None and cluster == previous:
        return "linked", "source_link"
    if cluster in existing:
        return "merged", "engine_match"
    if engine_decision == "merged":
        return ("new", "cluster_seed") if cluster == rid else ("merged", "engine_match")
    if engine_decision == "review":
        return "review", "review_band"
    return "new", "no_match"


def resolve(conn, run_id: str, cfg: SourceConfig) -> ResolveResult:
    settings = match_settings()
    streams = [s for s in cfg.streams if s.entity == "customer"]
    with conn.cursor() as cur:
        batch, resolved_cols = _records(cur, run_id, cfg, streams)
        for table in ("stg.resolved", "stg.identity_input", "stg.match_key"):
            for stream in streams:
                staging.delete_run(cur, table, run_id, cfg.source, stream.name)
        for table in ("stg.review_pair", "stg.cluster_merge"):
            staging.delete_run(cur, table, run_id, cfg.source)
        if batch.empty:
            runlog.update(cur, run_id, cfg.source, ids_linked=0, ids_merged=0, ids_new=0, ids_review=0)
            return ResolveResult(records=0, linked=0, merged=0, new=0)

        feats = features.build(batch[["record_id", *IDENTITY_COLUMNS]], settings)
        key_rows, key_values = record_keys(feats, settings)
        all_rows = np.concatenate(key_rows) if key_rows else np.empty(0, dtype=np.int64)
        all_keys = np.concatenate(key_values) if key_values else np.empty(0, dtype=object)
        blocking_keys = sorted({k for k in all_keys if k.startswith("b:")})
        terms = sorted({k for k in all_keys if k.startswith("t:")})

        # the master as it will be once this run's load executes the pending splits
        splits = {}
        for s in master.pending_splits(cur):
            splits.setdefault((s.source, s.source_id), str(s.to_customer))
        batch_records = list(zip(batch["source"], batch["source_pk"]))
        previous = master.current_customers(cur, batch_records)
        previous = {k: splits.get(k, v) for k, v in previous.items()}
        cap = max([settings.max_block_size] + [r.max_block_size or 0 for r in settings.blocking])
        partners = master.decided_partners(cur, batch_records)
        cands = master.candidates(cur, blocking_keys, cap, partners)
        if len(cands):
            moved = [splits.get(master.split_record_id(r)[::2]) for r in cands["record_id"]]
            cands["cluster_id"] = [m or c for m, c in zip(moved, cands["cluster_id"])]
        must, cannot = master.decisions(cur, batch_records + [master.split_record_id(r)[::2]
                                                               for r in cands["record_id"]])
        tf = master.term_counts(cur, terms)

        batch_in = feats.copy()
        batch_in["record_id"] = batch["record_id"].to_numpy()
        prev_col = [previous.get(k) for k in batch_records]
        batch_in["cluster_id"] = pd.Series(prev_col, dtype=object)
        res = engine.resolve(batch_in, settings, cands if len(cands) else None, must_link=must, cannot_link=cannot,
                             tf_counts=tf, estimate=len(batch) >= ESTIMATE_MIN_BATCH)
        existing = {c for c in prev_col if c} | set(cands["cluster_id"]) if len(cands) else {c for c in prev_col if c}

        def customer(cluster: str) -> str:
            return cluster if cluster in existing else str(master.new_customer_id(cluster))

        a = res.assignments
        out_rows = []
        counts = {"linked": 0, "merged": 0, "review": 0, "new": 0}
        new_customers: set[str] = set()
        for (rid, source, stream, pk), prev, cluster, dec, prob, expl, norm in zip(
                batch[["record_id", "source", "stream", "source_pk"]].itertuples(index=False, name=None), prev_col,
                a["cluster_id"], a["decision"], a["probability"], a["explanation"], resolved_cols):
            decision, rule = _decision(rid, dec, cluster, prev, existing)
            if rule == "engine_match" and isinstance(expl, dict) and expl.get("rule") == "must_link":
                rule = "steward_same"
            cid = customer(cluster)
            counts[decision] += 1
            if cid not in existing:
                new_customers.add(cid)
            out_rows.append((run_id, source, stream, pk, cid, decision, rule, float(prob), _json(expl or {}),
                             norm["full_name"], norm["name_key"], norm["phone_raw"], norm["phone_e164"],
                             norm["phone_kind"], norm["phone_ext"], norm["email"], norm["email_valid"]))
        staging.copy_rows(
            cur, "stg.resolved",
            ["run_id", "source", "stream", "source_pk", "customer_id", "decision", "match_rule", "match_score",
             "explanation", "full_name", "name_key", "phone_raw", "phone_e164", "phone_kind", "phone_ext",
             "email", "email_valid"], out_rows)
        staging.copy_rows(
            cur, "stg.identity_input", ["run_id", "source", "stream", "source_pk", *IDENTITY_COLUMNS],
            ((run_id, *row) for row in batch[["source", "stream", "source_pk", *IDENTITY_COLUMNS]]
             .itertuples(index=False, name=None)))
        if len(all_rows):
            keyed = pd.DataFrame({"pos": all_rows, "key": all_keys}).drop_duplicates()
            staging.copy_rows(
                cur, "stg.match_key", ["run_id", "source", "stream", "source_pk", "key"],
                zip([run_id] * len(keyed), batch["source"].to_numpy()[keyed["pos"]],
                    batch["stream"].to_numpy()[keyed["pos"]], batch["source_pk"].to_numpy()[keyed["pos"]],
                    keyed["key"]))
        review = res.review_pairs
        staging.copy_rows(
            cur, "stg.review_pair", ["run_id", "source", "record_a", "record_b", "probability", "reason",
                                     "explanation"],
            ((run_id, cfg.source, min(ra, rb), max(ra, rb), float(p), reason, _json(ex))
             for ra, rb, p, reason, ex in review[["record_a", "record_b", "probability", "reason", "explanation"]]
             .itertuples(index=False, name=None)))
        merges = res.cluster_merges
        staging.copy_rows(
            cur, "stg.cluster_merge", ["run_id", "source", "survivor", "absorbed", "record_a", "record_b",
                                       "probability", "explanation"],
            ((run_id, cfg.source, customer(s), customer(ab), ra, rb, float(p), _json(ex))
             for s, ab, ra, rb, p, ex in merges[["survivor", "absorbed", "record_a", "record_b", "probability",
                                                 "explanation"]].itertuples(index=False, name=None)))
        for table in ("stg.resolved", "stg.identity_input", "stg.match_key"):
            staging.analyze(cur, table)
        runlog.update(cur, run_id, cfg.source, ids_linked=counts["linked"], ids_merged=counts["merged"],
                      ids_new=len(new_customers), ids_review=len(review))
        log.info("resolve %s/%s: %d records (%d master candidates): %s, %d new customers, %d review pairs, "
                 "%d customer merges; engine %s", cfg.source, run_id, len(batch), len(cands), counts,
                 len(new_customers), len(review), len(merges), res.stats.get("seconds"))
    return ResolveResult(records=len(batch), linked=counts["linked"], merged=counts["merged"],
                         new=len(new_customers), review=len(review), cluster_merges=len(merges))
