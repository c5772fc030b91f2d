"""Offline identity resolution of one CSV (`crm-sync match --config FILE INPUT.csv --out OUT.csv`).

`match_csv(config_path, input_csv, out_csv)` reads every column as a string, runs the engine with
estimation on (falling back to the config's parameters below `estimation.min_records`), and
writes `record_id, cluster_id, decision, score`, one row per input record, in input order.
Guarantees:
- `decision` is `merged` (the record shares its cluster with another), `review` (alone in its
  cluster but in a review pair) or `new`; `score` is the best probability linking the record to
  its cluster, else its best review-pair probability, else 0;
- a missing `record_id` column, a duplicate or empty record id, or a config column absent from
  the CSV raises `SettingsError` naming the file and the column; nothing is written then;
- the output is written to a temporary file and renamed, so a failed run leaves no half CSV.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from crm_sync.identity import engine
from crm_sync.identity.settings import SettingsError, load_settings

OUTPUT_COLUMNS = ["record_id", "cluster_id", "decision", "score"]


def _read(input_csv: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(input_csv, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except FileNotFoundError:
        raise SettingsError(f"{input_csv}: input CSV not found") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SettingsError(f"{input_csv}: cannot read CSV: {exc}") from None


def match_csv(config_path: str | os.PathLike, input_csv: str | os.PathLike, out_csv: str | os.PathLike) -> str:
    """Resolve `input_csv` with the match config at `config_path`; returns a one-paragraph summary."""
    started = time.perf_counter()
    settings = load_settings(config_path)
    input_csv, out_csv = Path(input_csv), Path(out_csv)
    frame = _read(input_csv)
    rid = settings.record_id
    if rid not in frame.columns:
        raise SettingsError(f"{input_csv}: no '{rid}' column (columns: {list(frame.columns)})")
    missing = [c for c in settings.input_columns if c not in frame.columns]
    if missing:
        raise SettingsError(f"{input_csv}: column(s) {missing} named in {config_path} are not in the CSV "
                            f"(columns: {list(frame.columns)})")
    ids = frame[rid]
    if ids.isna().any():
        raise SettingsError(f"{input_csv}: column '{rid}' has empty values (rows {list(ids[ids.isna()].index[:5] + 2)})")
    dupes = ids[ids.duplicated()].unique()
    if len(dupes):
        raise SettingsError(f"{input_csv}: column '{rid}' has duplicate values, e.g. {list(dupes[:5])}")

    # a previous run's output columns in the input would be read as existing clusters
    result = engine.resolve(frame.drop(columns=["cluster_id"], errors="ignore"), settings,
                            estimate=True, explain=False)
    a = result.assignments
    score = a["probability"].where(a["decision"] != "new", 0.0).round(6)
    out = pd.DataFrame({"record_id": a["record_id"], "cluster_id": a["cluster_id"],
                        "decision": a["decision"], "score": score}, columns=OUTPUT_COLUMNS)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(out_csv.name + ".tmp")
    out.to_csv(tmp, index=False, encoding="utf-8")
    os.replace(tmp, out_csv)

    counts = out["decision"].value_counts()
    clusters = out["cluster_id"].nunique()
    stats = result.stats
    origin = stats["params_origin"]
    return (
        f"{len(out)} records -> {clusters} clusters: {counts.get('merged', 0)} merged, "
        f"{counts.get('review', 0)} review, {counts.get('new', 0)} new; "
        f"{stats['candidate_pairs']} candidate pairs, {len(result.review_pairs)} review pairs, "
        f"{stats['refused_edges']} merges refused as chains; "
        f"parameters: m {origin.get('m')}, u {origin.get('u')}"
        + (f" ({origin['note']})" if "note" in origin else "")
        + f"; wrote {out_csv} in {time.perf_counter() - started:.1f}s"
    )
