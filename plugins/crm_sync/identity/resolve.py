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
  `review` (a new customer, with an open question to a steward), `new`;
- nothing is estimated here: m/u and the prior are the latest stored estimate (`crm.match_params`,
  written by `estimate`, i.e. `crm-sync identity estimate`) for the source, else for the whole
  master, else the match config's; the log line names which;
- each identity value is normalised once (`features.build`): the columns of `stg.resolved` are
  read from the engine's own features; explanations are built and written a slice at a time.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

import msgspec
import numpy as np
import pandas as pd

from crm_sync import paths, runlog, staging
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.identity import engine, features, master, normalize, scoring
from crm_sync.identity.settings import Settings, load_settings

log = logging.getLogger(__name__)

IDENTITY_COLUMNS = ["name", "phone", "email", "company", "city"]
# Records per slice when writing stg.resolved: bounds the explanations held at once.
WRITE_SLICE = 50_000
# Records per COPY of their match keys (about nine keys each): bounds the keys held at once.
KEY_SLICE = 100_000
# Master records `crm-sync identity estimate` reads by default (a random sample beyond that).
ESTIMATE_SAMPLE = 200_000


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


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# msgspec's encoder (already a pinned dependency): a nightly run writes a million explanations, and
# this takes 0.7 us where `json.dumps` took 5.9 us each. Like `json.dumps(ensure_ascii=False)` it
# writes UTF-8 text and keys in order; a NaN becomes null (which jsonb accepts) instead of NaN, a
# datetime RFC 3339 text.
_ENCODER = msgspec.json.Encoder(enc_hook=_json_default)


def _json(value) -> str:
    return _ENCODER.encode(value).decode()


# ----------------------------------------------------------------------------- the run's records

def _value_sql(cur, key: str | None) -> str:
    """A payload's identity value as text; NULL when absent or of a shape no identity can be read
    from (an object, a list, a boolean): the map stage quarantines such a record, naming the field."""
    if not key:
        return "null::text"
    k = cur.mogrify("%s", (key,)).decode()
    return f"case when jsonb_typeof(payload -> {k}) in ('string', 'number') then payload ->> {k} end"


def _clean(values: pd.Series) -> np.ndarray:
    text = values.astype("string").str.strip()
    return text.astype(object).where(text.notna() & (text != ""), None).to_numpy(dtype=object)


def _records(cur, run_id: str, cfg: SourceConfig, streams: list[StreamConfig]) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The run's customer records as engine input columns, and per phone field of the identity
    keys the field's own text (`phone_raw` is the field the record's phone was read from).

    Read with COPY into columns: a million payloads never become Python dicts."""
    frames: list[pd.DataFrame] = []
    width = max((len(s.identity.phones) for s in streams), default=0)
    for stream in streams:
        keys = stream.identity
        phone_cols = [f"phone_{k}" for k in range(width)]
        exprs = [_value_sql(cur, key) for key in (keys.name, keys.email, keys.company, keys.city)]
        exprs += [_value_sql(cur, keys.phones[k] if k < len(keys.phones) else None) for k in range(width)]
        query = cur.mogrify(f"select source_pk, {', '.join(exprs)} from stg.extracted"
                            " where run_id = %s and source = %s and stream = %s order by source_pk",
                            (run_id, cfg.source, stream.name)).decode()
        buf = io.BytesIO()
        cur.copy_expert(f"copy ({query}) to stdout with (format csv, encoding 'utf8')", buf)
        names = ["source_pk", "name", "email", "company", "city", *phone_cols]
        if not buf.tell():
            continue    # no record of this stream in the run (read_csv cannot read an empty text)
        buf.seek(0)
        frame = pd.read_csv(buf, header=None, names=names, dtype=str, keep_default_na=False,
                            na_values={c: [""] for c in names[1:]}, encoding="utf-8")
        del buf
        frame.insert(0, "stream", stream.name)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["record_id", "source", "stream", "source_pk", *IDENTITY_COLUMNS]), []
    raw = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    del frames
    n = len(raw)
    phone_fields: list[np.ndarray] = []
    for k in range(width):
        text = raw[f"phone_{k}"]
        # the field as the source wrote it, unless there is no text in it
        phone_fields.append(np.where(pd.isna(_clean(text)), None, text.to_numpy(dtype=object)))
    stripped = [_clean(raw[f"phone_{k}"]) for k in range(width)]
    if width == 0:
        phone = np.full(n, None, dtype=object)
    elif width == 1:
        phone = stripped[0]
    else:
        phone = np.array([" / ".join(p for p in ps if p is not None) or None for ps in zip(*stripped)], dtype=object)
    del stripped
    source_pk = raw["source_pk"].to_numpy(dtype=object)
    stream_col = raw["stream"].to_numpy(dtype=object)
    batch = pd.DataFrame({
        "record_id": (cfg.source + "/" + raw["stream"] + "/" + raw["source_pk"]).to_numpy(dtype=object),
        "source": np.full(n, cfg.source, dtype=object), "stream": stream_col, "source_pk": source_pk,
        "name": _clean(raw["name"]), "phone": phone, "email": _clean(raw["email"]),
        "company": _clean(raw["company"]), "city": _clean(raw["city"]),
    }, columns=["record_id", "source", "stream", "source_pk", *IDENTITY_COLUMNS], dtype=object)
    return batch, phone_fields


def _objects(values: pd.Series) -> np.ndarray:
    """An object array with None for a missing value (pandas may hold text columns with NaN)."""
    arr = values.to_numpy(dtype=object)
    missing = pd.isna(arr)
    if missing.any():
        arr = arr.copy()
        arr[missing] = None
    return arr


def _reader(settings: Settings, normaliser: str, column: str, city: str | None = None) -> str | None:
    """The configured field that normalises `column` as `normaliser` (its features are the record's)."""
    for spec in settings.fields:
        if (spec.normaliser == normaliser and spec.source_columns == [column]
                and (normaliser != "phone" or spec.city_column == city)):
            return spec.name
    return None


def _record_columns(batch: pd.DataFrame, feats: pd.DataFrame, phone_fields: list[np.ndarray],
                    settings: Settings) -> dict[str, np.ndarray]:
    """The normalised columns of stg.resolved, from the features the engine computed (each value was
    normalised once); a column no configured field reads is normalised here, once per distinct value."""
    def outputs(normaliser: str, column: str, city: str | None = None) -> dict[str, np.ndarray]:
        name = _reader(settings, normaliser, column, city)
        if name is not None:
            return {attr: _objects(feats[f"{name}.{attr}"]) for attr in features._OUTPUTS[normaliser]}
        return features.normalise_column(normaliser, batch[column], batch[city] if city else None)

    name = outputs("person_name", "name")
    email = outputs("email", "email")
    phone = outputs("phone", "phone", "city")
    kind = np.where(pd.isna(phone["kind"]), "empty", phone["kind"]).astype(object)
    # the field the record's phone came from: the first holding the chosen number (as
    # `normalize_phone` of each field would rank them), else the first with any text
    phone_raw = np.full(len(batch), None, dtype=object)
    several = np.zeros(len(batch), dtype=np.int8)
    for field in reversed(phone_fields):
        present = pd.notna(field)
        phone_raw = np.where(present, field, phone_raw)
        several += present
    for r in np.flatnonzero((several > 1) & pd.notna(phone["part"])).tolist():
        part = phone["part"][r]
        for field in phone_fields:
            if field[r] is not None and part in normalize.phone_parts(field[r]):
                phone_raw[r] = field[r]
                break
    return {"full_name": name["full"], "name_key": name["key"], "phone_raw": phone_raw, "phone_e164": phone["e164"],
            "phone_kind": kind, "phone_ext": phone["ext"], "email": email["text"],
            "email_valid": np.asarray(email["valid"], dtype=bool)}


def term_aliases(settings: Settings) -> dict[str, str]:
    """Blocking rules whose key is one whole term column ('mobile.value'): rule name -> column. Such a
    column's term keys would repeat the rule's key value for value (a million records, two million
    index entries more), so its term frequencies are counted on the rule's 'b:' keys instead."""
    terms = set(settings.tf_columns())
    aliases: dict[str, str] = {}
    for rule in settings.blocking:
        if len(rule.keys) == 1 and not rule.keys[0].prefix and rule.keys[0].column in terms:
            aliases.setdefault(rule.name, rule.keys[0].column)
    return aliases


def record_keys(feats: pd.DataFrame, settings: Settings) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per blocking rule and term column: (row positions of `feats`, their key values), where a
    blocking key is 'b:<rule>=<v>' and a term 't:<col>=<v>'. One rule at a time, so a million
    records never hold all their keys at once."""
    n = len(feats)
    seen: set[str] = set()
    for rule in settings.blocking:
        if rule.name in seen:
            continue
        seen.add(rule.name)
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
        yield pos, (f"b:{rule.name}=" + joined.iloc[pos]).to_numpy(dtype=object)
    aliased = set(term_aliases(settings).values())
    for column in settings.tf_columns():
        if column in aliased:
            continue    # its blocking key is the same value: term counts read that key (`term_aliases`)
        values = pd.Series(feats[column].to_numpy(dtype=object), dtype=object)
        pos = np.flatnonzero(values.notna().to_numpy())
        yield pos, (f"t:{column}=" + values.iloc[pos].astype(str)).to_numpy(dtype=object)


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class StoredParams:
    params_id: int
    source: str | None
    params: dict
    matches_per_record: float | None
    records: int
    estimated_at: Any

    def describe(self) -> str:
        scope = f"source {self.source}" if self.source else "the whole master"
        return (f"stored estimate #{self.params_id} ({scope}, {self.records:,} records, "
                f"{self.estimated_at:%Y-%m-%d %H:%M%z})")


def stored_params(cur, settings: Settings, source: str | None) -> StoredParams | None:
    """The latest estimate of the match config for `source`, else for the whole master, else None."""
    cur.execute(
        """select params_id, source, params, matches_per_record, records, estimated_at from crm.match_params
           where config = %s and (source = %s or source is null)
           order by source is null, estimated_at desc, params_id desc limit 1""",
        (settings.name, source),
    )
    row = cur.fetchone()
    return StoredParams(*row) if row else None


def run_params(stored: StoredParams | None, settings: Settings, records: int) -> scoring.Params | None:
    """The engine's parameters for a run over `records` records (batch and candidates): None means the
    config's (the engine scales their prior itself); a stored estimate's prior is scaled the same way."""
    if stored is None:
        return None
    params = scoring.Params.from_dict(stored.params, settings)
    if stored.matches_per_record:
        params.prior = min(0.5, stored.matches_per_record / max(records - 1, 1))
    params.origin = {"m": stored.describe(), "u": stored.describe(),
                     "prior": f"{stored.describe()}: matches_per_record {stored.matches_per_record or 0:g} "
                              f"/ ({records} records - 1)" if stored.matches_per_record else stored.describe()}
    return params


def estimate(conn, source: str | None = None, sample: int = ESTIMATE_SAMPLE, by: str = "crm-sync",
             seed: int = 20240601) -> dict:
    """Estimate m/u and the prior by EM over (a random sample of) the master's records, store them in
    `crm.match_params` and return a summary. The resolve stage uses the latest from its next run."""
    settings = match_settings()
    where, args = ("where source = %s", [source]) if source else ("", [])
    with conn.cursor() as cur:
        cur.execute(f"select count(*) from crm.source_identity {where}", args)
        population = int(cur.fetchone()[0])
        if population < settings.estimation.min_records:
            scope = f"source '{source}'" if source else "the master"
            raise ValueError(f"{scope} holds {population:,} records: too few to estimate m/u "
                             f"(estimation.min_records is {settings.estimation.min_records:,}); the match config's "
                             "values stay in use")
        sampled = ""
        if population > sample:
            percent = 100.0 * sample / population
            sampled = cur.mogrify(" tablesample bernoulli (%s) repeatable (%s)", (percent, seed)).decode()
        cur.execute(f"""select source || '/' || stream || '/' || source_id, name, phone, email, company, city
                        from crm.source_identity{sampled} {where}""", args)
        records = pd.DataFrame(cur.fetchall(), columns=["record_id", *IDENTITY_COLUMNS], dtype=object)
    t0 = time.perf_counter()
    res = engine.resolve(records, settings, estimate=True, explain=False)
    if "note" in res.params.origin or not res.stats.get("em_sessions"):
        raise ValueError(f"estimation did not run on {len(records):,} sampled records: "
                         f"{res.params.origin.get('note', 'no candidate pairs')}")
    doc = res.params.to_dict(settings)
    # the sample's prior as other records of one person per record in the population it was drawn
    # from: a run scales it to its own size, as the config's matches_per_record
    per_record = float(res.params.prior) * (population - 1)
    stats = {"population": population, "sampled": len(records), "candidate_pairs": res.stats["candidate_pairs"],
             "u_pairs_sampled": res.stats.get("u_pairs_sampled"), "em_sessions": res.stats.get("em_sessions"),
             "blocked_match_rate": res.stats.get("blocked_match_rate"), "seconds": round(time.perf_counter() - t0, 1)}
    with conn.cursor() as cur:
        cur.execute(
            """insert into crm.match_params (config, source, params, matches_per_record, records, stats, estimated_by)
               values (%s, %s, %s, %s, %s, %s, %s) returning params_id, estimated_at""",
            (settings.name, source, _json(doc), per_record, len(records), _json(stats), by),
        )
        params_id, at = cur.fetchone()
    conn.commit()
    return {"params_id": params_id, "config": settings.name, "source": source, "estimated_at": at,
            "records": len(records), "matches_per_record": per_record, **stats, "params": doc}


# ----------------------------------------------------------------------------- the stage

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


def _stage_match_keys(cur, run_id: str, batch: pd.DataFrame, feats: pd.DataFrame, settings: Settings) -> None:
    """Every record's blocking and term keys (`record_keys`) into stg.match_key, `KEY_SLICE` records
    at a time, each record's keys together and the records in the batch's order (by stream and
    source id, as `_records` reads them). The table's primary key (run_id, source, stream, source_pk,
    key) then grows near its right edge; written rule by rule, every rule's rows swept the whole index
    again (1M records, 8.7M keys: 31.6 s of the server's time in rule order, 13.2 s in this one)."""
    source, stream, pk = (batch[c].to_numpy(dtype=object) for c in ("source", "stream", "source_pk"))
    for start in range(0, len(batch), KEY_SLICE):
        parts = list(record_keys(feats.iloc[start:start + KEY_SLICE], settings))
        if not parts:
            break
        pos = np.concatenate([p for p, _ in parts])
        keys = np.concatenate([k for _, k in parts])
        del parts
        order = np.argsort(pos, kind="stable")    # record by record, each record's keys in rule order
        pos, keys = pos[order] + start, keys[order]
        del order
        staging.copy_rows(cur, "stg.match_key", ["run_id", "source", "stream", "source_pk", "key"],
                          zip([run_id] * len(pos), source[pos], stream[pos], pk[pos], keys))
    staging.analyze(cur, "stg.match_key")


def _stage_identity_input(cur, run_id: str, batch: pd.DataFrame, feats: pd.DataFrame, settings: Settings,
                          version: str) -> None:
    """Each record's identity input with its engine features (`features.stored_features`): the load
    stores both in `crm.source_identity`, so later runs read this record's features, not rebuild them."""
    def rows() -> Iterator[tuple]:
        cols = [batch[c].to_numpy(dtype=object) for c in ("source", "stream", "source_pk", *IDENTITY_COLUMNS)]
        for start in range(0, len(batch), WRITE_SLICE):
            part = slice(start, start + WRITE_SLICE)
            stored = features.stored_features(feats.iloc[part], settings)
            yield from zip([run_id] * len(stored), *(c[part].tolist() for c in cols), [version] * len(stored),
                           stored)

    staging.copy_rows(cur, "stg.identity_input", ["run_id", "source", "stream", "source_pk", *IDENTITY_COLUMNS,
                                                  "match_version", "match_features"], rows())
    staging.analyze(cur, "stg.identity_input")


def master_features(cands: pd.DataFrame, settings: Settings, version: str) -> pd.DataFrame:
    """The master candidates as the engine reads them: record and cluster ids with the engine's feature
    columns — stored ones where their version is current, normalised here for the rest (records
    stored before migration 0014, or under another match config or normaliser version)."""
    columns = features.engine_columns(settings)
    stored = (cands["match_version"] == version).to_numpy(dtype=bool) & cands["match_features"].notna().to_numpy()
    parts = []
    if stored.any():
        part = features.from_stored(cands["match_features"].to_numpy(dtype=object)[stored].tolist(), settings)
        part.index = np.flatnonzero(stored)
        parts.append(part)
    if not stored.all():
        rebuilt = features.build(cands.loc[~stored, ["record_id", *IDENTITY_COLUMNS]].reset_index(drop=True),
                                 settings)[columns]
        rebuilt.index = np.flatnonzero(~stored)
        parts.append(rebuilt)
    out = (parts[0] if len(parts) == 1 else pd.concat(parts).sort_index()).reset_index(drop=True)
    out.insert(0, "record_id", cands["record_id"].to_numpy(dtype=object))
    out.insert(1, "cluster_id", cands["cluster_id"].to_numpy(dtype=object))
    log.info("resolve: %d master candidates, %d with stored features, %d normalised in this run",
             len(cands), int(stored.sum()), int((~stored).sum()))
    return out


def resolve(conn, run_id: str, cfg: SourceConfig) -> ResolveResult:
    settings = match_settings()
    streams = [s for s in cfg.streams if s.entity == "customer"]
    with conn.cursor() as cur:
        for table in ("stg.resolved", "stg.identity_input", "stg.match_key"):
            for stream in streams:
                staging.delete_run(cur, table, run_id, cfg.source, stream.name)
        for table in ("stg.review_pair", "stg.cluster_merge"):
            staging.delete_run(cur, table, run_id, cfg.source)
        batch, phone_fields = _records(cur, run_id, cfg, streams) if streams else (pd.DataFrame(), [])
        if batch.empty:
            runlog.update(cur, run_id, cfg.source, ids_linked=0, ids_merged=0, ids_new=0, ids_review=0)
            return ResolveResult(records=0, linked=0, merged=0, new=0)

        feats = features.build(batch[["record_id", *IDENTITY_COLUMNS]], settings)
        own = _record_columns(batch, feats, phone_fields, settings)
        del phone_fields
        version = features.match_version(settings)
        _stage_match_keys(cur, run_id, batch, feats, settings)
        _stage_identity_input(cur, run_id, batch, feats, settings, version)
        # from here on the engine reads features only: a nightly million records' raw identity input and
        # the feature columns no comparison reads would otherwise stay in memory through the engine
        batch.drop(columns=IDENTITY_COLUMNS, inplace=True)
        engine_cols = set(features.engine_columns(settings))
        feats.drop(columns=[c for c in feats.columns if c not in engine_cols], inplace=True)

        # the master as it will be once this run's load executes the pending splits
        batch_records = list(zip(batch["source"], batch["source_pk"]))
        previous = master.current_customers(cur, batch_records)
        partners = master.decided_partners(cur, batch_records)
        rule_caps = {r.name: r.max_block_size or settings.max_block_size for r in settings.blocking}
        cands = master.candidates(cur, run_id, cfg.source, len(batch), settings.max_block_size, partners,
                                  [s.name for s in streams], rule_caps)
        cand_records = [master.split_record_id(r)[::2] for r in cands["record_id"]]
        splits = {}
        for s in master.pending_splits(cur, batch_records + cand_records):
            splits.setdefault((s.source, s.source_id), str(s.to_customer))
        previous = {k: splits.get(k, v) for k, v in previous.items()}
        if len(cands):
            moved = [splits.get(r) for r in cand_records]
            cands["cluster_id"] = [m or c for m, c in zip(moved, cands["cluster_id"])]
        must, cannot = master.decisions(cur, batch_records + cand_records)
        del cand_records
        tf = master.term_counts(cur, run_id, cfg.source, len(batch), term_aliases(settings))

        stored = stored_params(cur, settings, cfg.source)
        params = run_params(stored, settings, len(batch) + len(cands))
        prev_col = np.array([previous.get(k) for k in batch_records], dtype=object)
        del batch_records, previous
        feats["record_id"] = batch["record_id"].to_numpy()
        feats["cluster_id"] = pd.Series(prev_col, dtype=object)
        res = engine.resolve(feats, settings, master_features(cands, settings, version) if len(cands) else None,
                             must_link=must, cannot_link=cannot,
                             tf_counts=tf, estimate=False, params=params, explain=False)
        del feats
        existing = {c for c in prev_col if c is not None}
        if len(cands):
            existing |= set(cands["cluster_id"])
        n_cands = len(cands)
        del cands

        def customer(cluster: str) -> str:
            return cluster if cluster in existing else master.new_customer_id_text(cluster)

        a = res.assignments
        counts = {"linked": 0, "merged": 0, "review": 0, "new": 0}
        new_customers: set[str] = set()
        record_cols = ("full_name", "name_key", "phone_raw", "phone_e164", "phone_kind", "phone_ext", "email",
                       "email_valid")

        def resolved_rows() -> Iterator[tuple]:
            for start in range(0, len(batch), WRITE_SLICE):
                stop = min(start + WRITE_SLICE, len(batch))
                part = slice(start, stop)
                explanations = res.explanations(start, stop)
                cols = [batch[c].to_numpy(dtype=object)[part].tolist() for c in ("record_id", "stream", "source_pk")]
                cols += [prev_col[part].tolist(), a["cluster_id"].to_numpy(dtype=object)[part].tolist(),
                         a["decision"].to_numpy(dtype=object)[part].tolist(),
                         a["probability"].to_numpy(dtype=float)[part].tolist()]
                cols += [own[c][part].tolist() for c in record_cols]
                for (rid, stream, pk, prev, cluster, dec, prob, *norm), expl in zip(zip(*cols), explanations):
                    decision, rule = _decision(rid, dec, cluster, prev, existing)
                    if rule == "engine_match" and expl.get("rule") == "must_link":
                        rule = "steward_same"
                    cid = customer(cluster)
                    counts[decision] += 1
                    if cid not in existing:
                        new_customers.add(cid)
                    yield (run_id, cfg.source, stream, pk, cid, decision, rule, prob, _json(expl), *norm)
                del explanations, cols

        staging.copy_rows(
            cur, "stg.resolved",
            ["run_id", "source", "stream", "source_pk", "customer_id", "decision", "match_rule", "match_score",
             "explanation", *record_cols], resolved_rows())
        del own
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
        staging.analyze(cur, "stg.resolved")
        runlog.update(cur, run_id, cfg.source, ids_linked=counts["linked"], ids_merged=counts["merged"],
                      ids_new=len(new_customers), ids_review=len(review))
        log.info("resolve %s/%s: %d records (%d master candidates): %s, %d new customers, %d review pairs, "
                 "%d customer merges; parameters: %s; engine %s", cfg.source, run_id, len(batch), n_cands, counts,
                 len(new_customers), len(review), len(merges),
                 stored.describe() if stored else "the match config's (no stored estimate)", res.stats.get("seconds"))
    return ResolveResult(records=len(batch), linked=counts["linked"], merged=counts["merged"],
                         new=len(new_customers), review=len(review), cluster_merges=len(merges))
